"""Rollout & flow: how attention mixes information across layers, four ways, for one token."""

from dataclasses import replace

import numpy as np
import streamlit as st

from backend.analyses.attention import OVERVIEW_BINS
from backend.analyses.rollout import FLOW_MAX_TOKENS, FlowParams
from backend.local_reductions import bin_matrix, exclude_first_token
from pages import shared
from pages.view_requests import rollout as requests, target_token
from pages.view_state import HEAD_FUSIONS
from viz import export
from viz.heatmap import DETAIL_MAX, attention_heatmap, binned_heatmap
from viz.reading_view import reading_view, text_pieces
from viz.token_text import highlighted_tokens
from viz.token_view import attention_bars


EXPLANATIONS = """
- **Raw attention**: the target token's row in the last layer, averaged over heads. It ignores
  everything earlier layers did, so it often points at the wrong tokens.
- **Rollout** (Abnar & Zuidema, 2020): multiplies each layer's head-fused attention, with half of
  each row kept on the token itself for the residual connection, from the first layer up. It
  assumes the residual stream and attention contribute equally, which they rarely do.
- **Flow** (Abnar & Zuidema, 2020): treats attention as a network of pipes and asks how much can
  flow from the target at the top to each input token (a maximum flow, computed exactly here).
  Flows saturate, so it spreads credit more evenly than rollout.
- **Gradient-weighted rollout** (Chefer, Gur & Wolf, 2021): weights each head's attention by the
  gradient of the model's output (the predicted next-token logit; for encoders, the token's
  similarity to the sentence embedding) and keeps only positive parts, so it is class- and
  output-specific.

Attention is not explanation (Jain & Wallace, 2019): these show where information *can* come
from, not why the model decided anything. Many models park attention on the first token (a
"sink"); excluding it and renormalising shows the rest more clearly.
"""


BARS_MAX = 512  # tokens drawn as bars; longer inputs read as shaded text only


def heatmap(matrix: np.ndarray, labels: list[str], title: str, key_offset: int = 0):
    """A (query, key) matrix; keys start at position `key_offset` (1 without the first token)."""
    keys = labels[key_offset:]
    if len(labels) <= DETAIL_MAX:
        return attention_heatmap(matrix, labels, keys, 0, key_offset, title=title, size=380)
    binned = bin_matrix(matrix, OVERVIEW_BINS)
    return binned_heatmap(binned.values, binned.query_edges, binned.key_edges + key_offset,
                          labels, title, size=380)


def scores_view(record, rows: dict, target: int, no_sink: bool) -> None:
    """Each method's row as shaded tokens (and bars up to BARS_MAX tokens)."""
    labels = record.meta["tokens"]
    offset = 1 if no_sink else 0
    shown_labels = labels[offset:]
    long_input = len(labels) > DETAIL_MAX
    pieces = text_pieces(record.text, record.meta["offsets"], labels)[offset:]
    columns = st.columns(2)
    for i, (name, row) in enumerate(rows.items()):
        with columns[i % 2]:
            if long_input:  # compact HTML: a few hundred kB at 8k tokens
                st.markdown(f"**{name}**")
                st.html(reading_view(pieces, row, offset, target))
            else:
                st.html(highlighted_tokens(shown_labels, row, name,
                                           highlight=target - offset if target >= offset
                                           else None))
            if len(labels) <= BARS_MAX:
                st.altair_chart(attention_bars(row, shown_labels, offset, name, target))


@shared.fragment
def rollout_view(record, results, state) -> None:
    meta, aid, labels = record.meta, record.id, record.meta["tokens"]
    n = len(labels)
    c1, c2 = st.columns([3, 2])
    c3, c4 = st.columns([3, 2])
    target = c1.selectbox("Target token", range(n), key="target", bind="query-params",
                          index=target_token(None, labels, meta["causal"]),
                          format_func=lambda i: f"{i} {labels[i]}",
                          help="Whose sources to trace: CLS for encoders, the last token for "
                               "causal LMs by default.")
    fusion = c2.segmented_control("Head fusion", HEAD_FUSIONS, default=FlowParams.head_fusion,
                                  key="fusion", bind="query-params") or FlowParams.head_fusion
    depth = c3.slider("Rollout after layer", 1, meta["n_layers"], meta["n_layers"], key="depth",
                      bind="query-params")
    no_sink = c4.toggle("Exclude first token", key="no_sink", bind="query-params",
                        help="Drop position 0 (an attention sink) and renormalise the rest, "
                             "in the scores and the full matrices.")

    service = shared.service()
    full_max = service.settings.full_matrix_max_tokens
    with st.spinner("Following the target through the layers…"):
        target_rows = service.target_rollout(aid, target, fusion)
    last_row = service.attention_row(aid, meta["n_layers"] - 1, None, target)
    rows = {"Raw attention (last layer)": last_row,
            f"Rollout (after layer {depth})": target_rows[depth - 1]}

    state = replace(state, a=aid, target=f"{target} {labels[target]}", fusion=fusion,
                    flow=state.flow or st.session_state.get(f"flow_{aid}", False))
    results = results.for_state(state)
    if "attention_flow" not in results and n <= FLOW_MAX_TOKENS:
        asked = results.for_state(replace(state, flow=True))
        if service.cached(asked.request("attention_flow")) or st.button(
                f"Compute attention flow ({n} tokens: may take a minute or more)"):
            st.session_state[f"flow_{aid}"] = True
            state, results = asked.state, asked
    elif n > FLOW_MAX_TOKENS:
        st.info(f"Attention flow is offered up to {FLOW_MAX_TOKENS} tokens ({n:,} here).")
    flow_id = results.get("attention_flow", "Attention flow")
    flow = None
    if flow_id:
        raw = service.array(flow_id, "flow")
        flow = raw / np.where(raw.sum(1, keepdims=True) > 0, raw.sum(1, keepdims=True), 1)
        rows["Flow"] = flow[target]
    gradient = None
    if "gradient_rollout" in results:
        grad_id = results.get("gradient_rollout", "Gradient-weighted rollout")
        gradient = service.array(grad_id, "gradient_rollout") if grad_id else None
    else:
        st.info(f"Gradient-weighted rollout and the full matrices are offered up to "
                f"{full_max:,} tokens ({n:,} here): raw attention and the target's rollout "
                "are exact at any length.")
    if gradient is not None:
        rows["Gradient-weighted rollout"] = gradient[-1, target]

    if no_sink:
        rows = {name: exclude_first_token(row) for name, row in rows.items()}
    offset = 1 if no_sink else 0
    sink_note = " (first token excluded, renormalised)" if no_sink else ""
    st.subheader(f"Where {target} {labels[target]} draws from{sink_note}")
    scores_view(record, rows, target, no_sink)

    if n <= full_max:
        with st.expander(f"Full (query × key) matrices{sink_note}", expanded=n <= 48):
            matrices = {f"Rollout after layer {depth}": service.rollout(aid, fusion)[depth - 1]}
            if flow is not None:
                matrices["Flow (rows normalised)"] = flow
            if gradient is not None:
                matrices["Gradient-weighted rollout"] = gradient[-1]
            for column, (name, matrix) in zip(st.columns(3), matrices.items()):
                shown = exclude_first_token(matrix) if no_sink else matrix
                column.altair_chart(heatmap(shown, labels, name, offset))
    with st.expander("What these methods are, and their caveats"):
        st.markdown(EXPLANATIONS)
    with st.expander("Export and share", expanded=True):
        table = np.stack(list(rows.values()), axis=1)
        shown_labels = labels[offset:]
        st.download_button("CSV of the scores", lambda: export.matrix_csv(
            table, [f"{i + offset} {t}" for i, t in enumerate(shown_labels)], list(rows)),
            file_name=f"rollout_target{target}.csv", mime="text/csv")
        shared.share_link({**shared.view_state.to_query(state), "depth": depth,
                           "no_sink": "true" if no_sink else None})


def render(results, state) -> None:
    st.header("Rollout & flow")
    current = shared.require_analysis()
    if current:
        rollout_view(current, results, state)


if __name__ == "__main__":
    shared.show("rollout", requests, render)

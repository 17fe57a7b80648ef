"""Rollout & flow: how attention mixes information across layers, four ways, for one token."""

import numpy as np
import streamlit as st

from backend.analyses import AnalysisRequest
from backend.analyses.rollout import AUTO_FLOW_TOKENS, FLOW_MAX_TOKENS
from pages import shared
from viz import export
from viz.heatmap import attention_heatmap, binned_heatmap
from viz.token_text import highlighted_tokens
from viz.token_view import attention_bars

DETAIL_MAX = 96
FUSIONS = ["mean", "max", "min"]

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


def heatmap(matrix: np.ndarray, labels: list[str], title: str):
    if len(labels) <= DETAIL_MAX:
        return attention_heatmap(matrix, labels, labels, title=title, size=380)
    binned = shared.service().bin(matrix, 64)
    return binned_heatmap(binned.values, binned.query_edges, binned.key_edges, labels, title,
                          size=380)


st.header("Rollout & flow")
record = shared.require_analysis()
if record:
    meta, aid, labels = record.meta, record.id, record.meta["tokens"]
    n = len(labels)
    default_target = n - 1 if meta["causal"] else 0
    c1, c2, c3, c4 = st.columns([3, 2, 3, 2])
    target = c1.selectbox("Target token", range(n), index=default_target, key="target",
                          bind="query-params", format_func=lambda i: f"{i} {labels[i]}",
                          help="Whose sources to trace: CLS for encoders, the last token for "
                               "causal LMs by default.")
    fusion = c2.segmented_control("Head fusion", FUSIONS, default="mean", key="fusion",
                                  bind="query-params") or "mean"
    depth = c3.slider("Rollout after layer", 1, meta["n_layers"], meta["n_layers"], key="depth",
                      bind="query-params")
    no_sink = c4.toggle("Exclude first token", key="no_sink", bind="query-params",
                        help="Drop position 0 (an attention sink) and renormalise the rest.")

    service = shared.service()
    rollout = service.rollout(aid, fusion)
    last_layer = service.attention_matrix(aid, meta["n_layers"] - 1, None)
    rows = {"Raw attention (last layer)": last_layer[target],
            f"Rollout (after layer {depth})": rollout[depth - 1, target]}

    flow_id = None
    if n > FLOW_MAX_TOKENS:
        st.info(f"Attention flow is offered up to {FLOW_MAX_TOKENS} tokens ({n} here).")
    elif n <= AUTO_FLOW_TOKENS or st.session_state.get(f"flow_{aid}") or \
            st.button(f"Compute attention flow ({n} tokens: may take a minute or more)"):
        st.session_state[f"flow_{aid}"] = True
        flow_id = shared.derived(AnalysisRequest.make("attention_flow", record.model,
                                                      record.text, head_fusion=fusion),
                                 "Attention flow")
    flow = None
    if flow_id:
        raw = service.array(flow_id, "flow")
        flow = raw / np.where(raw.sum(1, keepdims=True) > 0, raw.sum(1, keepdims=True), 1)
        rows["Flow"] = flow[target]
    grad_id = shared.derived(AnalysisRequest.make("gradient_rollout", record.model, record.text,
                                                  target=int(target)),
                             "Gradient-weighted rollout")
    gradient = service.array(grad_id, "gradient_rollout") if grad_id else None
    if gradient is not None:
        rows["Gradient-weighted rollout"] = gradient[-1, target]

    shown_labels = labels[1:] if no_sink else labels
    if no_sink:
        rows = {name: service.without_first_token(row) for name, row in rows.items()}
    offset = 1 if no_sink else 0
    sink_note = " (first token excluded, renormalised)" if no_sink else ""
    st.subheader(f"Where {target} {labels[target]} draws from{sink_note}")
    columns = st.columns(2)
    for i, (name, row) in enumerate(rows.items()):
        with columns[i % 2]:
            st.html(highlighted_tokens(shown_labels, row, name,
                                       highlight=target - offset if target >= offset else None))
            st.altair_chart(attention_bars(row, shown_labels, offset, name, target))

    with st.expander("Full (query × key) matrices", expanded=n <= 48):
        m1, m2, m3 = st.columns(3)
        m1.altair_chart(heatmap(rollout[depth - 1], labels, f"Rollout after layer {depth}"))
        if flow is not None:
            m2.altair_chart(heatmap(flow, labels, "Flow (rows normalised)"))
        if gradient is not None:
            m3.altair_chart(heatmap(gradient[-1], labels, "Gradient-weighted rollout"))
    with st.expander("What these methods are, and their caveats"):
        st.markdown(EXPLANATIONS)
    with st.expander("Export and share", expanded=True):
        table = np.stack(list(rows.values()), axis=1)
        st.download_button("CSV of the four scores", lambda: export.matrix_csv(
            table, [f"{i + offset} {t}" for i, t in enumerate(shown_labels)], list(rows)),
            file_name=f"rollout_target{target}.csv", mime="text/csv")
        shared.share_link({"a": aid, "target": f"{target} {labels[target]}", "fusion": fusion,
                           "depth": depth, "no_sink": "true" if no_sink else None})

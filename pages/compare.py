"""Compare: two analyses side by side (two texts, two models, or two heads of one analysis), their
difference where tokens align, and the heads or layers that changed most."""

from dataclasses import replace

import numpy as np
import streamlit as st

from backend.analyses import AnalysisRequest
from backend.local_reductions import (bin_matrix, divergence, matching_layer, spearman,
                                     top_cells)
from backend.service import DEFAULT_CAUSAL
from pages import shared
from pages.examples import COMPARISON_EXAMPLE
from pages.view_requests import compare as requests
from viz.comparison import difference_heatmap, paired_bars, picked_cell, score_grid
from viz.heatmap import attention_heatmap, binned_heatmap

B_PARAM = shared.COMPARE_PARAM
DETAIL_MAX = 64  # units per side drawn cell by cell (two maps share the width); more are binned
MEAN = "mean"
TEXTS, MODELS, HEADS = "Two texts, one model", "One text, two models", "Two heads of one analysis"
LEVEL_TITLES = {"tokens": "tokens", "spans": "character spans", "words": "words"}
TOP_HEADS = 5

EXPLANATIONS = """
- **Alignment.** Two inputs rarely have the same tokens. With one tokenizer, tokens are matched
  (where a run of tokens is swapped for as many others, they pair up by position:
  "big→small"); across tokenizers,
  tokens are grouped into the finest **character spans** both tokenizations cut at, or into
  **words**. Tokens without a counterpart (a BOS token only one model adds, a word only one text
  has) drop out, so aligned rows can sum to less than one.
- **Difference (B − A).** Each aligned query row is the mean of its tokens' rows; each key column
  the sum of its tokens' columns. Red: B attends more; blue: A does.
- **Divergence.** The Jensen-Shannon divergence (bits, 0 = same, 1 = disjoint) between the two
  sides' attention rows, renormalised, averaged over queries. The grid points at the heads or
  layers whose pattern changed most. Heads are compared by position when both models have the
  same shape: meaningful for one model, or a model and its fine-tune; models of different shapes
  are compared layer against layer.
- **Rollout and head importance** compare the same way when both sides have them.

Caveats: attention weights are not explanations; a change of pattern need not change the output.
Different models can put their attention sink on different tokens (a BOS token only one of them
has, or the first word): the first column then differs for reasons unrelated to meaning, and a
sink token without a counterpart drops out of the comparison.
"""


def _side_labels(record, layer: int, head: int | None) -> str:
    return (f"{record.meta['model_label']} · layer {layer}, "
            f"{'mean of heads' if head is None else f'head {head}'}")


def _heatmap(record, layer: int, head: int | None, title: str):
    labels = record.meta["tokens"]
    if len(labels) <= DETAIL_MAX:
        matrix = shared.service().attention_matrix(record.id, layer, head)
        return attention_heatmap(matrix, labels, labels, title=title, size=340)
    binned = shared.service().attention_overview(record.id, layer, head, DETAIL_MAX)
    return binned_heatmap(binned.values, binned.query_edges, binned.key_edges, labels, title,
                          size=340)


def _difference(difference: np.ndarray, labels: list[str], title: str):
    if len(labels) <= DETAIL_MAX:
        return difference_heatmap(difference, labels, title)
    binned = bin_matrix(difference, DETAIL_MAX)
    edges = binned.query_edges
    return difference_heatmap(binned.values, [f"{labels[a]}…({b - a})" for a, b in
                                              zip(edges[:-1], edges[1:])], title)


def _start(request_a: AnalysisRequest, request_b: AnalysisRequest) -> None:
    st.session_state.pop("cmp_error", None)
    st.session_state["cmp_pending"] = (request_a, request_b)


def setup(record) -> None:
    """Choose the two sides; both analyses are computed (or found in the cache) on Compare."""
    mode = st.segmented_control("What to compare", [TEXTS, MODELS, HEADS], default=TEXTS,
                                key="cmp_mode") or TEXTS
    st.session_state.setdefault("cmp_text_a", COMPARISON_EXAMPLE[0])
    st.session_state.setdefault("cmp_text_b", COMPARISON_EXAMPLE[1])
    if mode == TEXTS:
        model = shared.model_picker("Model", "cmp_model", "cmp_model_other")
        text_a = st.text_area("Text A", key="cmp_text_a", height=80)
        text_b = st.text_area("Text B", key="cmp_text_b", height=80)
        if st.button("Compare", type="primary", key="cmp_go_texts"):
            _start(AnalysisRequest.make("attention", model, text_a),
                   AnalysisRequest.make("attention", model, text_b))
    elif mode == MODELS:
        text = st.text_area("Text", key="cmp_text_a", height=80)
        c1, c2 = st.columns(2)
        with c1:
            model_a = shared.model_picker("Model A", "cmp_model", "cmp_model_other")
        with c2:
            st.session_state.setdefault("cmp_model_b", "gemma3-270m")
            model_b = shared.model_picker("Model B", "cmp_model_b", "cmp_model_b_other")
        if st.button("Compare", type="primary", key="cmp_go_models"):
            _start(AnalysisRequest.make("attention", model_a, text),
                   AnalysisRequest.make("attention", model_b, text))
    elif record is None:
        st.info("Analyse a text first (sidebar), then compare two of its heads.")
    elif st.button("Compare two heads of the current analysis", type="primary"):
        _open_second(record.id)
        st.rerun()


def _pending() -> bool:
    """Progress of the two analyses being computed; opens them when both are ready."""
    pending = st.session_state.get("cmp_pending")
    if not pending:
        return False
    ids = [shared.derived(request, f"Side {side} ({request.model})")
           for side, request in zip("AB", pending)]
    failed = st.session_state.get("failed", {})
    errors = [failed.pop(r.canonical()) for r in pending if r.canonical() in failed]
    if errors:  # shown until the next Compare, which may try the same request again
        st.session_state["cmp_error"] = " ".join(errors)
        del st.session_state["cmp_pending"]
        st.rerun()
    if all(ids):
        del st.session_state["cmp_pending"]
        shared.open_analysis(ids[0])
        _open_second(ids[1])
        st.rerun()
    return True


def _open_second(aid: str) -> None:
    st.session_state["compare_b"] = aid
    st.query_params[B_PARAM] = aid


def current_second_id() -> str | None:
    """Side B: from the link, else the last one this session compared (page switches drop
    unbound query parameters)."""
    from_url = st.query_params.get(B_PARAM)
    if from_url:
        st.session_state["compare_b"] = from_url
    elif st.session_state.get("compare_b"):
        st.query_params[B_PARAM] = st.session_state["compare_b"]
    return st.session_state.get("compare_b")


def _pick_from_grid() -> None:
    cell = picked_cell(st.session_state.get("cmp_grid"))
    kind = st.session_state.get("cmp_grid_kind")
    if not cell:
        return
    row, column = cell
    if kind == "heads of A":  # a head like the reference: show it on side B
        st.session_state.update(cmp_layer_b=row, cmp_head_b=str(column))
    elif kind == "heads":
        st.session_state.update(cmp_layer=row, cmp_head=str(column))
        if not st.session_state.get("cmp_linked", True):
            st.session_state.update(cmp_layer_b=row, cmp_head_b=str(column))
    else:  # layers of A (rows) against layers of B (columns)
        st.session_state.update(cmp_layer=row, cmp_layer_b=column, cmp_linked=False,
                                cmp_head=MEAN, cmp_head_b=MEAN)


def controls(ra, rb) -> dict:
    """The synchronised controls: A's layer and head drive B's unless unlinked."""
    ma, mb = ra.meta, rb.meta
    same = ra.id == rb.id
    c1, c2, c3, c4, c5 = st.columns([3, 1.4, 1.8, 3, 1.4])
    layer_a = c1.slider("Layer", 0, ma["n_layers"] - 1, ma["n_layers"] // 2, key="cmp_layer",
                        bind="query-params")
    head_a = c2.selectbox("Head", [MEAN, *map(str, range(ma["n_heads"]))], key="cmp_head",
                          index=1 if same else 0, bind="query-params")  # heads 0 and 1
    linked = not same and c3.toggle("Link B to A", True, key="cmp_linked", bind="query-params",
                                    help="B follows A's layer (at the same relative depth when "
                                         "the models differ) and head.")
    matching = matching_layer(layer_a, ma["n_layers"], mb["n_layers"])
    if linked:
        layer_b = matching
        head_b = head_a if head_a == MEAN or int(head_a) < mb["n_heads"] else MEAN
        c4.markdown(f"B: layer **{layer_b}**, head **{head_b}**")
    else:
        layer_b = c4.slider("Layer (B)", 0, mb["n_layers"] - 1, matching, key="cmp_layer_b",
                            bind="query-params")
        heads_b = [MEAN, *map(str, range(mb["n_heads"]))]
        head_b = c5.selectbox("Head (B)", heads_b, key="cmp_head_b",
                              index=min(2, len(heads_b) - 1) if same else 0, bind="query-params")
    levels = shared.service().alignment_levels(ra.id, rb.id)
    level = st.segmented_control("Align by", levels, default=levels[0], key="cmp_align",
                                 bind="query-params", format_func=LEVEL_TITLES.get,
                                 help="How tokens of the two sides are matched: see the "
                                      "explanations below.") or levels[0]
    return {"layer_a": layer_a, "head_a": None if head_a == MEAN else int(head_a),
            "layer_b": layer_b, "head_b": None if head_b == MEAN else int(head_b),
            "level": level, "linked": linked, "same": same,
            "params": {"cmp_layer": layer_a, "cmp_head": head_a, "cmp_align": level,
                       "cmp_linked": None if linked or same else "false",
                       **({} if linked else {"cmp_layer_b": layer_b, "cmp_head_b": head_b})}}


def divergence_section(ra, rb, c: dict) -> None:
    service = shared.service()
    ma, mb = ra.meta, rb.meta
    if c["same"]:
        values = service.head_similarity(ra.id, c["layer_a"], c["head_a"])
        kind, rows, columns = "heads of A", "layer", "head"
        title = "How different every head is from A's head (pale = same pattern)"
        picked = (c["layer_b"], c["head_b"]) if c["head_b"] is not None else None
    elif (ma["n_layers"], ma["n_heads"]) == (mb["n_layers"], mb["n_heads"]):
        values = service.head_divergence(ra.id, rb.id, c["level"])
        kind, rows, columns = "heads", "layer", "head"
        title = "Which heads changed most between A and B (dark = changed)"
        picked = (c["layer_a"], c["head_a"]) if c["head_a"] is not None else None
    else:
        values = service.layer_divergence(ra.id, rb.id, c["level"])
        kind, rows, columns = "layers", "layer of A", "layer of B"
        title = "Which layers of B attend like which layers of A (pale = alike)"
        picked = (c["layer_a"], c["layer_b"])
    st.session_state["cmp_grid_kind"] = kind
    st.subheader("Divergence grid")
    cell = int(np.clip(420 // max(values.shape[1], 1), 10, 28))
    st.altair_chart(score_grid(values, rows, columns, "Jensen-Shannon (bits)", title, cell=cell,
                               picked=picked), key="cmp_grid", on_select=_pick_from_grid,
                    selection_mode="grid_cell")
    ranked = ", ".join(f"{r}/{k} ({v:.3f})" for r, k, v in top_cells(values, TOP_HEADS))
    st.caption(f"Click a cell to show it above. Largest ({rows}/{columns}): {ranked}.")


def focus_section(ra, rb, c: dict, alignment) -> int:
    """One unit's attention row and rollout row on both sides; returns the unit."""
    service, labels = shared.service(), alignment.labels
    default = len(labels) - 1 if ra.meta["causal"] else 0
    unit = st.selectbox("Query (aligned)", range(len(labels)), index=default, key="cmp_unit",
                        bind="query-params", format_func=lambda i: f"{i} {labels[i]}")
    rows = {"A": service.aligned_matrix(ra.id, c["layer_a"], c["head_a"], alignment.a)[unit],
            "B": service.aligned_matrix(rb.id, c["layer_b"], c["head_b"], alignment.b)[unit]}
    left, right = st.columns(2)
    left.altair_chart(paired_bars(rows, labels, f"Where {labels[unit]} looks"))
    if not c["same"]:
        rollouts = {"A": service.aligned_rollout(ra.id, alignment.a),
                    "B": service.aligned_rollout(rb.id, alignment.b)}
        right.altair_chart(paired_bars({side: r[unit] for side, r in rollouts.items()}, labels,
                                       f"Rollout after the last layer: {labels[unit]}"))
        right.metric("Rollout divergence (mean over queries)",
                     f"{divergence(rollouts['A'], rollouts['B']):.4f} bits",
                     help="Rollout assumes the residual stream carries half of each layer.")
    return unit


def importance_section(ra, rb, results) -> None:
    """Gradient head importance of both sides, when asked for or already cached."""
    service = shared.service()
    asked = results.for_state(replace(results.state, a=ra.id, b=rb.id, cmp_importance=True))
    pair = asked.requests("head_importance")
    cached = all(service.cached(r) for r in pair)
    if not (st.toggle("Compare head importance (gradient, one backward pass per side)",
                      value=cached, key="cmp_importance", bind="query-params") or cached):
        return
    ids = [shared.derived(r, f"Head importance ({side})") for side, r in zip("AB", pair)]
    if not all(ids):
        return
    scores = [service.array(aid, "layer") for aid in ids]
    n_heads = ra.meta["n_heads"]
    if scores[0].shape == scores[1].shape:
        correlation = spearman(*scores)
        st.metric("Rank correlation of head importance (Spearman)",
                  "n/a" if np.isnan(correlation) else f"{correlation:.3f}")
        st.altair_chart(score_grid(scores[1] - scores[0], "layer", "head", "B − A", "Importance, "
                                   "layer-normalised: B − A (red = matters more in B)",
                                   cell=int(np.clip(420 // n_heads, 10, 28)), signed=True))
    columns = st.columns(2)
    for column, record, values, side in zip(columns, (ra, rb), scores, "AB"):
        heads = ", ".join(f"{l}/{h}" for l, h, _ in top_cells(values, TOP_HEADS))
        column.markdown(f"**{side}** ({shared.plain(record.meta['model_label'])}): most "
                        f"important heads (layer/head) {heads}")
        if scores[0].shape != scores[1].shape:
            column.altair_chart(score_grid(values, "layer", "head", "importance",
                                           cell=int(np.clip(300 // values.shape[1], 8, 24))))


def comparison(record_a, record_b, results) -> None:
    """The two sides, their difference, the divergence grid, one query and head importance."""
    for side, record in (("A", record_a), ("B", record_b)):
        st.markdown(f"**{side}** · {shared.plain(record.meta['model_label'])} · "
                    f"{len(record.meta['tokens'])} tokens: "
                    f"“{shared.plain(record.text)}”")
    c = controls(record_a, record_b)
    alignment = shared.service().alignment(record_a.id, record_b.id, c["level"])
    if alignment.mostly_changed:
        st.warning("The two texts share little: most aligned units pair different words by "
                   "position (or merge whole passages), so the difference compares "
                   "positions more than meanings.")
    left, right = st.columns(2)
    left.altair_chart(_heatmap(record_a, c["layer_a"], c["head_a"],
                               "A: " + _side_labels(record_a, c["layer_a"], c["head_a"])))
    right.altair_chart(_heatmap(record_b, c["layer_b"], c["head_b"],
                                "B: " + _side_labels(record_b, c["layer_b"], c["head_b"])))
    st.subheader(f"Difference B − A, aligned by {LEVEL_TITLES[c['level']]}")
    aligned_a = shared.service().aligned_matrix(record_a.id, c["layer_a"], c["head_a"],
                                                alignment.a)
    aligned_b = shared.service().aligned_matrix(record_b.id, c["layer_b"], c["head_b"],
                                                alignment.b)
    d1, d2 = st.columns([3, 1])
    d1.altair_chart(_difference(aligned_b - aligned_a, alignment.labels,
                                f"{len(alignment.labels)} aligned units"))
    divergence_ab = divergence(aligned_a, aligned_b)
    d2.metric("Divergence of these maps", f"{divergence_ab:.4f} bits",
              help="Mean Jensen-Shannon divergence of the aligned rows: 0 same, 1 disjoint.")
    lost_a, lost_b = alignment.unmatched()
    if lost_a or lost_b:
        d2.caption(f"Tokens without a counterpart, left out: {lost_a} of A, {lost_b} of B.")
    divergence_section(record_a, record_b, c)
    st.subheader("One query, both sides")
    unit = focus_section(record_a, record_b, c, alignment)
    if not c["same"]:
        st.subheader("Head importance")
        importance_section(record_a, record_b, results)
    with st.expander("How the comparison works, and its caveats"):
        st.markdown(EXPLANATIONS)
    shared.share_link({"a": record_a.id, B_PARAM: record_b.id, **c["params"],
                       "cmp_unit": f"{unit} {alignment.labels[unit]}",
                       "cmp_importance": st.session_state.get("cmp_importance") or None})


def render(results, state) -> None:
    st.header("Compare")
    a_id = shared.current_analysis_id()
    b_id = current_second_id()
    record_a = shared.load_analysis(a_id) if a_id else None
    with st.expander("Choose what to compare", expanded=not b_id):
        setup(record_a)
    if st.session_state.get("cmp_error"):
        st.error(st.session_state["cmp_error"])
    if not b_id and "cmp_pending" not in st.session_state and "cmp_auto" not in st.session_state \
            and (record_a is None or record_a.text == COMPARISON_EXAMPLE[0]):
        # A first visit shows the classic pair at once (cached after the first time).
        st.session_state["cmp_auto"] = True
        _start(*(AnalysisRequest.make("attention", DEFAULT_CAUSAL, text)
                 for text in COMPARISON_EXAMPLE))
    waiting = _pending()
    if not b_id and not waiting:
        st.info("Choose two texts or two models above and press **Compare**, or compare two heads "
                "of the current analysis.")
    elif b_id and record_a is not None:
        record_b = shared.load_analysis(b_id)
        if record_b is not None and {record_a.kind, record_b.kind} != {"attention"}:
            st.error("Compare shows attention analyses: open one from the sidebar or a link.")
        elif record_b is not None:
            comparison(record_a, record_b, results)


if __name__ == "__main__":
    shared.show("compare", requests, render)

"""Explore: one head or a layer's head mean as a heatmap, and one token's attention."""

import streamlit as st

from pages import shared
from viz import export
from viz.heatmap import attention_heatmap, axis_labels, binned_heatmap, selected_values
from viz.token_view import attention_bars, attention_lines

DETAIL_MAX = 96  # tokens per side shown cell by cell; longer windows are binned
OVERVIEW_BINS = 64
LINES_MAX = 40
MEAN = "mean"


def _pick_token() -> None:
    tokens = selected_values(st.session_state.get("heatmap_detail"), "query")
    if tokens:
        st.session_state["token"] = int(tokens[0])


def _zoom_into_bin() -> None:
    event = st.session_state.get("heatmap_overview")
    starts, ends = selected_values(event, "q0"), selected_values(event, "q1")
    if starts:
        start = int(starts[0])
        end = max(int(ends[0]) - 1, start)
        centre = (start + end) // 2
        half = DETAIL_MAX // 2
        lo = max(0, min(centre - half, st.session_state["n_tokens"] - DETAIL_MAX))
        st.session_state["window"] = (lo, min(lo + DETAIL_MAX - 1,
                                              st.session_state["n_tokens"] - 1))


st.header("Explore attention")
record = shared.require_analysis()
if record:
    meta, aid = record.meta, record.id
    n_tokens, labels = len(meta["tokens"]), meta["tokens"]
    st.session_state["n_tokens"] = n_tokens
    heads = [MEAN] + [str(h) for h in range(meta["n_heads"])]
    c1, c2, c3 = st.columns([2, 1, 3])
    layer = c1.slider("Layer", 0, meta["n_layers"] - 1, meta["n_layers"] // 2, key="layer",
                      bind="query-params")
    head_choice = c2.selectbox("Head", heads, key="head", bind="query-params",
                               help="A head's own map, or the mean over the layer's heads.")
    if n_tokens > 1:
        window = c3.slider("Token window", 0, n_tokens - 1, (0, n_tokens - 1), key="window",
                           bind="query-params",
                           help=f"Up to {DETAIL_MAX} tokens show cell by cell; wider windows "
                                "show a binned overview: click a block to zoom into it.")
    else:
        window = (0, 0)
    w0, w1 = min(window), max(window)
    head = None if head_choice == MEAN else int(head_choice)
    head_name = "mean of heads" if head is None else f"head {head}"
    window_labels = labels[w0:w1 + 1]

    def token_option(i: int) -> str:  # also the token's value in the link
        return f"{i} {labels[i]}"

    left, right = st.columns([3, 2])
    with left:
        if w1 - w0 + 1 <= DETAIL_MAX:
            matrix = shared.service().attention_matrix(aid, layer, head, slice(w0, w1 + 1),
                                                       slice(w0, w1 + 1))
            chart = attention_heatmap(matrix, window_labels, window_labels, w0, w0,
                                      title=f"Layer {layer}, {head_name}")
            st.altair_chart(chart, key="heatmap_detail", on_select=_pick_token,
                            selection_mode="cell")
            st.caption("Rows: the attending token (query); columns: the attended token (key). "
                       "Hover for values, click a cell to pick its query token.")
            if w0 > 0:
                st.caption("Only keys inside the window are shown, so rows may sum to less "
                           "than 1 (the rest often goes to the first token).")
        else:
            overview = shared.service().attention_overview(aid, layer, head, OVERVIEW_BINS)
            n_bins = len(overview.query_edges) - 1
            matrix = overview.values  # what is shown is what is exported
            chart = binned_heatmap(overview.values, overview.query_edges, overview.key_edges,
                                   labels, title=f"Layer {layer}, {head_name}: {n_tokens} tokens "
                                                 f"in {n_bins} × {n_bins} blocks")
            st.altair_chart(chart, key="heatmap_overview", on_select=_zoom_into_bin,
                            selection_mode="cell")
            st.caption("Each block is the mean attention between two token ranges. Click a block "
                       f"to zoom into a {DETAIL_MAX}-token window around it.")

    with right:
        token = st.selectbox("Token", range(w0, w1 + 1), index=None, key="token",
                             bind="query-params", placeholder="Pick a token (or click a row)",
                             format_func=token_option)
        if token is not None and w0 <= token <= w1:
            layer_matrix = shared.service().attention_matrix(aid, layer, head)
            st.altair_chart(attention_bars(layer_matrix[token, w0:w1 + 1], window_labels, w0,
                                           f"Where {token} {labels[token]} looks", token))
            st.altair_chart(attention_bars(layer_matrix[w0:w1 + 1, token], window_labels, w0,
                                           f"Who looks at {token} {labels[token]}", token))
        if w1 - w0 + 1 <= LINES_MAX:
            lines_matrix = shared.service().attention_matrix(aid, layer, head, slice(w0, w1 + 1),
                                                             slice(w0, w1 + 1))
            st.altair_chart(attention_lines(lines_matrix, window_labels, w0, token))
            st.caption("Lines link each query (left) to the keys it attends (right); opacity is "
                       "the weight.")

    with st.expander("Export and share", expanded=True):
        csv_labels = (axis_labels(window_labels, w0) if w1 - w0 + 1 <= DETAIL_MAX
                      else [f"{a}-{b - 1}" for a, b in zip(overview.query_edges[:-1],
                                                             overview.query_edges[1:])])
        b1, b2, b3 = st.columns(3)
        b1.download_button("CSV of this matrix", lambda: export.matrix_csv(
            matrix, csv_labels, csv_labels), file_name=f"attention_L{layer}_{head_choice}.csv",
            mime="text/csv")
        b2.download_button("PNG of the heatmap", lambda: export.chart_png(chart),
                           file_name=f"attention_L{layer}_{head_choice}.png", mime="image/png")
        b3.download_button("SVG of the heatmap", lambda: export.chart_svg(chart),
                           file_name=f"attention_L{layer}_{head_choice}.svg",
                           mime="image/svg+xml")
        shared.share_link({"a": aid, "layer": layer, "head": head_choice,
                           "window": [w0, w1] if (w0, w1) != (0, n_tokens - 1) else None,
                           "token": None if token is None else token_option(token)})

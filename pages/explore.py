"""Explore: one head or a layer's head mean, from a zoomed-out overview down to exact cells, and
one token's attention as bars, lines and a reading view of the text.

The view is a fragment: a control reruns this view only, not the sidebar or the page around it.
"""

import streamlit as st

from pages import shared
from pages.view_requests import attention_only as requests
from viz import export
from backend.analyses.attention import OVERVIEW_BINS
from backend.local_reductions import exclude_first_token
from viz.heatmap import (DETAIL_MAX, SCALES, attention_heatmap, axis_labels, binned_heatmap,
                         block_labels, brushed_range, selected_values)
from viz.reading_view import reading_view, text_pieces, top_positions
from viz.token_view import attention_bars, attention_lines

READING_MAX = 4096  # tokens of text in the reading view, around the selected token
STRONGEST = 10
MEAN = "mean"
DIRECTIONS = {"row": "Where it looks", "column": "Who looks at it"}


def _around(centre: int, n: int) -> tuple[int, int]:
    """A DETAIL_MAX-token window centred on `centre`, inside [0, n)."""
    lo = max(0, min(centre - DETAIL_MAX // 2, n - DETAIL_MAX))
    return lo, min(lo + DETAIL_MAX, n) - 1


def _token_range(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The tokens a dragged range [lo, hi) of positions covers, inside [0, n)."""
    first = max(0, int(lo))
    return first, min(n - 1, max(first, round(hi) - 1))


def _set_windows(queries: tuple[int, int], keys: tuple[int, int]) -> None:
    st.session_state["window"] = queries
    st.session_state["keys"] = keys
    st.session_state["split"] = queries != keys


def _pick_token() -> None:
    tokens = selected_values(st.session_state.get("heatmap_detail"), "query")
    if tokens:
        st.session_state["token"] = int(tokens[0])


def _zoom() -> None:
    """A clicked block zooms into exact windows around its queries and its keys (each its own
    window, so an off-diagonal block keeps its keys); a dragged range zooms into that range."""
    event, n = st.session_state.get("heatmap_overview"), st.session_state["n_tokens"]
    dragged = brushed_range(event)
    if dragged:
        (q_lo, q_hi), (k_lo, k_hi) = dragged["q0"], dragged["k0"]
        _set_windows(_token_range(q_lo, q_hi, n), _token_range(k_lo, k_hi, n))
        return
    fields = {f: selected_values(event, f) for f in ("q0", "q1", "k0", "k1")}
    if all(fields.values()):
        q0, q1, k0, k1 = (int(fields[f][0]) for f in ("q0", "q1", "k0", "k1"))
        _set_windows(_around((q0 + q1 - 1) // 2, n), _around((k0 + k1 - 1) // 2, n))


def _token_option(labels: list[str]):
    return lambda i: f"{i} {labels[i]}"  # also the token's value in the link


def _controls(meta: dict, n: int) -> tuple:
    heads = [MEAN] + [str(h) for h in range(meta["n_heads"])]
    c1, c2, c3 = st.columns([3, 1, 2])
    layer = c1.slider("Layer", 0, meta["n_layers"] - 1, meta["n_layers"] // 2, key="layer",
                      bind="query-params")
    head_choice = c2.selectbox("Head", heads, key="head", bind="query-params",
                               help="A head's own map, or the mean over the layer's heads.")
    scale = c3.segmented_control(
        "Colour scale", SCALES, default="linear", key="scale", bind="query-params",
        help="log and rank show small weights next to a dominant one (an attention sink).") \
        or "linear"
    w1, w2 = st.columns([4, 2])
    no_sink = w2.toggle("Leave out the first token", key="no_sink", bind="query-params",
                        help="Drop key 0 (often an attention sink) and renormalise each row "
                             "over the other keys.")
    full = (0, n - 1)
    if n > 1:
        window = w1.slider("Queries (token window)", 0, n - 1, full, key="window",
                           bind="query-params",
                           help=f"Up to {DETAIL_MAX} tokens per side show cell by cell; wider "
                                "windows show blocks: click a block or drag a range to zoom.")
        split = w2.toggle("Separate key window", key="split", bind="query-params",
                          help="Give keys their own window (zooming into an off-diagonal "
                               "block does this).")
        keys = (w1.slider("Keys (token window)", 0, n - 1, window, key="keys",
                          bind="query-params") if split else window)
    else:
        window = keys = full
    return (layer, head_choice, scale, no_sink, (min(window), max(window)),
            (min(keys), max(keys)))


def _heatmap(aid: str, labels: list[str], layer: int, head, title: str, scale: str,
             no_sink: bool, queries: tuple[int, int], keys: tuple[int, int]):
    """The chart of the windows and what it shows, for export: (chart, matrix, row labels,
    column labels)."""
    service = shared.service()
    (q0, q1), (k0, k1) = queries, keys
    if no_sink:
        k0 = max(k0, 1)
        k1 = max(k1, k0)
    if q1 - q0 + 1 <= DETAIL_MAX and k1 - k0 + 1 <= DETAIL_MAX:
        if no_sink:  # renormalising needs each row's whole mass: take full rows of the window
            rows = service.attention_matrix(aid, layer, head, slice(q0, q1 + 1))
            matrix = exclude_first_token(rows)[:, k0 - 1:k1]
        else:
            matrix = service.attention_matrix(aid, layer, head, slice(q0, q1 + 1),
                                              slice(k0, k1 + 1))
        chart = attention_heatmap(matrix, labels[q0:q1 + 1], labels[k0:k1 + 1], q0, k0,
                                  title=title, scale=scale)
        st.altair_chart(chart, key="heatmap_detail", on_select=_pick_token,
                        selection_mode="cell", width="content")
        st.caption("Rows: the attending token (query); columns: the attended token (key). "
                   "Hover for values, click a cell to pick its query token.")
        if k0 > 0 and not no_sink:
            st.caption("Only keys inside the window are shown, so rows may sum to less than 1 "
                       "(the rest often goes to the first token).")
        return (chart, matrix, axis_labels(labels[q0:q1 + 1], q0),
                axis_labels(labels[k0:k1 + 1], k0))
    whole = (q0, q1, k0, k1) == (0, len(labels) - 1, 0, len(labels) - 1)
    with st.spinner("Pooling the window…"):
        overview = service.attention_overview(
            aid, layer, head, OVERVIEW_BINS,
            slice(None) if whole else slice(q0, q1 + 1),
            slice(None) if whole else slice(k0, k1 + 1))
    qe, ke = overview.query_edges, overview.key_edges  # token positions
    chart = binned_heatmap(overview.values, qe, ke, labels, scale=scale, drag=True,
                           title=f"{title}: queries {q0}–{q1} × keys {k0}–{k1} in "
                                 f"{len(qe) - 1} × {len(ke) - 1} blocks")
    st.altair_chart(chart, key="heatmap_overview", on_select=_zoom,
                    selection_mode=["cell", "brush"], width="content")
    st.caption(f"Each block is the mean attention between two token ranges. Click a block to "
               f"zoom into exact {DETAIL_MAX}-token windows around its queries and its keys, or "
               "drag a range to zoom into it."
               + (" The first token is left out (blocks are not renormalised)." if no_sink
                  else ""))
    return chart, overview.values, block_labels(qe), block_labels(ke)


def _token_view(record, layer: int, head, no_sink: bool, queries, keys, labels) -> int | None:
    service, aid, n = shared.service(), record.id, len(labels)
    option = _token_option(labels)
    t1, t2 = st.columns([3, 2])
    token = t1.selectbox("Token", range(n), index=None, key="token", bind="query-params",
                         placeholder="Pick a token (or click a row)", format_func=option)
    if token is None:
        st.caption("Pick a token to see where it looks and who looks at it.")
        return None
    direction = t2.segmented_control("Reading view", list(DIRECTIONS), default="row",
                                     key="direction", bind="query-params",
                                     format_func=DIRECTIONS.get) or "row"
    if direction == "row":
        weights = service.attention_row(aid, layer, head, token)
        shown = keys
        if no_sink:
            weights = exclude_first_token(weights)
        title = f"Where {option(token)} looks"
    else:
        weights = service.attention_column(aid, layer, head, token)
        shown = queries
        title = f"Who looks at {option(token)}"
    first = 1 if no_sink else 0  # position of weights[0]
    lo, hi = max(shown[0], first), shown[1]
    text_column, list_column = st.columns([3, 2])
    if hi - lo + 1 <= DETAIL_MAX:
        list_column.altair_chart(attention_bars(weights[lo - first:hi - first + 1],
                                                labels[lo:hi + 1], lo, title, token))
    # The reading view: the window's text (at most READING_MAX tokens around the token).
    if hi - lo + 1 > READING_MAX:
        lo = max(lo, min(token - READING_MAX // 2, hi - READING_MAX + 1))
        hi = lo + READING_MAX - 1
    pieces = text_pieces(record.text, record.meta["offsets"], labels)
    sink_note = (" (first token left out, renormalised)" if no_sink and direction == "row"
                 else " (first token left out)" if no_sink else "")
    text_column.markdown(f"**{shared.plain(title)}**, shaded on tokens {lo}–{hi}{sink_note}:")
    text_column.html(reading_view(pieces[lo:hi + 1], weights[lo - first:hi - first + 1], lo,
                                  token))
    strongest = [(p + first, w) for p, w in top_positions(weights, STRONGEST)]
    list_column.markdown(f"**Strongest {len(strongest)}**")
    list_column.dataframe({"position": [p for p, _ in strongest],
                           "token": [labels[p] for p, _ in strongest],
                           "weight": [round(w, 4) for _, w in strongest]},
                          hide_index=True, height="content")
    return token


@shared.fragment
def explore(record) -> None:
    meta, aid, labels = record.meta, record.id, record.meta["tokens"]
    n = len(labels)
    st.session_state["n_tokens"] = n
    layer, head_choice, scale, no_sink, queries, keys = _controls(meta, n)
    st.space("small")  # keeps the chart's toolbar clear of the window sliders' thumbs
    head = None if head_choice == MEAN else int(head_choice)
    title = f"Layer {layer}, {'mean of heads' if head is None else f'head {head}'}"
    chart, matrix, row_labels, column_labels = _heatmap(aid, labels, layer, head, title, scale,
                                                        no_sink, queries, keys)
    token = _token_view(record, layer, head, no_sink, queries, keys, labels)
    (q0, q1), (k0, k1) = queries, keys
    if q1 - q0 + 1 <= DETAIL_MAX and k1 - k0 + 1 <= DETAIL_MAX and not no_sink:
        with st.expander("Lines (bertviz-style)", expanded=token is not None):
            lines = shared.service().attention_matrix(aid, layer, head, slice(q0, q1 + 1),
                                                      slice(k0, k1 + 1))
            st.altair_chart(attention_lines(lines, labels[q0:q1 + 1], labels[k0:k1 + 1], q0,
                                            k0, token))
            st.caption(f"Lines link each query (left) to the keys it attends (right); opacity "
                       f"is the weight. Shown up to {DETAIL_MAX} tokens per side, like the cells "
                       "(beyond that the lines merge into a solid block).")

    with st.expander("Export and share", expanded=True):
        b1, b2, b3 = st.columns(3)
        name = f"attention_L{layer}_{head_choice}"
        b1.download_button("CSV of this matrix", lambda: export.matrix_csv(
            matrix, row_labels, column_labels), file_name=f"{name}.csv", mime="text/csv")
        b2.download_button("PNG of the heatmap", lambda: export.chart_png(chart),
                           file_name=f"{name}.png", mime="image/png")
        b3.download_button("SVG of the heatmap", lambda: export.chart_svg(chart),
                           file_name=f"{name}.svg", mime="image/svg+xml")
        full = (0, n - 1)
        split = keys != queries
        shared.share_link({
            "a": aid, "layer": layer, "head": head_choice,
            "window": list(queries) if queries != full else None,
            "split": split, "keys": list(keys) if split else None,
            "scale": scale if scale != "linear" else None, "no_sink": no_sink,
            "token": None if token is None else _token_option(labels)(token),
            "direction": st.session_state.get("direction") if token is not None and
            st.session_state.get("direction") not in (None, "row") else None})


def render(results, state) -> None:
    st.header("Explore attention")
    current = shared.require_analysis()
    if current:
        explore(current)


if __name__ == "__main__":
    shared.show("explore", requests, render)

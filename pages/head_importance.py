"""Head importance: which heads matter (gradient, ablation, attention statistics), what each head
does (role scores), and how the loss grows as heads are masked (pruning curves)."""

from dataclasses import replace

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from backend.analyses import AnalysisRequest
from backend.analyses.heads import (METHODS, NORMALIZATIONS, ROLES, head_label, head_ranks,
                                    parse_head_label, top_attended_pairs)
from backend.service import AtlasError
from pages import shared
from pages.view_requests import head_importance as requests
from pages.view_state import SCORES
from viz.head_grid import head_grid, selected_head
from backend.analyses.attention import OVERVIEW_BINS
from viz.heatmap import DETAIL_MAX, attention_heatmap, binned_heatmap
from viz.pruning import pruning_chart

THUMBNAIL_BINS = 24
GRID_WIDTH = 400  # pixels the grid's heads may take: its column is ~480 px wide at 1280 px
TOP_PAIRS = 10
TITLES = {
    "gradient": "gradient importance", "ablation": "ablation Δ loss",
    "confidence": "confidence", "entropy": "entropy (nats)",
    "previous_token": "previous-token score", "first_token": "first-token (sink) score",
    "self": "self (diagonal) score", "locality": "locality", "induction": "induction score",
    "receiver_kurtosis": "receiver kurtosis",
}
SHORT_NAMES = {"previous_token": "prev. token", "first_token": "first token",
               "receiver_kurtosis": "recv. kurt."}
RANK_COLUMN_PX = 74  # 9 score columns, rank and id fit the main column at 1,280 px
NORM_TITLES = {"layer": "layer-normalised", "global": "scaled to 0–1", "raw": "raw"}

EXPLANATIONS = """
**Importance** (how much the model's output depends on a head):
- **gradient** (Michel, Levy & Neubig, 2019, *Are Sixteen Heads Really Better than One?*): put a
  gate ξ = 1 on each head's output and take |∂ loss / ∂ξ|, averaged over examples. A first-order
  estimate of what removing the head would cost, from one backward pass.
- **ablation**: the change in loss when the head's output is set to zero (positive: the loss
  rises without it, so the head helps). Exact but one forward pass per head.
- **confidence** (Voita et al., 2019): mean over query tokens of the head's largest attention
  weight. Confident heads are often the ones that matter, but this needs no loss at all.
- **entropy**: mean over query tokens of the entropy of the head's attention row (nats; uniform
  over k keys is log k). Low entropy = focused, high = diffuse.

Normalisation: *layer* divides each layer's scores by their L2 norm (the paper's choice: it makes
layers comparable); *global* then stretches all heads to [0, 1]; *raw* shows the values as
measured.

**Roles** (what a head's attention map looks like on this text):
- **previous_token**: mean attention from token t to token t − 1.
- **first_token**: mean attention to the first token, often an "attention sink" that absorbs
  weight the head does not need.
- **self**: mean attention of each token to itself.
- **locality**: 1 − mean attention distance / 8 (distances capped at 8): 1 = attends to itself,
  0.875 = previous token, 0 = 8 or more tokens away.
- **induction**: on random tokens repeated twice, mean attention from each token of the second
  copy to the token that followed its first occurrence: the "copy what came next last time"
  circuit (Olsson et al., 2022). Measured on random tokens, so it is the same for every text.
- **receiver_kurtosis**: kurtosis over keys of the attention each key receives from later tokens
  (Thought Anchors' receiver heads): high = the head broadcasts a few tokens to everything after.

**Pruning curve**: heads are masked cumulatively, the least important first (5 %, 10 %, …,
100 %), and the loss is measured at each step, beside a random order. If importance is
meaningful, the importance order stays low much longer than the random one. "Least important"
is the lowest layer-normalised score: for entropy that is the most focused head, so the entropy
order treats diffuse heads as the important ones. *Recompute* ranks the remaining heads again
after each step (slower, usually a little better).

Attention is not explanation: a head can attend somewhere without using it, and importance on one
short text is noisy. Compare texts before drawing conclusions.
"""


class InTurn:
    """The page's results with one progress bar at a time. Each progress bar polls, and every
    poll reruns a fragment after which Streamlit collects garbage, slowing the worker: so only
    the first result still computing gets one; the others are queued (or, when cached, returned
    at once) and say they are next in line. The worker runs one job at a time anyway."""

    def __init__(self):
        self.polling = False

    def get(self, request: AnalysisRequest, label: str) -> str | None:
        if not self.polling:
            aid = shared.derived(request, label)
            failed = request.canonical() in st.session_state.get("failed", {})
            self.polling = aid is None and not failed
            return aid
        try:
            ticket = shared.service().submit(request)
        except AtlasError as e:
            st.error(f"{label}: {e}")
            return None
        if ticket.analysis_id is None:
            st.caption(f"{label}: queued, next in line.")
        return ticket.analysis_id


def _pick_from_grid() -> None:
    picked = selected_head(st.session_state.get("hi_grid"))
    if picked:
        st.session_state["hi_head"] = head_label(*picked)


def _pick_from_ranking() -> None:
    event = st.session_state.get("hi_ranking")
    rows = (event or {}).get("selection", {}).get("rows", [])
    ranked = st.session_state.get("hi_ranked", [])
    if rows and rows[0] < len(ranked):
        st.session_state["hi_head"] = ranked[rows[0]]


def _loss_note(meta: dict) -> None:
    """Say plainly what the loss is when it is not the model's own."""
    if meta.get("loss_kind") == "sentence_similarity":
        where = "sentence boundary" if meta.get("split") == "sentence" else "word"
        st.info(f"This encoder has no language-model head, so it has no loss of its own: "
                f"importance and pruning here measure the **cosine similarity of the text's two "
                f"halves** (cut at the {where} nearest the middle): "
                f"“{shared.plain(meta['first'])}” vs “{shared.plain(meta['second'])}”.",
                icon=":material/info:")


def head_details(record, layer: int, head: int, scores: np.ndarray | None, score: str,
                 roles: dict[str, np.ndarray]) -> None:
    """The picked head: its attention map, its role scores and its top attended pairs."""
    service, labels, aid = shared.service(), record.meta["tokens"], record.id
    st.subheader(f"Layer {layer}, head {head}")
    if scores is not None:
        ranks = head_ranks(scores)
        st.caption(f"{TITLES[score]}: **{scores[layer, head]:.4g}**, rank {ranks[layer, head]} "
                   f"of {scores.size}")
    n = len(labels)
    if n <= DETAIL_MAX:
        matrix = service.attention_matrix(aid, layer, head)
        chart = attention_heatmap(matrix, labels, labels, size=320)
    else:
        overview = service.attention_overview(aid, layer, head, OVERVIEW_BINS)
        chart = binned_heatmap(overview.values, overview.query_edges, overview.key_edges, labels,
                               title=f"{n} tokens in blocks", size=320)
    st.altair_chart(chart, key="hi_head_map")
    st.page_link(shared.page("explore"), label="Open this head in Explore",
                 icon=":material/arrow_forward:",
                 query_params={"a": aid, "layer": str(layer), "head": str(head)})
    if roles:
        st.markdown("**Role scores**")
        st.dataframe(pd.DataFrame([
            {"role": name, "score": float(values[layer, head]),
             "rank": f"{head_ranks(values)[layer, head]} / {values.size}"}
            for name, values in roles.items()]), hide_index=True,
            column_config={"score": st.column_config.NumberColumn(format="%.4f")})
    st.markdown("**Top attended token pairs**")
    skip_first = st.toggle("Leave out the first token", key="hi_skip_first", bind="query-params",
                           help="The first token is often an attention sink that hides the rest.")
    pairs = top_attended_pairs(service.attention_matrix(aid, layer, head), TOP_PAIRS, skip_first)
    st.dataframe(pd.DataFrame([{"query": f"{q} {labels[q]}", "key": f"{k} {labels[k]}",
                                "weight": w} for q, k, w in pairs],
                              columns=["query", "key", "weight"]),
                 hide_index=True, column_config={"weight": st.column_config.NumberColumn(
                     format="%.4f")})


def scores_table(n_layers: int, n_heads: int, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per head (layer-major): its id, layer, head and one column per score."""
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    frame = pd.DataFrame({"id": [head_label(l, h) for l, h in zip(layer, head)]})
    position = pd.DataFrame({"layer": layer, "head": head})
    scores = pd.DataFrame({name: np.asarray(values, dtype=np.float64).ravel()
                           for name, values in columns.items()})
    return pd.concat([frame, position, scores], axis=1)


def pruning_section(record, jobs: InTurn, results) -> dict:
    """Controls and chart of the pruning curve; returns what it shows (for export and links)."""
    st.subheader("Pruning curve")
    c1, c2 = st.columns(2)
    method = c1.selectbox("Mask heads in order of", METHODS, key="hi_prune", bind="query-params",
                          help="Least important first. Ablation costs one forward pass per head.")
    recompute = c2.toggle("Recompute each step", key="hi_recompute", bind="query-params",
                          help="Rank the remaining heads again after every 5 % step: 20 "
                               "importance computations instead of one.")
    asked = results.for_state(replace(results.state, hi_prune=method, hi_recompute=recompute))
    curve_id = jobs.get(asked.request("pruning_curve"), "Pruning curve")
    if not curve_id:
        return {"method": method, "recompute": recompute}
    service, meta = shared.service(), shared.service().analysis(curve_id).meta
    fractions = service.array(curve_id, "fractions")
    losses = {f"{method} order": service.array(curve_id, "loss_importance"),
              "random order": service.array(curve_id, "loss_random")}
    chart = pruning_chart(fractions, losses, meta["loss"],
                          title=f"Heads masked by {method}"
                                f"{' (recomputed each step)' if recompute else ''}")
    st.altair_chart(chart, key="hi_pruning", width="content")
    if meta.get("higher_is_better"):
        st.caption("Here the curve is a similarity, not a loss: heads whose masking moves it "
                   "most matter most.")
    else:
        st.caption(f"Dashed: the loss with every head on ({losses['random order'][0]:.3f}). "
                   "The lower the red line stays, the better the ranking finds unneeded heads.")
    return {"method": method, "recompute": recompute, "fractions": fractions, "losses": losses,
            "loss": meta["loss"]}


@shared.fragment
def pruning_and_export(record, jobs: InTurn, results, head_scores: pd.DataFrame, score: str,
                       link: dict | None) -> None:
    """The pruning curve with the downloads and the share link: its two controls rerun only
    this part, not the grid, the head's details and the ranking above it."""
    curve = pruning_section(record, jobs, results)
    with st.expander("Export and share", expanded=True):
        b1, b2 = st.columns(2)
        b1.download_button("CSV of every head's scores",
                           lambda: head_scores.to_csv(index=False, float_format="%.6g"),
                           file_name=f"head_scores_{score}.csv", mime="text/csv")
        if curve.get("losses"):
            curve_frame = pd.DataFrame({"fraction_masked": curve["fractions"], **curve["losses"]})
            b2.download_button("CSV of the pruning curve",
                               lambda: curve_frame.to_csv(index=False, float_format="%.6g"),
                               file_name=f"pruning_{curve['method']}.csv", mime="text/csv")
        if link is not None:  # inside a lesson, the lesson shows its step's link instead
            shared.share_link({**link, "hi_prune": curve["method"],
                               "hi_recompute": True if curve["recompute"] else None})


def render(results, state) -> None:
    st.header("Head importance")
    record = shared.require_analysis()
    if record:
        meta, aid = record.meta, record.id
        n_layers, n_heads = meta["n_layers"], meta["n_heads"]
        service = shared.service()
        c1, c2, c3 = st.columns([2, 2, 2])
        score = c1.selectbox("Colour heads by", SCORES, key="hi_score", bind="query-params",
                             help="An importance method (the first four) or a head role. See "
                                  "“What the scores mean” below.")
        is_importance = score in METHODS
        norm = c2.segmented_control("Normalisation", NORMALIZATIONS, default="layer", key="hi_norm",
                                    bind="query-params", disabled=not is_importance,
                                    help="For importance scores only.") or "layer"
        focus = c3.selectbox("Head", [head_label(l, h) for l in range(n_layers)
                                      for h in range(n_heads)],
                             index=None, key="hi_head", bind="query-params",
                             placeholder="Click a head in the grid, or pick one")

        results = results.for_state(replace(state, a=aid, hi_score=score))
        jobs, importance_id = InTurn(), None
        if is_importance:  # the grid's own score first
            importance_id = jobs.get(results.request("head_importance"),
                                     f"{score.capitalize()} importance")
        roles_id = jobs.get(results.request("head_roles"), "Head roles")
        unavailable = service.analysis(roles_id).meta["unavailable"] if roles_id else {}
        roles = {name: service.array(roles_id, name) for name in ROLES
                 if roles_id and name not in unavailable}
        importance_meta = service.analysis(importance_id).meta if importance_id else {}
        _loss_note(importance_meta)

        scores, score_title = None, TITLES[score]
        if is_importance and importance_id:
            scores = service.array(importance_id, norm)
            score_title = f"{TITLES[score]}, {NORM_TITLES[norm]}"
        elif not is_importance and roles_id:
            scores = roles.get(score)
            if scores is None:
                st.warning(f"No {TITLES[score]} for this text. {unavailable.get(score, '')}")

        grid_column, detail_column = st.columns([3, 2])
        with grid_column:
            thumbnails = service.head_thumbnails(aid, THUMBNAIL_BINS)
            # cells sized to fit the column: a squeezed grid hides the frames under the thumbnails
            cell = int(np.clip(GRID_WIDTH // n_heads, 16, 36))
            grid = head_grid(thumbnails, scores, score_title, cell=cell).configure_legend(
                orient="top", gradientLength=min(GRID_WIDTH, cell * n_heads), titleLimit=400,
            ).properties(autosize=alt.AutoSizeParams(type="pad"))  # width, height: the cells alone
            st.altair_chart(grid, key="hi_grid", on_select=_pick_from_grid, selection_mode="head",
                            width="content")
            colour = (f"its frame is coloured by the {score_title} (hover for the value)"
                      if scores is not None else f"frames take the {score_title} when it is ready")
            st.caption(f"{n_layers} layers × {n_heads} heads of {meta['model_label']}, "
                       f"{len(meta['tokens'])} tokens. Each cell is the head's attention map; "
                       f"{colour}. Click a head to see it in detail.")
        with detail_column:
            picked = parse_head_label(focus)
            if picked and picked[0] < n_layers and picked[1] < n_heads:
                head_details(record, *picked, scores, score, roles)
            else:
                st.info("Click a head in the grid (or pick one above) to see its attention map, "
                        "its role scores and the token pairs it attends most.")

        # The ranking, then the pruning curve, one below the other: side by side, the curve's plot
        # shrank under its legend and the table's columns ran off its half of the page.
        st.subheader("Ranking")
        columns = {}
        if scores is not None:
            columns[score_title] = scores
        columns.update({name: values for name, values in roles.items() if name != score})
        table = scores_table(n_layers, n_heads, columns).drop(columns=["layer", "head"])  # in id
        if scores is not None:
            table = table.sort_values(score_title, ascending=False, kind="stable")
            table.insert(0, "rank", np.arange(1, len(table) + 1))
        st.session_state["hi_ranked"] = list(table["id"])
        # Narrow columns with short headers (the full name on hover), so every score fits at
        # 1,280 px without scrolling sideways.
        st.dataframe(table, hide_index=True, height=380, key="hi_ranking",
                     on_select=_pick_from_ranking, selection_mode="single-row",
                     column_config={name: st.column_config.NumberColumn(
                         SHORT_NAMES.get(name, name) if name in ROLES else SHORT_NAMES.get(
                             score, score), help=name, format="%.4f", width=RANK_COLUMN_PX)
                         for name in columns} | {"rank": st.column_config.NumberColumn(width=44),
                                                 "id": st.column_config.TextColumn(width=64)})
        st.caption("Sorted by the chosen score, highest first. Select a row to open its head.")
        with st.expander("What the scores mean"):
            st.markdown(EXPLANATIONS)

        export_columns = dict(roles)
        if importance_id:
            export_columns = {f"{score}_{name}": service.array(importance_id, name)
                              for name in NORMALIZATIONS} | export_columns
        link = None if st.session_state.get("in_lesson") else {
            "a": aid, "hi_score": score, "hi_head": focus,
            "hi_norm": norm if is_importance and norm != "layer" else None,
            "hi_skip_first": True if st.session_state.get("hi_skip_first") else None}
        pruning_and_export(record, jobs, results, scores_table(n_layers, n_heads, export_columns),
                           score, link)


if __name__ == "__main__":
    shared.show("head_importance", requests, render)

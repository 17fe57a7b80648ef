"""Overview: what each view shows, and the analysis at hand."""

import streamlit as st

from pages import shared
from pages.view_requests import attention_only as requests
from viz.heatmap import attention_heatmap, binned_heatmap

CHART_MAX = 64  # tokens per side drawn cell by cell on this page; longer texts are binned

INTRO = ("See what a transformer attends to, layer by layer and head by head. Pick a model and "
         "a text in the sidebar (or an example) and press **Analyse**; every result is cached, so "
         "a link to a view reopens it instantly for anyone using this server.")
VIEWS = """
| View | What it shows |
|---|---|
| **Explore** | One head (or a layer's head mean) as a query × key heatmap with token labels; click a token to see where it looks and what looks at it. Long inputs open as a binned overview you zoom into. |
| **Head grid** | Every layer × head as a thumbnail on one screen: spot previous-token, first-token (sink) and diagonal heads at a glance; click one to open it. |
| **Head importance** | Which heads matter (gradient, ablation, confidence, entropy) and what each does (previous-token, sink, induction… scores) on a layer × head grid; click a head for its map and top token pairs; pruning curves mask heads least-important first. |
| **Long-context heads** | Heads by their long-context roles, each measured as its paper does on a needle-in-a-haystack probe: retrieval heads (Wu et al. 2024), streaming heads (a training-free proxy of DuoAttention's gates) and attention sinks (first-token attention above a threshold). |
| **Rollout & flow** | How attention composes across layers: raw attention beside attention rollout and attention flow (Abnar & Zuidema) and gradient-weighted rollout (Chefer et al.), per token and as full matrices. |
| **Thought Anchors** | Which sentences of a reasoning trace steer the answer: counterfactual resampling, receiver heads and attention suppression (Bogdan et al., 2025), on a published trace or one the model writes. |
| **Compare** | Two analyses side by side (two texts, two models, or two heads), their difference where tokens align, and the heads or layers that changed most. |
| **Lessons** | Guided lessons for a class: short stories around prepared analyses, with a presenter mode and a link for every step. |
| **bertviz views** | The classic bertviz head view and model view, rendered offline, for inputs up to 128 tokens. |
"""


def _analysis_at_hand(record) -> None:
    """The analysis' facts beside its middle layer's map (Explore opens on the same map)."""
    meta = record.meta
    chart_column, facts_column = st.columns([3, 2])
    with facts_column:
        # The model's name as text, not a metric: large metric type cuts long names off.
        st.markdown(f"**Model:** {shared.plain(meta['model_label'])}")
        cols = st.columns(3)
        cols[0].metric("Tokens", len(meta["tokens"]))
        cols[1].metric("Layers", meta["n_layers"])
        cols[2].metric("Heads", meta["n_heads"], help="Heads per layer")
        st.markdown("**Text analysed**")
        st.text(record.text)  # st.text never interprets markup
        st.page_link(shared.page("explore"), label="Explore this analysis",
                     icon=":material/arrow_forward:", query_params={"a": record.id})
    layer, labels = meta["n_layers"] // 2, meta["tokens"]  # Explore opens on the same map
    if len(labels) <= CHART_MAX:
        title = f"Layer {layer}, mean of its heads: who attends to whom"
        chart = attention_heatmap(shared.service().attention_matrix(record.id, layer, None),
                                  labels, labels, size=300)
    else:
        title = f"Layer {layer}, mean of its heads, in blocks"
        overview = shared.service().attention_overview(record.id, layer, None, CHART_MAX)
        chart = binned_heatmap(overview.values, overview.query_edges, overview.key_edges,
                               labels, size=300)
    with chart_column:
        # The title outside the chart: Vega would label the chart "Title text …", which
        # locating the sidebar's "Text" box by its label would then also find.
        st.markdown(f"**{title}**")
        st.altair_chart(chart, key="overview_map", width="content")


def render(results, state) -> None:
    st.header("Attention Atlas")
    st.markdown(INTRO)
    record = shared.require_analysis()
    if record:  # first, so the landing page opens on a chart
        _analysis_at_hand(record)
    st.subheader("The views")
    st.markdown(VIEWS)
    st.caption("Attention weights show where information *can* flow, not why a model decided "
               "something: treat them as a lens, not an explanation.")

    recent = shared.service().recent(limit=8)
    if recent:
        st.subheader("Recent analyses on this server")
        for item in recent:
            preview = item.text[:80].replace("\n", " ") + ("…" if len(item.text) > 80 else "")
            label = f"{item.meta.get('model_label', item.model)}: {preview}"
            st.page_link(shared.page("explore"), label=shared.plain(label),
                         query_params={"a": item.id})


if __name__ == "__main__":
    shared.show("overview", requests, render)

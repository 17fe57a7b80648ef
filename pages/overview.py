"""Overview: what each view shows, and the analysis at hand."""

import streamlit as st

from pages import shared

st.header("Attention Atlas")
st.markdown(
    "See what a transformer attends to, layer by layer and head by head. Pick a model and a text "
    "in the sidebar (or an example) and press **Analyse**; every result is cached, so a link to "
    "a view reopens it instantly for anyone using this server."
)
st.markdown(
    """
| View | What it shows |
|---|---|
| **Explore** | One head (or a layer's head mean) as a query × key heatmap with token labels; click a token to see where it looks and what looks at it. Long inputs open as a binned overview you zoom into. |
| **Head grid** | Every layer × head as a thumbnail on one screen: spot previous-token, first-token (sink) and diagonal heads at a glance; click one to open it. |
| **Head importance** | Which heads matter (gradient, ablation, confidence, entropy) and what each does (previous-token, sink, induction… scores) on a layer × head grid; click a head for its map and top token pairs; pruning curves mask heads least-important first. |
| **bertviz views** | The classic bertviz head view and model view, rendered offline, for inputs up to 128 tokens. |
"""
)
st.caption("Attention weights show where information *can* flow, not why a model decided "
           "something: treat them as a lens, not an explanation.")

record = shared.require_analysis()
if record:
    meta = record.meta
    cols = st.columns(4)
    cols[0].metric("Model", meta["model_label"])
    cols[1].metric("Tokens", len(meta["tokens"]))
    cols[2].metric("Layers", meta["n_layers"])
    cols[3].metric("Heads per layer", meta["n_heads"])
    st.markdown("**Text analysed**")
    st.text(record.text)  # st.text never interprets markup
    st.page_link(shared.page("explore"), label="Explore this analysis",
                 icon=":material/arrow_forward:", query_params={"a": record.id})

recent = shared.service().recent(limit=8)
if recent:
    st.subheader("Recent analyses on this server")
    for item in recent:
        preview = item.text[:80].replace("\n", " ") + ("…" if len(item.text) > 80 else "")
        label = f"{item.meta.get('model_label', item.model)}: {preview}"
        st.page_link(shared.page("explore"), label=shared.plain(label), query_params={"a": item.id})

"""Head grid: every layer x head as a thumbnail; click one to open it in Explore."""

import streamlit as st

from pages import shared
from pages.view_requests import attention_only as requests
from viz.head_grid import head_grid, selected_head

THUMBNAIL_BINS = 32  # stored overviews pooled to 32 x 32 per head
GRID_WIDTH = 760  # pixels of the main column at 1,280 px wide: the grid fills it


def _open_head() -> None:
    picked = selected_head(st.session_state.get("grid"))
    if picked:
        st.session_state["open_head"] = picked


def render(results, state) -> None:
    st.header("Head grid")
    record = shared.require_analysis()
    if record:
        if "open_head" in st.session_state:
            layer, head = st.session_state.pop("open_head")
            # A page switch drops every widget's state, the sidebar's text too: let the sidebar
            # show this analysis' model and text again (not the default example).
            st.session_state.pop("inputs_for", None)
            st.switch_page(shared.page("explore"),
                           query_params={"a": record.id, "layer": str(layer), "head": str(head)})
        meta = record.meta
        st.caption(f"{meta['n_layers']} layers × {meta['n_heads']} heads of "
                   f"{meta['model_label']}, {len(meta['tokens'])} tokens. Each thumbnail is a "
                   f"head's query × key map (darker = more attention; long inputs pooled to {THUMBNAIL_BINS} × "
                   f"{THUMBNAIL_BINS}). Look for a dark diagonal (self), a line just below it "
                   "(previous token) and a dark first column (sink). Click a head to open it.")
        thumbnails = shared.service().head_thumbnails(record.id, THUMBNAIL_BINS)
        cell = max(44, min(96, GRID_WIDTH // meta["n_heads"]))
        st.altair_chart(head_grid(thumbnails, cell=cell), key="grid", on_select=_open_head,
                        selection_mode="head", width="content")
        shared.share_link({"a": record.id})


if __name__ == "__main__":
    shared.show("head_grid", requests, render)

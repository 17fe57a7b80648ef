"""bertviz's head view and model view, rendered offline for short inputs."""

import numpy as np
import streamlit as st

from pages import shared
from pages.view_requests import attention_only as requests
from viz import bertviz_view

def render(results, state) -> None:
    st.header("bertviz views")
    st.caption("The head view and model view of bertviz (Vig, 2019), with its scripts served from "
               "this app so they work offline.")
    record = shared.require_analysis()
    if record:
        meta = record.meta
        n_tokens, n_layers = len(meta["tokens"]), meta["n_layers"]
        if n_tokens > bertviz_view.MAX_TOKENS:
            st.warning(f"This input has {n_tokens} tokens; the bertviz views draw every line "
                       f"and are only usable up to {bertviz_view.MAX_TOKENS}. Use Explore, which "
                       "bins long inputs, or analyse a shorter text.")
        else:
            view = st.segmented_control("View", ["head view", "model view"], default="head view",
                                        key="view", bind="query-params")
            per_layer = meta["n_heads"] * n_tokens ** 2
            budget = max(1, min(n_layers, bertviz_view.MAX_EMBEDDED_VALUES // per_layer))
            layers = st.multiselect(
                "Layers", range(n_layers), default=list(range(min(n_layers, budget, 6))),
                max_selections=budget, key="bv_layers",
                help=f"Up to {budget} layers at this length, to keep the page light.")
            if layers:
                attention = np.stack([shared.service().attention_layer(record.id, layer)
                                      for layer in range(n_layers)])
                if view == "model view":
                    html = bertviz_view.model_view_html(attention, meta["tokens"], layers=layers)
                else:
                    html = bertviz_view.head_view_html(attention, meta["tokens"], layers=layers)
                # Tokens are escaped inside the generated script (see viz.bertviz_view). The frame
                # takes the drawing's height, whatever the layers and tokens.
                st.iframe(html, height="content")
            shared.share_link({"a": record.id, "view": view})


if __name__ == "__main__":
    shared.show("bertviz_views", requests, render)

"""Attention Atlas: navigation and the sidebar where a model and a text are chosen."""

from __future__ import annotations

import sys

import streamlit as st

from backend.analyses import AnalysisRequest
from backend.service import DEFAULT_CAUSAL, PACKAGED
from pages import shared
from pages.examples import DEFAULT_EXAMPLE, EXAMPLES


def _load_example() -> None:
    model, text = EXAMPLES[st.session_state["example"]]
    st.session_state.update(model_choice=model, text=text)


def _sync_inputs_with(aid: str | None) -> None:
    """When a link opens another analysis, show its model and text in the sidebar."""
    if not aid or st.session_state.get("inputs_for") == aid:
        return
    st.session_state["inputs_for"] = aid
    try:
        record = shared.service().analysis(aid)
    except Exception:  # malformed or unknown ids are reported by the page itself
        return
    known = record.model in PACKAGED
    st.session_state.update(model_choice=record.model if known else shared.OTHER_MODEL,
                            text=record.text, other_model="" if known else record.model)


def sidebar() -> None:
    aid = shared.current_analysis_id()
    if aid is None and "job_id" not in st.session_state and "submit_error" not in st.session_state:
        # A cold open shows a real analysis at once (cached) or within seconds (computed).
        shared.submit(AnalysisRequest.make("attention", *EXAMPLES[DEFAULT_EXAMPLE]))
        aid = shared.current_analysis_id()
    _sync_inputs_with(aid)
    st.session_state.setdefault("model_choice", DEFAULT_CAUSAL)
    st.session_state.setdefault("text", EXAMPLES[DEFAULT_EXAMPLE][1])
    with st.sidebar:
        st.title("Attention Atlas")
        st.selectbox("Example", list(EXAMPLES), key="example", index=None,
                     placeholder="Load an example…", on_change=_load_example)
        model = shared.model_picker("Model", "model_choice", "other_model")
        text = st.text_area("Text", key="text", height=160)
        limit = shared.service().settings.max_tokens
        st.caption(f"Up to {limit:,} tokens.")
        if st.button("Analyse", type="primary", width="stretch"):
            shared.submit(AnalysisRequest.make("attention", model or "", text))


def main() -> None:
    st.set_page_config(page_title="Attention Atlas", page_icon=":material/visibility:",
                       layout="wide")
    navigation = st.navigation([shared.page(name) for name in shared.PAGES])
    with shared.worker_guard():
        sidebar()
        shared.job_panel()
        shared.run(navigation)


def serve(streamlit_args: list[str]) -> int:
    """`streamlit run app.py` in this process, once this module's imports and the charts' are
    done: torch and the model code behind the analysis kinds take seconds to import, which the
    first visitor would otherwise spend waiting for a chart (Streamlit runs the script in this
    same process, so nothing is imported again)."""
    import importlib
    import pkgutil

    from streamlit.web import cli

    import viz

    for chart in pkgutil.iter_modules(viz.__path__):
        if not chart.ispkg:
            importlib.import_module(f"viz.{chart.name}")
    sys.argv = ["streamlit", "run", __file__, *streamlit_args]
    return cli.main()


if __name__ == "__main__":
    if __spec__ is not None:  # `python -m app [streamlit options]` (run_app starts it so)
        sys.exit(serve(sys.argv[1:]))
    main()  # as `streamlit run app.py` runs it: a script, without a module spec

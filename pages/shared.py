"""What every page shares: the service, the current analysis, job progress and share links, and
`show`, which draws a view inside the app. (Not a page itself: app.py lists the pages.)"""

from __future__ import annotations

import functools
import importlib
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import streamlit as st

from backend.analyses import AnalysisRequest
from backend.service import (PACKAGED, AnalysisRecord, AtlasError, AtlasService, CacheFileError,
                             InputError, JobInterrupted, JobStatus, WorkerUnavailable)
from backend.serving.client import WorkerClient, worker_from_env
from pages import cache_recovery, kind_views, view_state
from viz.math_text import inert

PAGES_DIR = Path(__file__).resolve().parent  # absolute: the app may be started from anywhere
# name (the file pages/<name>.py, also its URL path): (title, icon); the first is the default.
PAGES = {
    "overview": ("Overview", ":material/home:"),
    "explore": ("Explore", ":material/grid_on:"),
    "head_grid": ("Head grid", ":material/apps:"),
    "head_importance": ("Head importance", ":material/leaderboard:"),
    "long_context_heads": ("Long-context heads", ":material/manage_search:"),
    "rollout": ("Rollout & flow", ":material/account_tree:"),
    "thought_anchors": ("Thought Anchors", ":material/psychology:"),
    "compare": ("Compare", ":material/compare:"),
    "lessons": ("Lessons", ":material/school:"),
    "bertviz_views": ("bertviz views", ":material/timeline:"),
}
ANALYSIS_PARAM = "a"
COMPARE_PARAM = "b"  # the second analysis of a comparison
OTHER_MODEL = "other"
MODEL_LABELS = {**{alias: f"{m.label} (offline)" for alias, m in PACKAGED.items()},
                OTHER_MODEL: "Other model…"}  # short: the sidebar is narrow


def page(name: str) -> st.Page:
    """The page `name` (its file is pages/<name>.py), for navigation and links."""
    title, icon = PAGES[name]
    return st.Page(PAGES_DIR / f"{name}.py", title=title, icon=icon, url_path=name,
                   default=name == next(iter(PAGES)))


UNAVAILABLE = "The worker is unavailable, retrying…"
INTERRUPTED = "The worker restarted; the analysis was interrupted. It has been started again."


_app = threading.local()  # whether this thread's script run is the app's (see `show`)


def run(navigation: st.Page) -> None:
    """Run the page the app's navigation picked (app.py calls it after drawing the sidebar)."""
    _app.running = True
    try:
        navigation.run()
    finally:
        _app.running = False


def show(name: str, requests, render) -> None:
    """Draw the view `name` (a page file's last line): `render(results, state)` with the state
    its link asks for and the Results of `requests` for it, or the link's error. On a fresh
    server, Streamlit runs the page file of the very first request alone, without app.py, until
    the app first declares its navigation (its pages-folder mode): then declare it now and rerun,
    which opens the whole app on this view with this link."""
    if not getattr(_app, "running", False):
        st.navigation([page(n) for n in PAGES], position="hidden")
        st.rerun()
    try:
        state = view_state.parse(name, st.query_params.to_dict())
    except InputError as e:
        st.error(str(e))
        return
    render(Results(requests, state), state)


def show_inside(name: str) -> None:
    """Draw the view `name` inside another page (a lesson step), for the link's state."""
    view = importlib.import_module(f"pages.{name}")
    show(name, view.requests, view.render)


class Results:
    """What a view's `requests(state, service)` (pages.view_requests: the function a lesson
    step and the precompute command call too) produce for a state, as its `render` reads them.

    `get(kind, label)` is the analysis id of the view's request of that kind once computed
    (None while it computes, after it failed, or when the state asks for none). A request is
    resolved through the service when render reads it, so its progress bar is drawn where the
    view shows the result; the requests are made on first read, once render has checked the
    analyses the state names. A view whose own widgets change the state (a fragment reruns
    without `show`) reads `for_state(changed)`."""

    def __init__(self, requests, state):
        self._requests, self.state = requests, state
        self._made: list[AnalysisRequest] | None = None

    def for_state(self, state) -> Results:
        return Results(self._requests, state)

    def requests(self, kind: str) -> list[AnalysisRequest]:
        """The state's requests of `kind`, in the order the view asks for them."""
        if self._made is None:
            self._made = list(self._requests(self.state, service()))
        return [request for request in self._made if request.kind == kind]

    def request(self, kind: str) -> AnalysisRequest | None:
        return next(iter(self.requests(kind)), None)

    def __contains__(self, kind: str) -> bool:
        return self.request(kind) is not None

    def get(self, kind: str, label: str) -> str | None:
        """The id of the result of `kind` (see `derived`), or None."""
        request = self.request(kind)
        return None if request is None else derived(request, label)


@st.cache_resource
def _service() -> AtlasService | WorkerClient:
    return worker_from_env() or AtlasService()


def service() -> AtlasService | WorkerClient:
    """One service for all sessions of this server: the worker service's client when
    ATLAS_WORKER_URL is set, else the service in this process (store connection, worker, model
    pool); if the cache file cannot be opened, the page says why and offers what can be done."""
    try:
        return _service()
    except CacheFileError as e:  # not cached: the next run tries again
        cache_recovery.show(e)
        st.stop()


@st.fragment(run_every=2.0)
def _retry_worker() -> None:
    if service().ready():
        st.rerun(scope="app")


@contextmanager
def worker_guard():
    """Around a run (the app's, or a fragment's): a worker that does not answer shows
    UNAVAILABLE, not a traceback, and the page reruns by itself once the worker is back."""
    try:
        yield
    except WorkerUnavailable as e:
        st.warning(UNAVAILABLE, icon=":material/sync_problem:")
        st.caption(plain(str(e)))
        _retry_worker()
        st.stop()


def fragment(function=None, *, run_every: float | None = None):
    """st.fragment, with the worker_guard around each of its own reruns."""
    def decorate(function):
        @functools.wraps(function)
        def guarded(*args, **kwargs):
            with worker_guard():
                return function(*args, **kwargs)
        return st.fragment(guarded, run_every=run_every)
    return decorate(function) if function is not None else decorate


def current_analysis_id() -> str | None:
    """The analysis this session shows: from the link, else the last one it opened."""
    from_url = st.query_params.get(ANALYSIS_PARAM)
    if from_url:
        st.session_state["analysis_id"] = from_url
    aid = st.session_state.get("analysis_id")
    if aid and not from_url:
        st.query_params[ANALYSIS_PARAM] = aid  # page switches drop unbound query params
    return aid


def open_analysis(aid: str) -> None:
    st.session_state["analysis_id"] = aid
    st.query_params[ANALYSIS_PARAM] = aid


def submit(request: AnalysisRequest) -> None:
    """Open the result if cached, else start its job; errors show in the sidebar."""
    try:
        ticket = service().submit(request)
    except WorkerUnavailable:
        raise
    except AtlasError as e:
        st.session_state["submit_error"] = str(e)
        return
    st.session_state.pop("submit_error", None)
    if ticket.analysis_id:
        st.session_state.pop("job_id", None)
        open_analysis(ticket.analysis_id)
    else:
        st.session_state["job_id"] = ticket.job_id
        st.session_state["job_request"] = request  # to start it again if the worker restarts


def _show_progress(status: JobStatus, label: str = "") -> None:
    eta = f" · about {status.eta_s:.0f} s left" if status.eta_s is not None else ""
    st.progress(status.fraction,
                text=f"{label}{status.stage} ({status.elapsed_s:.0f} s{eta})")
    if st.button("Cancel", key=f"cancel_{status.id}"):
        service().cancel(status.id)


@fragment(run_every=0.7)
def _job_progress(job_id: str) -> None:
    try:
        status = service().job_status(job_id)
    except JobInterrupted as e:
        del st.session_state["job_id"]
        request = st.session_state.pop("job_request", None)
        if request is None:
            st.session_state["submit_error"] = str(e)
        else:  # resampling resumes from its saved rollouts
            st.session_state["job_note"] = INTERRUPTED
            submit(request)
        st.rerun(scope="app")
    if not status.finished:
        _show_progress(status)
        return
    del st.session_state["job_id"]
    if status.state == "done":
        open_analysis(service().job_result(job_id))
    else:
        st.session_state["submit_error"] = status.error or status.state
    st.rerun(scope="app")


def job_panel() -> None:
    """Progress of this session's running job (polls without rerunning the page)."""
    if "job_id" in st.session_state:
        with st.container(border=True):
            if "job_note" in st.session_state:
                st.info(st.session_state.pop("job_note"))
            _job_progress(st.session_state["job_id"])
    if st.session_state.get("submit_error"):
        st.error(plain(st.session_state["submit_error"]))  # messages may quote user input


@fragment(run_every=0.7)
def _derived_progress(job_id: str, label: str, key: str) -> None:
    try:
        status = service().job_status(job_id)
    except JobInterrupted:  # the page submits the request again when it reruns
        st.session_state.setdefault("job_notes", {})[key] = INTERRUPTED
        st.rerun(scope="app")
    if not status.finished:
        _show_progress(status, f"{label}: ")
        return
    if status.state != "done":
        st.session_state.setdefault("failed", {})[key] = status.error or status.state
    st.rerun(scope="app")


def derived(request: AnalysisRequest, label: str) -> str | None:
    """The id of a result a view needs besides the attention analysis (flow, importance...):
    cached, or computed now with its own progress bar (then None until it is ready)."""
    key = request.canonical()
    failed = st.session_state.setdefault("failed", {})
    if key in failed:
        st.error(plain(f"{label}: {failed[key]}"))
        if st.button("Try again", key=f"retry_{hash(key)}"):
            del failed[key]
            st.rerun()
        return None
    try:
        ticket = service().submit(request)
    except WorkerUnavailable:
        raise
    except AtlasError as e:  # refused at once (bad input, unknown model): same as a failed job
        failed[key] = str(e)
        st.error(plain(f"{label}: {e}"))
        return None
    note = st.session_state.get("job_notes", {}).pop(key, None)
    if ticket.analysis_id:
        return ticket.analysis_id
    with st.container(border=True):
        if note:
            st.info(f"{label}: {note}")
        _derived_progress(ticket.job_id, label, key)
    return None


def require_analysis(kinds: tuple[str, ...] = kind_views.ATTENTION) -> AnalysisRecord | None:
    """The current analysis if it is of one of `kinds`, or a clear message why there is none."""
    aid = current_analysis_id()
    if not aid:
        if "job_id" in st.session_state:
            st.info("Computing the analysis: it appears here when ready.")
        else:
            st.info("Enter a text in the sidebar and press **Analyse**.")
        return None
    return load_analysis(aid, kinds)


def load_analysis(aid: str, kinds: tuple[str, ...] = kind_views.ATTENTION
                  ) -> AnalysisRecord | None:
    """The analysis `aid` (from a link) if it is of one of `kinds`, or a clear message why it
    cannot be shown here (with a link to the view that can)."""
    try:
        record = service().analysis(view_state.check_analysis_id(aid))
    except InputError as e:
        st.error(str(e))
        return None
    except WorkerUnavailable:
        raise
    except AtlasError as e:
        st.warning(f"{e} It may have been computed on another server: analyse the text again.")
        return None
    if record.kind in kinds:
        return record
    where = kind_views.redirect(record, kinds, service().cached)
    st.warning(where.message)
    st.page_link(page(where.page), label=where.label, icon=":material/arrow_forward:",
                 query_params=where.query)
    return None


def model_picker(label: str, key: str, other_key: str) -> str:
    """A model reference: an offline model from the list, or a typed hub id, folder or file."""
    choice = st.selectbox(label, list(MODEL_LABELS), key=key, format_func=MODEL_LABELS.get)
    if choice != OTHER_MODEL:
        return choice
    return st.text_input("Hub id, model folder or .gguf file", key=other_key,
                         placeholder="Qwen/Qwen2.5-0.5B or my-model/ or model.gguf")


def share_link(params: dict, caption: str = "Link to this view") -> None:
    """A copyable link that reopens exactly this view (the code block has a copy button).
    Inside a lesson the lesson shows its step's link instead."""
    if st.session_state.get("in_lesson"):
        return
    shown = {k: ("true" if v is True else v) for k, v in params.items()
             if v is not None and v is not False}
    query = urlencode(shown, doseq=True)
    base = st.context.url or ""
    st.caption(f"{caption} (copy it with the button on the right):")
    st.code(f"{base}?{query}", language=None)


plain = inert  # user text made inert inside markdown labels: no markup, no HTML, as typed

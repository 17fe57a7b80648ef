"""Lessons: a gallery of guided lessons. Each step tells a short story around a prepared analysis,
shown on the app's own page for it. Presenter mode: large type, controls hidden, one step per
screen; every step is a link that reopens it."""

from html import escape
from urllib.parse import urlencode

import streamlit as st

from backend.service import AtlasError
from pages import shared
from pages.lesson_files import Lesson, read_lessons
from pages.lesson_preparation import Preparation

LESSON, STEP, PRESENT = "lesson", "step", "present"
PRESENTER_CSS = """<style>
section[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"],
[data-testid="stExpandSidebarButton"], header[data-testid="stHeader"] {display: none !important;}
.st-key-lesson_view :is([data-testid="stSlider"], [data-testid="stSelectbox"],
  [data-testid="stButtonGroup"], [data-testid="stCheckbox"], [data-testid="stNumberInput"],
  [data-testid="stTextArea"], [data-testid="stTextInput"], [data-testid="stButton"],
  [data-testid="stDownloadButton"], [data-testid="stExpander"], [data-testid="stFileUploader"],
  [data-testid="stRadio"], [data-testid="stMultiSelect"]) {display: none !important;}
.st-key-lesson_text :is(p, li, span) {font-size: 1.55rem !important; line-height: 1.45;}
.st-key-lesson_text :is(h3, h3 span) {font-size: 2.6rem !important; line-height: 1.2;}
</style>"""
LINK_CSS = """
.atlas-links {display: flex; flex-wrap: wrap; gap: 0.4rem;}
.atlas-links a {padding: 0.3rem 0.8rem; border: 1px solid rgba(49, 51, 63, 0.25);
  border-radius: 0.5rem; text-decoration: none; color: inherit;}
.atlas-links a:hover {border-color: #ff4b4b; color: #ff4b4b;}
"""


def step_link(lesson: Lesson, index: int, present: bool) -> str:
    """The step's link: the lesson, the step, its page's settings and its analyses. Opening it
    loads the page afresh, so every setting comes from the link (as for a colleague)."""
    params = {LESSON: lesson.slug, STEP: index + 1, **lesson.steps[index].params,
              **_cached_ids(lesson, index), **({PRESENT: "true"} if present else {})}
    return "?" + urlencode(params)


def _cached_ids(lesson: Lesson, index: int) -> dict[str, str]:
    """The step's analysis ids that are cached already (the rest are computed on opening)."""
    ids = {}
    for key, request in zip(("a", shared.COMPARE_PARAM), lesson.requests(lesson.steps[index])):
        try:
            aid = request and shared.service().cached(request)
        except AtlasError:  # an unavailable model: the step itself says why when opened
            aid = None
        if aid:
            ids[key] = aid
    return ids


def _links(links: list[tuple[str, str, str]]) -> None:
    """A row of buttons that are plain links (label, href, aria label)."""
    anchors = "".join(f'<a href="{escape(href)}" aria-label="{escape(name)}">{escape(label)}</a>'
                      for label, href, name in links)
    st.html(f"<style>{LINK_CSS}</style><nav class='atlas-links'>{anchors}</nav>")


@st.cache_resource
def _preparations() -> dict[str, Preparation]:
    """The preparation of each lessons folder, shared by every session of this server."""
    return {}


@shared.fragment(run_every=1.0)
def _preparation_progress(preparation: Preparation) -> None:
    if preparation.running:
        fraction = preparation.done / max(preparation.total, 1)
        st.progress(fraction, text=f"Preparing the lessons: {preparation.where} "
                                   f"({preparation.done} of {preparation.total} steps) "
                                   f"{preparation.detail}")
        return
    st.rerun(scope="app")


def preparation_panel(found, folder) -> None:
    """Compute every lesson's analyses on this server, with progress (see
    pages.lesson_preparation)."""
    preparation = _preparations().get(str(folder))
    if preparation is not None and preparation.running:
        _preparation_progress(preparation)
        return
    if preparation is not None and preparation.report:
        report = preparation.report
        st.success(f"Lessons prepared: {report['computed']} analyses computed, "
                   f"{report['cached']} already cached.")
        for where, error in report["failed"].items():
            st.error(f"{shared.plain(where)}: {shared.plain(error)}")
    if st.button("Prepare every lesson", icon=":material/bolt:",
                 help="Computes what the lessons show and is not cached yet, so no step waits "
                      "in class. It runs on the server: you can leave this page."):
        _preparations()[str(folder)] = Preparation(found, shared.service())
        st.rerun()


def gallery(found, folder) -> None:
    st.header("Lessons")
    st.caption(f"Guided lessons for a class. Each is a Markdown file in the lessons folder "
               f"({shared.plain(folder.name)}/): copy one, edit it, and it appears here. "
               "Prepare a class below, or with `python -m backend.precompute`, so no step "
               "waits.")
    preparation_panel(found, folder)
    for name, error in found.errors.items():
        st.warning(f"{shared.plain(name)} could not be read: {shared.plain(error)}")
    columns = st.columns(3)
    for i, lesson in enumerate(found.lessons):
        with columns[i % 3].container(border=True):
            st.markdown(f"**{shared.plain(lesson.title)}**")
            st.caption(f"{shared.plain(lesson.summary)}  \n{len(lesson.steps)} steps")
            _links([("Open", step_link(lesson, 0, False), f"Open {lesson.title}"),
                    ("Present", step_link(lesson, 0, True), f"Present {lesson.title}")])


def _analyses(lesson: Lesson, index: int) -> dict[str, str] | None:
    """The step's analysis ids as link parameters (computed with progress if not cached)."""
    main, second = lesson.requests(lesson.steps[index])
    ids = {"a": shared.derived(main, "Preparing the lesson's analysis")}
    if second is not None:
        ids[shared.COMPARE_PARAM] = shared.derived(second, "Preparing the second analysis")
    return ids if all(ids.values()) else None


def _navigation(lesson: Lesson, index: int, present: bool) -> list[tuple[str, str, str]]:
    """Previous, every step, next, presenter mode on/off, the gallery: all links."""
    links = [("← Previous", step_link(lesson, index - 1, present), "Previous step")
             ] if index > 0 else []
    links += [(str(i + 1), step_link(lesson, i, present), f"Step {i + 1}: {step.title}")
              for i, step in enumerate(lesson.steps)]
    if index < len(lesson.steps) - 1:
        links.append(("Next →", step_link(lesson, index + 1, present), "Next step"))
    mode = "Leave presenter mode" if present else "Present"
    return links + [(mode, step_link(lesson, index, not present), mode),
                    ("All lessons", "?", "All lessons")]


def _fill_step_settings(lesson: Lesson, index: int) -> None:
    """A hand-written link may carry only the lesson and the step: the step's own settings fill
    in whatever the link leaves out, once per step opened (later changes are the reader's)."""
    opened = (lesson.slug, index)
    if st.session_state.get("lesson_settings_for") == opened:
        return
    st.session_state["lesson_settings_for"] = opened
    missing = {k: v for k, v in lesson.steps[index].params.items() if k not in st.query_params}
    if missing:
        st.query_params.update(missing)
        st.rerun()  # before the page's widgets exist, so they start from these settings


def show(lesson: Lesson, index: int, present: bool) -> None:
    _fill_step_settings(lesson, index)
    step, n = lesson.steps[index], len(lesson.steps)
    if present:
        st.html(PRESENTER_CSS)
    with st.container(key="lesson_text"):
        st.caption(f"{shared.plain(lesson.title)} · step {index + 1} of {n}")
        st.subheader(shared.plain(step.title))
        if index == 0 and lesson.intro:
            st.markdown(lesson.intro)
        st.markdown(step.narrative)
        if step.look:
            st.info(f"**Look:** {step.look}", icon=":material/visibility:")
        if step.question:
            st.success(f"**Question for the class:** {step.question}", icon=":material/help:")
        if step.caveat:
            st.warning(f"**Caveat:** {step.caveat}", icon=":material/warning:")
    with st.container(key="lesson_nav"):
        _links(_navigation(lesson, index, present))
    ids = _analyses(lesson, index)
    if ids is None:
        return
    shared.open_analysis(ids["a"])
    if shared.COMPARE_PARAM in ids:
        st.query_params[shared.COMPARE_PARAM] = ids[shared.COMPARE_PARAM]
    if st.session_state.get("inputs_for") != ids["a"]:
        st.rerun()  # once, so the sidebar (and pages reading its model) shows the lesson's
    st.session_state["in_lesson"] = True  # the page's own share link gives way to the step's
    try:
        with st.container(key="lesson_view", border=True):
            shared.show_inside(step.page)
    finally:
        del st.session_state["in_lesson"]
    shared.share_link({key: st.query_params.get_all(key) for key in st.query_params},
                      "Link to this step")


def requests(state, service):
    """The gallery needs no analysis; a step's own view asks for its analyses (`show`)."""
    return iter(())


def render(results, state) -> None:
    folder = shared.service().settings.lessons_dir
    found = read_lessons(folder) if folder.is_dir() else None
    chosen = found.get(state.lesson) if found and state.lesson else None
    if found is None:
        st.error(f"There is no lessons folder ({shared.plain(folder.name)}): set "
                 "ATLAS_LESSONS_DIR.")
    elif chosen is None:
        if state.lesson:
            st.warning(f"There is no lesson '{shared.plain(state.lesson)}' here. Pick one below.")
        gallery(found, folder)
    else:
        show(chosen, min(state.step, len(chosen.steps)) - 1, state.present)


if __name__ == "__main__":
    shared.show("lessons", requests, render)

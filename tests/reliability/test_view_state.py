"""Property tests of link parsing: any query string gives every view a valid state or an
InputError with a clear message, never another exception; valid states survive a round trip."""

from __future__ import annotations

import dataclasses
import re

from hypothesis import given, settings, strategies as st

from backend.errors import InputError
from backend.store import AnalysisRecord
from pages import kind_views, view_state
from pages.shared import PAGES

NAMES = ["a", "b", "t", "lc", "lesson", "step", "present", "layer", "head", "target", "fusion",
         "flow", "hi_score", "hi_prune", "hi_recompute", "cmp_importance", "ta_source",
         "ta_supp", "ta_resample", "ta_which", "ta_engine", "ta_r", "ta_tokens", "ta_chunks",
         "lc_lengths"]
any_text = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", " ", "\0", "0" * 24, "f" * 24, "F" * 24, "0" * 25, "-1", "9" * 5000, "\u0663",
     "true", "True", "<script>", "3,7,3", "2, 1", "1,,2", "0,\u0663"])
queries = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), any_text, max_size=6)
hex_ids = st.text("0123456789abcdef", min_size=24, max_size=24)


def test_every_page_has_a_view_state():
    assert set(view_state.VIEWS) == set(PAGES)


@settings(max_examples=300, deadline=None)
@given(view=st.sampled_from(sorted(view_state.VIEWS)), query=queries)
def test_any_query_gives_a_state_or_a_clear_message(view, query):
    try:
        state = view_state.parse(view, query)
    except InputError as e:
        assert "malformed" in str(e) and "24 hexadecimal" in str(e)
        bad = [query.get(n) for n in ("a", "b", "t", "lc") if query.get(n)]
        assert any(not re.fullmatch("[0-9a-f]{24}", v) for v in bad)
        return
    assert isinstance(state, view_state.VIEWS[view])
    for name in ("a", "b", "t", "lc"):
        value = getattr(state, name, None)
        assert value is None or re.fullmatch("[0-9a-f]{24}", value)
    for f in dataclasses.fields(state):  # a setting its widget would refuse: the default
        if "choices" in f.metadata:
            value = getattr(state, f.name)
            assert value in f.metadata["choices"]
            assert value == query.get(f.name) or value == f.default
        if isinstance(f.default, bool):
            assert getattr(state, f.name) is (query.get(f.name) == "true")
    for name in ("ta_r", "ta_tokens"):
        value = getattr(state, name, None)
        assert value is None or value == int(query[name])
    chosen = getattr(state, "ta_chunks", None)  # sentence indices, each once, in order
    assert chosen is None or (list(chosen) == sorted(set(chosen)) and
                              set(chosen) == {int(i) for i in query["ta_chunks"].split(",")})
    if isinstance(state, view_state.LessonView):
        assert isinstance(state.step, int) and 1 <= state.step < 10 ** view_state.MAX_DIGITS
        raw = query.get("step", "")
        if re.fullmatch("[1-9][0-9]{0,5}", raw):
            assert state.step == int(raw)  # a plain positive number is kept exactly


@settings(max_examples=200, deadline=None)
@given(a=st.none() | hex_ids, b=st.none() | hex_ids, t=st.none() | hex_ids,
       lesson=st.none() | st.text(min_size=1, max_size=20),
       step=st.integers(1, 999_999), present=st.booleans())
def test_valid_states_survive_a_round_trip(a, b, t, lesson, step, present):
    for state in (view_state.AnalysisView(a), view_state.CompareView(a, b, present),
                  view_state.TraceView(t), view_state.ProbeView(a, b),
                  view_state.LessonView(lesson, step, present),
                  view_state.RolloutView(a, lesson, "max", present),
                  view_state.HeadImportanceView(a, "induction", "ablation", present),
                  view_state.TraceView(t, view_state.TRACE_SOURCES[1], present, True,
                                       view_state.RESAMPLE_WHICH[0], lesson, step, step)):
        view = next(v for v, cls in view_state.VIEWS.items() if cls is type(state))
        assert view_state.parse(view, view_state.to_query(state)) == state


KINDS = sorted(kind_views.KIND_NAMES) + ["something_new"]


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KINDS), expected=st.sampled_from([kind_views.ATTENTION,
                                                               kind_views.TRACES]),
       source=st.none() | hex_ids, params=st.dictionaries(
           st.sampled_from(["problem", "answer", "rollouts"]), st.text(max_size=5)))
def test_every_kind_is_redirected_to_a_page_that_exists(kind, expected, source, params):
    record = AnalysisRecord("0" * 24, kind, "smollm2", "f" * 64, "A text.", params)
    where = kind_views.redirect(record, expected, lambda request: source)
    assert where.page in PAGES
    assert "cannot show" in where.message and where.label
    if kind in kind_views.ATTENTION + kind_views.TRACES + kind_views.PROBES:  # itself
        assert list(where.query.values()) == [record.id]
    elif where.query:  # a derived result: the analysis it came from, when cached
        assert list(where.query.values()) == [source]

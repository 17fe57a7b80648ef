"""What a link's query string asks each view to show, parsed without Streamlit.

Widgets bound to query parameters (layer, head, window, target...) parse and clamp their own
values; this module parses the rest: analysis ids (a, b, t), the lesson, its step and presenter
mode. Any query string gives a state or an InputError whose message a page can show as it is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping

from backend.errors import InputError

ANALYSIS_ID = re.compile(r"[0-9a-f]{24}")
MAX_STEP_DIGITS = 6  # int() of thousands of digits is refused by Python itself


def check_analysis_id(raw: str) -> str:
    """The id, or InputError if it cannot be one (content addresses are 24 hex digits)."""
    if not ANALYSIS_ID.fullmatch(raw):
        raise InputError("This link's analysis id is malformed: it should be 24 hexadecimal "
                         "characters.")
    return raw


def step_number(raw: str | None) -> int:
    """A lesson step from a link: a positive number, else the first step."""
    if raw and raw.isascii() and raw.isdigit() and len(raw) <= MAX_STEP_DIGITS:
        return max(int(raw), 1)
    return 1


@dataclass(frozen=True)
class AnalysisView:
    """Overview, Explore, Head grid, Head importance, Rollout & flow, bertviz views."""

    a: str | None = None


@dataclass(frozen=True)
class CompareView:
    a: str | None = None
    b: str | None = None


@dataclass(frozen=True)
class TraceView:
    """Thought Anchors: t is the trace analysis."""

    t: str | None = None


@dataclass(frozen=True)
class ProbeView:
    """Long-context heads: a is the attention analysis (its model is probed), lc the probe."""

    a: str | None = None
    lc: str | None = None


@dataclass(frozen=True)
class LessonView:
    lesson: str | None = None
    step: int = 1
    present: bool = False


VIEWS = {"overview": AnalysisView, "explore": AnalysisView, "head_grid": AnalysisView,
         "head_importance": AnalysisView, "rollout": AnalysisView, "bertviz_views": AnalysisView,
         "compare": CompareView, "thought_anchors": TraceView, "lessons": LessonView,
         "long_context_heads": ProbeView}
_ID_FIELDS = ("a", "b", "t", "lc")


def parse(view: str, query: Mapping[str, str]):
    """The view's state from a query string (one value per name; others are ignored)."""
    state = VIEWS[view]
    if state is LessonView:
        return LessonView(query.get("lesson") or None, step_number(query.get("step")),
                          query.get("present") == "true")
    ids = {name: query.get(name) or None for name in state.__dataclass_fields__}
    for value in ids.values():
        if value is not None:
            check_analysis_id(value)
    return state(**ids)


def to_query(state) -> dict[str, str]:
    """The query parameters that reopen `state` (defaults left out)."""
    query = {}
    for name, value in asdict(state).items():
        if name in _ID_FIELDS or name == "lesson":
            if value:
                query[name] = value
        elif name == "step" and value != 1:
            query[name] = str(value)
        elif name == "present" and value:
            query[name] = "true"
    return query

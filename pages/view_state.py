"""Each view's state: what a link's query string asks the view to show, as a typed dataclass,
parsed from and written to the query string here and nowhere else. Streamlit-free, so a lesson
step (pages.lesson_files) parses its `view:` line with the same rules as the page.

A state holds the analysis ids (a, b, t, lc) and every setting that decides which analyses the
view needs (see pages.view_requests). A value the view's widget would refuse gives the
widget's default, as the page would. Settings that only change the drawing (layer, head,
window...) are restored by the widgets bound to them. Any query string gives a state or an
InputError whose message a page can show as it is.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, fields
from typing import Mapping

from backend.analyses.heads import METHODS, ROLES
from backend.analyses.rollout import HEAD_FUSIONS
from backend.analyses.thought_anchors import WORKED_EXAMPLE
from backend.service import InputError

ANALYSIS_ID = re.compile(r"[0-9a-f]{24}")
MAX_DIGITS = 6  # int() of thousands of digits is refused by Python itself
SCORES = (*METHODS, *(r for r in ROLES if r not in METHODS))  # Head importance's grid colours
PUBLISHED_SOURCE, OWN_PROBLEM, IMPORT_SOURCE = ("Published example", "Your problem",
                                                "Import a published trace")
TRACE_SOURCES = (PUBLISHED_SOURCE, WORKED_EXAMPLE, OWN_PROBLEM, IMPORT_SOURCE)
RESAMPLE_WHICH = ("Every sentence", "Flagged by receiver heads", "Flagged by suppression",
                  "Chosen")


def check_analysis_id(raw: str) -> str:
    """The id, or InputError if it cannot be one (content addresses are 24 hex digits)."""
    if not ANALYSIS_ID.fullmatch(raw):
        raise InputError("This link's analysis id is malformed: it should be 24 hexadecimal "
                         "characters.")
    return raw


def step_number(raw: str | None) -> int:
    """A lesson step from a link: a positive number, else the first step."""
    number = _number(raw)
    return max(number, 1) if number is not None else 1


def _number(raw: str | None) -> int | None:
    if raw and raw.isascii() and raw.isdigit() and len(raw) <= MAX_DIGITS:
        return int(raw)
    return None


def _indices(raw: str | None) -> tuple[int, ...] | None:
    """Sentence indices from a link ("3,7,12"), sorted once each; anything else is none."""
    parts = (raw or "").split(",")
    numbers = [_number(part.strip()) for part in parts]
    if not raw or None in numbers:
        return None
    return tuple(sorted(set(numbers)))


def _id():
    return field(default=None, metadata={"id": True})


def _choice(options: tuple[str, ...]):
    """A setting among `options`; anything else is the first, the widget's default."""
    return field(default=options[0], metadata={"choices": options})


@dataclass(frozen=True)
class AnalysisView:
    """Overview, Explore, Head grid, bertviz views: a is the attention analysis."""

    a: str | None = _id()


@dataclass(frozen=True)
class RolloutView:
    """target: the token as its widget spells it ("5 cat"; None: the view's default, the last
    token of a causal model, else the first); flow: compute attention flow for a text longer
    than the view starts it for by itself."""

    a: str | None = _id()
    target: str | None = None
    fusion: str = _choice(HEAD_FUSIONS)
    flow: bool = False


@dataclass(frozen=True)
class HeadImportanceView:
    """hi_score colours the grid (an importance method or a role); hi_prune orders the
    pruning curve, recomputed after each step when hi_recompute."""

    a: str | None = _id()
    hi_score: str = _choice(SCORES)
    hi_prune: str = _choice(tuple(METHODS))
    hi_recompute: bool = False


@dataclass(frozen=True)
class CompareView:
    """a and b: the two sides; cmp_importance: compare their gradient head importance."""

    a: str | None = _id()
    b: str | None = _id()
    cmp_importance: bool = False


@dataclass(frozen=True)
class TraceView:
    """Thought Anchors: t is the trace analysis (None: the source's trace, once there is one);
    the white-box passes and the resampling asked for, with its engine and budget (None: the
    engine's defaults); ta_chunks: the sentences chosen for resampling (ta_which "Chosen"),
    in a link as "3,7,12"."""

    t: str | None = _id()
    ta_source: str = _choice(TRACE_SOURCES)
    ta_supp: bool = False
    ta_resample: bool = False
    ta_which: str = _choice(RESAMPLE_WHICH)
    ta_engine: str | None = None
    ta_r: int | None = None
    ta_tokens: int | None = None
    ta_chunks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ProbeView:
    """Long-context heads: a is the attention analysis (its model is probed), lc the probe;
    without lc, the probe with the link's settings (comma-separated lengths and depths, the
    passkey input's length; malformed ones give the defaults)."""

    a: str | None = _id()
    lc: str | None = _id()
    lc_lengths: str | None = None
    lc_depths: str | None = None
    lc_passkey: str | None = None


@dataclass(frozen=True)
class LessonView:
    lesson: str | None = None
    step: int = 1
    present: bool = False


VIEWS = {"overview": AnalysisView, "explore": AnalysisView, "head_grid": AnalysisView,
         "head_importance": HeadImportanceView, "rollout": RolloutView,
         "bertviz_views": AnalysisView, "compare": CompareView, "thought_anchors": TraceView,
         "lessons": LessonView, "long_context_heads": ProbeView}


def parse(view: str, query: Mapping[str, str]):
    """The view's state from a query string (one value per name; others are ignored)."""
    state = VIEWS[view]
    hints = typing.get_type_hints(state)
    values = {}
    for f in fields(state):
        raw = query.get(f.name) or None
        if f.name == "step":
            values[f.name] = step_number(raw)
        elif f.metadata.get("id"):
            values[f.name] = raw and check_analysis_id(raw)
        elif hints[f.name] is bool:
            values[f.name] = raw == "true"
        elif hints[f.name] == int | None:
            values[f.name] = _number(raw)
        elif hints[f.name] == tuple[int, ...] | None:
            values[f.name] = _indices(raw)
        elif "choices" in f.metadata:
            values[f.name] = raw if raw in f.metadata["choices"] else f.default
        else:
            values[f.name] = raw
    return state(**values)


def to_query(state) -> dict[str, str]:
    """The query parameters that reopen `state` (defaults left out)."""
    query = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if value is None or value is False or value == f.default:
            continue
        if isinstance(value, tuple):
            query[f.name] = ",".join(map(str, value))
        else:
            query[f.name] = "true" if value is True else str(value)
    return query


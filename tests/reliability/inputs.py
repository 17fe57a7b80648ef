"""The bad-input list shared by the reliability tests (API, pages, browser)."""

from __future__ import annotations

from tests.conftest import SHARED_FIXTURES

MARKUP = ("<script>alert(1)</script><img src=x onerror=alert(2)> **bold** "
          "[link](javascript:alert(3)) <b>b</b> &amp; $x$")
# name: (text, what the refusal must say)
BAD_TEXTS = {
    "empty": ("", "empty"),
    "whitespace": (" \n\t  \r\n", "empty"),
    "100,001 characters": ("x" * 100_001, "100,001"),
    "NUL": ("before\0after", "NUL byte"),
    "lone high surrogate": ("before\ud800after", "lone surrogate"),
    "lone low surrogate": ("\udc80", "lone surrogate"),
    "bell": ("ring \x07 ring", "control character"),
    "escape sequence": ("red \x1b[31m text", "control character"),
    "DEL": ("a\x7fb", "control character"),
}
# Texts that must be analysed and shown exactly as typed.
FINE_TEXTS = {
    "emoji": "I \u2764\ufe0f \U0001f40d and \U0001f469\u200d\U0001f469\u200d\U0001f467 too.",
    "right-to-left": "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 "
                     "\u05e9\u05dc\u05d5\u05dd world",
    "combining": "Cafe\u0301 na\u0308ive Z\u0324\u0354\u0367\u0311o",
    "markup": MARKUP,
    "zero-width and bidi marks": "a\u200bb\u200fc\u202ed",
}
GOOD_TRACE_FILES = (SHARED_FIXTURES / "thought_anchors" / "deepseek-r1-distill-qwen-14b" /
                    "correct_base_solution" / "problem_2238")


def published_files() -> dict[str, bytes]:
    """A real published trace's files, by name (empty if the fixtures are absent)."""
    if not GOOD_TRACE_FILES.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in GOOD_TRACE_FILES.iterdir() if p.suffix == ".json"}

"""Text with each token's background shaded by a score: the most readable attribution view."""

from __future__ import annotations

import html

import numpy as np

_STYLE = ("font-family: ui-monospace, monospace; font-size: 14px; line-height: 2.0; "
          "white-space: pre-wrap;")


def shade(score: float, top: float) -> str:
    """CSS background for a score: opacity = |score| / top; blue, or red for negatives."""
    colour = "31, 119, 180" if score >= 0 else "214, 39, 40"
    return f"background: rgba({colour}, {min(abs(score) / top, 1.0):.3f});"


def highlighted_tokens(labels: list[str], scores: np.ndarray, title: str,
                       highlight: int | None = None) -> str:
    """HTML (escaped, no scripts): tokens shaded by score / max(score); `highlight` boxed.
    Safe for st.html: user text only ever appears through html.escape."""
    scores = np.nan_to_num(np.asarray(scores, dtype=float))
    top = max(float(np.abs(scores).max(initial=0.0)), 1e-12)
    spans = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        border = "outline: 2px solid #d62728;" if i == highlight else ""
        spans.append(f'<span title="{i}: {score:.4f}" style="{shade(score, top)} '
                     f'{border} display: inline-block; padding: 0 2px; margin: 1px; border-radius: 3px;">'
                     f"{html.escape(label)}</span>")
    return (f'<div style="{_STYLE}"><div style="font-family: sans-serif; font-weight: 600;">'
            f"{html.escape(title)}</div>{''.join(spans)}</div>")

"""The text itself, each token shaded by one token's attention: a reading view for long inputs.

Shading is quantised to a few CSS classes so a token costs about 25 bytes of HTML: 8,192 tokens
stay a few hundred kilobytes. User text only ever appears through html.escape (safe for st.html).
"""

from __future__ import annotations

import html

import numpy as np

LEVELS = 12  # shades of blue; level 0 is unshaded
_STYLE = "".join(
    f".rv .s{i}{{background:rgba(31,119,180,{i / (LEVELS - 1):.2f})}}" for i in range(1, LEVELS)
) + (".rv{font-family:ui-monospace,monospace;font-size:14px;line-height:1.9;"
     "white-space:pre-wrap;word-break:break-word;max-height:520px;overflow-y:auto;"
     "border:1px solid #ddd;border-radius:4px;padding:8px}"
     ".rv span{border-radius:2px}.rv .sel{outline:2px solid #d62728}")


def shade_levels(weights: np.ndarray) -> np.ndarray:
    """(tokens,) int levels 0..LEVELS-1: weight / max weight, square-root scaled so that small
    but real weights next to a dominant one stay visible."""
    w = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 0, None)
    top = w.max(initial=0.0)
    if top <= 0:
        return np.zeros(len(w), dtype=int)
    return np.ceil(np.sqrt(w / top) * (LEVELS - 1) - 0.5).clip(0, LEVELS - 1).astype(int)


def top_positions(weights: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(index, weight) of the k largest weights, strongest first."""
    w = np.asarray(weights, dtype=np.float64)
    k = min(k, len(w))
    if k == 0:
        return []
    idx = np.argpartition(-w, k - 1)[:k]
    idx = idx[np.argsort(-w[idx], kind="stable")]
    return [(int(i), float(w[i])) for i in idx]


def reading_view(pieces: list[str], weights: np.ndarray, offset: int = 0,
                 selected: int | None = None) -> str:
    """HTML of text pieces (the token's own text, in order) shaded by (tokens,) weights.
    `offset` is the position of pieces[0]; the `selected` position is outlined; shaded tokens
    carry their position and weight as a hover title."""
    levels = shade_levels(weights)
    spans = []
    for i, (piece, level) in enumerate(zip(pieces, levels)):
        position = offset + i
        classes = ([f"s{level}"] if level else []) + (["sel"] if position == selected else [])
        attrs = f' class="{" ".join(classes)}"' if classes else ""
        if level or position == selected:
            attrs += f' title="{position}: {float(weights[i]):.4f}"'
        spans.append(f"<span{attrs}>{html.escape(piece)}</span>")
    return f'<style>{_STYLE}</style><div class="rv">{"".join(spans)}</div>'


def text_pieces(text: str, offsets: list, labels: list[str]) -> list[str]:
    """Each token's own stretch of the text (from its character offsets), so the reading view
    reads as the text; tokens without a span (special tokens) show their label."""
    pieces = []
    previous_end = 0
    for (start, end), label in zip(offsets, labels):
        if end <= start:
            pieces.append(label)
            continue
        # The gap before a token (skipped whitespace) belongs to it, so nothing is lost; tokens
        # sharing characters (pieces of one multi-byte character) show them once.
        pieces.append(text[previous_end:end] if end > previous_end else "")
        previous_end = max(previous_end, end)
    return pieces

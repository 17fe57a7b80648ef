"""Aligning two tokenised texts so their attention maps can be compared cell by cell.

Two sides (two texts on one model, one text on two models) rarely have the same tokens. Both are
mapped onto shared *units*: runs of tokens that correspond. A unit is one token on each side when
the tokenizer is shared and the texts agree there; otherwise it is a word or a character span that
both tokenizations cover with whole tokens. Tokens without a counterpart (a word only one text has,
a BOS token only one model adds) belong to no unit and drop out of the comparison.

Attention moves onto units by averaging query rows (each row is a distribution) and summing key
columns (mass to a unit is the mass to its tokens), so aligned rows still sum to at most one.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np

TOKENS, SPANS, WORDS = "tokens", "spans", "words"
LEVELS = (TOKENS, SPANS, WORDS)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Side:
    """One tokenised text: ids, labels and special flags are (tokens,); offsets are each token's
    character span in `text`, (0, 0) for special tokens."""

    text: str
    ids: list[int]
    labels: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


@dataclass(frozen=True)
class Alignment:
    """labels: (unit,) what each unit shows ("big→small" where the sides differ).
    a, b: (unit, tokens) 0/1 membership of each side's tokens in each unit.
    changed: (unit,) True where the two sides' text differs (paired by position or merged)."""

    labels: list[str]
    a: np.ndarray
    b: np.ndarray
    changed: np.ndarray

    @property
    def mostly_changed(self) -> bool:
        """Too little in common to compare meanings: fewer than two units, or on either side
        fewer than half of the tokens sit in units whose text is the same on both sides."""
        same_a = self.a[~self.changed].sum() / max(self.a.shape[1], 1)
        same_b = self.b[~self.changed].sum() / max(self.b.shape[1], 1)
        return len(self.labels) < 2 or bool(min(same_a, same_b) < 0.5)

    def unmatched(self) -> tuple[int, int]:
        """How many tokens of each side belong to no unit."""
        return int((self.a.sum(0) == 0).sum()), int((self.b.sum(0) == 0).sum())


def align(a: Side, b: Side, level: str) -> Alignment:
    """Units shared by both sides. level: "tokens" (same tokenizer: token ids are compared),
    "spans" (same text: the finest character spans both tokenizations cut at) or "words"
    (whitespace-separated words; works across tokenizers and texts)."""
    if level == TOKENS:
        return _pair([[i] for i in range(len(a.ids))], a.ids, a.labels,
                     [[i] for i in range(len(b.ids))], b.ids, b.labels, joiner="")
    if level == SPANS and a.text != b.text:
        raise ValueError("Span alignment needs the same text on both sides; use words.")
    if level == SPANS:
        bounds = _token_bounds(a) & _token_bounds(b)
        units_a, units_b = _units(a, bounds), _units(b, bounds)
    elif level == WORDS:
        units_a = _units(a, _token_bounds(a) & _word_bounds(a.text))
        units_b = _units(b, _token_bounds(b) & _word_bounds(b.text))
    else:
        raise ValueError(f"Unknown alignment level '{level}'; use one of {', '.join(LEVELS)}.")
    return _pair(*units_a, *units_b, joiner=" ")


def unit_spans(membership: np.ndarray) -> np.ndarray:
    """(unit, 2) half-open token span of each unit of a (unit, tokens) 0/1 membership whose
    units are runs of consecutive tokens in token order (as `align` makes them)."""
    spans = []
    for row in np.asarray(membership):
        tokens = np.flatnonzero(row)
        if len(tokens) == 0 or tokens[-1] - tokens[0] + 1 != len(tokens):
            raise ValueError("Each unit must be one run of consecutive tokens, in token order.")
        spans.append((tokens[0], tokens[-1] + 1))
    spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
    if (spans[1:, 0] < spans[:-1, 1]).any():
        raise ValueError("Each unit must be one run of consecutive tokens, in token order.")
    return spans


def aligned_attention(attention: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """(..., query, key) attention of one side -> (..., unit, unit): query rows averaged over a
    unit's tokens, key columns summed. membership: (unit, tokens) 0/1; each unit is a run of
    consecutive tokens and units follow the token order (as `align` makes them)."""
    unit_of = np.full(membership.shape[1], -1)
    units, tokens = np.nonzero(membership)
    unit_of[tokens] = units
    # Runs of tokens with one unit (or none): pooling runs in place avoids copying the matrix.
    starts = np.flatnonzero(np.r_[True, unit_of[1:] != unit_of[:-1]])
    kept = unit_of[starts] >= 0
    if not np.array_equal(unit_of[starts][kept], np.arange(membership.shape[0])):
        raise ValueError("Each unit must be one run of consecutive tokens, in token order.")
    sizes = np.diff(np.r_[starts, membership.shape[1]])[kept]
    rows = np.add.reduceat(attention, starts, axis=-2)[..., kept, :] / sizes[:, None].astype(
        attention.dtype)
    return np.add.reduceat(rows, starts, axis=-1)[..., kept]


def _snap(text: str, position: int) -> int:
    """The first non-space position at or after `position`: a token "·it" and a word "it" then
    start at the same place."""
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _token_bounds(side: Side) -> set[int]:
    bounds = set()
    for (start, end), special in zip(side.offsets, side.special):
        if not special and end > start:
            bounds |= {_snap(side.text, start), _snap(side.text, end)}
    return bounds


def _word_bounds(text: str) -> set[int]:
    bounds = set()
    for word in _WORD.finditer(text):
        bounds |= {word.start(), _snap(text, word.end())}
    return bounds


def _units(side: Side, bounds: set[int]) -> tuple[list[list[int]], list, list[str]]:
    """Tokens grouped between consecutive bounds: (token indices, comparison key, label) per
    unit. Special tokens are units of their own, keyed by their label."""
    cuts = sorted(bounds)
    groups: list[list[int]] = []
    keys: list = []
    labels: list[str] = []
    current = None
    for i, ((start, end), special) in enumerate(zip(side.offsets, side.special)):
        if special or end <= start:
            groups.append([i])
            keys.append(("special", side.labels[i]))
            labels.append(side.labels[i])
            current = None
            continue
        position = min(_snap(side.text, start), max(cuts[-1] - 1, 0)) if cuts else 0
        unit = int(np.searchsorted(cuts, position, side="right"))  # which gap between cuts
        if current != unit:
            lo = cuts[unit - 1] if unit > 0 else 0
            hi = cuts[unit] if unit < len(cuts) else len(side.text)
            piece = side.text[lo:hi].strip()
            groups.append([])
            keys.append(piece)
            labels.append(piece)
            current = unit
        groups[-1].append(i)
    return groups, keys, labels


def _pair(groups_a, keys_a, labels_a, groups_b, keys_b, labels_b, joiner: str) -> Alignment:
    """Match the two unit sequences (difflib). Equal runs pair one to one; a replaced run of the
    same length pairs position by position ("big→small"); other differences become one merged
    unit when both sides have something there, and drop out when only one side has. `joiner`
    glues the labels of a merged unit (tokens carry their own spaces, words do not)."""
    matcher = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
    pairs: list[tuple[list[int], list[int], str, bool]] = []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            pairs += [(groups_a[i], groups_b[j], labels_a[i], False)
                      for i, j in zip(range(a0, a1), range(b0, b1))]
        elif op == "replace" and a1 - a0 == b1 - b0:
            pairs += [(groups_a[i], groups_b[j], f"{labels_a[i]}→{labels_b[j]}", True)
                      for i, j in zip(range(a0, a1), range(b0, b1))]
        elif op == "replace":
            pairs.append(([t for g in groups_a[a0:a1] for t in g],
                          [t for g in groups_b[b0:b1] for t in g],
                          f"{joiner.join(labels_a[a0:a1])}→{joiner.join(labels_b[b0:b1])}",
                          True))
    n_a = sum(len(g) for g in groups_a)
    n_b = sum(len(g) for g in groups_b)
    a = np.zeros((len(pairs), n_a), dtype=np.float32)
    b = np.zeros((len(pairs), n_b), dtype=np.float32)
    for u, (tokens_a, tokens_b, _, _) in enumerate(pairs):
        a[u, tokens_a] = 1
        b[u, tokens_b] = 1
    return Alignment([pair[2] for pair in pairs], a, b,
                     np.array([pair[3] for pair in pairs], dtype=bool))

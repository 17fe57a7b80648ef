"""Sentence segmentation of reasoning traces ("chunks"), spec section 1.

`split_into_chunks` reproduces the published chunk lists exactly. `chunk_spans` gives where each
chunk lies in the original (un-stripped) text, and `token_spans` turns those character spans into
token index spans of the model's real input encoding.

Span convention. A chunk span `(start, end)` is half-open, in characters of the original text.
`text[start:end]` begins with the chunk's first character and ends with its last. It equals the
chunk exactly, except where the merge pass joined a short chunk to its neighbour: there the chunk
has one space and the slice keeps the original whitespace between the two pieces (for example
"\\n\\n"). So the two always agree after each whitespace run is collapsed to one space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_CHUNK_CHARS = 10
_SENTENCE_END = ".?!"
_PARAGRAPH_ENDS = ("\n\n", "\r\n\r\n")


def _think_region(text: str) -> tuple[int, int]:
    """Character range `[lo, hi)` of the text the chunks come from (step 1: think tags, strip).

    All that follows the first `<think>`, as the spec says (the reference's
    `split("<think>")[1]` would also stop at a second `<think>`; published traces have one).
    """
    lo, hi = 0, len(text)
    opening = text.find("<think>")
    if opening != -1:
        lo = opening + len("<think>")
    closing = text.find("</think>", lo)
    if closing != -1:
        hi = closing
    while lo < hi and text[lo].isspace():
        lo += 1
    while hi > lo and text[hi - 1].isspace():
        hi -= 1
    return lo, hi


def _raw_pieces(text: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Step 2, the character walk: stripped spans of the pieces between boundaries."""
    pieces, begin = [], lo
    for i in range(lo, hi):
        paragraph_end = any(text.startswith(p, i, hi) for p in _PARAGRAPH_ENDS)
        sentence_end = text[i] in _SENTENCE_END and i + 1 < hi and text[i + 1] in " \n"
        if paragraph_end or sentence_end or i == hi - 1:
            start, end = begin, i + 1
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if start < end:  # a whitespace-only chunk is not kept and does not reset the walk
                pieces.append((start, end))
                begin = i + 1
    return pieces


def _segment(text: str, min_chars: int) -> list[tuple[str, int, int]]:
    """(chunk, start, end) per chunk: the walk of step 2, then the merge pass of step 3."""
    lo, hi = _think_region(text)
    chunks = [(text[s:e], s, e) for s, e in _raw_pieces(text, lo, hi)]
    i = 0
    while i < len(chunks):
        chunk, start, end = chunks[i]
        if len(chunk) >= min_chars or len(chunks) == 1:
            i += 1
        elif i == len(chunks) - 1:  # a short last chunk joins the previous one
            previous, p_start, _ = chunks[i - 1]
            chunks[i - 1 : i + 1] = [(previous + " " + chunk, p_start, end)]
        else:  # a short chunk joins the next one; re-check the same position
            following, _, f_end = chunks[i + 1]
            chunks[i : i + 2] = [(chunk + " " + following, start, f_end)]
    return chunks


def split_into_chunks(text: str, min_chars: int = MIN_CHUNK_CHARS) -> list[str]:
    """Chunks of a model's raw output, exactly as the published traces list them.

    `min_chars`: chunks shorter than this are merged with a neighbour (10 in the reference;
    0 turns the merge pass off).
    """
    return [chunk for chunk, _, _ in _segment(text, min_chars)]


def chunk_spans(text: str, min_chars: int = MIN_CHUNK_CHARS) -> list[tuple[int, int]]:
    """Half-open character span `(start, end)` of each chunk in the original, un-stripped `text`.

    One span per entry of `split_into_chunks(text, min_chars)`; see the module docstring for how
    the slice relates to the chunk.
    """
    return [(start, end) for _, start, end in _segment(text, min_chars)]


def token_spans(
    char_spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token index span `(first, last + 1)` of each character span (half-open).

    `offsets`: the tokenizer's offset mapping of the text the model really reads, shape
    (token, 2), one `(start, end)` per token; special tokens (BOS, CLS...) carry `(0, 0)` and
    belong to no chunk. A token belongs to a chunk when its characters overlap the chunk's
    (`tok_start < end and tok_end > start`), so a token that straddles two chunks is in both.
    With offsets of the full encoding (BOS included) the indices are positions in the model's
    input, the spec's "tokens of the text before it" convention. A chunk that no token overlaps
    (for example after truncation) gets the empty span `(k, k)`, k = tokens that end before it.
    """
    table = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    tok_start, tok_end = table[:, 0], table[:, 1]
    real = tok_end > tok_start
    spans = []
    for start, end in char_spans:
        inside = np.flatnonzero(real & (tok_start < end) & (tok_end > start))
        if inside.size:
            spans.append((int(inside[0]), int(inside[-1]) + 1))
        else:
            before = np.flatnonzero(real & (tok_end <= start))
            k = int(before[-1]) + 1 if before.size else 0
            spans.append((k, k))
    return spans


def token_spans_for_text(text: str, tokenizer, char_spans: Sequence[tuple[int, int]] | None = None):
    """Token spans of the chunks of `text`, encoded as the model reads it (special tokens added).

    `tokenizer` must be a fast (Rust) tokenizer, which reports offsets. `text` is the whole model
    input (prompt + trace); `char_spans` defaults to `chunk_spans(text)`, which is right when the
    prompt ends with `<think>` (as the reference prompt does); otherwise pass the trace's spans
    shifted by the prompt's length.
    """
    spans = chunk_spans(text) if char_spans is None else char_spans
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return token_spans(spans, encoding["offset_mapping"])


def resampling_prefix(chunks: Sequence[str], i: int) -> str:
    """Prefix that chunk i's rollouts continue, as the reference builds it (the faithful variant):
    `" ".join(chunks[:i+1]).replace(chunks[i], "").strip()`. Chunks 0..i-1 joined by single
    spaces, except that earlier copies of chunk i's text are deleted too."""
    return " ".join(chunks[: i + 1]).replace(chunks[i], "").strip()


def clean_resampling_prefix(text: str, i: int) -> str:
    """Prefix before chunk i with the original spacing: the trace text from its first chunk to
    the end of chunk i-1 ("" for chunk 0). `text` as given to `split_into_chunks`."""
    spans = chunk_spans(text)
    return text[spans[0][0] : spans[i - 1][1]] if i > 0 else ""

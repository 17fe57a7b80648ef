import json
import re

import pytest

from backend.methods.thought_anchors import split_into_chunks
from backend.methods.thought_anchors.segmentation import (
    chunk_spans,
    clean_resampling_prefix,
    resampling_prefix,
    token_spans,
    token_spans_for_text,
)


def _published(trace_dir):
    base = json.loads((trace_dir / "base_solution.json").read_text())
    chunks = [c["chunk"] for c in json.loads((trace_dir / "chunks_labeled.json").read_text())]
    return base, chunks


@pytest.mark.parametrize("field", ["solution", "full_cot"])
def test_split_reproduces_published_chunks(trace_dir, field):
    base, chunks = _published(trace_dir)
    assert split_into_chunks(base[field]) == chunks


def test_spans_without_merge_slice_back_exactly(trace_dir):
    text = _published(trace_dir)[0]["full_cot"]
    raw = split_into_chunks(text, min_chars=0)
    spans = chunk_spans(text, min_chars=0)
    assert [text[s:e] for s, e in spans] == raw


def test_merged_spans_cover_consecutive_pieces(trace_dir):
    """Each merged chunk = its pieces joined by one space; its span runs from the first piece's
    start to the last piece's end, and the slice keeps the original whitespace between pieces."""
    text = _published(trace_dir)[0]["full_cot"]
    raw, raw_spans = split_into_chunks(text, 0), chunk_spans(text, 0)
    chunks, spans = split_into_chunks(text), chunk_spans(text)
    assert len(raw) > len(chunks)  # the merge pass did something in both fixtures
    k = 0
    for chunk, (start, end) in zip(chunks, spans):
        assert raw_spans[k][0] == start
        pieces = []
        while k < len(raw) and raw_spans[k][1] <= end:
            pieces.append(k)
            k += 1
        assert raw_spans[pieces[-1]][1] == end
        assert chunk == " ".join(raw[p] for p in pieces)
        gaps = [text[raw_spans[p][1] : raw_spans[p + 1][0]] for p in pieces[:-1]]
        assert all(g.strip() == "" for g in gaps)
        assert re.sub(r"\s+", " ", text[start:end]) == re.sub(r"\s+", " ", chunk)
    assert k == len(raw)


def test_boundary_rules():
    text = "Pi is 3.14 here. Step 1. Do it: now?Yes! Go\nnext line.\n\nNew paragraph starts here"
    assert split_into_chunks(text, min_chars=0) == [
        "Pi is 3.14 here.", "Step 1.", "Do it: now?Yes!", "Go\nnext line.",
        "New paragraph starts here",
    ]


def test_merge_pass_short_chunks():
    # "Ok." is short: joined to the next; "Done." is short and last: joined to the previous.
    assert split_into_chunks("Ok. Then we compute things. Done.") == [
        "Ok. Then we compute things. Done."
    ]
    text = "A. B. C. This one is long enough."
    assert split_into_chunks(text) == [text]
    assert split_into_chunks("Tiny.") == ["Tiny."]


def test_think_tags_and_spans_in_original_text():
    text = "Prompt.\n<think>\n  First sentence here. Second sentence here.\n</think>\nAnswer."
    expected = ["First sentence here.", "Second sentence here."]
    assert split_into_chunks(text) == expected
    assert [text[s:e] for s, e in chunk_spans(text)] == expected


def test_token_spans_offsets_convention():
    # tokens: [BOS] "Ab" "c." " D" "e" "f." [EOS] ; chunks "Abc." (0, 4) and "Def." (5, 9)
    offsets = [(0, 0), (0, 2), (2, 4), (4, 6), (6, 7), (7, 9), (0, 0)]
    assert token_spans([(0, 4), (5, 9)], offsets) == [(1, 3), (3, 6)]
    # a token straddling two chunks belongs to both; a chunk past the encoding is empty
    assert token_spans([(0, 3), (3, 4), (20, 25)], offsets) == [(1, 3), (2, 3), (6, 6)]


def test_token_spans_with_real_tokenizer(trace_dir, minilm_tokenizer):
    """The span of each chunk holds exactly the chunk's own tokens, and equals the spec's
    "tokens of the text before it" count with the leading special token included."""
    text = _published(trace_dir)[0]["full_cot"]
    chunks, spans = split_into_chunks(text), chunk_spans(text)
    ids = minilm_tokenizer(text)["input_ids"]
    tokens = token_spans_for_text(text, minilm_tokenizer, spans)

    def count(prefix):  # [CLS] + the prefix's tokens
        return 1 + len(minilm_tokenizer(prefix, add_special_tokens=False)["input_ids"])

    for chunk, (start, end), (t0, t1) in zip(chunks, spans, tokens):
        assert ids[t0:t1] == minilm_tokenizer(chunk, add_special_tokens=False)["input_ids"]
        assert (t0, t1) == (count(text[:start]), count(text[:end]))


def test_resampling_prefixes():
    chunks = ["We add the numbers here.", "Then we check it again.", "We add the numbers here."]
    assert resampling_prefix(chunks, 0) == ""
    assert resampling_prefix(chunks, 1) == "We add the numbers here."
    # the faithful variant also deletes earlier copies of the same sentence
    assert resampling_prefix(chunks, 2) == "Then we check it again."
    text = "<think>\nWe add the numbers here.\n\nThen we check it again. We add the numbers here."
    assert clean_resampling_prefix(text, 0) == ""
    assert clean_resampling_prefix(text, 2) == "We add the numbers here.\n\nThen we check it again."


def test_prefixes_on_published_trace(trace_dir):
    text = _published(trace_dir)[0]["full_cot"]
    chunks = split_into_chunks(text)
    for i in range(len(chunks)):
        clean = clean_resampling_prefix(text, i)
        assert split_into_chunks(clean) == chunks[:i]
        if chunks[i] not in " ".join(chunks[:i]):
            assert resampling_prefix(chunks, i) == " ".join(chunks[:i])

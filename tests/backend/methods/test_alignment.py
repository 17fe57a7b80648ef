"""Token alignment across tokenizers and texts, on hand-made tokenisations with known answers."""

import numpy as np
import pytest

from backend.methods.alignment import Side, align, aligned_attention

TEXT = "The unbelievable cat sat."


def side(text, pieces, special=()):
    """A Side from (label, start, end) pieces; specials are (label, 0, 0)."""
    return Side(text, list(range(len(pieces))), [p[0] for p in pieces],
                [(p[1], p[2]) for p in pieces], [p[0] in special for p in pieces])


# Two tokenizations of TEXT: a BPE with leading-space tokens, and a WordPiece-like one with
# [CLS]/[SEP] and pieces that do not include the space.
BPE = side(TEXT, [("The", 0, 3), ("·un", 3, 6), ("believ", 6, 12), ("able", 12, 16),
                  ("·cat", 16, 20), ("·sat", 20, 24), (".", 24, 25)])
WORDPIECE = side(TEXT, [("[CLS]", 0, 0), ("the", 0, 3), ("unbel", 4, 9), ("##ievable", 9, 16),
                        ("cat", 17, 20), ("sat", 21, 24), (".", 24, 25), ("[SEP]", 0, 0)],
                 special={"[CLS]", "[SEP]"})


def groups(membership):
    return [list(np.flatnonzero(row)) for row in membership]


def test_spans_group_tokens_until_both_tokenizers_cut():
    alignment = align(BPE, WORDPIECE, "spans")
    assert alignment.labels == ["The", "unbelievable", "cat", "sat", "."]
    assert groups(alignment.a) == [[0], [1, 2, 3], [4], [5], [6]]
    assert groups(alignment.b) == [[1], [2, 3], [4], [5], [6]]
    assert alignment.unmatched() == (0, 2)  # [CLS] and [SEP] have no counterpart
    assert not alignment.changed.any() and not alignment.mostly_changed


def test_words_merge_punctuation_into_its_word():
    alignment = align(BPE, WORDPIECE, "words")
    assert alignment.labels == ["The", "unbelievable", "cat", "sat."]
    assert groups(alignment.a) == [[0], [1, 2, 3], [4], [5, 6]]
    assert groups(alignment.b) == [[1], [2, 3], [4], [5, 6]]


def test_words_across_two_texts_pair_the_replaced_word():
    big = side("it was too big", [("it", 0, 2), ("·was", 2, 6), ("·too", 6, 10),
                                  ("·big", 10, 14)])
    small = side("it was too small", [("it", 0, 2), ("·was", 2, 6), ("·too", 6, 10),
                                      ("·sm", 10, 13), ("all", 13, 16)])
    alignment = align(big, small, "words")
    assert alignment.labels == ["it", "was", "too", "big→small"]
    assert groups(alignment.b)[-1] == [3, 4]


def test_tokens_of_one_tokenizer_pair_one_to_one_and_mark_the_substitution():
    a = Side("x", [5, 6, 7, 8], ["A", "·big", "·box", "."], [(0, 1)] * 4, [False] * 4)
    b = Side("y", [5, 9, 7, 8], ["A", "·small", "·box", "."], [(0, 1)] * 4, [False] * 4)
    alignment = align(a, b, "tokens")
    assert np.array_equal(alignment.a, np.eye(4)) and np.array_equal(alignment.b, np.eye(4))
    assert alignment.labels == ["A", "·big→·small", "·box", "."]
    assert alignment.changed.tolist() == [False, True, False, False]
    inserted = Side("z", [5, 6, 6, 7, 8], ["A", "·big", "·big", "·box", "."], [(0, 1)] * 5,
                    [False] * 5)
    alignment = align(a, inserted, "tokens")
    assert alignment.unmatched() == (0, 1)  # the repeated word has no counterpart
    assert len(alignment.labels) == 4


def test_texts_with_nothing_in_common_are_flagged():
    a = side("Hello there", [("Hello", 0, 5), ("·there", 5, 11)])
    b = side("Goodbye now friend", [("Good", 0, 4), ("bye", 4, 7), ("·now", 7, 11),
                                    ("·friend", 11, 18)])
    alignment = align(a, b, "words")
    assert alignment.labels == ["Hello there→Goodbye now friend"]  # one merged unit
    assert alignment.mostly_changed


def test_same_text_and_tokenizer_is_the_identity():
    alignment = align(BPE, BPE, "tokens")
    assert np.array_equal(alignment.a, np.eye(7)) and np.array_equal(alignment.b, np.eye(7))


def test_spans_need_one_text():
    with pytest.raises(ValueError, match="same text"):
        align(BPE, side("Other text", [("Other", 0, 5), ("·text", 5, 10)]), "spans")


def test_aligned_attention_averages_queries_and_sums_keys():
    rng = np.random.default_rng(0)
    attention = rng.random((2, 7, 7))
    attention /= attention.sum(-1, keepdims=True)
    alignment = align(BPE, WORDPIECE, "spans")
    units = aligned_attention(attention, alignment.a)
    assert units.shape == (2, 5, 5)
    # Unit 1 ("unbelievable") holds tokens 1-3: its row is the mean of their rows, summed per unit.
    expected = attention[:, 1:4, :].mean(1)
    assert np.allclose(units[:, 1, 1], expected[:, 1:4].sum(-1))
    assert np.allclose(units[:, 1, 0], expected[:, 0])
    assert np.allclose(units.sum(-1), 1)  # every BPE token is in a unit: no mass is lost

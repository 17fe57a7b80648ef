"""Token labels and offsets for a byte-level BPE (SmolLM2) and a WordPiece (MiniLM) tokenizer."""

from __future__ import annotations

import pytest

from backend.errors import InputError
from backend.methods.tokens import tokenize

TEXT = "Hello world, the cat sat.\nThen it slept\n\nfor hours and hours."


def test_bpe_labels_show_whitespace_and_pieces_rebuild_the_text(smollm2):
    tok = smollm2.tokenizer
    out = tokenize(tok, TEXT, max_tokens=1024)
    assert len(out.ids) == len(out.labels) == len(out.special) == len(out.offsets)
    pieces = [tok.decode([i]) for i in out.ids]
    assert "".join(pieces) == TEXT  # SmolLM2 adds no BOS/EOS: every token is text
    assert not any(out.special)
    for piece, label in zip(pieces, out.labels):
        assert " " not in label and "\n" not in label
        if piece.startswith(" "):
            assert label.startswith("·")
        if "\n" in piece:
            assert "↵" * piece.count("\n") in label
    # Labels are the text with visible whitespace, token by token.
    shown = "".join(out.labels).replace("·", " ").replace("↵", "\n")
    assert shown == TEXT
    assert "·world," in "".join(out.labels) and "↵↵" in "".join(out.labels)


def test_bpe_offsets_slice_each_token(smollm2):
    tok = smollm2.tokenizer
    out = tokenize(tok, TEXT, max_tokens=1024)
    for tid, (start, end) in zip(out.ids, out.offsets):
        assert TEXT[start:end] == tok.decode([tid])
    assert out.offsets[0][0] == 0 and out.offsets[-1][1] == len(TEXT)


def test_multibyte_characters_never_show_replacement_characters(smollm2):
    out = tokenize(smollm2.tokenizer, "Café au lait ☕ 東京", max_tokens=1024)
    assert all("\ufffd" not in label for label in out.labels)


def test_wordpiece_marks_cls_and_sep_special(minilm):
    tok = minilm.tokenizer
    out = tokenize(tok, "Hello World, again", max_tokens=1024)
    tokens = tok.convert_ids_to_tokens(out.ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert out.special == [True] + [False] * (len(out.ids) - 2) + [True]
    assert out.labels[0] == "[CLS]" and out.labels[-1] == "[SEP]"
    assert out.offsets[0] == (0, 0) and out.offsets[-1] == (0, 0)


def test_wordpiece_offsets_slice_each_token_case_insensitively(minilm):
    tok = minilm.tokenizer
    text = "Attention Atlas shows Unbelievably long tokenizations, too."
    out = tokenize(tok, text, max_tokens=1024)
    words = tok.convert_ids_to_tokens(out.ids)
    assert any(w.startswith("##") for w in words)  # the test covers sub-word pieces
    for word, special, (start, end) in zip(words, out.special, out.offsets):
        if special:
            continue
        assert text[start:end].lower() == word.removeprefix("##")


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_text_is_refused(smollm2, text):
    with pytest.raises(InputError, match="empty"):
        tokenize(smollm2.tokenizer, text, max_tokens=1024)


def test_text_over_the_limit_is_refused_with_its_token_count(smollm2):
    tok = smollm2.tokenizer
    text = "one two three four five six seven eight nine ten " * 3
    count = len(tok(text)["input_ids"])
    assert count > 20
    with pytest.raises(InputError, match=rf"\b{count} tokens\b"):
        tokenize(tok, text, max_tokens=20)
    # Exactly at the limit is fine.
    assert len(tokenize(tok, text, max_tokens=count).ids) == count


def test_limit_counts_special_tokens(minilm):
    tok = minilm.tokenizer
    words = len(tok("hello world", add_special_tokens=False)["input_ids"])
    with pytest.raises(InputError):
        tokenize(tok, "hello world", max_tokens=words + 1)  # + [CLS] + [SEP] = words + 2
    assert len(tokenize(tok, "hello world", max_tokens=words + 2).ids) == words + 2

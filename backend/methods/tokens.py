"""Tokens as the model sees them, with readable labels.

Byte-level BPE vocabularies spell a leading space as "Ġ" and a newline as "Ċ"; decoding each id
alone gives the real text, which we show with visible whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from backend.errors import InputError

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


@dataclass(frozen=True)
class Tokenized:
    """ids: (tokens,). offsets: character span of each token in the text, (0, 0) for specials."""

    ids: list[int]
    labels: list[str]
    special: list[bool]
    offsets: list[tuple[int, int]]


def readable_label(piece: str) -> str:
    """Whitespace made visible: a leading space becomes '·', newlines '↵'."""
    for raw, shown in _VISIBLE.items():
        piece = piece.replace(raw, shown)
    stripped = piece.lstrip(" ")
    return "·" * (len(piece) - len(stripped)) + stripped if stripped else "␣" * len(piece)


def model_context(config) -> int | None:
    """The longest input the model was built for (its position table), None if it declares none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int,
             context: int | None = None) -> Tokenized:
    """The text's tokens; refuses more than min(max_tokens, context), saying which bound."""
    if not text or not text.strip():
        raise InputError("The text is empty: type or pick a text to analyse.")
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if context is not None and context < max_tokens and len(ids) > context:
        raise InputError(
            f"The text is {len(ids):,} tokens long; this model reads at most {context:,} "
            "(its context). Shorten the text or pick a model with a longer context.")
    if len(ids) > max_tokens:
        raise InputError(
            f"The text is {len(ids):,} tokens long; this server analyses at most "
            f"{max_tokens:,}. Shorten the text, or raise the limit by starting the server with "
            f"ATLAS_MAX_TOKENS={len(ids)} (or more)."
        )
    special_ids = set(tokenizer.all_special_ids)
    labels = []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        piece = tokenizer.decode([tid])
        if "\ufffd" in piece:  # part of a multi-byte character: show the token's own spelling
            piece = tokenizer.convert_ids_to_tokens(tid)
        labels.append(readable_label(piece) if tid not in special_ids else piece)
    return Tokenized(ids=ids, labels=labels, special=[t in special_ids for t in ids],
                     offsets=[(int(s), int(e)) for s, e in enc["offset_mapping"]])

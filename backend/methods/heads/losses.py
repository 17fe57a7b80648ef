"""Losses whose sensitivity to the head gates defines head importance.

A loss function is called as `loss_fn(model, input_ids)` with input_ids (rows, tokens) and returns
one loss per EXAMPLE, a tensor (rows // k,), where example i is computed from the consecutive rows
`[i * k, (i + 1) * k)` only; k is the loss's `rows_per_example` attribute (1 when absent).
Batched ablation relies on this: it repeats the caller's input once per gate setting, each copy
under its own gates, so a loss must never mix rows of different examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backend.errors import InputError

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder LMs with a head (their own next-token loss applies)."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate())


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The causal LM's own loss per row: mean next-token cross-entropy, (rows,), in nats."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    targets = input_ids[:, 1:]
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)


def rows_per_example(loss_fn: LossFn) -> int:
    """k: how many consecutive input rows make one example of this loss."""
    return getattr(loss_fn, "rows_per_example", 1)


def default_loss(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """`loss_fn` if given; the next-token loss for causal LMs; an InputError otherwise."""
    if loss_fn is not None:
        return loss_fn
    if is_causal_lm(model):
        return next_token_loss
    raise InputError(
        f"{type(model).__name__} has no language-model head, so it has no loss of its own: pass "
        "loss_fn, e.g. sentence_similarity_loss(tokenizer, first, second) for a sentence encoder."
    )


@dataclass(frozen=True)
class SentenceSimilarity:
    """Cosine similarity of two sentences' mean-pooled embeddings (a sentence-encoder "loss").

    input_ids, attention_mask: (2, tokens), the two sentences padded to one length. Pass
    `input_ids` as the model input and the object itself as `loss_fn`. Called on rows
    (2 * copies, tokens), copies of `input_ids` stacked, it returns (copies,) similarities.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows_per_example = 2

    def __call__(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        copies = input_ids.shape[0] // 2
        mask = self.attention_mask.repeat(copies, 1).to(input_ids.device)
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)   # (2 * copies, hidden)
        pooled = pooled.to(torch.promote_types(pooled.dtype, torch.float32))
        return F.cosine_similarity(pooled[0::2], pooled[1::2], dim=-1)


def sentence_similarity_loss(tokenizer, first: str, second: str) -> SentenceSimilarity:
    """The loss for an encoder with no head: how similar the two sentences' embeddings are."""
    encoded = tokenizer([first, second], padding=True, return_tensors="pt")
    return SentenceSimilarity(encoded["input_ids"], encoded["attention_mask"])

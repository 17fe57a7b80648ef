"""Next-token sampling: temperature, then top-p (nucleus), from a seeded generator."""

from __future__ import annotations

import torch

TOP_CANDIDATES = 1024  # tokens ranked before falling back to a full sort of the vocabulary


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: (rows, vocab) logits -> (rows,) ids.

    Softmax at `temperature`, then the smallest set of most likely tokens whose mass reaches
    `top_p` (always at least the top one), renormalised, sampled. temperature <= 0: argmax.
    Ranks the top `TOP_CANDIDATES` tokens only, unless a row's set needs more.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.topk(min(TOP_CANDIDATES, probs.shape[-1]), dim=-1)
    cumulative = sorted_probs.cumsum(-1)
    if bool((cumulative[:, -1] < top_p).any()):  # a row needs more: sort the whole vocabulary
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
    mass_before = cumulative - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises
    return order.gather(-1, choice)[:, 0]


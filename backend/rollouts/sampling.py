"""Next-token sampling: temperature, then top-p (nucleus), from a seeded generator.

The nucleus: every token at least as likely as the one whose cumulative mass (most likely
first) reaches top_p, so tokens of equal probability are kept or dropped together and the most
likely token is always kept. On CUDA one Triton kernel finds and samples it without sorting
(`sampling_kernel`); elsewhere the top tokens are ranked here.
"""

from __future__ import annotations

import torch

try:
    from backend.rollouts import sampling_kernel
except ImportError:  # no Triton: the ranking below on every device
    sampling_kernel = None

TOP_CANDIDATES = 1024  # tokens ranked before falling back to a full sort of the vocabulary


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: (rows, vocab) logits -> (rows,) ids; temperature <= 0: argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    if logits.is_cuda and sampling_kernel is not None:
        seed = torch.randint(2 ** 62, (1,), generator=generator, device=logits.device)
        return sampling_kernel.top_p_sample(logits, temperature, top_p, seed)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.topk(min(TOP_CANDIDATES, probs.shape[-1]), dim=-1)
    threshold = nucleus_threshold(sorted_probs, top_p)
    if sorted_probs.shape[-1] < probs.shape[-1] and bool((sorted_probs[:, -1] >= threshold).any()):
        # the nucleus may go on past the ranked tokens: rank them all
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        threshold = nucleus_threshold(sorted_probs, top_p)
    kept = sorted_probs.masked_fill(sorted_probs < threshold[:, None], 0.0)
    choice = torch.multinomial(kept, 1, generator=generator)  # renormalises
    return order.gather(-1, choice)[:, 0]


def nucleus_threshold(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(rows,) probability of the token whose cumulative mass reaches top_p, from (rows, k)
    probabilities in descending order (the last one where the k tokens fall short)."""
    short = (sorted_probs.cumsum(-1) < top_p).sum(-1, keepdim=True)
    return sorted_probs.gather(-1, short.clamp(max=sorted_probs.shape[-1] - 1))[:, 0]

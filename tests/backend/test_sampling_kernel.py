"""The top-p sampling kernel against the nucleus rule, on known distributions.

On a GPU the kernel runs compiled; without one (CI) in Triton's interpreter on the CPU, which
runs each row's program in turn (about 0.1 s each), so the draws here are few and the bounds
loose: a token outside the nucleus must never come, one inside it must.
"""

from __future__ import annotations

import math

import torch

from backend.rollouts.sampling import nucleus_threshold
from backend.rollouts.sampling_kernel import top_p_sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])


def draws(logits, temperature, top_p, seed=0):
    return top_p_sample(logits.to(DEVICE), temperature, top_p,
                        torch.tensor([seed], device=DEVICE)).cpu()


def test_the_nucleus_is_the_smallest_top_set_reaching_top_p_drawn_in_proportion():
    rows = 80
    counts = torch.bincount(draws(PROBS.log().expand(rows, -1), 1.0, 0.75), minlength=4)
    assert counts[0] == counts[2] == 0  # 0.5 + 0.3 reaches 0.75
    share = 0.5 / 0.8
    assert abs(counts[1] / rows - share) < 4 * math.sqrt(share * (1 - share) / rows)
    counts = torch.bincount(draws(PROBS.log().expand(40, -1), 1.0, 0.85), minlength=4)
    assert counts[2] == 0 and counts[0] > 0  # 0.15 is needed now (P(absent) = 0.001)


def test_temperature_sharpens_before_the_nucleus_is_taken():
    # At temperature 0.5 the probabilities are 0.5^2 : 0.3^2 : ... -> 0.66, 0.24, 0.09, 0.01:
    # top-p 0.85 now stops at 0.09 (0.66 + 0.24 = 0.90), so 0.15's token never comes.
    counts = torch.bincount(draws(PROBS.log().expand(40, -1), 0.5, 0.85), minlength=4)
    assert counts[0] == counts[2] == 0 and counts[1] > counts[3] > 0


def test_ties_are_kept_together_across_blocks():
    # 10,000 equal logits (more than one block of the kernel): every one is as likely as the one
    # that reaches top-p, so all are kept and the draws spread over the whole vocabulary.
    drawn = draws(torch.zeros(40, 10_000), 0.6, 0.5)
    assert drawn.max() >= 5_000 and len(set(drawn.tolist())) > 35


def test_draws_stay_in_the_nucleus_of_random_bfloat16_logits():
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 6_000, generator=generator) * 3).bfloat16()  # many ties
    drawn = draws(logits, 0.8, 0.9)
    probs = torch.softmax(logits.float() / 0.8, -1)
    threshold = nucleus_threshold(probs.sort(-1, descending=True).values, 0.9)
    assert (probs.gather(1, drawn[:, None])[:, 0] >= threshold).all()
    # A row's draw depends on the seed and the row alone.
    assert (draws(logits[:4], 0.8, 0.9) == drawn[:4]).all()
    assert (draws(logits[:4], 0.8, 0.9, seed=5) != drawn[:4]).any()


def test_masked_tokens_never_come_even_with_top_p_one():
    logits = torch.zeros(20, 300)
    logits[:, 100:] = float("-inf")  # a model's masked tokens
    drawn = draws(logits, 1.0, 1.0)
    assert drawn.max() < 100 and len(set(drawn.tolist())) > 10

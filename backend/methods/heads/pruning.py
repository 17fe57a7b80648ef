"""Pruning curve (Michel et al. 2019, the paper's Figure): loss against the fraction of heads
masked, heads masked cumulatively from least to most important, beside a seeded random order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backend.methods.heads.importance import (as_batch, loss_under_gates, normalize_importance,
                                              ones_gates, raw_importance)
from backend.methods.heads.losses import LossFn
from backend.progress import Progress


@dataclass(frozen=True)
class PruningCurve:
    """fractions: (step,) fraction of heads masked, 0 to 1.
    loss: order name ("importance", "random") -> (step,) mean loss with that fraction masked.
    order: order name -> (layer * head,) flat head indices (layer-major) in masking order."""

    fractions: np.ndarray
    loss: dict[str, np.ndarray]
    order: dict[str, np.ndarray]


def masking_fractions(step: float = 0.05) -> np.ndarray:
    """0, step, 2 step, ..., 1: (step,)."""
    return np.round(np.linspace(0.0, 1.0, int(round(1 / step)) + 1), 10)


def gates_for_order(order: np.ndarray, counts: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Gate settings (len(counts), layer, head): setting i closes the first counts[i] heads."""
    gates = torch.ones(len(counts), shape[0] * shape[1])
    for i, count in enumerate(counts):
        gates[i, torch.as_tensor(order[:count], dtype=torch.long)] = 0
    return gates.view(len(counts), *shape)


def _recomputed_order(model: nn.Module, ids: torch.Tensor, method: str, loss_fn: LossFn | None,
                      counts: np.ndarray, progress: Progress | None) -> np.ndarray:
    """Masking order with importance recomputed (at the current gates) before every step."""
    gates, order = ones_gates(model), []
    for count in counts[1:]:
        masked = set(order)
        remaining = [h for h in range(gates.numel()) if h not in masked]
        if count - len(order) >= len(remaining):
            order.extend(remaining)
            continue
        raw = raw_importance(model, ids, method, loss_fn, gates).ravel()
        raw[order] = 0.0                    # masked heads take no part in the layer norms
        scores = normalize_importance(raw.reshape(gates.shape), "layer").ravel()
        scores[order] = np.inf
        picked = np.argsort(scores, kind="stable")[:count - len(order)].tolist()
        order.extend(picked)
        gates.view(-1)[picked] = 0
        if progress:
            progress(0.5 * len(order) / gates.numel(), "Recomputing importance")
    return np.array(order, dtype=np.int64)


def pruning_curve(model: nn.Module, input_ids: torch.Tensor, method: str = "gradient",
                  loss_fn: LossFn | None = None, importance: np.ndarray | None = None,
                  recompute: bool = False, step: float = 0.05, seed: int = 0,
                  progress: Progress | None = None) -> PruningCurve:
    """Loss of input_ids (batch, tokens) with 0, 5, ..., 100 % of the heads masked.

    The "importance" order masks heads in increasing order of layer-normalised importance by
    `method` (computed once, or recomputed after each step with `recompute`; `importance`
    (layer, head) may be given instead); the "random" order is a permutation seeded by `seed`.
    All (orders x steps) gate settings are evaluated in batched passes.
    """
    ids = as_batch(model, input_ids)
    shape = tuple(ones_gates(model).shape)
    fractions = masking_fractions(step)
    counts = np.round(fractions * shape[0] * shape[1]).astype(int)
    if recompute:
        ranked = _recomputed_order(model, ids, method, loss_fn, counts, progress)
    else:
        if importance is None:
            first = (lambda f, s: progress(0.5 * f, f"Ranking heads: {s}")) if progress else None
            raw = raw_importance(model, ids, method, loss_fn, progress=first)
            importance = normalize_importance(raw, "layer")
        ranked = np.argsort(np.asarray(importance).ravel(), kind="stable")
    orders = {"importance": ranked,
              "random": np.random.default_rng(seed).permutation(shape[0] * shape[1])}
    gates = torch.cat([gates_for_order(o, counts, shape) for o in orders.values()])
    # Each half names itself: its counters restart ("Gate settings 1/42" after ".../271").
    stage = (lambda f, s: progress(0.5 + 0.5 * f, f"Masked heads: {s}")) if progress else None
    losses = loss_under_gates(model, ids, gates, loss_fn, progress=stage).reshape(len(orders), -1)
    return PruningCurve(fractions, dict(zip(orders, losses)), orders)

"""Head importance per (layer, head): gate gradients, zero ablation, attention statistics.

- "gradient" (Michel, Levy, Neubig 2019): I[l, h] = mean over examples of |dLoss(x)/dxi[l, h]|,
  each example's gradient taken on its own (the bertology example's |sum of gradients| quirk is
  avoided: one backward pass gives every example's gradient through per-row gate copies).
- "ablation": Loss(xi[l, h] = 0) - Loss(all gates 1), the zero-ablation Delta loss. Every head is
  ablated in a few batched passes: the input is repeated, one copy per gate setting.
- "confidence", "entropy": attention statistics of each head (see `roles`), averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.heads.gates import gate_shape, head_gates
from backend.methods.heads.losses import LossFn, default_loss, is_causal_lm, rows_per_example
from backend.methods.heads.roles import attention_confidence, attention_entropy
from backend.progress import Progress

METHODS = ("gradient", "ablation", "confidence", "entropy")
NORMALIZATIONS = ("layer", "global", "raw")  # also the names of the stored arrays
# Float elements of the widest activation per pass on a CPU (128 MiB fp32). Larger passes were
# slower on a 2-core CPU: 85 settings x 64 tokens of SmolLM2 per pass ran 2.8x slower than 10.
ROW_BUDGET = 2 ** 25


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) while open; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def as_batch(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) LongTensor on the model's device; a (tokens,) vector becomes one row."""
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise InputError(f"Expected input_ids (batch, tokens >= 2), got {tuple(ids.shape)}.")
    return ids.to(model.device)


def rows_per_pass(model: nn.Module, tokens: int, backward: bool = False) -> int:
    """How many rows of `tokens` tokens one forward (or forward + backward) pass may hold."""
    config = model.config.get_text_config()
    layers, heads = gate_shape(model)
    inner = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    width = max(config.vocab_size if is_causal_lm(model) else 0, inner + heads * tokens)
    if backward:  # activations of every layer are kept for the backward pass
        width = max(width, layers * (3 * inner + heads * tokens))
    return max(1, element_budget(model.device) // (tokens * width))


def element_budget(device: torch.device) -> int:
    """Float elements the widest activation of one pass may hold: ROW_BUDGET on a CPU; on a GPU
    1/32 of its free memory (room for bf16 logits, their fp32 copy and the softmax)."""
    if device.type != "cuda":
        return ROW_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    return max(ROW_BUDGET, free // 32)


def _gate_dtype(model: nn.Module) -> torch.dtype:
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def ones_gates(model: nn.Module) -> torch.Tensor:
    """All gates open: (layer, head) ones."""
    return torch.ones(gate_shape(model), dtype=_gate_dtype(model), device=model.device)


def gate_gradients(model: nn.Module, input_ids: torch.Tensor, loss_fn: LossFn | None = None,
                   gates: torch.Tensor | None = None,
                   progress: Progress | None = None) -> np.ndarray:
    """Each example's gradient dLoss(x)/dxi, (example, layer, head), at gates (layer, head).

    gates defaults to all ones (Michel et al.); pruning passes partly closed gates.
    """
    loss_fn, ids = default_loss(model, loss_fn), as_batch(model, input_ids)
    base = ones_gates(model) if gates is None else gates.to(model.device, _gate_dtype(model))
    k = rows_per_example(loss_fn)
    step = max(1, rows_per_pass(model, ids.shape[1], backward=True) // k) * k
    grads = []
    with evaluating(model), torch.enable_grad():
        for start in range(0, ids.shape[0], step):
            part = ids[start:start + step]
            rows = base.expand(part.shape[0], *base.shape).clone().requires_grad_(True)
            with head_gates(model, rows):
                losses = loss_fn(model, part)
            (grad,) = torch.autograd.grad(losses.sum(), rows)
            grads.append(grad.unflatten(0, (-1, k)).sum(dim=1))   # rows of one example add up
            if progress:
                progress(min(1.0, (start + step) / ids.shape[0]), "Gate gradients")
    return torch.cat(grads).double().cpu().numpy()


def loss_under_gates(model: nn.Module, input_ids: torch.Tensor, gates: torch.Tensor,
                     loss_fn: LossFn | None = None, settings_per_pass: int | None = None,
                     progress: Progress | None = None) -> np.ndarray:
    """Mean loss over the examples under each gate setting: gates (setting, layer, head) ->
    (setting,). Many settings share one forward pass (the input repeated once per setting)."""
    loss_fn, ids = default_loss(model, loss_fn), as_batch(model, input_ids)
    batch, tokens = ids.shape
    per_pass = settings_per_pass or max(1, rows_per_pass(model, tokens) // batch)
    gates = gates.to(model.device, _gate_dtype(model))
    losses = []
    with evaluating(model), torch.inference_mode():
        for start in range(0, len(gates), per_pass):
            chunk = gates[start:start + per_pass]
            with head_gates(model, chunk.repeat_interleave(batch, dim=0)):
                per_example = loss_fn(model, ids.repeat(len(chunk), 1))
            if per_example.numel() % len(chunk):
                raise InputError("loss_fn must return one loss per example, (examples,): got "
                                 f"{per_example.numel()} values for {len(chunk)} gate settings.")
            losses.append(per_example.view(len(chunk), -1).double().mean(dim=1))
            if progress:
                done = start + len(chunk)
                progress(done / len(gates), f"Gate settings {done}/{len(gates)}")
    return torch.cat(losses).cpu().numpy()


def single_head_ablations(base: torch.Tensor) -> torch.Tensor:
    """Gate settings (1 + layer * head, layer, head): `base`, then base with each head closed."""
    settings = base.expand(1 + base.numel(), *base.shape).clone()
    flat = settings.view(len(settings), -1)
    flat[torch.arange(1, len(settings)), torch.arange(base.numel())] = 0
    return settings


def ablation_deltas(model: nn.Module, input_ids: torch.Tensor, loss_fn: LossFn | None = None,
                    gates: torch.Tensor | None = None, settings_per_pass: int | None = None,
                    progress: Progress | None = None) -> np.ndarray:
    """Zero-ablation Delta loss per head, (layer, head): Loss(head's gate 0) - Loss(gates).

    gates: (layer, head) starting setting, all ones by default. All heads in batched passes.
    """
    base = ones_gates(model) if gates is None else gates.to(model.device, _gate_dtype(model))
    losses = loss_under_gates(model, input_ids, single_head_ablations(base), loss_fn,
                              settings_per_pass, progress)
    return (losses[1:] - losses[0]).reshape(tuple(base.shape))


def attention_statistic(model: nn.Module, input_ids: torch.Tensor,
                        statistic: Callable[[np.ndarray], np.ndarray],
                        gates: torch.Tensor | None = None,
                        progress: Progress | None = None) -> np.ndarray:
    """statistic((batch, head, query, key)) -> (batch, head), per layer, mean over the batch:
    (layer, head). Eager attention weights, captured layer by layer."""
    def reduce(layer: int, weights: torch.Tensor) -> np.ndarray:
        return statistic(weights.float().cpu().numpy()).mean(axis=0)

    with evaluating(model), (nullcontext() if gates is None else head_gates(model, gates)):
        ids = as_batch(model, input_ids)
        return np.stack(capture_attention(model, ids, reduce=reduce, progress=progress))


def raw_importance(model: nn.Module, input_ids: torch.Tensor, method: str = "gradient",
                   loss_fn: LossFn | None = None, gates: torch.Tensor | None = None,
                   progress: Progress | None = None) -> np.ndarray:
    """Unnormalised importance (layer, head) by `method`, at gates (layer, head) (default ones)."""
    if method == "gradient":
        return np.abs(gate_gradients(model, input_ids, loss_fn, gates, progress)).mean(axis=0)
    if method == "ablation":
        return ablation_deltas(model, input_ids, loss_fn, gates, progress=progress)
    if method in ("confidence", "entropy"):
        statistic = attention_confidence if method == "confidence" else attention_entropy
        return attention_statistic(model, input_ids, statistic, gates, progress)
    raise InputError(f"Unknown head importance method {method!r}: pick one of {METHODS}.")


def normalize_importance(scores: np.ndarray, normalize: str | None = "layer") -> np.ndarray:
    """(layer, head) -> (layer, head). "layer": each layer divided by its L2 norm + 1e-20;
    "global": "layer", then min-max over all heads to [0, 1]; "raw" (or None): unchanged."""
    scores = np.asarray(scores, dtype=np.float64)
    if normalize in ("raw", None):
        return scores.copy()
    if normalize not in NORMALIZATIONS:
        raise InputError(f"Unknown normalisation {normalize!r}: pick one of {NORMALIZATIONS}.")
    per_layer = scores / (np.linalg.norm(scores, axis=-1, keepdims=True) + 1e-20)
    if normalize == "layer":
        return per_layer
    spread = per_layer.max() - per_layer.min()
    return (per_layer - per_layer.min()) / spread if spread > 0 else np.zeros_like(per_layer)


def head_importance(model: nn.Module, input_ids: torch.Tensor, method: str = "gradient",
                    normalize: str | None = "layer", loss_fn: LossFn | None = None,
                    progress: Progress | None = None) -> np.ndarray:
    """Importance of every head, (layer, head), for input_ids (batch, tokens).

    method: "gradient" | "ablation" | "confidence" | "entropy" (see the module docstring).
    loss_fn: `loss_fn(model, input_ids) -> (examples,)`; default: a causal LM's own next-token
    loss. Encoders without an LM head need one, e.g. `sentence_similarity_loss(...)`.
    normalize: "layer" | "global" | None (see `normalize_importance`).
    progress: optional `progress(fraction, stage)`.
    """
    raw = raw_importance(model, input_ids, method, loss_fn, progress=progress)
    return normalize_importance(raw, normalize)

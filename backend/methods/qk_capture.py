"""Capture at the cost of a forward pass: each layer's query and key, never its full map.

Our attention function (`hooks.attention_function`) computes each layer's output with SDPA (or,
where SDPA cannot follow eager attention: soft-capping, sink logits, from the exact weights of
each chunk) and keeps what views need: query and key after position encoding in the model's dtype
(16 bits on a GPU; key heads not repeated), each row's log-sum-exp, the layer's rule
(`exact.AttentionRule`) and the results of reducers fed with exact weights a chunk of queries at
a time. Any exact weight is recomputed later from these by `exact.weights`.

On a CUDA GPU with Triton, a layer the kernels cover (`attention_kernels.supported`) takes two
fused passes over key blocks instead of SDPA and the chunk loop: one for the output with the
log-sum-exps, one for the reductions; the results are the same weights'
(tests/backend/methods/test_fused_capture.py).

A layer whose mask is not one the rule describes (a position bias added to the scores, another
window shape) or a model whose attention does not go through transformers' attention interface
raises UnsupportedAttention: a refusal, not a wrong picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from backend.errors import ModelLoadError
from backend.methods import exact, reductions
from backend.methods.exact import AttentionRule
from backend.methods.hooks import attention_function
from backend.progress import Progress

try:  # the fused kernels need Triton, which has no build off Linux
    from backend.methods import attention_kernels
except ImportError:
    attention_kernels = None
# reducers(layer, n_heads, n_tokens, device) -> objects with update(q0, k0, p) and result()
Reducers = Callable[[int, int, int, torch.device], list]
# float32 weights of one chunk of queries, all heads. On the CPU small enough for the allocator
# to reuse its blocks: 128 MB chunks, each mapped afresh, made a capture 30-40% slower.
GPU_CHUNK_BYTES = 1 << 30
CPU_CHUNK_BYTES = 1 << 24
MASK_ROWS = 1024  # mask rows compared with the rule at a time


class UnsupportedAttention(ModelLoadError):
    """The model's attention is not one the exact rule reproduces."""


@dataclass
class LayerCapture:
    """query (head, T, head_dim) and key (key_head, T, head_dim): CPU tensors (None
    unless kept); lse (head, T) float32; reductions: each reducer's result(). Until the
    recorder's finish(), lse is a device tensor and reductions the reducers (no sync per
    layer)."""

    rule: AttentionRule
    lse: np.ndarray | torch.Tensor
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    reductions: list[Any] = field(default_factory=list)


def storage_dtype(tensor: torch.Tensor, sixteen_bits: bool) -> torch.dtype:
    """The model's own dtype (what eager attention multiplies: exact); a float32 model's in
    16 bits if asked (float16 where it holds the values): half the bytes, weights then within
    about 1e-2 of eager's where the logits are large."""
    if tensor.dtype in (torch.float16, torch.bfloat16) or not sixteen_bits:
        return tensor.dtype
    return torch.float16 if tensor.abs().amax() < 60000 else torch.bfloat16


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(query, key) bool of a boolean or additive mask; refuses additive masks that add more than
    0 or -inf-like values (a position bias)."""
    mask = mask[0, 0] if mask.ndim == 4 else mask
    if mask.dtype == torch.bool:
        return mask
    allowed = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[allowed] != 0).any()):
        raise UnsupportedAttention("This model adds a position bias to its attention scores "
                                   "(ALiBi or similar), which exact recomputation from query "
                                   "and key does not cover.")
    return allowed


def _matches(rule: AttentionRule, allowed: torch.Tensor) -> bool:
    n_q, n_k = allowed.shape
    keys = torch.arange(n_k, device=allowed.device)
    offset = n_k - n_q  # queries are the last n_q positions
    for start in range(0, n_q, MASK_ROWS):
        rows = torch.arange(start, min(start + MASK_ROWS, n_q), device=allowed.device) + offset
        if not torch.equal(rule.allowed(rows, keys), allowed[start:start + MASK_ROWS]):
            return False
    return True


def mask_rule(mask: torch.Tensor | None, causal: bool, window: int | None, scaling: float,
              n_tokens: int) -> AttentionRule:
    """The rule (causal or not, window or not) whose mask equals the one the layer received."""
    if mask is None:  # SDPA semantics: causality from the flag alone, no window in effect
        return AttentionRule(scaling, causal and n_tokens > 1)
    allowed = _allowed(mask)
    if allowed.shape[-2] == 1 and n_tokens > 1:
        allowed = allowed.expand(n_tokens, -1)
    candidates = [AttentionRule(scaling, c, w) for c in (causal, not causal)
                  for w in dict.fromkeys([window, None])]
    for rule in candidates:
        if _matches(rule, allowed):
            return rule
    raise UnsupportedAttention("This model's attention mask is neither causal nor bidirectional "
                               "(with or without a sliding window): exact recomputation does "
                               "not cover it.")


def chunk_rows(n_heads: int, n_keys: int, device: torch.device,
               chunk_bytes: int | None = None) -> int:
    budget = chunk_bytes or (GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES)
    return int(max(16, budget // max(1, 4 * n_heads * n_keys)))


class LayerRecorder:
    """kernels: use the fused kernels where they cover a layer (None: on a CUDA device when
    Triton is there; True: on any device `attention_kernels.supported` accepts, i.e. also on the
    CPU under Triton's interpreter, as the tests do; False: never)."""

    def __init__(self, n_layers: int, reducers: Reducers | None, keep_qk: bool,
                 sixteen_bits: bool, chunk_bytes: int | None, progress: Progress | None,
                 kernels: bool | None = None):
        self.n_layers, self.reducers, self.keep_qk = n_layers, reducers, keep_qk
        self.sixteen_bits = sixteen_bits
        self.kernels = attention_kernels is not None and kernels
        self.chunk_bytes, self.progress = chunk_bytes, progress
        self.layers: list[LayerCapture] = []
        self._index: dict[int, int] = {}
        self._rules: dict[tuple, AttentionRule] = {}  # masks are shared by layers: check once
        self._copies = None  # a side stream for device-to-host copies

    def _host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host copies in the storage dtype; on a GPU into pinned memory on a side stream,
        without a sync (finish() waits for them)."""
        tensors = [t.to(storage_dtype(t, self.sixteen_bits)) for t in tensors]
        if tensors[0].device.type != "cuda":
            return [t.contiguous().clone() for t in tensors]
        if self._copies is None:
            self._copies = torch.cuda.Stream(tensors[0].device)
        self._copies.wait_stream(torch.cuda.current_stream(tensors[0].device))
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        with torch.cuda.stream(self._copies):
            for host, tensor in zip(hosts, tensors):
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self._copies)
        return hosts

    def finish(self) -> None:
        """Per-layer results to the host, after the forward pass: one copy for every layer's
        lse and one per kind of reducer (`reductions.results`)."""
        if self._copies is not None:
            self._copies.synchronize()
        pending = [layer for layer in self.layers if isinstance(layer.lse, torch.Tensor)]
        if not pending:
            return
        lse = reductions.to_host(torch.stack([layer.lse for layer in pending]))
        done = iter(reductions.results([r for layer in pending for r in layer.reductions]))
        for i, layer in enumerate(pending):
            layer.lse = lse[i]
            layer.reductions = [next(done) for _ in layer.reductions]

    def _rule(self, mask, causal, window, scaling, n_tokens) -> AttentionRule:
        key = (None if mask is None else (mask.data_ptr(), tuple(mask.shape)), causal, window,
               scaling)
        if key not in self._rules:
            self._rules[key] = mask_rule(mask, causal, window, scaling, n_tokens)
        return self._rules[key]

    def __call__(self, module: nn.Module, query, key, value, attention_mask, scaling=None,
                 dropout=0.0, sliding_window=None, softcap=None, s_aux=None, is_causal=None,
                 **kwargs):
        if query.shape[0] != 1:
            raise ValueError("The capture reads one sequence at a time.")
        layer = self._index.setdefault(id(module), len(self._index))
        n_heads, n_tokens = query.shape[1], query.shape[2]
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        rule = self._rule(attention_mask, bool(causal), sliding_window, float(scaling), n_tokens)
        rule = replace(rule, softcap=float(softcap) if softcap else None,
                       sinks=tuple(float(x) for x in s_aux.float().tolist())
                       if s_aux is not None else None)
        q, k, v = query[0], key[0], value[0]
        reducers = self.reducers(layer, n_heads, n_tokens, q.device) if self.reducers else []
        # automatic: compiled kernels on a GPU only, never the (slow) interpreter
        fused = self.kernels if self.kernels is not None else (
            q.is_cuda and not attention_kernels.INTERPRETED)
        if fused and attention_kernels.supported(rule, reducers, q):
            output, lse, top = attention_kernels.forward(q, k, v, rule)
            if reducers:
                attention_kernels.reduce_layer(q, k, lse, top, rule, reducers)
            out = output[None]
        else:
            lse, output = self._chunks(q, k, v, rule, reducers)
            if output is None:
                extra = {k: v for k, v in kwargs.items() if k not in ("sliding_window",)}
                out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                dropout=0.0, scaling=scaling,
                                                is_causal=is_causal, **extra)
            else:
                out = output.transpose(0, 1)[None]
        kept = self._host(q, k) if self.keep_qk else (None, None)
        self.layers.append(LayerCapture(rule, lse, *kept, reducers))
        if self.progress:
            self.progress(len(self.layers) / self.n_layers,
                          f"Layer {len(self.layers)}/{self.n_layers}")
        return out, None

    def _chunks(self, q, k, v, rule: AttentionRule, reducers: list):
        """lse (head, T) and, under soft-capping or sinks, the output (head, T, value_dim), from
        exact weights a chunk of queries at a time, fed to the reducers."""
        n_heads, n_tokens = q.shape[0], q.shape[1]
        own_output = rule.softcap is not None or rule.sinks is not None
        lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
        output = torch.empty(n_heads, n_tokens, v.shape[-1], dtype=v.dtype,
                             device=q.device) if own_output else None
        sinks = exact.sink_logits(rule, None, n_heads, q.device)
        step = chunk_rows(n_heads, rule.key_range(0, 1, n_tokens)[1] if rule.window
                          else n_tokens, q.device, self.chunk_bytes)
        for q0 in range(0, n_tokens, step):
            q1 = min(q0 + step, n_tokens)
            k0, k1 = rule.key_range(q0, q1, n_tokens)
            scores = exact.logits(q, k, rule, slice(q0, q1), slice(k0, k1), dtype=q.dtype)
            lse[:, q0:q1] = exact.softmax_(scores, sinks)
            if output is None and not reducers:
                continue
            p = scores  # in place: one chunk alive
            if output is not None:
                values = exact.expand_heads(v, None, n_heads)[:, k0:k1]
                output[:, q0:q1] = torch.matmul(p.to(v.dtype), values)
            for reducer in reducers:
                reducer.update(q0, k0, p)
            del scores, p
        return lse, output


@torch.inference_mode()
def capture_layers(model: nn.Module, input_ids: torch.Tensor, reducers: Reducers | None = None,
                   keep_qk: bool = True, sixteen_bits: bool = False,
                   chunk_bytes: int | None = None, progress: Progress | None = None,
                   kernels: bool | None = None) -> list[LayerCapture]:
    """One forward pass of the base model over input_ids (1, T) -> one LayerCapture per layer.

    sixteen_bits: keep a float32 model's query and key in 16 bits (`storage_dtype`).
    kernels: see LayerRecorder.

    Raises UnsupportedAttention (see the module docstring).
    """
    config = model.config.get_text_config()
    n_layers = config.num_hidden_layers
    recorder = LayerRecorder(n_layers, reducers, keep_qk, sixteen_bits, chunk_bytes, progress,
                             kernels)
    with attention_function(model, recorder):
        model.base_model(input_ids=input_ids.to(model.device), use_cache=False)
    recorder.finish()
    if len(recorder.layers) != n_layers:
        raise UnsupportedAttention(
            f"{type(model).__name__} computes attention in its own code rather than through "
            "transformers' attention interface, so its weights cannot be recomputed exactly "
            "from query and key.")
    return recorder.layers

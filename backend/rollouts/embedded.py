"""The embedded rollout engine: in-process, a static KV cache, continuous batching, CUDA graphs.

Layout: `rows` decoding slots share one static cache, (row, kv_head, position, dim) per layer,
written in place at each row's own position (`SlotCache`). A prompt is prefilled ONCE (batch 1)
and its keys and values are copied into every row that samples a continuation of it; when a row
finishes, it is refilled at once with the next pending continuation (of the same prompt, or the
next one), so rows never idle while work is left. Each decoding step is one forward pass of
(rows, 1) tokens with per-row positions and a (row, 1, 1, key) mask over the first L cache
positions, L rounded up to a bucket; on CUDA each bucket's step is captured once as a CUDA graph
and replayed (no Python or kernel-launch overhead per layer). Attention runs on sdpa, never eager
(the model's implementation is switched for the run and restored). For the one-token decoding
steps on CUDA, each bucket is captured with each decoding attention of `DECODE_ATTENTION` and
the fastest graph is kept: sdpa; `grouped` (two batched matrix products over the key/value
heads, no repeated keys); `kernel` (`decode_kernel`: split-key flash decoding that reads each
row's keys up to its own position only; sdpa's masked kernels read every row's whole bucket, and
expand the key/value heads first). The CPU runs the same code without graphs, on sdpa.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from backend.errors import JobCancelled

from backend.rollouts.base import (Continuation, EngineError, Progress, Prompt, RolloutMeter,
                                   SamplingParams, degenerate)
from backend.rollouts.sampling import sample_next

try:  # Triton: with CUDA builds of torch, and installed by the set-up on CPU builds
    from backend.rollouts import decode_kernel
except ImportError:
    decode_kernel = None

log = logging.getLogger(__name__)

MAX_ROWS_CUDA = 256
MAX_ROWS_CPU = 16
CACHE_MEMORY_FRACTION = 0.6  # of the free GPU memory, for the static cache
CHECK_EVERY = 8  # tokens between answer / repetition checks of a row


ATTENTION = "atlas_rollouts"
DECODE_ATTENTION = ("sdpa", "grouped", "kernel")
# Read while a decoding step is traced or captured: which attention, and the static cache's
# (row,) query positions (the kernel reads them on the device, so a graph replays them).
_decode: dict = {"attention": "sdpa", "positions": None}


def decode_step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    """Attention of one query token per row: query (row, head, 1, dim) against key/value
    (row, kv_head, L, dim) and the boolean mask (row, 1, 1, L), by `_decode["attention"]`.
    Anything else (prefill, soft-capping, sink logits) goes to sdpa."""
    how = _decode["attention"]
    scale = scaling or query.shape[-1] ** -0.5
    if query.shape[2] != 1 or how == "sdpa" or kwargs.get("softcap") is not None \
            or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape
    if how == "kernel":
        window = _layer_window(module.config, module.layer_idx)
        out = decode_kernel.decode_attention(query[:, :, 0], key, value, _decode["positions"],
                                             scale, window)
        return out[:, None], None
    grouped = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float() * scale
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, decode_step_attention)


def bucket(length: int, capacity: int) -> int:
    """Cache positions a step attends over: `length` rounded up (few distinct graphs)."""
    step = 256 if length <= 2048 else 1024 if length <= 8192 else 2048
    return min(capacity, -(-length // step) * step)


class SlotCache:
    """Stand-in for a transformers cache, (row, kv_head, position, dim) per layer.

    Decoding: `update` writes each row's new key/value at `pos[row]` and returns the first
    `length` positions. Staging (a prefill of one prompt): `update` keeps the prompt's keys and
    values as they are, for `place` to copy into rows.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.length = 0
        self.row_ids = self.pos = self.tokens = None

    def allocate(self, rows: int, capacity: int, like: list[tuple[torch.Tensor, torch.Tensor]]):
        """Zeroed buffers (masked positions are read: they must not hold NaN)."""
        self.keys = [torch.zeros(rows, k.shape[1], capacity, k.shape[3], dtype=k.dtype,
                                 device=k.device) for k, _ in like]
        self.values = [torch.zeros(rows, v.shape[1], capacity, v.shape[3], dtype=v.dtype,
                                   device=v.device) for _, v in like]
        device = like[0][0].device
        self.row_ids = torch.arange(rows, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # each row's input

    @property
    def shape(self) -> tuple[int, int] | None:
        """(rows, capacity) of the buffers, None before `allocate`."""
        return tuple(self.keys[0].shape[::2]) if self.keys else None

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self.staged is not None:
            self.staged.append((key_states, value_states))
            return key_states, value_states
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.row_ids, :, self.pos] = key_states[:, :, 0]
        values[self.row_ids, :, self.pos] = value_states[:, :, 0]
        return keys[:, :, : self.length], values[:, :, : self.length]

    def place(self, staged, rows: torch.Tensor) -> None:
        """Copy a staged prompt (batch 1, T positions) into `rows` at positions 0..T-1."""
        for layer, (k, v) in enumerate(staged):
            t = k.shape[2]
            self.keys[layer][rows, :, :t] = k[0]
            self.values[layer][rows, :, :t] = v[0]


def _layer_window(config, layer: int) -> int | None:
    """The sliding window of `layer`, as `_masks` applies it (None: full attention)."""
    types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    return window if window and layer < len(types) and types[layer] == "sliding_attention" \
        else None


def _masks(config, key_index: torch.Tensor, query_pos: torch.Tensor):
    """Attention mask(s) for queries at `query_pos` (rows, q) over keys `key_index` (L,):
    (rows, 1, q, L) bool, or {layer type: mask} for models with sliding-window layers."""
    full = key_index[None, None, :] <= query_pos[:, :, None]
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" not in types or not window:
        return full[:, None]
    sliding = full & (query_pos[:, :, None] - key_index[None, None, :] < window)
    return {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}


@contextlib.contextmanager
def sdpa_attention(model: nn.Module):
    """Run with sdpa attention (models loaded for attention capture use eager), through
    `decode_step_attention`; restore the model's own afterwards."""
    previous = model.config._attn_implementation
    if previous != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


@dataclass
class _Row:
    prompt: int
    index: int  # within the prompt
    cap: int
    tokens: list[int] = field(default_factory=list)
    trigger_at: int | None = None


class EmbeddedEngine:
    """In-process engine over a loaded causal LM. `max_rows`: decoding slots (default: as many
    as fit in CACHE_MEMORY_FRACTION of free GPU memory, at most 256; 16 on the CPU). `graphs`:
    capture decoding steps as CUDA graphs (default: on CUDA). Buffers and graphs are kept for
    the next run of the same shape; `close()` frees them."""

    name = "embedded"

    def __init__(self, model: nn.Module, tokenizer=None, max_rows: int | None = None,
                 graphs: bool | None = None):
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.config = model.config.get_text_config()
        self.cache = SlotCache()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.graphs_used = False
        self.decode_attention: dict[int, str] = {}  # bucket -> the attention its graph uses

    def close(self) -> None:
        self.cache, self._graphs, self._pool = SlotCache(), {}, None
        self.decode_attention = {}

    # --- forward passes -----------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, token_ids) -> tuple[list, torch.Tensor]:
        """(staged keys/values per layer, (vocab,) logits of the next token) of one prompt."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)[None]
        if ids.shape[1] == 0:
            raise EngineError("A prompt has no tokens.")
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        self.cache.staged = []
        try:
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache,
                             attention_mask=_masks(self.config, positions[0], positions),
                             use_cache=True, logits_to_keep=1)
            return self.cache.staged, out.logits[0, -1]
        finally:
            self.cache.staged = None

    def _forward_step(self) -> torch.Tensor:
        """(rows, vocab) logits of one decoding step over the first `cache.length` positions."""
        cache = self.cache
        keys = torch.arange(cache.length, device=self.device)
        out = self.model(input_ids=cache.tokens[:, None], position_ids=cache.pos[:, None],
                         attention_mask=_masks(self.config, keys, cache.pos[:, None]),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.inference_mode()
    def _step(self, length: int) -> torch.Tensor:
        self.cache.length = length
        if not self.use_graphs:
            return self._forward_step()
        if length not in self._graphs:
            try:
                self._graphs[length] = self._capture()
            except Exception as e:  # an op the graph cannot hold: decode eagerly from now on
                log.warning("CUDA graph capture failed (%s: %s); decoding without graphs",
                            type(e).__name__, e)
                self.use_graphs = False
                torch.cuda.synchronize(self.device)
                return self._forward_step()
        graph, logits = self._graphs[length]
        graph.replay()
        self.graphs_used = True
        return logits

    def _capture(self):
        """The fastest of this bucket's decoding graphs, one per `DECODE_ATTENTION`."""
        timed = []
        for how in DECODE_ATTENTION:
            if how == "kernel" and decode_kernel is None:
                continue
            _decode.update(attention=how, positions=self.cache.pos)
            try:
                graph, logits = self._capture_one()
            except Exception as e:  # e.g. a kernel this GPU cannot compile: the others remain
                if how == "sdpa":
                    raise
                log.warning("decoding graph with %s attention failed (%s: %s)", how,
                            type(e).__name__, e)
                torch.cuda.synchronize(self.device)
                continue
            finally:
                _decode.update(attention="sdpa", positions=None)
            graph.replay()
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                graph.replay()
            end.record()
            end.synchronize()
            timed.append((start.elapsed_time(end), how, graph, logits))
        seconds, how, graph, logits = min(timed, key=lambda t: t[0])
        self.decode_attention[self.cache.length] = how
        return graph, logits

    def _capture_one(self):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, autotuning)
            self._forward_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward_step()
        return graph, logits

    def _rows_for(self, total: int, capacity: int, staged) -> int:
        if self.max_rows:
            return max(1, min(self.max_rows, total))
        if self.device.type != "cuda":
            return max(1, min(MAX_ROWS_CPU, total))
        per_row = sum(2 * k[0].numel() // k.shape[2] * k.element_size() for k, _ in staged)
        free = torch.cuda.mem_get_info(self.device)[0]
        if self.cache.shape:
            free += sum(2 * k.numel() * k.element_size() for k in self.cache.keys)
        fit = int(CACHE_MEMORY_FRACTION * free // (per_row * capacity))
        if fit < 1:
            raise EngineError(f"Not enough GPU memory for one row of {capacity} tokens.")
        return max(1, min(MAX_ROWS_CUDA, total, fit))

    def _prepare(self, rows: int, capacity: int, staged) -> None:
        """Buffers of `rows` x `capacity`; those (and graphs) of an earlier run if they fit."""
        shape = self.cache.shape
        if shape is None or shape[0] != rows or shape[1] < capacity:
            self.close()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.cache.allocate(rows, capacity, staged)

    # --- the run ------------------------------------------------------------------------------
    def run(self, prompts: Iterable[Prompt], params: SamplingParams,
            progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Continuation]:
        prompts = [p for p in prompts if p.n > 0]
        total = sum(p.n for p in prompts)
        meter = RolloutMeter(total)
        if not prompts:
            return
        with sdpa_attention(self.model):
            yield from self._run(prompts, params, meter, progress, should_stop)

    def _run(self, prompts, params, meter, progress, should_stop):
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop = set(params.stop_token_ids)
        pending = deque((p, j) for p in range(len(prompts)) for j in range(prompts[p].n))
        capacity = max(len(p.token_ids) for p in prompts) + params.max_new_tokens
        open_prompt, staged, first_logits = None, None, None
        slots: list[_Row | None] = []
        host_pos: list[int] = []

        def sample_first(rows: int) -> list[int]:
            with torch.inference_mode():
                return sample_next(first_logits.expand(rows, -1), params.temperature,
                                   params.top_p, generator).tolist()

        def finish(r: int, reason: str, done: list) -> None:
            row = slots[r]
            prompt = prompts[row.prompt]
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True) \
                if self.tokenizer is not None else ""
            continuation = Continuation(prompt.key, prompt.first_index + row.index, row.tokens,
                                        text, reason)
            meter.add(continuation)
            done.append(continuation)
            slots[r], host_pos[r] = None, 0

        def stopped(row: _Row) -> str | None:
            """Why the row ends after its last token, or None."""
            if len(row.tokens) >= row.cap:
                return "length"
            n = len(row.tokens)
            answer = params.answer_stop
            if answer is not None and row.trigger_at is None and \
                    row.tokens[-1] in answer.trigger_ids:
                row.trigger_at = max(0, n - 4)
            if n % CHECK_EVERY == 0:
                if answer is not None and row.trigger_at is not None and \
                        answer.reached(row.tokens, row.trigger_at):
                    return "answer"
                if params.stop_at_repetition and degenerate(row.tokens):
                    return "repetition"
            return None

        def refill(done: list) -> None:
            nonlocal open_prompt, staged, first_logits
            free = [r for r, row in enumerate(slots) if row is None]
            while pending and (free or not slots):
                p = pending[0][0]
                if p != open_prompt:
                    staged, first_logits = self._prefill(prompts[p].token_ids)
                    open_prompt = p
                    if not slots:
                        rows = self._rows_for(meter.total, capacity, staged)
                        self._prepare(rows, capacity, staged)
                        slots.extend([None] * rows)
                        host_pos.extend([0] * rows)
                        free = list(range(rows))
                take = []
                while free and pending and pending[0][0] == p:
                    take.append((free.pop(0), pending.popleft()[1]))
                firsts = sample_first(len(take))
                t = len(prompts[p].token_ids)
                placed = []
                for (r, j), token in zip(take, firsts):
                    row = slots[r] = _Row(p, j, prompts[p].cap(j, params.max_new_tokens))
                    if token in stop:
                        finish(r, "stop", done)
                        free.append(r)
                        continue
                    row.tokens.append(token)
                    reason = stopped(row)
                    if reason:
                        finish(r, reason, done)
                        free.append(r)
                        continue
                    host_pos[r] = t
                    placed.append((r, token))
                if placed:
                    index = torch.tensor([r for r, _ in placed], device=self.device)
                    with torch.inference_mode():
                        self.cache.place(staged, index)
                        self.cache.tokens[index] = torch.tensor([tok for _, tok in placed],
                                                           device=self.device)
                free.sort()

        done: list[Continuation] = []
        refill(done)
        yield from done
        while any(row is not None for row in slots):
            if should_stop is not None and should_stop():
                raise JobCancelled("Rollouts cancelled.")
            with torch.inference_mode():
                self.cache.pos.copy_(torch.tensor(host_pos))
                logits = self._step(bucket(max(host_pos) + 1, self.cache.shape[1]))
                nxt = sample_next(logits, params.temperature, params.top_p, generator)
                self.cache.tokens.copy_(nxt)
            done = []
            for r, token in enumerate(nxt.tolist()):
                row = slots[r]
                if row is None:
                    continue
                if token in stop:
                    finish(r, "stop", done)
                    continue
                row.tokens.append(token)
                host_pos[r] += 1
                reason = stopped(row)
                if reason:
                    finish(r, reason, done)
            if done:
                refill(done)
            if progress is not None:
                progress(meter)
            yield from done

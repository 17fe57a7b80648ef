"""The probe inputs of `long_context` and the passes that measure them.

Haystack: generated sentences (seeded; no licensed text), a needle sentence inserted at a
sentence boundary at a chosen depth, then the question (Wu et al.'s "Based on the content of the
book, Question: ...\\nAnswer:", reworded) and optionally the start of the answer, so a small model
only has to copy the rest. Lengths count tokens of the whole input.

Passes (each through `hooks.attention_function`: SDPA for every multi-token pass, so a 16k-token
haystack never forms a (head, T, T) map):
- `greedy_copy`: prefill, then greedy decoding with a KV cache; at each step each head's exact
  weights of the one new query give its top-1 key, its weights binned over the input and on the
  needle span (the head's attention during the copy).
- `greedy_copies`: `greedy_copy` of many trials, prefilling once the haystack they share: trials
  of one seed differ only from their needle on (the sentences before it are a prefix of one
  stream), so in order of needle position each trial extends one KV cache of that stream to its
  needle and prefills only its own rest from a copy of it.
- `passkey_pass`: one pass over a passkey input giving `long_context.streaming_errors` per layer
  on the queries from the question on and Gu et al.'s alpha through the long-context capture
  (`qk_capture`, exact weights chunk by chunk).
"""

from __future__ import annotations

import copy as copying
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from backend.errors import InputError
from backend.methods import exact
from backend.methods.binning import bin_edges
from backend.methods.exact import AttentionRule
from backend.methods.heads.long_context import FirstKeyMass, streaming_errors
from backend.methods.hooks import attention_function
from backend.methods.qk_capture import LayerRecorder, UnsupportedAttention
from backend.progress import Progress

_WHO = ("The old miller", "A quiet engineer", "The river pilot", "My neighbour", "The night baker",
        "A travelling painter", "The village teacher", "An orchard keeper", "The harbour clerk",
        "A young botanist", "The choir master", "Her grandfather", "The lighthouse keeper",
        "A tired courier", "The museum guard", "Our landlady")
_DID = ("repaired", "described", "carried", "painted", "measured", "forgot", "borrowed", "sold",
        "counted", "cleaned", "wrapped", "photographed", "returned", "weighed", "hid", "found")
_WHAT = ("a wooden cart", "the broken clock", "three blue jars", "an atlas of rivers",
         "the morning bread", "a box of nails", "the parish ledger", "two copper kettles",
         "a bundle of letters", "the striped umbrella", "a crate of pears", "the brass compass",
         "an old fishing net", "the spare key", "a jar of buttons", "the green ladder")
_WHEN = ("near the bridge", "before the first snow", "at the market", "behind the mill",
         "during the long rain", "after supper", "on the third morning", "beside the canal",
         "in the cold cellar", "under the oak", "before the ferry left", "at the far end of town")
_WHY = ("", " and nobody asked why", " while the bells rang", " because the road was closed",
        " as the wind turned", " for the second time that week", " without a word")
NEEDLE = ("The secret ingredient of the lighthouse soup is smoked paprika and a spoon of "
          "wild honey.")
QUESTION = "What is the secret ingredient of the lighthouse soup?"
ANSWER_START = "The secret ingredient of the lighthouse soup is"
PASSKEY = "The passkey is {key}. Remember it. {key} is the passkey."
QUESTION_TEMPLATE = "\n\nBased on the text above, answer the question. Question: {question}\nAnswer:"


def haystack_sentences(n: int, seed: int) -> list[str]:
    """n generated sentences, the same for the same seed."""
    rng = np.random.default_rng(seed)
    parts = (_WHO, _DID, _WHAT, _WHEN, _WHY)
    picks = [rng.integers(0, len(p), n) for p in parts]
    return [f"{_WHO[a]} {_DID[b]} {_WHAT[c]} {_WHEN[d]}{_WHY[e]}."
            for a, b, c, d, e in zip(*picks)]


@dataclass(frozen=True)
class Trial:
    """One probe input. ids (token,); needle: [start, end) of the needle sentence; span:
    [start, end) of the part to copy (the needle after the answer's given start); question: the
    first token of the question."""

    ids: list[int]
    needle: tuple[int, int]
    span: tuple[int, int]
    question: int
    length: int
    depth: float


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_trial(tokenizer, length: int, depth: float, needle: str, question: str,
                answer_start: str = "", seed: int = 0) -> Trial:
    """A haystack of at most `length` tokens with the needle at `depth` (0 = first sentence,
    1 = last) and the question last (module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"Needle depths lie in [0, 1]; got {depth}.")
    start = tokenizer("")["input_ids"]  # the tokenizer's own leading special tokens (BOS)
    needle_ids = _encode(tokenizer, " " + needle.strip())
    tail = QUESTION_TEMPLATE.format(question=question.strip()) + (
        " " + answer_start.strip() if answer_start.strip() else "")
    question_ids = _encode(tokenizer, tail)
    budget = length - len(start) - len(needle_ids) - len(question_ids)
    if budget < 16:
        raise InputError(f"A {length}-token haystack leaves no room around a "
                         f"{len(needle_ids)}-token needle and its question: use longer inputs.")
    sentences: list[list[int]] = []
    total, batch = 0, 0
    while total < budget:
        for ids in tokenizer([" " + s for s in haystack_sentences(256, seed * 1000 + batch)],
                             add_special_tokens=False)["input_ids"]:
            if total + len(ids) > budget:
                total = budget  # full: stop at this sentence boundary
                break
            sentences.append(ids)
            total += len(ids)
        batch += 1
    ends = np.cumsum([len(s) for s in sentences])
    cut = int(np.searchsorted(ends, depth * ends[-1], side="left") + 1) if depth > 0 else 0
    cut = min(cut, len(sentences))
    before = [t for s in sentences[:cut] for t in s]
    after = [t for s in sentences[cut:] for t in s]
    needle_at = len(start) + len(before)
    given = _encode(tokenizer, " " + answer_start.strip()) if answer_start.strip() else []
    copy_from = needle_at + (len(given) if given and needle_ids[:len(given)] == given
                             and len(given) < len(needle_ids) else 0)
    ids = start + before + needle_ids + after + question_ids
    return Trial(ids, (needle_at, needle_at + len(needle_ids)),
                 (copy_from, needle_at + len(needle_ids)),
                 len(start) + len(before) + len(needle_ids) + len(after), length, depth)


def passkey_input(tokenizer, length: int, seed: int = 0) -> tuple[list[int], int]:
    """A passkey haystack of at most `length` tokens with its answer appended (teacher-forced,
    as DuoAttention's passkey data), and where its question starts."""
    key = str(np.random.default_rng(seed).integers(10_000, 100_000))
    trial = build_trial(tokenizer, length, 0.5, PASSKEY.format(key=key), "What is the passkey?",
                        "The passkey is", seed + 1)
    return trial.ids + _encode(tokenizer, " " + key), trial.question


def _sdpa(module, query, key, value, attention_mask, scaling, is_causal, softcap, s_aux, kwargs):
    """The layer's output of a multi-token pass, by SDPA (no (head, T, T) map)."""
    if softcap or s_aux is not None:
        raise UnsupportedAttention("This model soft-caps its attention logits or adds sink "
                                   "logits: the long-context probe's fast path does not "
                                   "cover it.")
    extra = {k: v for k, v in kwargs.items() if k != "sliding_window"}
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                    scaling=scaling, is_causal=is_causal, **extra)
    return out


def _allowed_keys(mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """(key,) bool of the last query's mask row (boolean or additive), None: every key."""
    if mask is None:
        return None
    row = mask[0, 0, -1, -n_keys:] if mask.ndim == 4 else mask[-1, -n_keys:]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


@dataclass
class Copy:
    """What greedy decoding left. top_keys (step, layer, head) input positions of each head's
    top-1 key; generated (step,) token ids; bins (layer, head, bin) and span (layer, head,
    span token) the heads' weights averaged over the steps; edges (bin + 1,) token edges."""

    top_keys: np.ndarray
    generated: np.ndarray
    bins: np.ndarray
    span: np.ndarray
    edges: np.ndarray


class _CopyRecorder:
    """Our attention function during greedy decoding (module docstring). Per step and layer it
    only adds the one query's weights on the input into a sum (layer, head, input token) and
    keeps its argmax, on the model's device; bins and span come from the sum at the end."""

    def __init__(self, n_layers: int, n_prompt: int, span: tuple[int, int], bins: int):
        self.n_layers, self.n_prompt, self.span = n_layers, n_prompt, span
        self.edges = bin_edges(n_prompt, bins)
        self.length = 0  # tokens seen once the current step's query is in
        self.layer = 0
        self.top: list[torch.Tensor] = []  # per step (layer, head)
        self.weights = None  # (layer, head, input token) float64 sum over the steps

    def __call__(self, module: nn.Module, query, key, value, attention_mask, scaling=None,
                 dropout=0.0, sliding_window=None, softcap=None, s_aux=None, is_causal=None,
                 **kwargs):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        if query.shape[2] > 1:
            return _sdpa(module, query, key, value, attention_mask, scaling, is_causal, softcap,
                         s_aux, kwargs), None
        q, k, v = query[0], key[0], value[0]
        n_heads, n_keys = q.shape[0], k.shape[1]
        rule = AttentionRule(float(scaling), False, softcap=float(softcap) if softcap else None,
                             sinks=tuple(s_aux.float().tolist()) if s_aux is not None else None)
        scores = exact.logits(q, k, rule, slice(0, 1), slice(0, n_keys), dtype=q.dtype)
        allowed = _allowed_keys(attention_mask, n_keys)
        if allowed is not None:
            scores = scores.masked_fill(~allowed.to(scores.device), -torch.inf)
        sinks = exact.sink_logits(rule, None, n_heads, scores.device)
        exact.softmax_(scores, sinks)
        p = scores[:, 0]  # (head, key)
        out = torch.matmul(p[:, None].to(v.dtype), exact.expand_heads(v, None, n_heads))
        self._record(p, self.length - n_keys)
        return out.transpose(0, 1)[None], None  # (1, 1, head, head_dim)

    def _record(self, p: torch.Tensor, offset: int) -> None:
        """p (head, key) of keys at positions offset + j."""
        if self.layer == 0:
            self.top.append(torch.empty(self.n_layers, p.shape[0], dtype=torch.long,
                                        device=p.device))
            if self.weights is None:
                self.weights = torch.zeros(self.n_layers, p.shape[0], self.n_prompt,
                                           dtype=torch.float64, device=p.device)
        self.top[-1][self.layer] = p.argmax(-1) + offset
        first = max(0, -offset)  # keys of the input only: the answer's own keys are left out
        last = min(p.shape[1], self.n_prompt - offset)
        if last > first:
            self.weights[self.layer, :, offset + first:offset + last] += p[:, first:last]
        self.layer = (self.layer + 1) % self.n_layers

    def result(self, generated: list[int]) -> "Copy":
        """The Copy of the steps recorded, `generated` their tokens."""
        steps = len(generated)
        weights = self.weights.cpu() / steps  # mean over the steps, (layer, head, input token)
        edges = torch.as_tensor(self.edges)
        sums = torch.cumsum(torch.nn.functional.pad(weights, (1, 0)), dim=-1)
        bins = (sums[..., edges[1:]] - sums[..., edges[:-1]]) / torch.diff(edges)
        return Copy(torch.stack(self.top).cpu().numpy(), np.asarray(generated),
                    bins.float().numpy(),
                    weights[..., self.span[0]:self.span[1]].float().numpy(), self.edges)


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Greedy steps on the CPU run on one intra-op thread, restored after: a one-token step's
    operations are too small to share, and on a busy two-core machine the second thread's
    waiting at each of them made ten SmolLM2 steps take 14 to 41 s instead of 1 to 1.5 s."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stops(tokenizer, token: int) -> bool:
    """Wu et al. stop at a newline; so do we, and at the end-of-sequence token."""
    return token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token])


@dataclass
class Prefix:
    """A KV cache of a sequence's first `length` tokens (`ids`), as the model's forward left it."""

    ids: list[int]
    cache: object

    @property
    def length(self) -> int:
        return len(self.ids)


def _sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, s_aux=None, is_causal=None, **kwargs):
    """The attention function of a pass that records nothing (what `_CopyRecorder` does on
    multi-token passes), so a shared prefix's cache equals the one each trial would build."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _sdpa(module, query, key, value, attention_mask, scaling, is_causal, softcap, s_aux,
                 kwargs), None


@torch.inference_mode()
def extend_prefix(model: nn.Module, prefix: Prefix | None, ids: list[int]) -> Prefix:
    """The prefix extended to `ids` (which start with prefix.ids): only the new tokens run
    (prefix's cache grows in place)."""
    done = prefix.length if prefix else 0
    if prefix is not None and done == len(ids):
        return prefix
    new = torch.tensor([ids[done:]], device=model.device)
    with attention_function(model, _sdpa_attention):
        cache = model(input_ids=new, past_key_values=prefix.cache if prefix else None,
                      use_cache=True, logits_to_keep=1).past_key_values
    return Prefix(list(ids), cache)


def _decode(model: nn.Module, tokenizer, recorder: _CopyRecorder, cache, token: torch.Tensor,
            n_prompt: int, max_new_tokens: int, progress: Progress | None) -> list[int]:
    """Greedy tokens after the prefilled cache, `token` the input's last one."""
    generated: list[int] = []
    for step in range(max_new_tokens):
        recorder.length = n_prompt + step
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        generated.append(int(out.logits[0, -1].argmax()))
        if progress:
            progress((step + 1) / max_new_tokens, f"copying, token {step + 1}")
        if _stops(tokenizer, generated[-1]):
            break
        token = torch.tensor([[generated[-1]]], device=model.device)
    return generated


@torch.inference_mode()
def greedy_copy(model: nn.Module, tokenizer, trial: Trial, max_new_tokens: int = 50,
                bins: int = 256, progress: Progress | None = None,
                prefix: Prefix | None = None) -> Copy:
    """Greedy decoding after the trial's input, at most max_new_tokens, recording every head.
    prefix: a cache of the input's first tokens (consumed: its cache grows with the trial)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = torch.tensor([trial.ids], device=model.device)
    if prefix is not None and trial.ids[:prefix.length] != prefix.ids:
        raise ValueError("The prefix is not the start of the trial's input.")
    done = prefix.length if prefix else 0
    recorder = _CopyRecorder(n_layers, len(trial.ids), trial.span, bins)
    with attention_function(model, recorder):
        cache = model(input_ids=ids[:, done:-1], past_key_values=prefix.cache if prefix else None,
                      use_cache=True, logits_to_keep=1).past_key_values
        with one_thread_on_cpu(model.device):
            generated = _decode(model, tokenizer, recorder, cache, ids[:, -1:], len(trial.ids),
                                max_new_tokens, progress)
    if len(recorder.top) != len(generated):
        raise UnsupportedAttention(f"{type(model).__name__} computes attention in its own code "
                                   "rather than through transformers' attention interface.")
    return recorder.result(generated)


# A greedy step against prefilled tokens, for progress only: on two CPU cores a step of SmolLM2
# (one thread) costs about as much as prefilling this many tokens.
STEP_TOKENS = 16


def greedy_copies(model: nn.Module, tokenizer, trials: list[Trial], max_new_tokens: int = 50,
                  bins: int = 256, progress: Progress | None = None) -> list[Copy]:
    """`greedy_copy` of every trial, in the trials' order, the haystack before the needles
    prefilled once (module docstring). Progress: each trial's share is the tokens it prefills
    plus its greedy steps (STEP_TOKENS each)."""
    order = sorted(range(len(trials)), key=lambda i: trials[i].needle[0])
    befores = [trials[i].ids[:trials[i].needle[0]] for i in order]  # the stream up to each needle
    extends = [k > 0 and befores[k][:len(befores[k - 1])] == befores[k - 1]
               for k in range(len(order))]  # False: another stream, prefilled from the start
    steps = STEP_TOKENS * max_new_tokens
    costs = [len(trials[i].ids) - (len(befores[k - 1]) if extends[k] else 0) + steps
             for k, i in enumerate(order)]
    total, done = sum(costs), 0
    copies: dict[int, Copy] = {}
    prefix = None
    for k, i in enumerate(order):
        label = (f"Trial {k + 1}/{len(trials)}: {len(trials[i].ids):,} tokens, needle at "
                 f"{trials[i].depth:.0%}")
        if progress:
            progress(done / total, f"{label}, prefilling")
        if befores[k]:
            prefix = extend_prefix(model, prefix if extends[k] else None, befores[k])
        own = Prefix(prefix.ids, copying.deepcopy(prefix.cache)) if befores[k] else None
        report = None
        if progress:
            def report(f, stage, start=done, cost=costs[k], label=label):
                progress((start + cost - steps * (1 - f)) / total, f"{label}, {stage}")
        copies[i] = greedy_copy(model, tokenizer, trials[i], max_new_tokens, bins, report, own)
        done += costs[k]
    return [copies[i] for i in range(len(trials))]


@torch.inference_mode()
def passkey_pass(model: nn.Module, ids: list[int], queries_from: int, sink: int,
                 recent: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the passkey input: ((layer, head) `streaming_errors` of every head on
    queries [queries_from, T), (layer, head) Gu et al.'s alpha from exact weights chunk by
    chunk)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    n_tokens = len(ids)
    recorder = LayerRecorder(n_layers, lambda layer, heads, tokens, device:
                             [FirstKeyMass(heads, tokens, device)], keep_qk=False,
                             sixteen_bits=False, chunk_bytes=None, progress=None)
    errors: list[np.ndarray] = []

    def attend(module, query, key, value, attention_mask, **kwargs):
        out = recorder(module, query, key, value, attention_mask, **kwargs)
        rule = recorder.layers[-1].rule  # the layer's mask, soft-capping and sinks
        errors.append(streaming_errors(query[0], key[0], value[0], rule,
                                       slice(queries_from, n_tokens), sink, recent))
        return out

    with attention_function(model, attend):
        model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    recorder.finish()
    if len(recorder.layers) != n_layers:
        raise UnsupportedAttention(f"{type(model).__name__} computes attention in its own code "
                                   "rather than through transformers' attention interface.")
    return np.stack(errors), np.stack([layer.reductions[0] for layer in recorder.layers])

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
- `streaming_pass`: one pass over a passkey input; `long_context.streaming_errors` per layer on
  the queries from the question on.
- `first_key_masses`: Gu et al.'s alpha through the long-context capture (`qk_capture`).
"""

from __future__ import annotations

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
from backend.methods.qk_capture import UnsupportedAttention, capture_layers, mask_rule
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
    """Our attention function during greedy decoding (module docstring)."""

    def __init__(self, n_layers: int, n_prompt: int, span: tuple[int, int], bins: int):
        self.n_layers, self.n_prompt, self.span = n_layers, n_prompt, span
        self.edges = bin_edges(n_prompt, bins)
        self.bin_of = torch.as_tensor(np.searchsorted(self.edges, np.arange(n_prompt),
                                                      side="right") - 1)
        self.length = 0  # tokens seen once the current step's query is in
        self.layer = 0
        self.top: list[torch.Tensor] = []
        self.bins = self.span_weights = None

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
        p = torch.exp(scores - exact.row_lse(scores, sinks)[..., None])[:, 0]  # (head, key)
        out = torch.matmul(p[:, None].to(v.dtype), exact.expand_heads(v, None, n_heads))
        self._record(p, self.length - n_keys)
        return out.transpose(0, 1)[None], None  # (1, 1, head, head_dim)

    def _record(self, p: torch.Tensor, offset: int) -> None:
        """p (head, key) of keys at positions offset + j."""
        n_heads = p.shape[0]
        if self.layer == 0:
            self.top.append(torch.empty(self.n_layers, n_heads, dtype=torch.long))
        self.top[-1][self.layer] = p.argmax(-1).cpu() + offset
        first = max(0, -offset)  # keys of the input only: the answer's own keys are left out
        last = min(p.shape[1], self.n_prompt - offset)
        row = torch.zeros(n_heads, self.n_prompt, dtype=torch.float64)
        if last > first:
            row[:, offset + first:offset + last] = p[:, first:last].double().cpu()
        if self.bins is None:
            self.bins = torch.zeros(self.n_layers, n_heads, len(self.edges) - 1,
                                    dtype=torch.float64)
            self.span_weights = torch.zeros(self.n_layers, n_heads, self.span[1] - self.span[0],
                                            dtype=torch.float64)
        self.bins[self.layer].index_add_(1, self.bin_of, row)
        self.span_weights[self.layer] += row[:, self.span[0]:self.span[1]]
        self.layer = (self.layer + 1) % self.n_layers


def _stops(tokenizer, token: int) -> bool:
    """Wu et al. stop at a newline; so do we, and at the end-of-sequence token."""
    return token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token])


@torch.inference_mode()
def greedy_copy(model: nn.Module, tokenizer, trial: Trial, max_new_tokens: int = 50,
                bins: int = 256, progress: Progress | None = None) -> Copy:
    """Greedy decoding after the trial's input, at most max_new_tokens, recording every head."""
    n_layers = model.config.get_text_config().num_hidden_layers
    ids = torch.tensor([trial.ids], device=model.device)
    recorder = _CopyRecorder(n_layers, len(trial.ids), trial.span, bins)
    generated: list[int] = []
    with attention_function(model, recorder):
        cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
        token = ids[:, -1:]
        for step in range(max_new_tokens):
            recorder.length = len(trial.ids) + step
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            generated.append(int(out.logits[0, -1].argmax()))
            if progress:
                progress((step + 1) / max_new_tokens, f"Copying: token {step + 1}")
            if _stops(tokenizer, generated[-1]):
                break
            token = torch.tensor([[generated[-1]]], device=model.device)
    if len(recorder.top) != len(generated):
        raise UnsupportedAttention(f"{type(model).__name__} computes attention in its own code "
                                   "rather than through transformers' attention interface.")
    steps = len(generated)
    return Copy(torch.stack(recorder.top).numpy(), np.asarray(generated),
                (recorder.bins / steps / np.diff(recorder.edges)).float().numpy(),
                (recorder.span_weights / steps).float().numpy(), recorder.edges)


@torch.inference_mode()
def streaming_pass(model: nn.Module, ids: list[int], queries_from: int, sink: int,
                   recent: int) -> np.ndarray:
    """(layer, head) `streaming_errors` of every head on queries [queries_from, T)."""
    errors: list[np.ndarray] = []
    n_tokens = len(ids)

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None, s_aux=None, is_causal=None, **kwargs):
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        rule = mask_rule(attention_mask, bool(causal), sliding_window, float(scaling), n_tokens)
        errors.append(streaming_errors(query[0], key[0], value[0], rule,
                                       slice(queries_from, n_tokens), sink, recent))
        return _sdpa(module, query, key, value, attention_mask, scaling, is_causal, softcap,
                     s_aux, kwargs), None

    with attention_function(model, attend):
        model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    return np.stack(errors)


def first_key_masses(model: nn.Module, ids: list[int]) -> np.ndarray:
    """(layer, head) Gu et al.'s alpha on the input, exact weights chunk by chunk."""
    layers = capture_layers(model, torch.tensor([ids]), keep_qk=False,
                            reducers=lambda layer, heads, tokens, device:
                            [FirstKeyMass(heads, tokens, device)])
    return np.stack([layer.reductions[0] for layer in layers])

"""Head importance, head roles and pruning curves of one text, as analyses
(spec: specs/head_importance.md; the science is in backend.methods.heads).

Kinds and their arrays, all (layer, head) unless said otherwise:
- "head_importance" (params: method in METHODS): "raw", and its normalisations "layer" (each layer
  of unit L2 norm) and "global" ("layer", then min-max to [0, 1]).
- "head_roles" (no params): one array per role in ROLES, from the text's attention; "induction"
  from random tokens repeated twice (it does not depend on the text).
- "pruning_curve" (params: method, recompute): "fractions" (step,), "loss_importance" and
  "loss_random" (step,), "order_importance" and "order_random" (layer * head,) flat head indices
  in masking order, "importance" (layer, head) the layer-normalised scores of the first step.

The loss. A causal LM's own next-token loss on the text. An encoder has no head and so no loss of
its own: the text is cut in two at the sentence boundary nearest its middle (at the word nearest
its middle when it is one sentence) and the "loss" is the cosine similarity of the two halves'
mean-pooled embeddings. Attention statistics (confidence, entropy) need no loss: they are taken
on the whole text.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.analyses.kind import Kind, NoParams, Result, Task, stored
from backend.analyses.params import param
from backend.errors import InputError
from backend.methods.capture import capture_attention
from backend.methods.heads import (METHODS, LossFn, induction_scores, normalize_importance,
                                   pruning_curve, raw_importance, sentence_similarity_loss)
from backend.methods.heads.importance import NORMALIZATIONS
from backend.methods.heads.roles import LOCALITY_WINDOW
from backend.methods.qk_capture import UnsupportedAttention, capture_layers
from backend.methods.reductions import ROLE_NAMES, HeadStatistics
from backend.methods.thought_anchors.receivers import PROXIMITY_IGNORE
from backend.methods.tokens import model_context, tokenize

STATISTICS = ("confidence", "entropy")  # importance methods that need no loss
INDUCTION = {"n_tokens": 50, "n_sequences": 2, "seed": 0}
PRUNING_STEP = 0.05
PRUNING_SEED = 0

ROLES = (*ROLE_NAMES, "induction")


@dataclass(frozen=True)
class ImportanceParams:
    """method: how a head's importance is measured (METHODS)."""

    method: str = param(METHODS[0], choices=METHODS)


@dataclass(frozen=True)
class PruningParams:
    """method: the importance the heads are masked by; recompute: score the heads again after
    each step (else once, before masking)."""

    method: str = param(METHODS[0], choices=METHODS)
    recompute: bool = param(False)

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_WORD_BREAK = re.compile(r"\s+")


@dataclass(frozen=True)
class ImportanceResult(Result):
    """(layer, head) float64 each: raw scores and their normalisations (NORMALIZATIONS)."""

    raw: np.ndarray
    layer: np.ndarray
    global_: np.ndarray = stored("global")


@dataclass(frozen=True)
class RolesResult(Result):
    """scores: role (ROLES) -> (layer, head) float64; roles a short text cannot give are left
    out (meta["unavailable"] says why)."""

    scores: dict[str, np.ndarray]

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.scores)

    @classmethod
    def load(cls, store, aid: str) -> "RolesResult":
        present = set(store.array_names(aid))
        return cls(store.load(aid), {name: store.load_array(aid, name) for name in ROLES
                                     if name in present})


@dataclass(frozen=True)
class PruningResult(Result):
    """fractions (step,) of heads masked; loss after each step (step,) and the masking order
    (layer * head,) flat head indices, by importance and at random; importance (layer, head):
    the layer-normalised scores of the first step (None when recomputed at every step)."""

    fractions: np.ndarray
    loss_importance: np.ndarray
    loss_random: np.ndarray
    order_importance: np.ndarray
    order_random: np.ndarray
    importance: np.ndarray | None = None


# --------------------------------------------------------------------------- the loss


def split_in_halves(text: str) -> tuple[str, str, str]:
    """(first, second, how): the text cut at the sentence boundary nearest its middle, or, for
    one sentence, at the space nearest its middle. how: "sentence" or "word"."""
    text = text.strip()
    middle = len(text) / 2
    for how, pattern in (("sentence", _SENTENCE_BREAK), ("word", _WORD_BREAK)):
        breaks = list(pattern.finditer(text))
        if breaks:
            cut = min(breaks, key=lambda m: abs((m.start() + m.end()) / 2 - middle))
            return text[:cut.start()], text[cut.end():], how
    raise InputError("An encoder's head importance compares the two halves of the text: give "
                     "it at least two words (better, two sentences).")


@dataclass(frozen=True)
class LossInput:
    """What importance is measured on: input_ids (rows, tokens), loss_fn (None: the causal LM's
    own loss, or no loss for attention statistics), and how the UI should describe it."""

    input_ids: torch.Tensor
    loss_fn: LossFn | None
    meta: dict = field(default_factory=dict)


def loss_input(lm, text: str, max_tokens: int, method: str) -> LossInput:
    """The rows and loss of `method` for this model and text (module docstring)."""
    if method not in METHODS:
        raise InputError(f"Unknown head importance method {method!r}: pick one of "
                         f"{', '.join(METHODS)}.")
    if method in STATISTICS or lm.causal:
        tokens = tokenize(lm.tokenizer, text, max_tokens)
        if len(tokens.ids) < 3:
            raise InputError("Head importance needs a text of at least 3 tokens.")
        if method in STATISTICS:
            meta = {"loss_kind": "none", "loss": f"attention {method} (no loss)",
                    "higher_is_better": None}
        else:
            meta = {"loss_kind": "next_token", "loss": "next-token loss (cross-entropy, nats)",
                    "higher_is_better": False}
        return LossInput(torch.tensor([tokens.ids]), None, {**meta, "n_tokens": len(tokens.ids)})
    first, second, how = split_in_halves(text)
    pair = sentence_similarity_loss(lm.tokenizer, first, second)
    if pair.input_ids.shape[1] > max_tokens:
        raise InputError(f"The text's halves are {pair.input_ids.shape[1]} tokens long; this "
                         f"server analyses at most {max_tokens} (ATLAS_MAX_TOKENS).")
    return LossInput(pair.input_ids, pair, {
        "loss_kind": "sentence_similarity", "higher_is_better": True,
        "loss": "cosine similarity of the text's two halves",
        "first": first, "second": second, "split": how,
        "n_tokens": int(pair.attention_mask.sum())})


def _record(task: Task, lm, meta: dict):
    shape = {"n_layers": lm.n_layers, "n_heads": lm.n_heads, "model_label": lm.source.label}
    return task.record(lm.fingerprint, {**shape, **meta})


# --------------------------------------------------------------------------- computations


class _Memo:
    """The last few results of a computation, by key. Jobs run one at a time on the worker, so
    the page's next job (the pruning curve after the importance, another text's roles) can reuse
    what the previous one computed instead of running the model again."""

    def __init__(self, size: int):
        self.size, self._items = size, OrderedDict()

    def get(self, key, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
        else:
            self._items[key] = compute()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return self._items[key]


_importance_memo, _induction_memo = _Memo(16), _Memo(4)


def _raw_importance(lm, text: str, data: LossInput, method: str, progress) -> np.ndarray:
    """raw_importance (layer, head) of the text, remembered for the next job."""
    key = (lm.fingerprint, str(lm.device), text, method, tuple(data.input_ids.shape))
    return _importance_memo.get(key, lambda: raw_importance(
        lm.model, data.input_ids, method, data.loss_fn, progress=progress))


def _induction(lm, progress) -> np.ndarray:
    """Induction scores (layer, head) of a model: they depend on its weights only, so one
    computation serves every text."""
    return _induction_memo.get((lm.fingerprint, str(lm.device)), lambda: induction_scores(
        lm.model, **INDUCTION, progress=progress))


def compute_head_importance(ctx, task: Task[ImportanceParams]):
    """Importance of every head by params.method: raw and both normalisations."""
    request, method = task.request, task.params.method
    lm = ctx.model(request.model)
    data = loss_input(lm, request.text, ctx.settings.max_tokens, method)
    ctx.progress(0.3, f"{method.capitalize()} importance on {data.meta['n_tokens']} tokens")
    raw = _raw_importance(lm, request.text, data, method, ctx.span(0.3, 0.85))
    arrays = {how: normalize_importance(raw, how) for how in NORMALIZATIONS}
    return ImportanceResult(_record(task, lm, {"method": method, **data.meta}), arrays["raw"],
                            arrays["layer"], arrays["global"])


def compute_head_roles(ctx, task: Task[NoParams]):
    """Every role score of every head (ROLES), reduced chunk by chunk as attention is captured
    (any length). Roles a short text cannot give are listed in meta["unavailable"] with the
    reason."""
    request = task.request
    lm = ctx.model(request.model)
    tokens = tokenize(lm.tokenizer, request.text, ctx.settings.max_tokens,
                      model_context(lm.model.config))
    if len(tokens.ids) < 3:
        raise InputError("Head roles need a text of at least 3 tokens.")
    ctx.progress(0.3, f"Role scores on {len(tokens.ids)} tokens")
    ids, progress = torch.tensor([tokens.ids]), ctx.span(0.3, 0.5)

    def statistics(layer, n_heads, n_tokens, device):
        return [HeadStatistics(n_heads, n_tokens, device, LOCALITY_WINDOW, PROXIMITY_IGNORE)]

    try:
        results = [layer.reductions[0] for layer in capture_layers(
            lm.model, ids, statistics, keep_qk=False, progress=progress)]
    except UnsupportedAttention:  # eager weights of the whole layer, reduced the same way
        def reduce(layer: int, weights: torch.Tensor) -> dict[str, np.ndarray]:
            stats = statistics(layer, weights.shape[1], weights.shape[-1], weights.device)[0]
            stats.update(0, 0, weights[0].float())
            return stats.result()
        results = capture_attention(lm.model, ids, reduce=reduce, progress=progress)
    unavailable = HeadStatistics.unavailable(len(tokens.ids), PROXIMITY_IGNORE)
    arrays = {name: np.stack([r[name] for r in results]).astype(np.float64)
              for name in ROLE_NAMES if name not in unavailable}
    ctx.progress(0.5, "Induction scores on repeated random tokens")
    arrays["induction"] = _induction(lm, ctx.span(0.5, 0.85)).astype(np.float64)
    meta = {"n_tokens": len(tokens.ids), "unavailable": unavailable, "induction": INDUCTION,
            "locality_window": LOCALITY_WINDOW, "proximity_ignore": PROXIMITY_IGNORE}
    return RolesResult(_record(task, lm, meta), arrays)


def compute_pruning_curve(ctx, task: Task[PruningParams]):
    """Loss with 0, 5, ..., 100 % of the heads masked, in increasing order of importance by
    params.method (computed once, or recomputed after each step with params.recompute), and in
    a seeded random order."""
    request, method, recompute = task.request, task.params.method, task.params.recompute
    lm = ctx.model(request.model)
    loss = loss_input(lm, request.text, ctx.settings.max_tokens,
                      "gradient" if method in STATISTICS else method)  # the curve needs a loss
    importance = None
    if not recompute:
        scored = loss_input(lm, request.text, ctx.settings.max_tokens, method)
        ctx.progress(0.3, f"{method.capitalize()} importance")
        importance = normalize_importance(
            _raw_importance(lm, request.text, scored, method, ctx.span(0.3, 0.45)), "layer")
    stage = f"Masking heads ({'recomputing importance' if recompute else 'importance computed once'})"
    ctx.progress(0.45 if importance is not None else 0.3, stage)
    curve = pruning_curve(lm.model, loss.input_ids, method, loss.loss_fn, importance=importance,
                          recompute=recompute, step=PRUNING_STEP, seed=PRUNING_SEED,
                          progress=ctx.span(0.45 if importance is not None else 0.3, 0.85))
    losses = {order: np.asarray(curve.loss[order], dtype=np.float64) for order in curve.loss}
    orders = {order: np.asarray(curve.order[order], dtype=np.int64) for order in curve.order}
    meta = {"method": method, "recompute": recompute, "step": PRUNING_STEP,
            "seed": PRUNING_SEED, **loss.meta}
    return PruningResult(_record(task, lm, meta), curve.fractions.astype(np.float64),
                         losses["importance"], losses["random"], orders["importance"],
                         orders["random"],
                         None if importance is None else np.asarray(importance, np.float64))


HEAD_IMPORTANCE = Kind("head_importance", ImportanceParams, compute_head_importance,
                       ImportanceResult)
HEAD_ROLES = Kind("head_roles", NoParams, compute_head_roles, RolesResult)
PRUNING_CURVE = Kind("pruning_curve", PruningParams, compute_pruning_curve, PruningResult)


# --------------------------------------------------------------------------- for the views


def head_label(layer: int, head: int) -> str:
    """"L12H3": how a head is named in links and tables."""
    return f"L{layer}H{head}"


def parse_head_label(label: str | None) -> tuple[int, int] | None:
    match = re.fullmatch(r"L(\d+)H(\d+)", label or "")
    return (int(match[1]), int(match[2])) if match else None


def top_attended_pairs(matrix: np.ndarray, k: int = 10,
                       skip_first: bool = False) -> list[tuple[int, int, float]]:
    """The k largest weights of a (query, key) matrix as (query, key, weight), largest first;
    skip_first leaves out every pair involving token 0 (an attention sink)."""
    weights = np.asarray(matrix, dtype=np.float64).copy()
    if skip_first:
        weights[0, :] = -np.inf
        weights[:, 0] = -np.inf
    flat = np.argsort(-weights, axis=None, kind="stable")[:k]
    pairs = [(int(f // weights.shape[1]), int(f % weights.shape[1])) for f in flat]
    return [(q, key, float(weights[q, key])) for q, key in pairs if np.isfinite(weights[q, key])]


def head_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of each head by score, (layer, head), 1 = highest; NaN scores rank last."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(1, flat.size + 1)
    return ranks.reshape(np.shape(scores))

"""Long-context head roles of one model, as the analysis kind "long_context_heads"
(science: backend.methods.heads.long_context; inputs and passes: backend.methods.heads.haystack).

The request's text is the needle sentence; params: question, answer_start (given to the model
after "Answer:"; "" = Wu et al.'s setting, the whole needle to copy), lengths (input tokens) and
depths (0..1) of the haystack trials, max_new_tokens, bins, passkey_length, sink, recent, seed.
Defaults scale the papers' settings (Wu et al.: 1,000 to 50,000 tokens in 20 steps x depths
0..100 % in 10 steps, 50 new tokens; DuoAttention: 64 sink + 256 recent tokens) to the machine:
the dataclass holds the CPU's (a probe of a few minutes on two cores), GPU_SCALE what a GPU
takes instead (`machine_defaults`); `probe_request` and `link_request` fill in the machine's.

Arrays, (layer, head) unless said: "retrieval" (NaN when no trial retrieved the needle),
"retrieval_trials" (trial, layer, head), "recall" (trial,), "top_keys" (trial, step, layer, head)
(-1 past a trial's last step), "generated" (trial, step) (-1 likewise), "attention_bins"
(trial, layer, head, bin) mean weight per token of each bin during the copy, "bin_edges"
(trial, bin + 1), "span_attention" (trial, layer, head, span token), "streaming_error",
"streaming", "sink_alpha". meta["trials"]: per trial its length, depth, tokens, needle and span,
answer, recall, accepted, and the token labels around the needle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from backend.analyses.kind import Kind, NamedArrays, Task
from backend.analyses.params import defaults, from_query, param
from backend.analyses.request import AnalysisRequest
from backend.errors import InputError
from backend.methods.heads import haystack
from backend.methods.heads.long_context import (RECALL_THRESHOLD, RECENT_TOKENS, SINK_TOKENS,
                                                retrieval_scores, rouge1_recall, sink_shares,
                                                streaming_scores, trial_retrieval_scores)
from backend.methods.tokens import model_context, readable_label

KIND = "long_context_heads"
NEEDLE = haystack.NEEDLE
MAX_PROBE_TOKENS = 10 ** 6


# The dataclass's defaults are the CPU's: two lengths x two depths, 16 new tokens for the
# needle's rest (about 12 tokens). A GPU's: Wu et al.'s 10 depths and 50 new tokens over lengths
# doubling up to 8,000 tokens (within the context of every packaged model); longer haystacks
# (16k, 32k) are a setting away.
GPU_SCALE = {"lengths": (1000, 2000, 4000, 8000),
             "depths": (0.0, 0.11, 0.22, 0.33, 0.44, 0.56, 0.67, 0.78, 0.89, 1.0),
             "max_new_tokens": 50, "passkey_length": 8000}


@dataclass(frozen=True)
class ProbeParams:
    """The probe's settings (module docstring); the text is the needle. Defaults: the CPU's
    (GPU_SCALE above replaces some on a GPU)."""

    question: str = param(haystack.QUESTION)
    answer_start: str = param(haystack.ANSWER_START)
    lengths: tuple[int, ...] = param((1000, 2000), low=1, high=MAX_PROBE_TOKENS)
    depths: tuple[float, ...] = param((0.25, 0.75), low=0.0, high=1.0)
    max_new_tokens: int = param(16, low=1, high=200)
    bins: int = param(128, low=1, high=4096)
    passkey_length: int = param(1000, low=1, high=MAX_PROBE_TOKENS)
    sink: int = param(SINK_TOKENS, low=1, high=MAX_PROBE_TOKENS)
    recent: int = param(RECENT_TOKENS, low=1, high=MAX_PROBE_TOKENS)
    seed: int = param(0, low=0, high=2 ** 31 - 1)

    def check(self) -> None:
        if min(self.lengths) < 2 * self.bins:
            raise InputError(f"Haystacks must be at least {2 * self.bins} tokens long (twice "
                             "the bins of the attention shown per trial).")


DEFAULTS = defaults(ProbeParams)
SCORES = ("retrieval", "streaming", "sink_alpha")
EXCERPT = 48  # tokens kept on each side of the needle for the per-trial view


def machine_defaults(device: str | None = None) -> dict:
    """The probe's defaults on `device` ("cpu", "cuda..."; None: where this process's worker
    runs, ATLAS_DEVICE or any GPU)."""
    if device is None:
        from backend.config import Settings
        from backend.models.loading import pick_device

        device = str(pick_device(Settings.from_env()))
    return {**DEFAULTS, **({} if device.startswith("cpu") else GPU_SCALE)}


def probe_request(model: str, needle: str = NEEDLE, device: str | None = None,
                  **params) -> AnalysisRequest:
    """The probe's request: the machine's defaults (`machine_defaults(device)`) for the
    settings left out."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise InputError(f"Unknown probe settings: {', '.join(sorted(unknown))}.")
    return AnalysisRequest.make(KIND, model, needle, **{**machine_defaults(device), **params})


# A link's (or lesson step's) probe settings: query parameter -> the probe's parameter.
LINK_SETTINGS = {"lc_lengths": "lengths", "lc_depths": "depths", "lc_passkey": "passkey_length"}


def link_request(model: str, link: dict[str, str], device: str | None = None) -> AnalysisRequest:
    """The machine's default probe with the settings a link (or a lesson step) carries:
    lc_lengths and lc_depths comma-separated, lc_passkey; a malformed value is refused, naming
    it."""
    strings = {name: link[key] for key, name in LINK_SETTINGS.items()
               if str(link.get(key, "")).strip()}
    return probe_request(model, device=device, **from_query(KIND, ProbeParams, strings))


def _settings(p: ProbeParams, max_tokens: int) -> dict:
    longest = max(max(p.lengths), p.passkey_length)
    if longest > max_tokens:
        raise InputError(f"A {longest:,}-token input is longer than this server analyses "
                         f"or this model reads ({max_tokens:,} tokens: ATLAS_MAX_TOKENS or "
                         "the model's context).")
    return asdict(p)


def _labels(tokenizer, ids: list[int]) -> list[str]:
    return [readable_label(tokenizer.decode([t])) for t in ids]


def _padded(rows: list[np.ndarray], fill) -> np.ndarray:
    """Stack arrays whose first axis differs, padding with `fill`."""
    steps = max(len(r) for r in rows)
    out = np.full((len(rows), steps, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def compute_long_context_heads(ctx, task: Task[ProbeParams]):
    """Every trial's greedy copy, then the passkey pass for streaming and sink scores."""
    request = task.request
    lm = ctx.model(request.model)
    if not lm.causal:
        raise InputError("Long-context head roles need a causal language model: the probe "
                         "generates the needle's answer.")
    context = model_context(lm.model.config) or ctx.settings.max_tokens
    p = _settings(task.params, min(ctx.settings.max_tokens, context))
    tok, needle = lm.tokenizer, request.text.strip()
    trials = [haystack.build_trial(tok, n, d, needle, p["question"], p["answer_start"],
                                   p["seed"]) for n in p["lengths"] for d in p["depths"]]
    copies = haystack.greedy_copies(lm.model, tok, trials, p["max_new_tokens"], p["bins"],
                                    ctx.span(0.3, 0.85, "Haystack trials"))
    metas, scores = [], []
    for trial, copy in zip(trials, copies):
        answer = tok.decode(copy.generated.tolist(), skip_special_tokens=True)
        given = p["answer_start"].strip()
        recall = rouge1_recall(needle, f"{given} {answer}" if given else answer)
        scores.append(trial_retrieval_scores(copy.top_keys, copy.generated,
                                             np.asarray(trial.ids), trial.span))
        lo, hi = max(0, trial.needle[0] - EXCERPT), min(len(trial.ids), trial.needle[1] + EXCERPT)
        metas.append({"length": trial.length, "depth": trial.depth, "n_tokens": len(trial.ids),
                      "needle": list(trial.needle), "span": list(trial.span),
                      "question_at": trial.question, "answer": answer, "recall": recall,
                      "accepted": recall > RECALL_THRESHOLD, "excerpt_start": lo,
                      "excerpt": _labels(tok, trial.ids[lo:hi]),
                      "generated": _labels(tok, copy.generated.tolist())})
    ctx.progress(0.86, f"Streaming proxy and sinks on a {p['passkey_length']:,}-token passkey")
    ids, question_at = haystack.passkey_input(tok, p["passkey_length"], p["seed"])
    errors, alpha = haystack.passkey_pass(lm.model, ids, question_at, p["sink"], p["recent"])
    trial_scores = np.stack(scores)
    recalls = np.array([m["recall"] for m in metas])
    arrays = {
        "retrieval": retrieval_scores(trial_scores, recalls),
        "retrieval_trials": trial_scores, "recall": recalls,
        "top_keys": _padded([c.top_keys.astype(np.int32) for c in copies], -1),
        "generated": _padded([c.generated.astype(np.int64) for c in copies], -1),
        "attention_bins": np.stack([c.bins for c in copies]),
        "bin_edges": np.stack([c.edges.astype(np.int64) for c in copies]),
        "span_attention": np.stack([c.span for c in copies]),
        "streaming_error": errors.astype(np.float64),
        "streaming": streaming_scores(errors), "sink_alpha": alpha.astype(np.float64),
    }
    meta = {"n_layers": lm.n_layers, "n_heads": lm.n_heads, "model_label": lm.source.label,
            "trials": metas, "settings": p, "passkey_tokens": len(ids),
            "passkey_queries": len(ids) - question_at}
    return NamedArrays(task.record(lm.fingerprint, meta), arrays)


LONG_CONTEXT_HEADS = Kind(KIND, ProbeParams, compute_long_context_heads)


def role_shares(arrays: dict[str, np.ndarray], retrieval_above: float, streaming_above: float,
                epsilon: float) -> dict[str, float]:
    """Share of heads in each role: retrieval score above `retrieval_above`, streaming score
    above `streaming_above`, sink alpha above epsilon."""
    _, sinks = sink_shares(arrays["sink_alpha"], epsilon)
    retrieval = np.nan_to_num(arrays["retrieval"], nan=0.0)
    return {"retrieval": float((retrieval > retrieval_above).mean()),
            "streaming": float((arrays["streaming"] > streaming_above).mean()),
            "sink": sinks}

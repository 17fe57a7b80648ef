"""Rollouts for counterfactual resampling (spec section 2): R continuations of one shared prefix.

`sample_token_ids` runs them on the embedded rollout engine (backend.rollouts.embedded): the
prefix is prefilled ONCE and its KV cache copied to every decoding row; a row that finishes is
refilled with the next rollout. `sample_one_by_one` is the naive baseline (one `model.generate`
per rollout, prefix re-read every time) for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from backend.progress import Progress
from backend.rollouts.base import TEMPERATURE, TOP_P, Prompt, SamplingParams
from backend.rollouts.embedded import EmbeddedEngine
from backend.rollouts.sampling import sample_next

from .resampling import rollout_prompt
from .segmentation import clean_resampling_prefix, resampling_prefix


MAX_NEW_TOKENS = 1024
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<｜end▁of▁sentence｜>")

__all__ = ["resampling_prompt", "sample_continuations", "sample_next",
           "sample_one_by_one", "sample_token_ids", "stop_token_ids"]


def resampling_prompt(problem: str, chunks: Sequence[str], i: int, forced: bool = False,
                      trace: str | None = None) -> str:
    """Prompt whose continuations resample chunk i: `rollout_prompt` of the prefix before it.

    Prefix: the reference's faithful `resampling_prefix(chunks, i)`; with `trace` (the text the
    chunks were split from) the clean variant `clean_resampling_prefix(trace, i)` instead.
    """
    prefix = resampling_prefix(chunks, i) if trace is None else clean_resampling_prefix(trace, i)
    return rollout_prompt(problem, prefix, forced)


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """Ids that end a rollout: the tokenizer's eos, the model's generation_config eos (int or
    list) and the usual end-of-turn tokens (`END_TOKENS`) that the vocabulary holds."""
    ids = {tokenizer.eos_token_id} if tokenizer is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids |= {vocab[t] for t in END_TOKENS if t in vocab}
    return sorted(int(i) for i in ids if i is not None)


def _prompt_ids(prompt_ids) -> list[int]:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (T,) or (1, T) with T > 0; got {tuple(ids.shape)}")
    return ids[0].tolist()


def _prompt_tensor(prompt_ids, device) -> torch.Tensor:
    return torch.tensor([_prompt_ids(prompt_ids)], device=device)


def sample_token_ids(model: nn.Module, prompt_ids, n: int, eos_token_ids: Iterable[int] = (),
                     temperature: float = TEMPERATURE, top_p: float = TOP_P,
                     max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None,
                     batch_size: int | None = None, progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """n sampled continuations of one prompt, as token ids (end token excluded), in order.

    prompt_ids: (T,) or (1, T). One prefill forward pass over the prompt; `batch_size` decoding
    rows (default all n) sample from copies of its KV cache, one forward pass per token, rows
    refilled as rollouts finish. Rows stop at any of `eos_token_ids` (none: exactly
    `max_new_tokens` tokens each). `seed` makes runs reproducible (same seed, n, batch_size and
    device: same output). should_stop() is polled every token (raises JobCancelled);
    progress(fraction of rollouts finished, message) after every token.
    """
    engine = EmbeddedEngine(model, max_rows=max(1, min(batch_size or n, n)))
    params = SamplingParams(temperature, top_p, max_new_tokens, tuple(sorted(set(eos_token_ids))),
                            seed, stop_at_repetition=False)
    report = None if progress is None else (
        lambda meter: progress(meter.done / meter.total, meter.describe()))
    rows: list[list[int]] = [[] for _ in range(n)]
    for continuation in engine.run([Prompt(0, _prompt_ids(prompt_ids), n)], params, report,
                                   should_stop):
        rows[continuation.index] = continuation.token_ids
    return rows


def sample_continuations(model: nn.Module, tokenizer, prompt_ids, n: int,
                         temperature: float = TEMPERATURE, top_p: float = TOP_P,
                         max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None,
                         batch_size: int | None = None, progress: Progress | None = None,
                         should_stop: Callable[[], bool] | None = None) -> list[str]:
    """n decoded continuations (special tokens skipped) of one prompt, sampled as one batch from
    a shared prefill (`sample_token_ids`), stopping at `stop_token_ids(tokenizer, model)`."""
    rows = sample_token_ids(model, prompt_ids, n, stop_token_ids(tokenizer, model), temperature,
                            top_p, max_new_tokens, seed, batch_size, progress, should_stop)
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


@torch.inference_mode()
def sample_one_by_one(model: nn.Module, prompt_ids, n: int, eos_token_ids: Iterable[int] = (),
                      temperature: float = TEMPERATURE, top_p: float = TOP_P,
                      max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None,
                      min_new_tokens: int = 0) -> list[list[int]]:
    """The naive baseline: one `model.generate(do_sample=True)` per rollout, each re-reading the
    whole prompt. Same temperature and top-p (top_k off); ids after the prompt, end token
    excluded (default end tokens: the model's generation_config). `min_new_tokens` lets a
    benchmark force equal lengths."""
    device = next(model.parameters()).device
    prompt = _prompt_tensor(prompt_ids, device)
    eos = sorted(set(eos_token_ids) or stop_token_ids(None, model))
    if seed is not None:
        torch.manual_seed(seed)
    rows = []
    for _ in range(n):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
        )[0, prompt.shape[1] :].tolist()
        rows.append([t for t in out if t not in eos])
    return rows

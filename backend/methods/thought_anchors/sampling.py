"""Rollouts for counterfactual resampling (spec section 2): R continuations of one shared prefix.

`sample_token_ids` prefills the prefix ONCE (one forward pass with a KV cache), copies the cache
to R rows and samples all rows as one batch, a token per forward pass, with explicit temperature
and top-p sampling from a seeded generator. A row that samples an end token leaves the batch (its
cache rows are dropped); sampling ends when every row has finished. `sample_one_by_one` is the
naive baseline (one `model.generate` per rollout, prefix re-read every time) for benchmarks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .resampling import rollout_prompt
from .segmentation import clean_resampling_prefix, resampling_prefix

Progress = Callable[[float, str], None]

TEMPERATURE = 0.6  # the reference runs
TOP_P = 0.95
MAX_NEW_TOKENS = 1024
TOP_CANDIDATES = 1024  # tokens ranked before falling back to a full sort of the vocabulary
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<｜end▁of▁sentence｜>")


class SamplingCancelled(Exception):
    """Sampling was stopped because should_stop() returned True."""


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


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: (rows, vocab) logits -> (rows,) ids.

    Softmax at `temperature`, then the smallest set of most likely tokens whose mass reaches
    `top_p` (always at least the top one), renormalised, sampled. temperature <= 0: argmax.
    Ranks the top `TOP_CANDIDATES` tokens only, unless a row's set needs more.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.topk(min(TOP_CANDIDATES, probs.shape[-1]), dim=-1)
    cumulative = sorted_probs.cumsum(-1)
    if bool((cumulative[:, -1] < top_p).any()):  # a row needs more: sort the whole vocabulary
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
    mass_before = cumulative - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises
    return order.gather(-1, choice)[:, 0]


def _prompt_tensor(prompt_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (T,) or (1, T) with T > 0; got {tuple(ids.shape)}")
    return ids.to(device)


def _decode_rows(model, cache, first_logits, rows, eos, temperature, top_p, max_new_tokens,
                 generator, tick) -> list[list[int]]:
    """Sample `rows` continuations from a cache holding the prefix `rows` times."""
    out: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows)
    tokens = sample_next(first_logits.expand(rows, -1), temperature, top_p, generator)
    for step in range(max_new_tokens):
        finished = torch.isin(tokens, eos)
        for row, token, done in zip(active.tolist(), tokens.tolist(), finished.tolist()):
            if not done:
                out[row].append(token)
        tick(step + 1)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            keep = (~finished).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            active, tokens = active[keep.cpu()], tokens[keep]
        logits = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        tokens = sample_next(logits, temperature, top_p, generator)
    return out


@torch.inference_mode()
def sample_token_ids(model: nn.Module, prompt_ids, n: int, eos_token_ids: Iterable[int] = (),
                     temperature: float = TEMPERATURE, top_p: float = TOP_P,
                     max_new_tokens: int = MAX_NEW_TOKENS, seed: int | None = None,
                     batch_size: int | None = None, progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """n sampled continuations of one prompt, as token ids (end token excluded).

    prompt_ids: (T,) or (1, T). One prefill forward pass over the prompt; then batches of
    `batch_size` rows (default all n) decode from copies of its KV cache, one forward pass per
    token. Rows stop at any of `eos_token_ids` (none: exactly `max_new_tokens` tokens each).
    `seed` makes runs reproducible (same seed, n, batch_size and device: same output).
    should_stop() is polled every token (raises SamplingCancelled).
    """
    device = next(model.parameters()).device
    prompt = _prompt_tensor(prompt_ids, device)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    prefill = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    first_logits, prefix_cache = prefill.logits[:, -1], prefill.past_key_values
    batch_size = max(1, min(batch_size or n, n))
    results: list[list[int]] = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        last = start + rows >= n
        cache = prefix_cache if last else copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(rows)

        def tick(step: int, start=start, rows=rows) -> None:
            if should_stop is not None and should_stop():
                raise SamplingCancelled("sampling cancelled")
            if progress is not None:
                progress((start + rows * step / max_new_tokens) / n,
                         f"Rollouts {start + 1}-{start + rows} of {n}: token {step}")

        results += _decode_rows(model, cache, first_logits, rows, eos, temperature, top_p,
                                max_new_tokens, generator, tick)
    return results


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

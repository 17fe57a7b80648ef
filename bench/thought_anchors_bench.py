"""Thought Anchors benchmark: rollouts per second, and memory of the receiver-head pass.

Rollouts, in one process, same prompt, temperature and top-p for all:
(a) equal work (`--rollouts` R continuations of `--new-tokens` tokens each, stopping off): the
    embedded rollout engine (backend.rollouts.embedded: static KV cache, one prefill, CUDA
    graphs), `model.generate(num_return_sequences=R)` (the baseline users would write) and the
    old one-by-one loop (one `generate` per rollout; measured on `--one-by-one` rollouts, its
    rate does not depend on R);
(b) stop-at-answer (`--sentences` prefixes of growing length, R rollouts each, every rollout
    with its own random length as when it stops at its answer): the engine refills finished rows
    with the next rollouts (continuous batching), generate(num_return_sequences=R) runs each
    sentence until its longest rollout ends. tokens/s counts the tokens the rollouts keep.
Printed: seconds, rollouts/s, tokens/s and the ratios.

Receiver memory (`--receiver-memory`): peak memory of `receiver_pass` (each layer reduced to
sentence blocks as it runs) vs `output_attentions=True` (every layer's (head, T, T) kept), at
each `--lengths`. On CUDA: torch.cuda.max_memory_allocated above the weights; where the full
maps would not fit, their size L x H x T^2 x 2 bytes is printed, marked "estimated". On the CPU:
peak resident memory (rough; for smoke tests).

    python -m bench.thought_anchors_bench                       # SmolLM2-135M on the CPU
    python -m bench.thought_anchors_bench --gpu-config deepseek-r1-distill-qwen-1.5b \
        --prompt-tokens 1500 --rollouts 100 --new-tokens 256        # the issue's H200 setting
    python -m bench.thought_anchors_bench --gpu-config deepseek-r1-distill-qwen-7b --receiver-memory
    python -m bench.thought_anchors_bench --gpu-config deepseek-r1-distill-qwen-1.5b \
        --device cpu --layers 2 --rollouts 4 --new-tokens 8 --sentences 2  # smoke test, no GPU

--gpu-config builds a randomly initialised model from the real architecture (speed and memory do
not depend on the weights' values) in bfloat16 on CUDA (float32 on the CPU) and prompts it with
random token ids; no tokenizer or download is needed.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from backend.methods.thought_anchors.passes import receiver_pass
from backend.methods.thought_anchors.resampling import rollout_prompt
from backend.methods.thought_anchors.sampling import sample_one_by_one
from backend.rollouts.base import Continuation, Prompt, SamplingParams
from backend.rollouts.embedded import EmbeddedEngine

QWEN2 = dict(model_type="qwen2", rope_theta=10000.0, max_position_embeddings=131072,
             rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
             bos_token_id=151643, eos_token_id=151643)
CONFIGS = {
    "deepseek-r1-distill-qwen-1.5b": dict(
        QWEN2, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, intermediate_size=8960, vocab_size=151936),
    "deepseek-r1-distill-qwen-7b": dict(
        QWEN2, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
}
PROBLEM = ("A rectangle has a perimeter of 56 centimetres and its length is three times its "
           "width. A square has the same area as the rectangle. What is the side of the square?")
REASONING = ("Let the width be w, so the length is 3w. The perimeter is 2(w + 3w) = 8w, which "
             "is 56, so w = 7 and the length is 21. The area is 7 times 21, which is 147. ")
TEMPERATURE, TOP_P = 0.6, 0.95


# --- models and prompts ----------------------------------------------------------------------


def random_model(name: str, device: str, layers: int | None):
    """Randomly initialised causal LM of a real architecture (bfloat16 on CUDA, float32 on CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(CONFIGS[name])
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(**spec)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), [spec["eos_token_id"]]


def smollm2():
    """SmolLM2-135M-Instruct as the app loads it (eager attention, float32, CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    return load_model(resolve_source("smollm2", settings), settings)


def text_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The reference rollout prompt with a reasoning prefix, cut to n_tokens."""
    prefix = REASONING * (n_tokens // 20 + 1)
    return tokenizer(rollout_prompt(PROBLEM, prefix))["input_ids"][:n_tokens]


def random_prompt(vocab_size: int, n_tokens: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (n_tokens,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def describe(model) -> str:
    c = model.config
    return (f"{c.num_hidden_layers} layers x {c.num_attention_heads} heads, "
            f"{next(model.parameters()).dtype}, {c._attn_implementation} attention, "
            f"{next(model.parameters()).device}")


# --- rollouts --------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _synchronize(device)
    start = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - start


def _generate(model, prompt: list[int], rows: int, new_tokens: int, eos: list[int]):
    """generate(num_return_sequences=rows), every row exactly `new_tokens` long."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                              num_return_sequences=rows, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=eos,
                              pad_token_id=eos[0])[:, len(prompt):]


def _engine_rows(engine, prompts: list[Prompt], new_tokens: int) -> list[Continuation]:
    params = SamplingParams(TEMPERATURE, TOP_P, new_tokens, (), seed=0, stop_at_repetition=False)
    return list(engine.run(prompts, params))


def _line(name: str, seconds: float, rollouts: int, tokens: int, note: str = "") -> None:
    print(f"  {name:<34}: {seconds:8.2f} s  {rollouts / seconds:8.2f} rollouts/s  "
          f"{tokens / seconds:10.0f} tokens/s  {note}")


def compare_rollouts(model, prompt: list[int], eos: list[int], rollouts: int, new_tokens: int,
                     one_by_one: int) -> None:
    """(a) equal work: every rollout exactly new_tokens long."""
    device = next(model.parameters()).device
    engine = EmbeddedEngine(model)
    work = [Prompt(0, prompt, rollouts)]
    _engine_rows(engine, [Prompt(0, prompt, 2)], 2)  # warm-up: kernels, allocator
    _generate(model, prompt, 2, 2, eos)
    sample_one_by_one(model, prompt, 1, eos, TEMPERATURE, TOP_P, 2, seed=0, min_new_tokens=2)
    rows_e, t_cold = _timed(lambda: _engine_rows(engine, work, new_tokens), device)
    rows_e, t_e = _timed(lambda: _engine_rows(engine, work, new_tokens), device)
    out_g, t_g = _timed(lambda: _generate(model, prompt, rollouts, new_tokens, eos), device)
    rows_n, t_n = _timed(lambda: sample_one_by_one(model, prompt, one_by_one, eos, TEMPERATURE,
                                                   TOP_P, new_tokens, seed=0,
                                                   min_new_tokens=new_tokens), device)
    assert len(rows_e) == rollouts and all(len(r.token_ids) == new_tokens for r in rows_e)
    assert tuple(out_g.shape) == (rollouts, new_tokens), out_g.shape
    assert len(rows_n) == one_by_one and all(len(r) == new_tokens for r in rows_n)
    tokens = rollouts * new_tokens
    print(f"(a) equal work: prompt {len(prompt)} tokens, {rollouts} rollouts x {new_tokens} new "
          f"tokens, temperature {TEMPERATURE}, top_p {TOP_P}, stopping off")
    rows = engine.cache.shape[0]
    _line("embedded engine", t_e, rollouts, tokens,
          f"({rows} rows, CUDA graphs: {engine.graphs_used}; first run with graph capture "
          f"{t_cold:.2f} s; decode attention per bucket: {engine.decode_attention})")
    _line(f"generate(num_return_sequences={rollouts})", t_g, rollouts, tokens)
    _line(f"one by one (generate), {one_by_one} rollouts", t_n, one_by_one,
          one_by_one * new_tokens)
    rate_n = one_by_one / t_n
    print(f"  ratio engine / generate(num_return_sequences): {t_g / t_e:.2f}x rollouts/s")
    print(f"  ratio engine / one by one: {rollouts / t_e / rate_n:.2f}x rollouts/s")
    engine.close()


def answer_lengths(sentences: int, rollouts: int, mean: int, cap: int) -> list[list[int]]:
    """Random rollout lengths as when rollouts stop at their answer: exponential around `mean`,
    between 16 and `cap` tokens (seeded)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.empty(sentences, rollouts).exponential_(1 / mean, generator=g)
    return lengths.clamp(16, cap).long().tolist()


def compare_stop_at_answer(model, prompt: list[int], eos: list[int], rollouts: int, mean: int,
                           sentences: int) -> None:
    """(b) each rollout stops at its own (random) length, over several sentence prefixes."""
    device = next(model.parameters()).device
    cap = 4 * mean
    lengths = answer_lengths(sentences, rollouts, mean, cap)
    vocab = model.config.vocab_size
    prefixes = [prompt + random_prompt(vocab, 24 * i, seed=i + 1) for i in range(sentences)]
    work = [Prompt(i, p, rollouts, max_new_tokens=lengths[i]) for i, p in enumerate(prefixes)]
    engine = EmbeddedEngine(model)
    _engine_rows(engine, [Prompt(0, prefixes[-1], 2, max_new_tokens=[2, 2])], cap)  # warm-up
    rows_e, t_cold = _timed(lambda: _engine_rows(engine, work, cap), device)
    rows_e, t_e = _timed(lambda: _engine_rows(engine, work, cap), device)
    kept = sum(map(sum, lengths))
    assert sum(len(r.token_ids) for r in rows_e) == kept

    def baseline():
        return [_generate(model, p, rollouts, max(n), eos) for p, n in zip(prefixes, lengths)]

    _, t_g = _timed(baseline, device)
    total = sentences * rollouts
    print(f"(b) stop at the answer: {sentences} sentence prefixes of {len(prefixes[0])}-"
          f"{len(prefixes[-1])} tokens x {rollouts} rollouts, lengths random (exponential, mean "
          f"{mean}, 16-{cap}; {kept:,} tokens kept)")
    _line("embedded engine (continuous batching)", t_e, total, kept,
          f"({engine.cache.shape[0]} rows; first run with graph capture {t_cold:.2f} s)")
    _line(f"generate(num_return_sequences={rollouts})", t_g, total, kept,
          "(each sentence runs to its longest rollout)")
    print(f"  ratio engine / generate(num_return_sequences): {t_g / t_e:.2f}x tokens/s")
    engine.close()


# --- receiver-pass memory --------------------------------------------------------------------


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator statistics on a GPU,
    resident memory sampled every 5 ms on the CPU (rough: freed memory may stay resident)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil  # CPU only: the GPU machines may lack it

            self._process, self._stop = psutil.Process(), threading.Event()
            self.base = self._peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._peak - self.base


def synthetic_spans(seq_len: int, prompt: int = 64, sentence: int = 32) -> list[tuple[int, int]]:
    """Sentence spans of `sentence` tokens after a `prompt`-token prompt."""
    return [(s, s + sentence) for s in range(prompt, seq_len - sentence + 1, sentence)]


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:8.2f} GiB"


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def receiver_memory(model, lengths: list[int]) -> None:
    device = next(model.parameters()).device
    model.set_attn_implementation("eager")  # weights are only materialised by eager attention
    config, itemsize = model.config, next(model.parameters()).element_size()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS (rough)"
    print(f"receiver pass vs output_attentions=True: peak memory above the weights ({kind})")
    for seq_len in lengths:
        ids = torch.tensor([random_prompt(config.vocab_size, seq_len)], device=device)
        spans = synthetic_spans(seq_len)
        try:
            with PeakMemory(device) as ours:
                start = time.perf_counter()
                blocks = receiver_pass(model, ids, spans)
                seconds = time.perf_counter() - start
        except torch.OutOfMemoryError:
            print(f"  T = {seq_len:6d}: receiver_pass out of memory")
            torch.cuda.empty_cache()
            continue
        print(f"  T = {seq_len:6d}, {len(spans)} sentences: receiver_pass {_gib(ours.peak)} "
              f"({seconds:.1f} s; result {blocks.nbytes / 2**20:.1f} MiB)")
        full_maps = layers * heads * seq_len**2 * itemsize
        if seq_len != lengths[0] and full_maps > 0.8 * _free_bytes(device):
            print(f"  T = {seq_len:6d}: output_attentions {_gib(full_maps)} estimated "
                  f"({layers} x {heads} x T^2 x {itemsize} bytes; does not fit)")
            continue
        try:
            with PeakMemory(device) as full, torch.inference_mode():
                out = model.base_model(input_ids=ids, output_attentions=True, use_cache=False)
                held = sum(a.numel() * a.element_size() for a in out.attentions)
                del out
            ratio = (f"; ratio {full.peak / max(ours.peak, 1):.1f}x" if device.type == "cuda"
                     else "")
            print(f"  T = {seq_len:6d}: output_attentions {_gib(full.peak)} "
                  f"(maps held: {_gib(held).strip()}){ratio}")
        except torch.OutOfMemoryError:
            print(f"  T = {seq_len:6d}: output_attentions out of memory; maps alone "
                  f"{_gib(full_maps)} estimated")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-config", choices=sorted(CONFIGS),
                        help="random model of this architecture (default: SmolLM2 on the CPU)")
    parser.add_argument("--device", help="default: cuda with --gpu-config, else cpu")
    parser.add_argument("--layers", type=int, help="override the number of layers (smoke tests)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--one-by-one", type=int,
                        help="rollouts of the one-by-one loop (default: min(R, 5))")
    parser.add_argument("--sentences", type=int, default=4,
                        help="sentence prefixes of the stop-at-answer comparison (0: skip it)")
    parser.add_argument("--answer-mean", type=int,
                        help="mean rollout length when stopping at the answer (default: "
                             "new tokens / 2; lengths up to 4x that)")
    parser.add_argument("--receiver-memory", action="store_true",
                        help="measure receiver_pass memory instead of rollout speed")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="receiver-memory lengths (default: 4096 16384 on CUDA, else 256 512)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default 1 on the CPU: on a shared 2-core "
                             "machine a second spinning thread made runs erratic, 1.6x-0.3x)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.gpu_config else "cpu")
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)

    if args.gpu_config:
        model, eos = random_model(args.gpu_config, device, args.layers)
        prompt = random_prompt(model.config.vocab_size, args.prompt_tokens)
        print(f"{args.gpu_config} (random weights): {describe(model)}")
    else:
        if device != "cpu":
            parser.error("without --gpu-config the benchmark runs SmolLM2 on the CPU")
        loaded = smollm2()
        model, eos = loaded.model, [loaded.tokenizer.eos_token_id]
        prompt = text_prompt(loaded.tokenizer, args.prompt_tokens)
        print(f"SmolLM2-135M-Instruct: {describe(model)}, {torch.get_num_threads()} threads")
    if args.receiver_memory:
        lengths = args.lengths or ([4096, 16384] if device.startswith("cuda") else [256, 512])
        receiver_memory(model, lengths)
    else:
        compare_rollouts(model, prompt, eos, args.rollouts, args.new_tokens,
                         args.one_by_one or min(args.rollouts, 5))
        if args.sentences:
            compare_stop_at_answer(model, prompt, eos, args.rollouts,
                                   args.answer_mean or max(4, args.new_tokens // 2),
                                   args.sentences)


if __name__ == "__main__":
    main()

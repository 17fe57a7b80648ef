"""Time and peak memory of the long-context probe's passes on one long haystack, or the whole
default probe through the service.

    python -m bench.long_context_bench --model smollm2 --tokens 2000
    python -m bench.long_context_bench --random qwen2.5-7b --tokenizer DIR --tokens 16384
    python -m bench.long_context_bench --probe smollm2 gemma3-270m

--random builds the named architecture with random weights (time and memory only: its answers
mean nothing). Prints each pass's seconds and, on a GPU, the peak memory beside the weights'
own bytes (the baseline of the same process).

--probe runs each model's default probe (this machine's defaults) as the app does, on a cache
of its own: its wall time and process CPU time, the seconds of each stage from the progress
reports, the load average, and the share of heads in each role (retrieval > 0.1, streaming
> 0.9, first-token attention alpha > epsilon 0.3).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from backend.methods.heads import haystack
from backend.methods.heads.long_context import RECENT_TOKENS, SINK_TOKENS

RANDOM_CONFIGS = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def _model(args):
    if args.random:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        spec = dict(RANDOM_CONFIGS[args.random])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        return model, AutoTokenizer.from_pretrained(args.tokenizer)
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    lm = load_model(resolve_source(args.model, settings), settings)
    return lm.model, lm.tokenizer


def _timed(label: str, fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
    return out


def _stages(events: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(stage, seconds) from (time, stage) reports: a stage lasts until the next one's first
    report; a trial's reports ("Trial 2/6: ..., copying, token 3") count as one stage."""
    named = [(t, stage.split(", ")[0] if "Trial " in stage else stage) for t, stage in events]
    out: list[tuple[str, float]] = []
    for (t, stage), (t_next, _) in zip(named, named[1:] + [named[-1]]):
        if out and out[-1][0] == stage:
            out[-1] = (stage, out[-1][1] + t_next - t)
        else:
            out.append((stage, t_next - t))
    return out


def probe(models: list[str]) -> None:
    """Each model's default probe through the service (module docstring)."""
    from backend.analyses.long_context import probe_request, role_shares
    from backend.config import Settings
    from backend.service import AtlasService

    with tempfile.TemporaryDirectory() as cache:
        settings = Settings.from_env()  # its converted models, a fresh cache file
        service = AtlasService(replace(settings, cache_dir=Path(cache),
                                       converted_dir=settings.converted_models_dir))
        for name in models:
            service.worker.models.get(name, lambda *_: None)  # loading is not the probe
            request = probe_request(name)
            events: list[tuple[float, str]] = []
            stop = service.worker.listen(lambda e: events.append((time.perf_counter(), e.stage)))
            load, cpu, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
            aid = service.run(request, timeout=3600)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            stop()
            print(f"{name}: default probe {wall:.0f} s wall, {cpu:.0f} s CPU of this process "
                  f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, "
                  f"{torch.get_num_threads()} threads)", flush=True)
            print(f"  settings: {dict(request.params)}")
            for stage, seconds in _stages(events):
                if seconds >= 1:
                    print(f"  {seconds:6.1f} s  {stage}")
            record = service.analysis(aid)
            trials = record.meta["trials"]
            print(f"  trials retrieving the needle: {sum(t['accepted'] for t in trials)}"
                  f"/{len(trials)}")
            arrays = {n: service.array(aid, n) for n in ("retrieval", "streaming", "sink_alpha")}
            shares = role_shares(arrays, 0.1, 0.9, 0.3)
            print("  heads: " + ", ".join(f"{role} {share:.1%}" for role, share in shares.items())
                  + f" of {arrays['streaming'].size}", flush=True)
        service.worker.shutdown()
        service.store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random", choices=sorted(RANDOM_CONFIGS))
    parser.add_argument("--tokenizer", help="tokenizer folder for --random")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--probe", nargs="+", metavar="MODEL",
                        help="run these models' default probes end to end instead")
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe)
    model, tokenizer = _model(args)
    cuda = torch.cuda.is_available()
    weights = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trial = haystack.build_trial(tokenizer, args.tokens, 0.5, haystack.NEEDLE, haystack.QUESTION,
                                 haystack.ANSWER_START)
    print(f"haystack: {len(trial.ids)} tokens", flush=True)
    copy = _timed("greedy copy (prefill + decoding)", lambda: haystack.greedy_copy(
        model, tokenizer, trial, args.new_tokens))
    print(f"  {len(copy.generated)} tokens generated", flush=True)
    ids, question_at = haystack.passkey_input(tokenizer, args.tokens)
    _timed("passkey pass (streaming errors and sink alpha)", lambda: haystack.passkey_pass(
        model, ids, question_at, SINK_TOKENS, RECENT_TOKENS))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        print(f"weights {weights / 2**30:.1f} GiB; peak {peak / 2**30:.1f} GiB "
              f"({peak / weights:.2f}x the weights)")


if __name__ == "__main__":
    main()

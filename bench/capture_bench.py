"""Long-context capture benchmark: capture vs a plain SDPA forward pass, in one process.

Per length, after a warm-up of each, the best of 3 runs: capture time / plain forward time (the
same base model, SDPA attention), peak memory above the weights (GPU: allocator peak; CPU: not
measured) of both, bytes the analysis stores vs full maps (layers x heads x T^2 x 2), and the
capture with query and key only (no reductions), which is what the reductions cost. Then view
latency on the captured data through the service's own QKMaps (arrays held in memory instead of
DuckDB): the stored overview, a computed 64-bin overview of a 4k window, a 256 x 256 tile, one
token's row, and the target-token rollout.

    python -m bench.capture_bench --config qwen2.5-7b --device cuda   # random weights, bf16
    python -m bench.capture_bench --config smollm2 --device cpu       # the packaged model
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from backend.analyses.attention import _qk_arrays, layer_reducers
from backend.attention_maps import QKMaps
from backend.memory import BoundedCache
from backend.methods.qk_capture import capture_layers
from backend.methods.rollout import target_rollout_rows
from backend.store import AnalysisRecord, encode_array

# Qwen2.5-7B's config (config.json of Qwen/Qwen2.5-7B), written here: the device has no hub.
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, use_sliding_window=False, hidden_act="silu")


def build(config: str, device: str):
    if config == "qwen2.5-7b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_7B, dtype="bfloat16")).to(
                torch.bfloat16)
        return model.eval()
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    return load_model(resolve_source(config, settings), settings).model.to(device).eval()


class _Arrays:
    """The part of Store that QKMaps reads, over arrays in memory."""

    def __init__(self, arrays):
        self.arrays = arrays

    def load_array(self, aid, name):
        return self.arrays[name]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPEAT = 3  # forward and captures: the best of this many runs each (short ones are host-bound)


def _timed(fn, device, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def _peak(fn, device, weights):
    if device.type != "cuda":
        return float("nan"), fn()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - weights) / 2**30, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--views-at", type=int, help="length for view latency (default: "
                                                     "16384 on cuda, 4096 on cpu)")
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="lengths at which to print where a capture's time goes")
    args = parser.parse_args()
    device = torch.device(args.device)
    lengths = args.lengths or ([1024, 4096, 16384, 32768] if device.type == "cuda"
                               else [1024, 4096])
    views_at = args.views_at or (16384 if device.type == "cuda" else 4096)
    model = build(args.config, args.device)
    config = model.config.get_text_config()
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    print(f"{args.config} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{n_layers} layers x {n_heads} heads ({config.num_key_value_heads} KV), "
          f"dtype {next(model.parameters()).dtype}, torch {torch.__version__}", flush=True)
    print("tokens | forward s | capture s (x fwd) | Q/K only s (x fwd) | peak GiB above weights "
          "fwd / capture | stored MB / full maps MB (ratio) | first capture s", flush=True)
    generator = torch.Generator().manual_seed(0)
    kept = None
    for n in sorted(set(lengths) | {views_at}):
        ids = torch.randint(100, config.vocab_size - 100, (1, n), generator=generator).to(device)

        def forward():
            model.set_attn_implementation("sdpa")
            with torch.inference_mode():
                return model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        # Warm-ups at this length; the capture's also fills torch's pool of pinned host memory,
        # which later captures of this length reuse (a first one allocates it: ~0.4 s per GB).
        forward()
        t_first = _timed(lambda: capture_layers(model, ids, layer_reducers), device)[0]
        t_fwd, _ = _timed(forward, device, repeat=REPEAT)
        m_fwd, _ = _peak(forward, device, weights)
        t_qk = _timed(lambda: capture_layers(model, ids, None), device, repeat=REPEAT)[0]
        m_cap, (t_cap, layers) = _peak(lambda: _timed(
            lambda: capture_layers(model, ids, layer_reducers), device, repeat=REPEAT), device,
            weights)
        arrays = _qk_arrays(layers)
        stored = sum(len(encode_array(a)) for a in arrays.values())
        maps = n_layers * n_heads * n * n * 2
        if n in lengths:
            print(f"{n:6d} | {t_fwd:9.3f} | {t_cap:8.3f} ({t_cap / t_fwd:5.2f}x) | "
                  f"{t_qk:7.3f} ({t_qk / t_fwd:5.2f}x) | {m_fwd:6.2f} / {m_cap:6.2f} | "
                  f"{stored / 1e6:9.1f} / {maps / 1e6:10.1f} ({maps / stored:6.1f}x smaller) | "
                  f"{t_first:7.3f}", flush=True)
        if n == views_at:
            kept = (n, layers, arrays)
        del layers, arrays
    views(model, device, *kept)
    for n in args.profile:
        profile(model, device, n, config.vocab_size)


def profile(model, device, n, vocab_size) -> None:
    """The operations taking most of one capture's time (torch.profiler, after a warm-up)."""
    from torch.profiler import ProfilerActivity
    ids = torch.randint(100, vocab_size - 100, (1, n)).to(device)
    capture_layers(model, ids, layer_reducers)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch.profiler.profile(activities=activities) as prof:
        seconds, _ = _timed(lambda: capture_layers(model, ids, layer_reducers), device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one capture at {n} tokens ({seconds:.3f} s with the profiler):")
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))


def views(model, device, n, layers, arrays) -> None:
    meta = {"tokens": ["t"] * n, "n_layers": len(layers), "n_heads": layers[0].query.shape[0],
            "causal": True, "format": "qk", "rules": [l.rule.to_json() for l in layers],
            "score_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    maps = QKMaps(_Arrays(arrays), AnalysisRecord("bench", "attention", "m", "f", "", {}, meta),
                  BoundedCache(64 << 30), device)
    whole = slice(0, n)
    maps.weights(0, slice(0, 1), whole)  # loads layer 0's query and key onto the device
    for layer in range(maps.n_layers):  # and every other (as a served analysis would hold)
        maps._layer(layer)
    mid = n // 2
    spans = lambda e: np.stack([e[:-1], e[1:]], axis=1)
    half = min(2048, mid)
    window = slice(mid - half, mid + half)
    edges = np.linspace(window.start, window.stop, 65).round().astype(int)
    cases = {
        "stored overview (64 bins, head mean)": lambda: maps.overview(3).mean(0),
        "computed 64-bin overview of a (up to) 4k x 4k window, one head": lambda: maps.pooled(
            3, [5], spans(edges), spans(edges), window, window),
        "256 x 256 tile, one head": lambda: maps.weights(3, slice(mid, mid + 256),
                                                         slice(max(0, mid - 256), mid), [5]).cpu(),
        "256 x 256 tile, head mean": lambda: maps.weights(3, slice(mid, mid + 256),
                                                          slice(max(0, mid - 256), mid)).mean(
                                                              0).cpu(),
        "one token's row, one head": lambda: maps.weights(3, slice(n - 1, n), whole,
                                                          [5]).cpu(),
        "target-token rollout (last token, all layers)": lambda: target_rollout_rows(
            maps.fused_rows, maps.n_layers, n, n - 1, maps.chunk(n), True),
    }
    print(f"view latency at {n} tokens on {device} (best of 3, data on the device):")
    for name, fn in cases.items():
        fn()
        seconds, _ = _timed(fn, device, repeat=3)
        print(f"  {name}: {seconds * 1000:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()

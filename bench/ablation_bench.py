"""Batched zero ablation of every head vs the naive way, one head per forward pass.

    python -m bench.ablation_bench                   # SmolLM2 on the CPU, a ~64-token text
    python -m bench.ablation_bench --config qwen2.5-7b --device cuda --dtype bf16 --layers 8
    python -m bench.ablation_bench --config path/to/config.json --device cuda

`--config` builds a randomly initialised causal LM from a preset name or a transformers
config.json (speed and memory do not depend on the weight values) and feeds it random tokens.
Both ways run in this process; the bench prints both times, the ratio, and checks that they give
the same Delta loss per head.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from backend.methods.heads import ablation_deltas, gate_shape, head_gates, next_token_loss

TEXT = ("Attention heads do not all matter equally. Michel, Levy and Neubig showed that many heads "
        "of a trained transformer can be removed at test time with little loss in quality, while "
        "a few heads carry most of the work, and that the ranking found with gradients of head "
        "gates agrees with the one found by removing each head and measuring the loss.")

PRESETS = {  # architecture dimensions of published models (weights are random here)
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or config.json path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, else fp32")
    parser.add_argument("--layers", type=int, help="keep only the first N layers (--config)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--settings-per-pass", type=int, help="gate settings per batched pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    return parser.parse_args()


def packaged_smollm2(tokens: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backend.config import Settings
    from backend.models import load_model, resolve_source

    settings = Settings.from_env()
    lm = load_model(resolve_source("smollm2", settings), settings)
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids[:, :tokens]
    return lm.model, ids, "SmolLM2-135M (packaged weights)"


def random_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module,
                                                                         torch.Tensor, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.config in PRESETS:
        fields = dict(PRESETS[args.config])
    else:
        fields = json.loads(Path(args.config).read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator()
                        .manual_seed(args.seed))
    name = f"{args.config} dims, {config.num_hidden_layers} layers, random weights"
    return model.eval(), ids, name


@torch.inference_mode()
def one_head_per_pass(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """The naive way: one forward pass per head, that head's gate at 0. (layer, head)."""
    layers, heads = gate_shape(model)
    ids = ids.to(model.device)
    base = next_token_loss(model, ids).double().mean().item()
    deltas = np.zeros((layers, heads))
    for layer in range(layers):
        for head in range(heads):
            gates = torch.ones(layers, heads, device=model.device)
            gates[layer, head] = 0
            with head_gates(model, gates):
                deltas[layer, head] = next_token_loss(model, ids).double().mean().item() - base
    return deltas


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two (layer, head) arrays."""
    return float(np.corrcoef(a.ravel().argsort().argsort(), b.ravel().argsort().argsort())[0, 1])


def timed(fn, device: str):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.config:
        model, ids, name = random_model(args, dtype)
    else:
        model, ids, name = packaged_smollm2(args.tokens)
        model = model.to(args.device, dtype)
    layers, heads = gate_shape(model)
    print(f"model: {name}; {layers} x {heads} = {layers * heads} heads; {ids.shape[1]} tokens; "
          f"{args.device} {dtype}; torch threads {torch.get_num_threads()}")
    batched, t_batched = timed(lambda: ablation_deltas(model, ids, settings_per_pass=args
                                                       .settings_per_pass), args.device)
    naive, t_naive = timed(lambda: one_head_per_pass(model, ids), args.device)
    print(f"one head per pass : {t_naive:8.2f} s ({layers * heads + 1} passes)")
    print(f"batched all heads : {t_batched:8.2f} s")
    print(f"speed-up          : {t_naive / t_batched:8.2f} x")
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    diff = np.abs(batched - naive).max()
    print(f"same deltas       : {'yes' if diff <= tolerance else 'NO'} (max |difference| "
          f"{diff:.2e}, tolerance {tolerance:.0e}; largest |delta| {np.abs(naive).max():.3e}; "
          f"rank correlation {rank_correlation(batched, naive):.4f})")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory   : {torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()

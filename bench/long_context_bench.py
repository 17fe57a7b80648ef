"""Time and peak memory of the long-context probe's passes on one long haystack.

    python -m bench.long_context_bench --model smollm2 --tokens 2000
    python -m bench.long_context_bench --random qwen2.5-7b --tokenizer DIR --tokens 16384

--random builds the named architecture with random weights (time and memory only: its answers
mean nothing). Prints each pass's seconds and, on a GPU, the peak memory beside the weights'
own bytes (the baseline of the same process).
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--random", choices=sorted(RANDOM_CONFIGS))
    parser.add_argument("--tokenizer", help="tokenizer folder for --random")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
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
    _timed("streaming pass", lambda: haystack.streaming_pass(model, ids, question_at,
                                                             SINK_TOKENS, RECENT_TOKENS))
    _timed("sink alpha (long-context capture)", lambda: haystack.first_key_masses(model, ids))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        print(f"weights {weights / 2**30:.1f} GiB; peak {peak / 2**30:.1f} GiB "
              f"({peak / weights:.2f}x the weights)")


if __name__ == "__main__":
    main()

"""Explorer benchmark on SmolLM2 at 128 / 256 / 512 / 1,024 tokens.

Prints, per length: analysis time cold (model already loaded: forward pass, capture, DuckDB
write) vs cached (a second request served from DuckDB, plus reading the layer a view shows); the
bytes our Explore page ships for its default view (heatmap and head grid) vs the HTML of
bertviz's head view; and the peak extra memory of our capture (float16, layer by layer) vs
transformers' own `output_attentions=True`, each measured in a fresh process.

    python -m bench.explore_bench [--lengths 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from backend.analyses import AnalysisRequest
from backend.config import Settings
from backend.methods.capture import capture_attention
from backend.models import load_model, resolve_source
from backend.service import AtlasService
from pages.explore import DETAIL_MAX, OVERVIEW_BINS
from viz.heatmap import attention_heatmap, binned_heatmap
from viz.head_grid import head_grid

PARAGRAPH = ("Attention lets every token look back at the tokens before it. Each head learns its "
             "own pattern: some follow the previous word, some jump to the first token, and some "
             "copy what came after an earlier occurrence of the current word. ")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self._process, self._stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def text_of_length(tokenizer, n: int) -> str:
    ids = tokenizer(PARAGRAPH * (n // 20 + 2))["input_ids"][:n]
    text = tokenizer.decode(ids)
    while len(tokenizer(text)["input_ids"]) > n:  # decoding can merge pieces; trim to fit
        text = text[:-5]
    return text


def explorer_bytes(svc: AtlasService, aid: str) -> int:
    """Vega-Lite specs of the Explore page's default view plus the head grid."""
    meta = svc.analysis(aid).meta
    n, layer = len(meta["tokens"]), meta["n_layers"] // 2
    if n <= DETAIL_MAX:
        chart = attention_heatmap(svc.attention_matrix(aid, layer, None), meta["tokens"],
                                  meta["tokens"])
    else:
        b = svc.attention_overview(aid, layer, None, OVERVIEW_BINS)
        chart = binned_heatmap(b.values, b.query_edges, b.key_edges, meta["tokens"])
    grid = head_grid(svc.head_thumbnails(aid, 24))
    return len(chart.to_json()) + len(grid.to_json())


def bertviz_head_view_bytes(attention: np.ndarray, tokens: list[str], measure: bool) -> tuple:
    """bertviz's own head view HTML size: built for real when `measure`, else extrapolated
    from its bytes per embedded value at the largest measured size."""
    from bertviz import head_view

    if not measure:
        return None, attention.size
    layers = tuple(torch.from_numpy(a.astype(np.float32))[None] for a in attention)
    html = head_view(layers, tokens, html_action="return")
    return len(html.data), attention.size


def peak_memory_child(way: str, n: int) -> None:
    """In a fresh process (so freed memory of another run cannot hide a peak): load SmolLM2,
    then print the peak extra memory of one capture of n tokens, `ours` or `naive`."""
    settings = Settings(cache_dir=Path(tempfile.mkdtemp()),
                        converted_dir=Settings.from_env().converted_models_dir, max_tokens=n)
    lm = load_model(resolve_source("smollm2", settings), settings)
    ids = torch.tensor([lm.tokenizer(text_of_length(lm.tokenizer, n))["input_ids"]])
    with torch.inference_mode():  # page in the memory-mapped weights before measuring
        lm.model.base_model(input_ids=ids[:, :8])
    with PeakRSS() as peak, torch.inference_mode():
        if way == "ours":
            layers = capture_attention(lm.model, ids)
        else:  # what transformers returns: every layer in float32 until the pass ends
            layers = lm.model.base_model(input_ids=ids, output_attentions=True).attentions
        del layers
    print(json.dumps({"peak_mb": peak.extra_mb}))


def peak_memory(way: str, n: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.explore_bench", "--child", way, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--bertviz-max", type=int, default=256,
                        help="largest length for which bertviz's HTML is really built")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_memory_child(args.child[0], int(args.child[1]))
    torch.manual_seed(0)
    settings = Settings(cache_dir=Path(tempfile.mkdtemp()),
                        converted_dir=Settings.from_env().converted_models_dir,
                        max_tokens=max(args.lengths))
    svc = AtlasService(settings)
    lm = svc.worker.models.get("smollm2", lambda f, s: None)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {lm.device}")
    svc.run(AnalysisRequest.make("attention", "smollm2", "warm up"))  # first-call overheads
    bytes_per_value = None
    rows = []
    for n in args.lengths:
        text = text_of_length(lm.tokenizer, n)
        request = AnalysisRequest.make("attention", "smollm2", text)
        t0 = time.perf_counter()
        aid = svc.run(request)
        cold = time.perf_counter() - t0
        svc._layers = type(svc._layers)(svc._layers.max_bytes)  # drop in-memory layers
        t0 = time.perf_counter()
        svc.run(request)
        svc.attention_matrix(aid, 15, None)
        cached = time.perf_counter() - t0
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        ours, naive = peak_memory("ours", n), peak_memory("naive", n)
        shipped = explorer_bytes(svc, aid)
        attention = np.stack([svc.attention_layer(aid, i) for i in range(30)])
        measured, values = bertviz_head_view_bytes(
            attention, svc.analysis(aid).meta["tokens"], n <= args.bertviz_max)
        if measured:
            bytes_per_value = measured / values
        bertviz = measured or bytes_per_value * values
        label = "" if measured else " (extrapolated)"
        rows.append(dict(tokens=ids.shape[1], cold_s=round(cold, 2), cached_s=round(cached, 3),
                         speedup=round(cold / cached, 1), explorer_kb=round(shipped / 1024),
                         bertviz_mb=round(bertviz / 2**20, 1), bytes_ratio=round(bertviz / shipped),
                         ours_peak_mb=round(ours), naive_peak_mb=round(naive)))
        print(f"{ids.shape[1]:5d} tokens | cold {cold:6.2f} s, cached {cached:6.3f} s "
              f"(x{cold / cached:,.0f}) | explorer {shipped / 1024:7.0f} KB vs bertviz head view "
              f"{bertviz / 2**20:8.1f} MB{label} (x{bertviz / shipped:,.0f}) | peak memory: ours "
              f"{ours:6.0f} MB vs output_attentions {naive:6.0f} MB (x{naive / ours:.1f})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

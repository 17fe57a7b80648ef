"""The app's engine in a notebook or a script: the same analyses, cache and exact weights.

    from backend.api import Atlas

    atlas = Atlas()                     # the app's settings and cache file (or cache_dir=...)
    result = atlas.attention("smollm2", "The trophy did not fit in the suitcase.")
    result.tokens, result.n_layers, result.n_heads
    result.matrix(13, head=8)           # (query, key) float32, exact eager weights
    atlas.link(result, view="explore", layer=13, head=8)

Results are cached exactly as the app caches them, so an analysis computed here opens instantly
in the app (and the other way round) when both use the same cache folder. DuckDB lets one process
write a cache file: while the app runs, go through its worker service
(`Atlas(worker_url="http://127.0.0.1:8600")`) or give the notebook its own `cache_dir`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

from backend import analyses
from backend.analyses import KINDS, AnalysisRequest, Result
from backend.analyses.heads import (ImportanceParams, ImportanceResult, PruningParams,
                                    PruningResult, RolesResult)
from backend.analyses.rollout import FlowParams, FlowResult, GradientRolloutResult
from backend.analyses.thought_anchors import ReceiversResult, ResamplingResult, SuppressionResult
from backend.config import Settings
from backend.errors import InputError
from backend.service import AtlasService
from backend.serving.client import WorkerClient

DEFAULT_APP_URL = "http://localhost:8501"
# The query parameter that carries a view's analysis id (the app's links use the same names).
_ID_PARAM = {"thought_anchors": "t"}
VIEWS = ("overview", "explore", "head_grid", "head_importance", "rollout", "thought_anchors",
         "compare", "bertviz_views")


@dataclass(frozen=True)
class AttentionResult(Result):
    """An attention analysis: tokens, shape, and exact weights recomputed on demand (its stored
    arrays load one at a time, by name)."""

    service: AtlasService | WorkerClient = field(repr=False, compare=False,
                                                 metadata={"array": False})

    @property
    def names(self) -> list[str]:
        return self.service.array_names(self.id)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"A {self.kind} analysis has no array '{name}'; it has: "
                           f"{', '.join(self.names) or 'none'}.")
        return self.service.array(self.id, name)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: self[name] for name in self.names}

    @property
    def tokens(self) -> list[str]:
        return self.meta["tokens"]

    @property
    def n_layers(self) -> int:
        return self.meta["n_layers"]

    @property
    def n_heads(self) -> int:
        return self.meta["n_heads"]

    @property
    def causal(self) -> bool:
        return self.meta["causal"]

    def matrix(self, layer: int, head: int | None = None, query: slice = slice(None),
               key: slice = slice(None)) -> np.ndarray:
        """(query, key) float32 weights of one head (head None: the mean over the layer's
        heads), restricted to a query window and a key window."""
        return self.service.attention_matrix(self.id, layer, head, query, key)

    def row(self, layer: int, head: int | None, token: int) -> np.ndarray:
        """(key,) where `token` looks."""
        return self.service.attention_row(self.id, layer, head, token)

    def column(self, layer: int, head: int | None, token: int) -> np.ndarray:
        """(query,) who looks at `token`."""
        return self.service.attention_column(self.id, layer, head, token)

    def statistics(self) -> dict[str, np.ndarray]:
        """(layer, head) entropy, sink (first-token mass), previous_token and diagonal scores."""
        return self.service.head_statistics(self.id)

    def rollout(self, target: int | None = None, head_fusion: str = "mean") -> np.ndarray:
        """(layer, key) attention rollout of `target` (default: the last token) after each
        layer."""
        target = len(self.tokens) - 1 if target is None else target
        return self.service.target_rollout(self.id, target, head_fusion)


class Atlas:
    """One service for a notebook: in this process (store, worker, models), or a running worker
    service at `worker_url` (token: `worker_token`, default ATLAS_WORKER_TOKEN). close() it, or
    use `with`."""

    def __init__(self, settings: Settings | None = None, *, cache_dir: str | None = None,
                 worker_url: str | None = None, worker_token: str | None = None,
                 app_url: str | None = None, progress: bool = True):
        if worker_url is not None:
            if settings is not None or cache_dir is not None:
                raise InputError("A worker service has its own settings and cache: give "
                                 "either worker_url or settings / cache_dir.")
            token = worker_token or os.environ.get("ATLAS_WORKER_TOKEN") or None
            self.service = WorkerClient(worker_url, token)
        else:
            settings = settings or Settings.from_env()
            if cache_dir is not None:  # converted models stay shared: they depend on weights
                settings = replace(settings, cache_dir=Path(cache_dir).expanduser().resolve(),
                                   converted_dir=settings.converted_models_dir)
            self.service = AtlasService(settings)
        self.app_url = (app_url or os.environ.get("ATLAS_APP_URL") or DEFAULT_APP_URL).rstrip("/")
        self.progress = progress

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.service.close()

    # --- any kind -------------------------------------------------------------------------
    def analysis(self, kind: str, model: str, text: str, timeout: float | None = None,
                 **params) -> Result:
        """Run (or load from the cache) an analysis of `kind` with its parameters; shows the
        job's progress (stage, time left) while it runs."""
        if kind not in KINDS:
            raise InputError(f"Unknown analysis kind '{kind}'; known: {', '.join(KINDS)}.")
        ticket = self.service.submit(AnalysisRequest.make(kind, model, text, **params))
        return self.load(ticket.analysis_id or self._wait(ticket.job_id, timeout))

    def load(self, aid: str) -> Result:
        """A cached analysis by id (what the app's links carry as `a` or `t`), as its kind's
        typed result."""
        record = self.service.analysis(aid)
        if record.kind == "attention":
            return AttentionResult(record, self.service)
        return analyses.load(self.service.store, aid)

    def _wait(self, job_id: str, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar() if self.progress else None
        while True:
            status = self.service.job_status(job_id)
            if bar:
                bar.show(status)
            if status.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"The job is still {status.state} after {timeout} s; "
                                   "call again to keep waiting (it goes on meanwhile).")
            time.sleep(0.2)
        if bar:
            bar.close()
        return self.service.job_result(job_id)

    # --- one method per kind --------------------------------------------------------------
    def attention(self, model: str, text: str, **kw) -> AttentionResult:
        """Every layer's and head's attention of `text` (exact weights on demand)."""
        return self.analysis("attention", model, text, **kw)

    def attention_flow(self, model: str, text: str, head_fusion: str = FlowParams.head_fusion,
                       **kw) -> FlowResult:
        """Attention flow (Abnar & Zuidema): `flow` (query, key), raw max-flow values."""
        return self.analysis("attention_flow", model, text, head_fusion=head_fusion, **kw)

    def gradient_rollout(self, model: str, text: str, target: int | None = None,
                         **kw) -> GradientRolloutResult:
        """Gradient-weighted rollout (Chefer et al.) for `target` (default: the last token):
        `gradient_rollout` (layer, query, key)."""
        return self.analysis("gradient_rollout", model, text, target=target, **kw)

    def head_importance(self, model: str, text: str, method: str = ImportanceParams.method,
                        **kw) -> ImportanceResult:
        """Head importance by `method`: `raw`, `layer`, `global_`, each (layer, head)."""
        return self.analysis("head_importance", model, text, method=method, **kw)

    def head_roles(self, model: str, text: str, **kw) -> RolesResult:
        """Per-head role scores (previous-token, first-token, induction...), each (layer, head):
        `scores[role]`."""
        return self.analysis("head_roles", model, text, **kw)

    def pruning_curve(self, model: str, text: str, method: str = PruningParams.method,
                      recompute: bool = PruningParams.recompute, **kw) -> PruningResult:
        """Loss as heads are masked in order of importance vs at random."""
        return self.analysis("pruning_curve", model, text, method=method, recompute=recompute,
                             **kw)

    def thought_anchors(self, model: str, trace: str, problem: str = "", **params) -> Result:
        """A reasoning trace split into sentences, with their token spans (kind "ta_trace")."""
        return self.analysis("ta_trace", model, trace, problem=problem, **params)

    def receiver_heads(self, model: str, trace: str, problem: str = "",
                       **params) -> ReceiversResult:
        """Receiver heads and the sentences they attend to (kind "ta_receivers")."""
        return self.analysis("ta_receivers", model, trace, problem=problem, **params)

    def suppression(self, model: str, trace: str, problem: str = "",
                    **params) -> SuppressionResult:
        """Attention suppression: each sentence's effect on later ones (kind
        "ta_suppression")."""
        return self.analysis("ta_suppression", model, trace, problem=problem, **params)

    def resampling(self, model: str, trace: str, problem: str = "",
                   **params) -> ResamplingResult:
        """Counterfactual resampling of each sentence (kind "ta_resampling"); rollouts are saved
        as they finish, so an interrupted call resumes."""
        return self.analysis("ta_resampling", model, trace, problem=problem, **params)

    def generate_trace(self, model: str, problem: str, **params) -> Result:
        """Let the model write its own reasoning trace for `problem` (kind "ta_generate")."""
        return self.analysis("ta_generate", model, problem, **params)

    # --- links ----------------------------------------------------------------------------
    def link(self, result: Result | str, view: str = "explore", **state) -> str:
        """A URL that opens `view` on this result in the running app, with the view's controls
        set from `state` (layer=13, head=8, token=..., as the app's own links write them)."""
        if view not in VIEWS:
            raise InputError(f"Unknown view '{view}'; views: {', '.join(VIEWS)}.")
        aid = result.id if isinstance(result, Result) else result
        query = {_ID_PARAM.get(view, "a"): aid}
        query.update({k: v for k, v in state.items() if v is not None})
        return f"{self.app_url}/{view}?{urlencode(query, doseq=True)}"


class _ProgressBar:
    """A job's progress as a tqdm bar: its stage and the job's own estimate of time left."""

    def __init__(self):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=1000, bar_format="{desc} {bar} {elapsed}{postfix}")

    def show(self, status) -> None:
        self._bar.set_description_str(status.stage[:60], refresh=False)
        self._bar.set_postfix_str("" if status.eta_s is None else
                                  f"about {status.eta_s:.0f} s left", refresh=False)
        self._bar.n = int(status.fraction * 1000)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

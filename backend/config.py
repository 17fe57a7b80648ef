"""Server settings, read once from the environment.

ATLAS_CACHE_DIR   where the DuckDB file and converted models live (default: ./cache)
ATLAS_MODEL_DIRS  os.pathsep-separated folders that local models may be loaded from
                  (default: ./models); a path in a link or form outside them is refused
ATLAS_MAX_TOKENS  longest input analysed (default: 8192 on the CPU, 32768 on a GPU; never more
                  than the model's context)
ATLAS_FULL_MATRIX_TOKENS  longest input whose views may use full (layer, T, T) products such as
                  the full rollout (default: 1024)
ATLAS_QK_16BIT    "1" keeps a float32 model's query and key in 16 bits (half the cache; weights
                  then within about 1e-2 of eager's); 16-bit models are always kept in 16 bits
ATLAS_MEMORY_MB   one budget for the service's in-process caches (default: 2048)
ATLAS_STORE_MEMORY_MB  what DuckDB may keep in memory of the cache file (default: 1024; more
                  than the largest single array, e.g. one layer's query of the longest input)
ATLAS_DEVICE      "cpu", "cuda", "cuda:1"... (default: cuda when present, else cpu)
ATLAS_ALLOW_HUB   "0" refuses hub ids (default "1": load them when the hub or its cache has them)
ATLAS_CONVERTED_DIR  where GGUF models converted to safetensors are kept (default: <cache>/models)
ATLAS_LESSONS_DIR the folder of lesson files the Lessons page lists (default: ./lessons)
ATLAS_ROLLOUT_ENDPOINTS  OpenAI-compatible completion servers users may resample on: a JSON list,
                  or the path of a .json or .toml file holding one (see backend.rollouts.registry)
ATLAS_ROLLOUT_MAX_TOKENS  cap of new tokens per rollout on a GPU or an endpoint (default: 16384)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip())


def default_max_tokens(device: str | None) -> int:
    """8192 tokens on the CPU, 32768 on a GPU (the one ATLAS_DEVICE names, or any present)."""
    if device is None:
        import torch  # only here: settings are read by processes that never load a model

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = not device.startswith("cpu")
    return 32768 if on_gpu else 8192


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = REPO_ROOT / "cache"
    model_dirs: tuple[Path, ...] = field(default_factory=lambda: (REPO_ROOT / "models",))
    max_tokens: int = 8192
    full_matrix_max_tokens: int = 1024
    memory_budget_bytes: int = 2 << 30
    store_memory_bytes: int = 1 << 30
    qk_16bit: bool = False
    device: str | None = None
    allow_hub: bool = True
    converted_dir: Path | None = None
    lessons_dir: Path = REPO_ROOT / "lessons"
    rollout_endpoints: str = ""
    rollout_max_tokens: int = 16384

    @property
    def database_path(self) -> Path:
        return self.cache_dir / "atlas.duckdb"

    @property
    def converted_models_dir(self) -> Path:
        return self.converted_dir or self.cache_dir / "models"

    def check_full_matrix(self, n_tokens: int, what: str, instead: str) -> None:
        """The one rule for whole (T, T) matrices: InputError when an input of `n_tokens` is
        over full_matrix_max_tokens (longer inputs are read through windows and overviews)."""
        limit = self.full_matrix_max_tokens
        if n_tokens > limit:
            raise InputError(f"{what} is offered up to {limit:,} tokens (ATLAS_FULL_MATRIX_TOKENS)"
                             f"; this input has {n_tokens:,}. {instead}")

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        return cls(
            cache_dir=Path(env.get("ATLAS_CACHE_DIR", REPO_ROOT / "cache")).expanduser().resolve(),
            model_dirs=_paths(env.get("ATLAS_MODEL_DIRS", str(REPO_ROOT / "models"))),
            max_tokens=int(env.get("ATLAS_MAX_TOKENS") or default_max_tokens(env.get(
                "ATLAS_DEVICE"))),
            full_matrix_max_tokens=int(env.get("ATLAS_FULL_MATRIX_TOKENS", "1024")),
            memory_budget_bytes=int(env.get("ATLAS_MEMORY_MB", "2048")) << 20,
            store_memory_bytes=int(env.get("ATLAS_STORE_MEMORY_MB", "1024")) << 20,
            qk_16bit=env.get("ATLAS_QK_16BIT", "0") == "1",
            device=env.get("ATLAS_DEVICE") or None,
            allow_hub=env.get("ATLAS_ALLOW_HUB", "1") != "0",
            converted_dir=Path(env["ATLAS_CONVERTED_DIR"]).resolve()
            if env.get("ATLAS_CONVERTED_DIR") else None,
            lessons_dir=Path(env.get("ATLAS_LESSONS_DIR", REPO_ROOT / "lessons")).expanduser()
            .resolve(),
            rollout_endpoints=env.get("ATLAS_ROLLOUT_ENDPOINTS", ""),
            rollout_max_tokens=int(env.get("ATLAS_ROLLOUT_MAX_TOKENS", "16384")),
        )

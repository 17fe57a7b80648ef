"""Server settings, read once from the environment.

ATLAS_CACHE_DIR   where the DuckDB file and converted models live (default: ./cache)
ATLAS_MODEL_DIRS  os.pathsep-separated folders that local models may be loaded from
                  (default: ./models); a path in a link or form outside them is refused
ATLAS_MAX_TOKENS  longest input analysed (default: 1024)
ATLAS_DEVICE      "cpu", "cuda", "cuda:1"... (default: cuda when present, else cpu)
ATLAS_ALLOW_HUB   "0" refuses hub ids (default "1": load them when the hub or its cache has them)
ATLAS_CONVERTED_DIR  where GGUF models converted to safetensors are kept (default: <cache>/models)
ATLAS_LESSONS_DIR the folder of lesson files the Lessons page lists (default: ./lessons)
ATLAS_MEMORY_BUDGET_MB  memory the service may keep results in for all sessions, besides the
                  loaded models (default: 1024)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip())


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = REPO_ROOT / "cache"
    model_dirs: tuple[Path, ...] = field(default_factory=lambda: (REPO_ROOT / "models",))
    max_tokens: int = 1024
    device: str | None = None
    allow_hub: bool = True
    converted_dir: Path | None = None
    lessons_dir: Path = REPO_ROOT / "lessons"
    memory_budget_mb: int = 1024

    @property
    def database_path(self) -> Path:
        return self.cache_dir / "atlas.duckdb"

    @property
    def converted_models_dir(self) -> Path:
        return self.converted_dir or self.cache_dir / "models"

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        return cls(
            cache_dir=Path(env.get("ATLAS_CACHE_DIR", REPO_ROOT / "cache")).expanduser().resolve(),
            model_dirs=_paths(env.get("ATLAS_MODEL_DIRS", str(REPO_ROOT / "models"))),
            max_tokens=int(env.get("ATLAS_MAX_TOKENS", "1024")),
            device=env.get("ATLAS_DEVICE") or None,
            allow_hub=env.get("ATLAS_ALLOW_HUB", "1") != "0",
            converted_dir=Path(env["ATLAS_CONVERTED_DIR"]).resolve()
            if env.get("ATLAS_CONVERTED_DIR") else None,
            lessons_dir=Path(env.get("ATLAS_LESSONS_DIR", REPO_ROOT / "lessons")).expanduser()
            .resolve(),
            memory_budget_mb=int(env.get("ATLAS_MEMORY_BUDGET_MB", "1024")),
        )

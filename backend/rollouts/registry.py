"""The rollout engines users may pick, by name: "embedded" and the operator's endpoints.

Endpoints come from the server's settings only (ATLAS_ROLLOUT_ENDPOINTS: a JSON list, or the
path of a .json or .toml file with that list, or with a table `[[endpoint]]` per endpoint).
Each entry: name, url (the server's base, e.g. http://gpu-node:8000/v1), model (the served
model name), api_key_env (name of the environment variable holding the key; optional),
concurrency (requests in flight, default 16), label (optional), retries (default 4),
backoff_s (first wait before a retry, doubled each time; default 1). Users see names and labels,
never URLs, and cannot add one: no request goes to an address a user typed.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from backend.config import Settings
from backend.errors import AtlasError, InputError

EMBEDDED = "embedded"
PAPER_ROLLOUTS = 100  # per sentence, as in the Thought Anchors runs
CPU_ROLLOUTS = 4  # a CPU demonstration: metrics are noisy at this size
CPU_MAX_TOKENS = 160
RATES: dict[str, float] = {}  # engine name -> rollouts/s last measured in this process


@dataclass(frozen=True)
class EndpointConfig:
    name: str
    url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 16
    label: str | None = None
    retries: int = 4
    backoff_s: float = 1.0

    @property
    def base_url(self) -> str:
        """The URL up to and including /v1."""
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


def endpoint_configs(settings: Settings) -> list[EndpointConfig]:
    """The configured endpoints (an operator's mistake raises AtlasError with what is wrong)."""
    raw = settings.rollout_endpoints.strip()
    if not raw:
        return []
    try:
        if raw.startswith("["):
            entries = json.loads(raw)
        else:
            path = Path(raw).expanduser()
            text = path.read_text()
            entries = tomllib.loads(text).get("endpoint", []) if path.suffix == ".toml" \
                else json.loads(text)
        configs = [EndpointConfig(**entry) for entry in entries]
    except (OSError, ValueError, TypeError) as e:
        raise AtlasError(f"ATLAS_ROLLOUT_ENDPOINTS is not a valid endpoint list: {e}") from e
    names = [c.name for c in configs]
    if EMBEDDED in names or len(set(names)) != len(names):
        raise AtlasError("ATLAS_ROLLOUT_ENDPOINTS: endpoint names must be unique and not "
                         f"'{EMBEDDED}'.")
    for c in configs:
        if not c.url.startswith(("http://", "https://")) or c.concurrency < 1:
            raise AtlasError(f"ATLAS_ROLLOUT_ENDPOINTS: endpoint '{c.name}' needs an http(s) url "
                             "and a concurrency of at least 1.")
    return configs


def endpoint_config(name: str, settings: Settings) -> EndpointConfig:
    for config in endpoint_configs(settings):
        if config.name == name:
            return config
    known = ", ".join([EMBEDDED] + [c.name for c in endpoint_configs(settings)])
    raise InputError(f"Unknown rollout engine '{name}'. Configured: {known}.")


def engine_infos(settings: Settings, device: str) -> list[dict]:
    """What the page lists: "embedded" on `device` ("cuda..." or "cpu") first, then endpoints.
    Defaults: the paper's 100 rollouts to the answer (cap: the setting) on a GPU or endpoint,
    small numbers on the CPU (`noisy`)."""
    gpu = device.startswith("cuda")
    infos = [{"name": EMBEDDED, "label": f"This server ({'GPU' if gpu else 'CPU'})",
              "kind": "embedded", "device": "cuda" if gpu else "cpu",
              "default_rollouts": PAPER_ROLLOUTS if gpu else CPU_ROLLOUTS,
              "default_max_new_tokens": settings.rollout_max_tokens if gpu else CPU_MAX_TOKENS,
              "noisy": not gpu, "rollouts_per_s": RATES.get(EMBEDDED)}]
    for c in endpoint_configs(settings):
        infos.append({"name": c.name, "label": c.label or c.name, "kind": "endpoint",
                      "device": "endpoint", "default_rollouts": PAPER_ROLLOUTS,
                      "default_max_new_tokens": settings.rollout_max_tokens, "noisy": False,
                      "rollouts_per_s": RATES.get(c.name)})
    return infos


def make_engine(name: str, lm, settings: Settings):
    """The engine called `name` for the loaded model `lm` (an endpoint checks its model first)."""
    if name == EMBEDDED:
        from backend.rollouts.embedded import EmbeddedEngine

        return EmbeddedEngine(lm.model, lm.tokenizer)
    from backend.rollouts.endpoint import EndpointEngine

    engine = EndpointEngine(endpoint_config(name, settings), lm.tokenizer)
    engine.check_model()
    return engine

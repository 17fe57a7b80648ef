"""Load a model for attention analysis: eager attention, safetensors only, never remote code.

GGUF files are de-quantised once into a safetensors copy keyed by the GGUF file's sha256 (see
backend.models.conversion; `python -m backend.models.prepare` does it at set-up); later loads take
about a second.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from backend.config import Settings
from backend.errors import ModelLoadError
from backend.models.conversion import convert_gguf, is_converted
from backend.models.fingerprint import weights_fingerprint
from backend.models.sources import ModelSource, check_config, declared_sha256
from backend.progress import Progress

log = logging.getLogger(__name__)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we run our own worker threads


@dataclass
class LoadedModel:
    """A model ready for analysis. `causal` distinguishes decoder LMs from encoders."""

    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    causal: bool
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.model.config.get_text_config().num_attention_heads


def pick_device(settings: Settings) -> torch.device:
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_causal(config) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            "Encoder-decoder models (T5, BART...) are not supported: pick an encoder or a decoder LM."
        )
    if config.architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)
    # GGUF configs carry no architectures: decide by model type (BERT-likes are masked LMs).
    return (config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _load_config(where: str | Path):
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=False)
    except ValueError as e:  # unknown model_type, or one that needs remote code
        raise ModelLoadError(f"Unsupported architecture for '{where}': {e}") from None
    except OSError as e:
        raise ModelLoadError(
            f"Cannot reach model '{where}': not in the local hub cache and the hub is unreachable "
            f"or the id does not exist ({type(e).__name__})."
        ) from None


def _hub_folder(source: ModelSource, local_only: bool = False) -> Path | None:
    """The hub model's local snapshot, downloaded first if needed (local_only: None when it is
    not in the local hub cache and could be downloaded, without asking the hub)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(source.ref, local_files_only=local_only, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except Exception as e:  # offline, unknown id, gated repo: all mean "cannot reach"
        if local_only and not constants.HF_HUB_OFFLINE:
            return None  # the job downloads it; an offline server knows at once it cannot
        raise ModelLoadError(
            f"Cannot reach hub model '{source.ref}': {type(e).__name__}. Offline servers can only "
            "load hub models already in the local hub cache."
        ) from None


def source_fingerprint(source: ModelSource, read: bool = True) -> str | None:
    """Identity of the weights (and tokenizer) a source loads, without loading them.
    read=False: only what is known without a hub call or reading a weight file whose hash is
    not memoised (None otherwise), so a request's thread can leave that work to its job."""
    if source.gguf_file:
        return weights_fingerprint(source.path, only=source.gguf_file,
                                   known=declared_sha256(source), read=read)
    folder = _hub_folder(source, local_only=not read) if source.kind == "hub" else source.path
    return None if folder is None else weights_fingerprint(folder, read=read)


def load_model(source: ModelSource, settings: Settings,
               progress: Progress = lambda f, s: None) -> LoadedModel:
    """Load weights and tokenizer on the configured device with eager attention."""
    device = pick_device(settings)
    converting = bool(source.gguf_file) and not is_converted(source, settings)
    if source.gguf_file:
        folder = convert_gguf(source, settings, lambda f, stage: progress(0.9 * f, stage))
    else:
        folder = _hub_folder(source) if source.kind == "hub" else source.path
        check_config(folder, source.ref)
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(
                f"'{source.ref}' has no safetensors weights. Pickle checkpoints (.bin) can run "
                "code when loaded and are refused: convert them to safetensors first."
            )
    fingerprint = source_fingerprint(source)
    progress(0.9 if converting else 0.0, "Loading weights")
    config = _load_config(folder)
    causal = is_causal(config)
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        model = auto.from_pretrained(folder, attn_implementation="eager", use_safetensors=True,
                                     trust_remote_code=False, dtype=_dtype_for(device))
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"Cannot load '{source.ref}': {e}") from None
    if "attentions" not in (getattr(model, "_can_record_outputs", None) or {}):
        raise ModelLoadError(
            f"'{source.ref}' ({type(model).__name__}) exposes no attention weights to analyse."
        )
    model.to(device).eval()
    progress(1.0, "Model ready")
    return LoadedModel(source, model, tokenizer, fingerprint, causal, device)


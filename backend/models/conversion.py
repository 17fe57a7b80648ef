"""GGUF to safetensors, once per file: what `load_model` reads instead of the quantised file.

transformers de-quantises GGUF files itself, but a single conversion parses the file four times
(tokenizer, config twice, weights: about 6 s each for SmolLM2's 49k-token vocabulary on one CPU
core) and rebuilds gguf's tensor-name table once per module (about 8 s). During a conversion here
the parsed reader and the name tables are kept, which cuts SmolLM2's conversion from about 45 s to
about 12 s on a 2-core machine, and the per-tensor loop reports its real progress.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from backend.config import Settings
from backend.models.fingerprint import file_sha256
from backend.models.sources import ModelSource, assemble_packaged, declared_sha256
from backend.progress import Progress

_conversion_lock = threading.Lock()


def converted_folder(source: ModelSource, settings: Settings) -> Path:
    """Where the safetensors copy of a GGUF source lives (whether or not it exists yet)."""
    sha = declared_sha256(source).get(source.gguf_file) or file_sha256(source.path /
                                                                      source.gguf_file)
    return settings.converted_models_dir / sha


def is_converted(source: ModelSource, settings: Settings) -> bool:
    return (converted_folder(source, settings) / "config.json").is_file()


@contextmanager
def _parse_once(progress: Progress) -> Iterator[None]:
    """While converting: one GGUFReader per file, one tensor-name table per architecture, and
    the de-quantisation loop's own count as progress (fractions of the tensors done)."""
    import gguf  # here, not at the top: only a conversion needs gguf (and it is slow to import)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    readers: dict[str, gguf.GGUFReader] = {}
    original_reader, original_map, original_tqdm = (gguf.GGUFReader, gguf.get_tensor_name_map,
                                                    gguf_utils.tqdm)

    def reader(path, *args, **kwargs):
        key = str(Path(path).resolve())
        if args or kwargs:  # a mode other than read-only: not ours to share
            return original_reader(path, *args, **kwargs)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    def tensors(iterable, desc: str = "", **_):
        items = list(iterable)
        for done, item in enumerate(items):
            yield item
            progress((done + 1) / len(items), f"De-quantising tensor {done + 1}/{len(items)}")

    gguf.GGUFReader, gguf_utils.tqdm = reader, tensors
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm = (
            original_reader, original_map, original_tqdm)


def convert_gguf(source: ModelSource, settings: Settings,
                 progress: Progress = lambda f, s: None) -> Path:
    """Safetensors copy of a GGUF model under <converted models>/<sha256>, made once.

    progress(fraction, stage) reports real fractions only: the file's parse and the save are
    single library calls and report just their start (no fraction of their own)."""
    from backend.models.loading import is_causal  # loading imports this module

    target = converted_folder(source, settings)
    with _conversion_lock:
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble_packaged(source)  # a packaged model in parts: its file, once
        with _parse_once(lambda f, stage: progress(0.1 + 0.8 * f, stage)):
            progress(0.0, "Reading the GGUF file's vocabulary and settings")
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
            auto = AutoModelForCausalLM if is_causal(config) else AutoModel
            progress(0.1, "Preparing the de-quantisation")
            model = auto.from_pretrained(source.path, gguf_file=source.gguf_file,
                                         attn_implementation="eager")
        # Drop the GGUF quantizer so the weights save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        progress(0.9, "Saving the converted weights")
        # A private temporary folder, renamed into place: a crash leaves no half copy, and a
        # second process converting the same file at once cannot disturb this one.
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.partial-"))
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(target)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(partial, ignore_errors=True)
        progress(1.0, "Converted")
        return target

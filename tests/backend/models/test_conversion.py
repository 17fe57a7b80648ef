"""The GGUF conversion: the same weights as de-quantising the file with gguf's own reader, real
per-tensor progress, and transformers' functions left as they were afterwards."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from safetensors.numpy import load_file

from backend.models import resolve_source
from backend.models.conversion import convert_gguf, is_converted

# GGUF tensor -> transformers parameter of the Llama layout (no q/k permutation for these).
SAME_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
                "blk.7.attn_v.weight": "model.layers.7.self_attn.v_proj.weight",
                "output_norm.weight": "model.norm.weight"}


def test_conversion_matches_gguf_and_reports_each_tensor(settings, tmp_path):
    fresh = dataclasses.replace(settings, converted_dir=tmp_path)
    source = resolve_source("smollm2", fresh)
    before = (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm)
    seen = []
    assert not is_converted(source, fresh)
    folder = convert_gguf(source, fresh, lambda f, stage: seen.append((f, stage)))
    assert is_converted(source, fresh) and folder.parent == tmp_path
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm) == before

    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    reader = gguf.GGUFReader(source.path / source.gguf_file)
    n = len(reader.tensors)
    counted = [stage for _, stage in seen if stage.startswith("De-quantising tensor")]
    assert counted[0] == f"De-quantising tensor 1/{n}"
    assert counted[-1] == f"De-quantising tensor {n}/{n}"
    assert len(counted) == n                                    # one report per tensor

    weights = load_file(folder / "model.safetensors")
    by_name = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in SAME_TENSORS.items():
        tensor = by_name[gguf_name]
        expected = gguf.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(weights[hf_name], expected.astype(np.float32))


def test_a_converted_model_is_not_converted_again(settings):
    source = resolve_source("smollm2", settings)
    if not is_converted(source, settings):  # set-up converts it; without set-up, convert here
        convert_gguf(source, settings, lambda f, stage: None)
    assert is_converted(source, settings)
    seen = []
    convert_gguf(source, settings, lambda f, stage: seen.append(stage))
    assert seen == []

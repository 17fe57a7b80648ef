"""docs/ARCHITECTURE.md's worked example of a new analysis kind runs as written, through the
service, and equals an independent computation from eager attention."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch

from backend import analyses
from backend.analyses import AnalysisRequest
from backend.errors import InputError
from backend.methods.hooks import attention_implementation
from tests.conftest import REPO_ROOT

TEXT = "Attention entropy says how spread out each token's attention is."


@pytest.fixture()
def row_entropy(monkeypatch):
    doc = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## How to add an analysis kind", 1)[1]
    module = types.ModuleType("row_entropy")
    monkeypatch.setitem(sys.modules, "row_entropy", module)  # dataclasses look their module up
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1),
                 "docs/ARCHITECTURE.md", "exec"), module.__dict__)
    # The registry line of the example.
    monkeypatch.setitem(analyses.KINDS, "row_entropy", module.ROW_ENTROPY)
    return module


def test_the_documented_kind_equals_eager_entropy(row_entropy, service, smollm2):
    aid = service.run(AnalysisRequest.make("row_entropy", "smollm2", TEXT), timeout=600)
    entropy = service.array(aid, "row_entropy")
    ids = smollm2.tokenizer(TEXT)["input_ids"]
    with attention_implementation(smollm2.model, "eager"), torch.inference_mode():
        weights = smollm2.model(torch.tensor([ids]), output_attentions=True).attentions
    p = torch.stack([w[0] for w in weights]).double()  # (layer, head, query, key)
    expected = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    assert entropy.shape == tuple(expected.shape)
    np.testing.assert_allclose(entropy, expected.numpy(), atol=1e-3)
    assert entropy[:, :, 0].max() < 1e-4  # the first token can only attend to itself
    with pytest.raises(InputError, match="Unknown parameter 'bins' for row_entropy"):
        service.submit(AnalysisRequest.make("row_entropy", "smollm2", TEXT, bins=3))
    with pytest.raises(InputError, match="row_entropy: 'unit' must be one of nats, bits"):
        service.submit(AnalysisRequest.make("row_entropy", "smollm2", TEXT, unit="joules"))


def test_the_documented_default_is_one_cache_entry_and_bits_are_nats_over_ln2(row_entropy,
                                                                               service):
    nats = service.run(AnalysisRequest.make("row_entropy", "smollm2", TEXT), timeout=600)
    assert service.run(AnalysisRequest.make("row_entropy", "smollm2", TEXT, unit="nats"),
                       timeout=600) == nats
    bits = service.run(AnalysisRequest.make("row_entropy", "smollm2", TEXT, unit="bits"),
                       timeout=600)
    assert bits != nats
    np.testing.assert_allclose(service.array(bits, "row_entropy"),
                               service.array(nats, "row_entropy") / np.log(2), rtol=1e-6)
    typed = analyses.load(service.store, bits)  # the kind's own result type, from the store
    assert isinstance(typed, row_entropy.RowEntropyResult)
    np.testing.assert_array_equal(typed.row_entropy, service.array(bits, "row_entropy"))

"""Analysis requests: cache-key stability and validation."""

from __future__ import annotations

import re

import pytest

import backend.analyses.request as analyses
from backend.analyses import MAX_TEXT_CHARS, AnalysisRequest, analysis_id, validate
from backend.errors import InputError

FP = "a" * 64


def _req(**kw) -> AnalysisRequest:
    args = dict(kind="attention", model="smollm2", text="The cat sat on the mat.")
    args.update(kw)
    params = args.pop("params", {"layer": 3, "bins": 64})
    return AnalysisRequest.make(args["kind"], args["model"], args["text"], **params)


def test_id_is_a_stable_hex_digest_of_equal_requests():
    a, b = _req(), _req()
    assert a == b and a is not b
    assert analysis_id(a, FP) == analysis_id(b, FP)
    assert re.fullmatch(r"[0-9a-f]{24}", analysis_id(a, FP))


def test_param_order_does_not_matter():
    one = AnalysisRequest.make("attention", "smollm2", "text", layer=3, bins=64, head=None)
    two = AnalysisRequest.make("attention", "smollm2", "text", head=None, bins=64, layer=3)
    assert one == two and hash(one) == hash(two)
    assert analysis_id(one, FP) == analysis_id(two, FP)
    # Even a request built by hand with unsorted params addresses the same result.
    by_hand = AnalysisRequest("attention", "smollm2", "text",
                              (("layer", 3), ("head", None), ("bins", 64)))
    assert analysis_id(by_hand, FP) == analysis_id(one, FP)


@pytest.mark.parametrize("change", [
    dict(text="The cat sat on the mat!"),
    dict(text="The cat sat on the mat. "),  # whitespace is part of the text the model sees
    dict(kind="rollout"),
    dict(params={"layer": 4, "bins": 64}),
    dict(params={"layer": 3}),
    dict(params={"layer": 3, "bins": 64, "head": 0}),
    dict(params={"layer": "3", "bins": 64}),  # a string is not the number
])
def test_id_changes_with_the_request(change):
    assert analysis_id(_req(**change), FP) != analysis_id(_req(), FP)


def test_id_changes_with_the_weights_fingerprint():
    assert analysis_id(_req(), FP) != analysis_id(_req(), "b" * 64)


def test_id_changes_with_the_code_version(monkeypatch):
    before = analysis_id(_req(), FP)
    monkeypatch.setattr(analyses, "CODE_VERSION", analyses.CODE_VERSION + 1)
    assert analysis_id(_req(), FP) != before


def test_id_does_not_depend_on_the_model_name_when_weights_are_equal():
    names = ["smollm2", "  smollm2 ", "HuggingFaceTB/SmolLM2-135M-Instruct",
             "./local/smollm2-copy", "/models/smol.gguf"]
    ids = {analysis_id(_req(model=name), FP) for name in names}
    assert len(ids) == 1


def test_make_strips_the_model_reference():
    assert _req(model="  smollm2\n").model == "smollm2"
    assert _req(model="  smollm2\n").canonical() == _req().canonical()


def test_valid_requests_pass_validation():
    _req().validate()
    _req(text="x" * MAX_TEXT_CHARS).validate()  # the limit itself is allowed


@pytest.mark.parametrize("text", ["", " ", "\n\t  \n"])
def test_empty_text_is_refused(text):
    with pytest.raises(InputError, match="empty"):
        _req(text=text).validate()


def test_too_long_text_is_refused_with_its_length():
    text = "x" * (MAX_TEXT_CHARS + 1)
    with pytest.raises(InputError, match=f"{MAX_TEXT_CHARS + 1:,}"):
        _req(text=text).validate()


@pytest.mark.parametrize("kind", ["nope", "", "Attention", "attention "])
def test_unknown_kind_is_refused(kind):
    with pytest.raises(InputError, match="kind"):
        validate(_req(kind=kind))


def test_input_errors_are_value_errors():
    # Callers that only know the standard library can still catch bad input.
    with pytest.raises(ValueError):
        _req(text="").validate()

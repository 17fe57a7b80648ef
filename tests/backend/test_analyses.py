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


# --- declared parameters: defaults before hashing, refusals that name the parameter ---------

from backend.analyses import KINDS  # noqa: E402
from backend.analyses.params import declared, defaults, from_query, parse  # noqa: E402


@pytest.mark.parametrize("kind, name, value", [
    ("head_importance", "method", "gradient"),
    ("pruning_curve", "method", "gradient"),
    ("pruning_curve", "recompute", False),
    ("attention_flow", "head_fusion", "mean"),
    ("gradient_rollout", "target", None),
    ("ta_receivers", "proximity_ignore", 4),
    ("ta_receivers", "top_k", 20),
    ("ta_suppression", "temperature", 0.6),
    ("ta_generate", "max_new_tokens", 384),
    ("ta_resampling", "temperature", 0.6),
    ("ta_resampling", "top_p", 0.95),
    ("ta_resampling", "max_new_tokens", 256),
    ("ta_resampling", "rollouts", 4),
    ("ta_resampling", "seed", 0),
    ("long_context_heads", "lengths", [1000, 2000]),
])
def test_a_default_left_out_and_given_are_one_cache_id(kind, name, value):
    left_out = AnalysisRequest.make(kind, "smollm2", "A text.")
    given = AnalysisRequest.make(kind, "smollm2", "A text.", **{name: value})
    assert left_out == given and left_out.canonical() == given.canonical()
    assert analysis_id(left_out, FP) == analysis_id(given, FP)
    assert left_out.params[name] == (tuple(value) if isinstance(value, list) else value)


def test_a_value_other_than_the_default_is_another_id():
    base = AnalysisRequest.make("head_importance", "smollm2", "A text.")
    other = AnalysisRequest.make("head_importance", "smollm2", "A text.", method="entropy")
    assert analysis_id(base, FP) != analysis_id(other, FP)


def test_a_whole_number_for_a_float_is_the_same_float():
    one = AnalysisRequest.make("ta_suppression", "smollm2", "A text.", temperature=1)
    assert one == AnalysisRequest.make("ta_suppression", "smollm2", "A text.", temperature=1.0)
    assert isinstance(one.params["temperature"], float)


def test_params_are_a_read_only_hashable_mapping():
    request = AnalysisRequest.make("long_context_heads", "smollm2", "A needle.", lengths=[500])
    assert request.params["lengths"] == (500,) and "bins" in request.params
    assert hash(request) == hash(AnalysisRequest.make("long_context_heads", "smollm2",
                                                      "A needle.", lengths=(500,)))
    with pytest.raises(TypeError):
        request.params["bins"] = 3
    # A request rebuilt from its canonical JSON (how a worker service receives it) is equal.
    import json
    payload = json.loads(request.canonical())
    assert AnalysisRequest.make(payload["kind"], payload["model"], payload["text"],
                                **payload["params"]) == request


@pytest.mark.parametrize("kind, params, message", [
    ("attention", {"foo": 1}, "Unknown parameter 'foo' for attention analyses (they take: "
                              "none)"),
    ("attention_flow", {"bins": 3}, "Unknown parameter 'bins' for attention_flow analyses "
                                    "(they take: head_fusion)"),
    ("long_context_heads", {"bins": "abc"}, "long_context_heads: 'bins' must be a whole "
                                            "number, got 'abc'"),
    ("long_context_heads", {"depths": [0.5, 2]}, "long_context_heads: 'depths' must be between"),
    ("long_context_heads", {"lengths": []}, "long_context_heads: 'lengths' must be a list"),
    ("long_context_heads", {"lengths": [200], "bins": 128}, "at least 256 tokens long"),
    ("ta_resampling", {"chunks": ["1"]}, "ta_resampling: 'chunks' must be a whole number"),
    ("ta_resampling", {"prefix": "dirty"}, "ta_resampling: 'prefix' must be one of faithful, "
                                           "clean"),
    ("ta_receivers", {"top_k": 0}, "ta_receivers: 'top_k' must be between 1 and"),
])
def test_unknown_and_ill_typed_parameters_are_refused_naming_kind_and_parameter(kind, params,
                                                                             message):
    with pytest.raises(InputError) as info:
        validate(AnalysisRequest.make(kind, "smollm2", "A text.", **params))
    assert message in str(info.value)


def test_query_strings_are_converted_by_the_declared_type():
    probe = KINDS["long_context_heads"].params
    typed = from_query("long_context_heads", probe,
                       {"lengths": "500, 700", "depths": "0.2,0.8", "passkey_length": "500"})
    assert typed == {"lengths": (500, 700), "depths": (0.2, 0.8), "passkey_length": 500}
    flags = from_query("pruning_curve", KINDS["pruning_curve"].params, {"recompute": "true"})
    assert flags == {"recompute": True}
    for bad, message in [({"lengths": "5OO"}, "'lengths' must be comma-separated numbers"),
                         ({"passkey_length": "1e3"}, "'passkey_length' must be a whole number"),
                         ({"colour": "blue"}, "Unknown parameter 'colour'")]:
        with pytest.raises(InputError, match=message):
            from_query("long_context_heads", probe, bad)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_declared_default_passes_its_own_checks(kind):
    params_type = KINDS[kind].params
    parsed = parse(kind, params_type, {})
    assert {name: getattr(parsed, name) for name in declared(params_type)} == \
        defaults(params_type)

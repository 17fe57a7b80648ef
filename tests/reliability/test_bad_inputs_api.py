"""Every entry of the bad-input list through the service API: each is refused before any job
is queued, with an InputError or ModelLoadError that says what is wrong (never a bare
ValueError, KeyError or a database error)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest

from backend import analyses
from backend.analyses import AnalysisRequest
from backend.analyses.params import declared
from backend.errors import AtlasError, InputError, ModelLoadError
from backend.inputs import MAX_TEXT_CHARS
from backend.service import AtlasService
from tests.reliability.inputs import (BAD_TEXTS, FINE_TEXTS, GOOD_TRACE_FILES, MARKUP,
                                      published_files)


def _refused(service, request, error=InputError):
    """The request's refusal, checked to be raised before any job exists."""
    with pytest.raises(error) as info:
        service.submit(request)
    assert not isinstance(info.value, (KeyError, UnicodeError))
    return str(info.value)


@pytest.mark.parametrize("name", sorted(BAD_TEXTS))
def test_bad_texts_are_refused_with_their_reason(service, name):
    text, reason = BAD_TEXTS[name]
    message = _refused(service, AnalysisRequest.make("attention", "smollm2", text))
    assert reason in message


def test_the_text_limit_itself_is_accepted_and_one_more_character_is_not():
    analyses.validate(AnalysisRequest.make("attention", "smollm2", "x" * MAX_TEXT_CHARS))
    with pytest.raises(InputError, match="100,001"):
        analyses.validate(AnalysisRequest.make("attention", "smollm2", "x" * (MAX_TEXT_CHARS + 1)))


@pytest.mark.parametrize("name", sorted(FINE_TEXTS))
def test_unicode_and_markup_texts_are_analysed_as_typed(service, name):
    text = FINE_TEXTS[name]
    aid = service.run(AnalysisRequest.make("attention", "smollm2", text), timeout=300)
    record = service.analysis(aid)
    assert record.text == text  # stored as typed: no stripping, no escaping in the cache
    assert len(record.meta["tokens"]) > 1


@pytest.mark.parametrize("ref, reason", [
    ("smol\0lm2", "NUL byte"),
    ("org/\0model", "NUL byte"),
    ("/models/a\0b.gguf", "NUL byte"),
    ("org/mo\ud800del", "lone surrogate"),
    ("org/model\x1b[31m", "control character"),
    ("org/" + "m" * 2000, "limit"),
    ("   ", "No model"),
    ("", "No model"),
])
def test_bad_model_references_give_input_errors(service, ref, reason):
    message = _refused(service, AnalysisRequest.make("attention", ref, "A short text."),
                       AtlasError)
    assert reason in message


def test_a_model_reference_that_is_not_text_is_refused(service):
    assert "must be text" in _refused(service, AnalysisRequest.make("attention", 42, "Text."))


@pytest.mark.parametrize("kind, params, reason", [
    ("attention_flow", {"head_fusion": "median"}, "'head_fusion' must be one of mean, max, min"),
    ("attention_flow", {"head_fusion": 1}, "'head_fusion' must be one of"),
    ("ta_resampling", {"rollouts": 0}, "'rollouts' must be between 1 and"),
    ("ta_resampling", {"rollouts": -5}, "'rollouts' must be between 1 and"),
    ("ta_resampling", {"rollouts": 2.5}, "'rollouts' must be a whole number"),
    ("ta_resampling", {"rollouts": "4"}, "'rollouts' must be a whole number"),
    ("ta_resampling", {"rollouts": True}, "'rollouts' must be a whole number"),
    ("ta_resampling", {"temperature": float("nan")}, "'temperature' must be a number"),
    ("ta_resampling", {"temperature": 0}, "'temperature' must be between"),
    ("ta_resampling", {"top_p": 1.5}, "'top_p' must be between"),
    ("ta_resampling", {"max_new_tokens": 10 ** 9}, "'max_new_tokens' must be between"),
    ("ta_resampling", {"problem": "a\0b"}, "parameter 'problem' contains a NUL byte"),
    ("ta_resampling", {"answer": ["9"]}, "parameter 'answer' must be text"),
    ("ta_resampling", {"rollout": 4}, "Unknown parameter 'rollout'"),
    ("head_importance", {"method": "saliency"}, "'method' must be one of gradient"),
    ("pruning_curve", {"recompute": "true"}, "'recompute' must be true or false"),
    ("gradient_rollout", {"target": -1}, "'target' must be between 0"),
    ("attention", {"layer": 3}, "Unknown parameter 'layer' for attention analyses"),
    ("head_roles", {"method": "gradient"}, "(they take: none)"),
])
def test_bad_parameters_are_refused_for_their_own_reason(service, kind, params, reason):
    job_ids_before = len(service.worker._jobs)
    message = _refused(service, AnalysisRequest.make(kind, "smollm2", "A short text.", **params))
    assert reason in message
    assert len(service.worker._jobs) == job_ids_before  # nothing was queued


def test_every_kind_declares_its_parameters():
    for name, kind in analyses.KINDS.items():
        assert kind.name == name
        assert dataclasses.is_dataclass(kind.params)
        assert kind.params.__dataclass_params__.frozen
        declared(kind.params)  # every field of a type the checks know


def test_the_parameters_the_app_sends_are_accepted():
    """The requests of the lessons and pages pass the schemas (their real parameter sets)."""
    base = {"problem": "p", "answer": "9"}
    for kind, params in [("attention_flow", {"head_fusion": "max"}),
                         ("gradient_rollout", {"target": 3}),
                         ("head_importance", {"method": "entropy"}),
                         ("pruning_curve", {"method": "ablation", "recompute": True}),
                         ("ta_trace", base), ("ta_receivers", base), ("ta_suppression", base),
                         ("ta_resampling", {**base, "rollouts": 2, "max_new_tokens": 12})]:
        analyses.validate(AnalysisRequest.make(kind, "smollm2", "A text.", **params))


@pytest.fixture
def folder_service(tmp_path, settings):
    models = tmp_path / "models"
    models.mkdir()
    svc = AtlasService(replace(settings, model_dirs=(models.resolve(),),
                               cache_dir=tmp_path / "cache"))
    yield svc, models
    svc.worker.shutdown()
    svc.store.close()


@pytest.mark.parametrize("config, reason", [
    ('{"model_type": "evil", "auto_map": {"AutoModel": "modeling_evil.Evil"}}', "remote code"),
    ('{"model_type": "evil", "trust_remote_code": true}', "remote code"),
    ('{"model_type": "llama", ', "not valid JSON"),
    ("\xff\xfe garbage", "not valid JSON"),
    ('["a", "list"]', "not a JSON object"),
])
def test_model_folders_are_refused_for_what_is_wrong_with_their_config(folder_service, config,
                                                                      reason):
    svc, models = folder_service
    folder = models / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(config.encode("latin-1"))
    message = _refused(svc, AnalysisRequest.make("attention", "./m", "Text."), ModelLoadError)
    assert reason in message and "pickle" not in message


@pytest.mark.parametrize("case", ["invalid JSON", "wrong type", "wrong entry type", "huge",
                                  "unexpected name", "path name", "NUL", "surrogate", "binary",
                                  "none"])
def test_malformed_uploads_are_refused_with_a_clear_message(service, case):
    good = published_files()
    files = {
        "invalid JSON": {**good, "problem.json": b'{"problem": '},
        "wrong type": {**good, "chunks_labeled.json": b'{"chunk": "x"}'},
        "wrong entry type": {**good, "chunks_labeled.json": b"[1, 2]"},
        "huge": {**good, "chunks_resampled.json": b"[" + b"1," * (26 << 20) + b"1]"},
        "unexpected name": {**good, "notes.txt": b"hello"},
        "path name": {"../../etc/passwd": b"x"},
        "NUL": {**good, "problem.json": json.dumps({"problem": "a\0b"}).encode()},
        "surrogate": {**good, "problem.json": b'{"problem": "a\\ud800b"}'},
        "binary": {**good, "problem.json": bytes(range(256))},
        "none": {},
    }[case]
    with pytest.raises(InputError) as info:
        service.import_published_trace(files, "label")
    message = str(info.value)
    assert "/tmp" not in message  # no server path in what the user reads
    expected = {"invalid JSON": "invalid JSON", "wrong type": "list of chunks",
                "wrong entry type": "string \"chunk\"", "huge": "limit is 50 MiB",
                "unexpected name": "notes.txt", "path name": "etc/passwd", "NUL": "NUL byte",
                "surrogate": "lone surrogate", "binary": "invalid JSON",
                "none": "none of the published trace files"}[case]
    assert expected in message


def test_a_good_upload_with_markup_in_its_label_imports(service):
    if not GOOD_TRACE_FILES.is_dir():
        pytest.skip(f"published fixtures not found at {GOOD_TRACE_FILES}")
    aid = service.import_published_trace(published_files(), MARKUP)
    assert service.analysis(aid).kind == "ta_published"
    with pytest.raises(InputError, match="label"):
        service.import_published_trace(published_files(), "a\0b")

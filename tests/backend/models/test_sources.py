"""Resolving model references without loading: packaged, hub, local folders, GGUF files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from backend.config import Settings
from backend.errors import ModelLoadError
from backend.models import PACKAGED, resolve_source, source_fingerprint
from backend.models.sources import ASSEMBLED, assemble_packaged
from backend.models.fingerprint import file_sha256, weights_fingerprint


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


@pytest.fixture
def dirs(tmp_path, settings):
    first, second = _model_folder(tmp_path / "first" / "m").parent, tmp_path / "second"
    second.mkdir()
    return replace(settings, model_dirs=(first.resolve(), second.resolve())), first, second


@pytest.mark.parametrize("alias", sorted(PACKAGED))
def test_packaged_aliases_resolve_to_files_on_disk(alias, settings):
    source = resolve_source(alias, settings)
    assert source.kind == "packaged" and source.ref == alias
    assert source.label == PACKAGED[alias].label
    assemble_packaged(source)  # what loading does first (a no-op but for Gemma's parts)
    if source.gguf_file:
        gguf = source.path / source.gguf_file
        assert gguf.is_file()
        with open(gguf, "rb") as f:
            assert f.read(4) == b"GGUF"  # the GGUF magic number
    else:
        assert (source.path / "config.json").is_file()
        assert any(source.path.glob("*.safetensors"))


def test_resolving_a_packaged_model_in_parts_writes_nothing_and_knows_its_fingerprint(
        settings, tmp_path):
    fresh = replace(settings, converted_dir=tmp_path)
    source = resolve_source(ASSEMBLED, fresh)
    fingerprint = source_fingerprint(source)
    assert list(tmp_path.iterdir()) == []  # no file assembled while resolving (a UI thread)
    assembled = resolve_source(ASSEMBLED, settings)
    assemble_packaged(assembled)
    assert fingerprint == weights_fingerprint(assembled.path, only=assembled.gguf_file)


@pytest.mark.parametrize("ref", ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/gemma-3-270m",
                                 "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "a/b", " org/m "])
def test_hub_ids_resolve_as_hub_sources(ref, settings):
    source = resolve_source(ref, settings)
    assert (source.kind, source.path, source.ref) == ("hub", None, ref.strip())


@pytest.mark.parametrize("ref", ["org/name/extra", "-org/name", "org/na me", "org/", "/org/name",
                                 "org/name.gguf", "./org/name", "~/org/name", "org\\name"])
def test_other_shapes_are_not_hub_ids(ref, dirs):
    settings, _, _ = dirs
    with pytest.raises(ModelLoadError):  # not a hub id, and no such folder in the model dirs
        resolve_source(ref, settings)


def test_hub_ids_refused_when_the_hub_is_off(settings):
    with pytest.raises(ModelLoadError, match="hub"):
        resolve_source("org/model", replace(settings, allow_hub=False))
    # Packaged models do not need the hub.
    assert resolve_source("minilm", replace(settings, allow_hub=False)).kind == "packaged"


def test_empty_reference_is_refused(settings):
    for ref in ("", "   "):
        with pytest.raises(ModelLoadError, match="No model"):
            resolve_source(ref, settings)


@pytest.mark.parametrize("ref", ["/etc/passwd", "/etc", "../../etc", "../second/../../first",
                                 "~/.ssh"])
def test_paths_outside_the_model_dirs_are_refused(ref, dirs):
    settings, _, _ = dirs
    with pytest.raises(ModelLoadError, match="ATLAS_MODEL_DIRS"):
        resolve_source(ref, settings)


def test_symlink_escaping_the_model_dir_is_refused(dirs):
    settings, first, _ = dirs
    (first / "escape").symlink_to("/etc")
    (first / "passwd-link").symlink_to("/etc/passwd")
    for ref in (first / "escape", first / "escape" / "passwd", first / "passwd-link",
                "./escape", "./escape/ssl"):
        with pytest.raises(ModelLoadError, match="ATLAS_MODEL_DIRS"):
            resolve_source(str(ref), settings)


def test_symlink_inside_the_model_dirs_is_followed(dirs):
    settings, first, second = dirs
    (second / "alias").symlink_to(first / "m")
    source = resolve_source(str(second / "alias"), settings)
    assert (source.kind, source.path) == ("local", (first / "m").resolve())


def test_relative_paths_resolve_inside_the_first_model_dir(dirs, tmp_path, monkeypatch):
    settings, first, second = dirs
    _model_folder(second / "only-in-second")
    # A folder of the same name in the working directory must not be picked up.
    cwd = tmp_path / "cwd"
    _model_folder(cwd / "m")
    monkeypatch.chdir(cwd)
    for ref in ("m", "./m", "m/", "./m/../m"):
        source = resolve_source(ref, settings)
        assert (source.kind, source.path) == ("local", (first / "m").resolve()), ref
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_source("./only-in-second", settings)
    # An absolute path into the second folder is fine.
    assert resolve_source(str(second / "only-in-second"), settings).kind == "local"


def test_local_folder_without_config_is_refused(dirs):
    settings, first, _ = dirs
    (first / "weights-only").mkdir()
    (first / "weights-only" / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_source("./weights-only", settings)


def test_gguf_files(dirs, tmp_path):
    settings, first, _ = dirs
    inside = first / "sub" / "tiny.gguf"
    inside.parent.mkdir()
    inside.write_bytes(b"GGUF")
    source = resolve_source(str(inside), settings)
    assert (source.kind, source.path, source.gguf_file) == ("gguf", inside.parent, "tiny.gguf")
    assert resolve_source("sub/tiny.gguf", settings).path == inside.parent  # relative, too

    outside = tmp_path / "outside" / "evil.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="ATLAS_MODEL_DIRS"):
        resolve_source(str(outside), settings)
    (first / "link.gguf").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="ATLAS_MODEL_DIRS"):
        resolve_source(str(first / "link.gguf"), settings)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_source("missing.gguf", settings)


def test_model_dirs_from_the_environment(monkeypatch, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("ATLAS_MODEL_DIRS", f"{a}{os.pathsep}{b}{os.pathsep}")
    assert Settings.from_env().model_dirs == (a.resolve(), b.resolve())


# --- weights fingerprints -----------------------------------------------------------------

@pytest.fixture
def weights(tmp_path) -> Path:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "README.md").write_text("about")
    return folder


def _rewrite(path: Path, data: bytes) -> None:
    stat = path.stat()
    path.write_bytes(data)
    # Real edits move mtime; make sure it moved even on coarse-grained file systems.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_fingerprint_is_stable(weights):
    first = weights_fingerprint(weights)
    assert weights_fingerprint(weights) == first
    (weights / "README.md").write_text("other words")  # not part of the model's identity
    (weights / "notes.txt").write_text("new")
    assert weights_fingerprint(weights) == first
    # A copy of the folder elsewhere has the same identity.
    copy = weights.parent / "copy"
    copy.mkdir()
    for p in weights.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert weights_fingerprint(copy) == first


def test_fingerprint_changes_with_weight_bytes(weights):
    first = weights_fingerprint(weights)
    data = bytearray((weights / "model.safetensors").read_bytes())
    data[1000] ^= 1  # one bit, same size
    _rewrite(weights / "model.safetensors", bytes(data))
    second = weights_fingerprint(weights)
    assert second != first
    _rewrite(weights / "model.safetensors", bytes(data) + b"\0")
    assert weights_fingerprint(weights) not in (first, second)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_fingerprint_changes_with_config_and_tokenizer(weights, name):
    first = weights_fingerprint(weights)
    _rewrite(weights / name, b'{"changed": true}')
    assert weights_fingerprint(weights) != first


def test_fingerprint_of_one_gguf_file_ignores_its_neighbours(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF one")
    (tmp_path / "b.gguf").write_bytes(b"GGUF two")
    first = weights_fingerprint(tmp_path, only="a.gguf")
    _rewrite(tmp_path / "b.gguf", b"GGUF three")
    assert weights_fingerprint(tmp_path, only="a.gguf") == first
    assert weights_fingerprint(tmp_path, only="b.gguf") != first


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(5 << 20)  # larger than one read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()

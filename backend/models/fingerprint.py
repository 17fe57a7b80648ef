"""Weights fingerprints: a model's identity in cache keys.

Two analyses share a cache entry only if the weights are byte-identical, so the fingerprint hashes
the weight files themselves (memoised per file by size and mtime, since large models take seconds).
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# Besides weights, what changes a model's outputs or tokens.
IDENTITY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
_BLOB_SHA = re.compile(r"^[0-9a-f]{64}$")
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def file_sha256(path: Path, read: bool = True) -> str | None:
    """sha256 of a file; hub cache blobs are named by their sha256 already, so reuse that.
    read=False: None when the file would have to be read (its hash is not memoised)."""
    target = path.resolve()
    if path.is_symlink() and _BLOB_SHA.match(target.name):
        return target.name
    stat = target.stat()
    key = (str(target), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        if key in _memo or not read:
            return _memo.get(key)
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    with _memo_lock:
        _memo[key] = digest.hexdigest()
    return _memo[key]


def weights_fingerprint(folder: Path, only: str | None = None,
                        known: dict[str, str] | None = None, read: bool = True) -> str | None:
    """sha256 over (file name, file sha256) of the weight, config and tokenizer files of a folder.

    only: restrict to one file of the folder (a GGUF file beside others). known: file sha256s
    given instead of read (a file that is not written yet). read=False: None when a file would
    have to be read (see file_sha256).
    """
    known = known or {}
    names = [only] if only else sorted(
        p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name in IDENTITY_FILES
    )
    digest = hashlib.sha256()
    for name in names:
        sha = known[name] if name in known else file_sha256(folder / name, read)
        if sha is None:
            return None
        digest.update(f"{name}:{sha}\n".encode())
    return digest.hexdigest()

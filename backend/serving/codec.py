"""The worker service's wire format: what a service method returns, as bytes and back. No pickle.

- an array: an npy body (`application/x-npy`), read with `np.load(allow_pickle=False)`;
- a dict of arrays: an npz body (`application/x-npz`), read the same way;
- bytes (a zip): the bytes (`application/octet-stream`);
- anything else: JSON (`application/json`) in which the values JSON lacks are tagged objects:
  {"$tuple": [...]}, {"$ndarray": base64 npy}, {"$bytes": base64}, {"$datetime": ISO 8601},
  {"$path": "..."}, {"$dataclass": name, "fields": {...}} for the result classes below only,
  and {"$dict": [[key, value], ...]} for a dict whose keys could be read as a tag.
Decoding builds only those classes; an unknown tag is an error, never an import.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from backend.config import Settings
from backend.errors import (AtlasError, CacheFileError, CacheInUseError, CorruptCacheError,
                            InputError, JobInterrupted, ModelLoadError, NotFoundError,
                            WorkerUnavailable)
from backend.methods.alignment import Alignment
from backend.methods.binning import BinnedMatrix
from backend.service import Ticket
from backend.store import AnalysisRecord, decode_array, encode_array
from backend.worker import JobCancelled, JobStatus

JSON, NPY, NPZ, BYTES = ("application/json", "application/x-npy", "application/x-npz",
                         "application/octet-stream")
DATACLASSES = {cls.__name__: cls for cls in (Ticket, JobStatus, AnalysisRecord, BinnedMatrix,
                                             Alignment, Settings)}


class WireFormatError(ValueError):
    """Bytes or JSON that are not a value of this wire format."""


def to_json(value: Any) -> Any:
    """A JSON-able tree of `value` (see the module docstring for the tags)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"$ndarray": base64.b64encode(encode_array(value)).decode()}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {"$tuple": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_json(v) for k, v in value.items()}
        return {"$dict": [[to_json(k), to_json(v)] for k, v in value.items()]}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if dataclasses.is_dataclass(value) and type(value).__name__ in DATACLASSES:
        return {"$dataclass": type(value).__name__,
                "fields": {f.name: to_json(getattr(value, f.name))
                           for f in dataclasses.fields(value)}}
    raise WireFormatError(f"{type(value).__name__} values do not travel to or from the worker.")


def from_json(tree: Any) -> Any:
    """The value `to_json` made `tree` of."""
    if isinstance(tree, list):
        return [from_json(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tags = [k for k in tree if k.startswith("$")]
    if not tags:
        return {k: from_json(v) for k, v in tree.items()}
    tag = tags[0]
    try:
        if tag == "$tuple":
            return tuple(from_json(v) for v in tree[tag])
        if tag == "$ndarray":
            return decode_array(base64.b64decode(tree[tag], validate=True))
        if tag == "$bytes":
            return base64.b64decode(tree[tag], validate=True)
        if tag == "$dict":
            return {from_json(k): from_json(v) for k, v in tree[tag]}
        if tag == "$datetime":
            return datetime.fromisoformat(tree[tag])
        if tag == "$path":
            return Path(tree[tag])
        if tag == "$dataclass" and tree[tag] in DATACLASSES:
            cls = DATACLASSES[tree[tag]]
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: from_json(v) for k, v in tree["fields"].items() if k in names})
    except (TypeError, ValueError, KeyError) as e:
        raise WireFormatError(f"A malformed {tag} value: {e}") from None
    raise WireFormatError(f"Unknown tag {tag!r}.")


def encode(value: Any) -> tuple[bytes, str]:
    """(body, content type) of a method's result."""
    if isinstance(value, np.ndarray):
        return encode_array(value), NPY
    if isinstance(value, bytes):
        return value, BYTES
    if isinstance(value, dict) and value and all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()):
        buffer = io.BytesIO()
        np.savez(buffer, **value)
        return buffer.getvalue(), NPZ
    return json.dumps(to_json(value)).encode(), JSON


def decode(body: bytes, content_type: str) -> Any:
    """The result `encode` made (body, content type) of."""
    kind = content_type.split(";")[0].strip()
    try:
        if kind == NPY:
            return decode_array(body)
        if kind == NPZ:
            with np.load(io.BytesIO(body), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if kind == BYTES:
            return body
        if kind == JSON:
            return from_json(json.loads(body))
    except (ValueError, OSError) as e:
        raise WireFormatError(f"A malformed {kind} body: {e}") from None
    raise WireFormatError(f"Unexpected content type {content_type!r}.")


# --- errors: the service's exceptions as (HTTP status, JSON) and back ---------------------------
ERRORS: dict[str, tuple[type[Exception], int]] = {cls.__name__: (cls, status) for cls, status in (
    (InputError, 400), (ModelLoadError, 422), (NotFoundError, 404), (JobInterrupted, 404),
    (JobCancelled, 409), (TimeoutError, 409), (CacheInUseError, 503), (CorruptCacheError, 503),
    (WorkerUnavailable, 503), (AtlasError, 409))}


def error_response(error: Exception) -> tuple[int, bytes]:
    """(status, JSON body {"error": class name, "message"}) of an exception; one this wire format
    does not name is a 500 that says what failed."""
    for cls in type(error).__mro__:
        if cls.__name__ in ERRORS:
            body = {"error": cls.__name__, "message": str(error)}
            if isinstance(error, CacheFileError):
                body["path"] = str(error.path)
            return ERRORS[cls.__name__][1], json.dumps(body).encode()
    message = f"The worker failed: {type(error).__name__}: {error}"
    return 500, json.dumps({"error": "AtlasError", "message": message}).encode()


def error_from(status: int, body: bytes) -> Exception:
    """The exception an error response carries (AtlasError when it names none we know)."""
    try:
        fields = json.loads(body)
        name, message = fields["error"], str(fields["message"])
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode(errors="replace")
        return AtlasError(f"The worker answered HTTP {status}: {text}")
    cls = ERRORS.get(name, (AtlasError, status))[0]
    if issubclass(cls, CacheFileError):
        return cls(message, Path(fields.get("path", "")))
    return cls(message)

"""The service methods the worker exports, each with its argument schema built once.

One table, `EXPORTED`, names the AtlasService methods a client may call. For each, `METHODS`
holds a pydantic model of its arguments made from the method's signature: the server validates
a request body with it (a wrong or missing argument is refused before the service sees it) and
the client encodes a call's arguments for it. On the wire an argument is JSON: a token window
(a `slice`) is `[start, stop]` (either may be null), an AnalysisRequest is
`{"kind", "model", "text", "params"}`, an array or bytes are the tagged values of
backend.serving.codec. Results are encoded by the codec (arrays as npy, dicts of arrays as npz).

Not exported: what stays in the worker (`maps`, `store`, `worker`, `memory`), the whole
(layer, head, T, T) `attention` (results that cross the network are small).
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np
import pydantic
from pydantic import AfterValidator, BeforeValidator, WithJsonSchema

from backend.analyses import AnalysisRequest
from backend.errors import InputError
from backend.serving import codec
from backend.service import AtlasService

EXPORTED = (
    # requests and jobs
    "submit", "cached", "job_status", "job_result", "cancel", "device_name",
    # results of any kind
    "analysis", "recent", "array_names", "array",
    # attention views: windows, rows, overviews, rollout
    "attention_layer", "attention_matrix", "attention_row", "attention_column",
    "strongest_keys", "attention_overview", "head_thumbnails", "head_statistics", "rollout",
    "target_rollout",
    # comparisons
    "alignment_levels", "alignment", "aligned_layer", "aligned_matrix", "aligned_rollout",
    "head_divergence", "layer_divergence", "head_similarity",
    # Thought Anchors
    "published_example", "import_published_trace", "published_zip", "resampled_alternatives",
    "trace_answers", "flagged_sentences", "rollout_engines", "resampling_estimate",
)


class WireRequest(pydantic.BaseModel):
    """An AnalysisRequest on the wire."""

    model_config = pydantic.ConfigDict(extra="forbid")
    kind: str
    model: str
    text: str
    params: dict[str, Any] = {}


def _decoded(tree: Any) -> Any:
    try:
        return codec.from_json(tree)
    except codec.WireFormatError as e:
        raise ValueError(str(e)) from None


def _array(tree: Any) -> np.ndarray:
    value = _decoded(tree)
    if not isinstance(value, np.ndarray):
        raise ValueError('an array must be sent as {"$ndarray": base64 npy}')
    return value


def _bytes(tree: Any) -> bytes:
    value = _decoded(tree)
    if not isinstance(value, bytes):
        raise ValueError('bytes must be sent as {"$bytes": base64}')
    return value


def _window(pair: tuple[int | None, int | None]) -> slice:
    return slice(*pair)


def _request(wire: WireRequest) -> AnalysisRequest:
    return AnalysisRequest.make(wire.kind, wire.model, wire.text,
                                **{k: _decoded(v) for k, v in wire.params.items()})


# Python types of the service's signatures -> their validated wire form (validation gives back
# the Python value: a slice, an array, an AnalysisRequest).
Window = Annotated[tuple[int | None, int | None], AfterValidator(_window)]
WireArray = Annotated[np.ndarray, BeforeValidator(_array), WithJsonSchema(
    {"type": "object", "properties": {"$ndarray": {"type": "string", "format": "base64 npy"}}})]
WireBytes = Annotated[bytes, BeforeValidator(_bytes), WithJsonSchema(
    {"type": "object", "properties": {"$bytes": {"type": "string", "format": "base64"}}})]
WIRE_TYPES = {slice: Window, np.ndarray: WireArray, bytes: WireBytes,
              AnalysisRequest: Annotated[WireRequest, AfterValidator(_request)]}
ANY = Annotated[Any, AfterValidator(_decoded)]


def wire_type(hint: Any) -> Any:
    """The validated wire form of a parameter's type hint."""
    if hint in WIRE_TYPES:
        return WIRE_TYPES[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return functools.reduce(operator.or_, [wire_type(a) for a in args])
    if origin is dict:
        return dict[wire_type(args[0]), wire_type(args[1])]
    if origin is list:
        return list[wire_type(args[0])]
    return hint


def encode_argument(value: Any) -> Any:
    """A call's argument as the JSON the server's schema reads."""
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise InputError("A token window is contiguous: its step must be 1.")
        return [value.start, value.stop]
    if isinstance(value, AnalysisRequest):
        return {"kind": value.kind, "model": value.model, "text": value.text,
                "params": {k: codec.to_json(v) for k, v in value.params.items()}}
    return codec.to_json(value)


@dataclass(frozen=True)
class Method:
    """An exported service method: its name, Python signature (without self) and arguments'
    schema. Optional arguments a call leaves out are not sent: the service's defaults apply."""

    name: str
    signature: inspect.Signature
    arguments: type[pydantic.BaseModel]
    doc: str

    def encode(self, *args, **kwargs) -> dict:
        """The request body of a call (raises TypeError for arguments the method lacks)."""
        bound = self.signature.bind(*args, **kwargs)
        body = {}
        for name, value in bound.arguments.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                body.update({k: encode_argument(v) for k, v in value.items()})
            else:
                body[name] = encode_argument(value)
        return body

    def call(self, service, arguments: pydantic.BaseModel) -> Any:
        """Call the method on `service` with validated arguments."""
        given = {name: getattr(arguments, name) for name in arguments.model_fields_set
                 if name in type(arguments).model_fields}
        extra = {k: _decoded(v) for k, v in (arguments.model_extra or {}).items()}
        return getattr(service, self.name)(**given, **extra)


def _default(parameter: inspect.Parameter) -> Any:
    """A field's default: the service's own when it is plain JSON (shown in the schema), else
    None; a left-out argument is not passed, so the service's default applies either way."""
    if parameter.default is inspect.Parameter.empty:
        return ...
    plain = parameter.default is None or isinstance(parameter.default, (bool, int, float, str))
    return parameter.default if plain else None


def _method(name: str) -> Method:
    function = getattr(AtlasService, name)
    hints = typing.get_type_hints(function)
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())[1:]  # without self
    fields, extra = {}, "forbid"
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
        else:
            fields[p.name] = (wire_type(hints[p.name]) if p.name in hints else ANY, _default(p))
    arguments = pydantic.create_model(
        f"{''.join(part.title() for part in name.split('_'))}Arguments",
        __config__=pydantic.ConfigDict(extra=extra, arbitrary_types_allowed=True), **fields)
    return Method(name, signature.replace(parameters=parameters), arguments,
                  inspect.getdoc(function) or "")


METHODS: dict[str, Method] = {name: _method(name) for name in EXPORTED}

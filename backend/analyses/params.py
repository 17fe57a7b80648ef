"""Typed parameters of the analysis kinds, checked in one place.

A kind declares its parameters as a frozen dataclass: each field's annotation is its type
(`int`, `float`, `bool`, `str`, `tuple[int, ...]`, `tuple[float, ...]`, any of them `| None`)
and `param(default, low=, high=, choices=)` its default and range. `complete` fills in the
defaults before a request is hashed, so a parameter left out and the same parameter given its
default are one cache id; `parse` refuses an unknown or ill-typed value with a message that
names the kind and the parameter; `from_query` converts the strings of a link or a lesson file
by the declared type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from backend.errors import InputError
from backend.inputs import check_text

MAX_LIST = 10_000
_NUMBER_WORDS = {int: "a whole number", float: "a number"}


def param(default: Any, *, low: float | None = None, high: float | None = None,
          choices: tuple[str, ...] = ()) -> Any:
    """A parameter's default and its allowed values: numbers from low to high (inclusive), or
    one of `choices`."""
    return dataclasses.field(default=default,
                             metadata={"low": low, "high": high, "choices": tuple(choices)})


@dataclass(frozen=True)
class Declared:
    """One declared parameter. base: int | float | bool | str; many: a non-empty tuple of
    them; optional: None is allowed (it means "the kind's own choice", e.g. the last token)."""

    name: str
    base: type
    many: bool
    optional: bool
    default: Any
    low: float | None
    high: float | None
    choices: tuple[str, ...]

    def normalised(self, value: Any) -> Any:
        """The value in its canonical form where that loses nothing (an int for a float, a
        list as a tuple); anything else unchanged, so that `check` names it."""
        if self.many and isinstance(value, list):
            value = tuple(value)
        if self.many and isinstance(value, tuple):
            return tuple(self._number(v) for v in value)
        return self._number(value)

    def _number(self, value: Any) -> Any:
        if self.base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def check(self, kind: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if not self.many:
            return self._check_one(kind, value)
        if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_LIST:
            raise InputError(f"{kind}: '{self.name}' must be a list of 1 to {MAX_LIST} "
                             f"numbers, got {value!r}.")
        for item in value:
            self._check_one(kind, item)

    def _check_one(self, kind: str, value: Any) -> None:
        name = self.name
        if self.base is bool:
            if not isinstance(value, bool):
                raise InputError(f"{kind}: '{name}' must be true or false, got {value!r}.")
        elif self.choices:
            if value not in self.choices:
                raise InputError(f"{kind}: '{name}' must be one of {', '.join(self.choices)}; "
                                 f"got {value!r}.")
        elif self.base is str:
            check_text(value, field=f"{kind} parameter '{name}'", required=False)
        else:
            numeric = (int,) if self.base is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, numeric) or \
                    (isinstance(value, float) and not math.isfinite(value)):
                raise InputError(f"{kind}: '{name}' must be {_NUMBER_WORDS[self.base]}, "
                                 f"got {value!r}.")
            if self.low is not None and value < self.low or \
                    self.high is not None and value > self.high:
                raise InputError(f"{kind}: '{name}' must be between {self.low:g} and "
                                 f"{self.high:g}; got {value!r}.")

    def from_string(self, kind: str, text: str) -> Any:
        """The value a link's string stands for: "true"/"false", a number, or numbers
        separated by commas; InputError naming the parameter when it is none of these."""
        def one(part: str):
            part = part.strip()
            if self.base is str:
                return part
            if self.base is bool and part in ("true", "false"):
                return part == "true"
            try:
                return self.base(part) if self.base is not bool else None
            except ValueError:
                return None

        values = [one(p) for p in text.split(",") if p.strip()] if self.many else [one(text)]
        if not values or any(v is None for v in values):
            wanted = "true or false" if self.base is bool else _NUMBER_WORDS.get(self.base, "")
            raise InputError(f"{kind}: '{self.name}' must be "
                             f"{'comma-separated numbers' if self.many else wanted}, "
                             f"got {text!r}.")
        return tuple(values) if self.many else values[0]


def _unwrap(annotation) -> tuple[type, bool, bool]:
    """(base, many, optional) of an annotation such as `tuple[int, ...] | None`."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if optional:
        [annotation] = [a for a in args if a is not type(None)]
    many = typing.get_origin(annotation) is tuple
    base = typing.get_args(annotation)[0] if many else annotation
    if base not in (int, float, bool, str):
        raise TypeError(f"Unsupported parameter type {annotation!r}.")
    return base, many, optional


@functools.cache
def declared(params_type: type) -> dict[str, Declared]:
    """The parameters a kind's dataclass declares, by name."""
    hints = typing.get_type_hints(params_type)
    found = {}
    for f in dataclasses.fields(params_type):
        base, many, optional = _unwrap(hints[f.name])
        meta = f.metadata
        found[f.name] = Declared(f.name, base, many, optional, f.default, meta.get("low"),
                                 meta.get("high"), meta.get("choices", ()))
    return found


def defaults(params_type: type) -> dict[str, Any]:
    """{name: default} of a kind's parameters."""
    return {name: d.default for name, d in declared(params_type).items()}


def complete(params_type: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The given values in canonical form, with the defaults of those left out. Unknown names
    are kept as they are: `parse` refuses them."""
    fields = declared(params_type)
    out = {name: d.default for name, d in fields.items()}
    for name, value in given.items():
        out[name] = fields[name].normalised(value) if name in fields else value
    return out


def parse(kind: str, params_type: type, given: Mapping[str, Any]):
    """The kind's parameters as its dataclass, or InputError naming the first unknown or
    ill-typed one (then the dataclass's own `check()` of values that depend on each other)."""
    fields = declared(params_type)
    for name, value in given.items():
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise InputError(f"Unknown parameter '{name}' for {kind} analyses "
                             f"(they take: {known}).")
        fields[name].check(kind, value)
    values = params_type(**complete(params_type, given))
    if hasattr(values, "check"):
        values.check()
    return values


def from_query(kind: str, params_type: type, strings: Mapping[str, str]) -> dict[str, Any]:
    """Typed values of parameters given as strings (a link, a lesson file), by name."""
    fields = declared(params_type)
    unknown = set(strings) - set(fields)
    if unknown:
        raise InputError(f"Unknown parameter '{sorted(unknown)[0]}' for {kind} analyses "
                         f"(they take: {', '.join(sorted(fields)) or 'none'}).")
    return {name: fields[name].from_string(kind, str(text)) for name, text in strings.items()}

"""The parameters each analysis kind accepts: names, types, ranges and choices, in one place.

`check_params` runs before a job is queued, so a wrong value is refused for its own reason
("head_fusion must be one of mean, max, min") instead of failing inside the computation.
A kind that gains a parameter declares it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backend.errors import InputError
from backend.inputs import check_text
from backend.methods.heads.importance import METHODS
from backend.methods.rollout import HEAD_FUSIONS

MAX_GENERATED_TOKENS = 131_072  # a sanity bound: the server caps rollouts lower
MAX_LIST = 10_000
MAX_ROLLOUTS = 1000


@dataclass(frozen=True)
class Param:
    """kind: "int" | "float" | "bool" | "text" | "choice", or "ints" | "floats" (a non-empty
    list of such numbers); low/high bound numbers (inclusive); choices: the allowed values of a
    "choice"."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> None:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InputError(f"Parameter '{name}' must be true or false, not {value!r}.")
        elif self.kind == "text":
            check_text(value, field=f"parameter '{name}'", required=False)
        elif self.kind in ("ints", "floats"):
            if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_LIST:
                raise InputError(f"Parameter '{name}' must be a list of 1 to {MAX_LIST} "
                                 f"numbers, not {value!r}.")
            item = Param(self.kind[:-1], self.low, self.high)
            for number in value:
                item.check(name, number)
        elif self.kind == "choice":
            if value not in self.choices:
                raise InputError(f"Parameter '{name}' must be one of {', '.join(self.choices)}; "
                                 f"got {value!r}.")
        else:
            self._check_number(name, value)

    def _check_number(self, name: str, value: Any) -> None:
        numeric = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or \
                (isinstance(value, float) and not math.isfinite(value)):
            wanted = "a whole number" if self.kind == "int" else "a number"
            raise InputError(f"Parameter '{name}' must be {wanted}, not {value!r}.")
        if self.low is not None and value < self.low or \
                self.high is not None and value > self.high:
            raise InputError(f"Parameter '{name}' must be between {self.low:g} and "
                             f"{self.high:g}; got {value!r}.")


def _int(low: int, high: int) -> Param:
    return Param("int", low, high)


TEXT = Param("text")
TEMPERATURE = Param("float", 0.01, 2.0)  # 0 would divide the logits by zero
_TRACE = {"problem": TEXT, "answer": TEXT}
_SAMPLING = {"temperature": TEMPERATURE, "top_p": Param("float", 0.01, 1.0),
             "max_new_tokens": _int(1, MAX_GENERATED_TOKENS), "seed": _int(0, 2 ** 31 - 1),
             "engine": TEXT}  # an engine's name; unknown names are refused by the registry

SCHEMAS: dict[str, dict[str, Param]] = {
    "attention": {},
    "attention_flow": {"head_fusion": Param("choice", choices=HEAD_FUSIONS)},
    "gradient_rollout": {"target": _int(0, 10 ** 9)},  # its upper bound is the text's length
    "head_importance": {"method": Param("choice", choices=METHODS)},
    "head_roles": {},
    "pruning_curve": {"method": Param("choice", choices=METHODS), "recompute": Param("bool")},
    "ta_trace": _TRACE,
    "ta_generate": _SAMPLING,
    "ta_receivers": {**_TRACE, "proximity_ignore": _int(1, 1000), "top_k": _int(1, 10_000)},
    "ta_suppression": {**_TRACE, "temperature": TEMPERATURE},
    "ta_resampling": {**_TRACE, **_SAMPLING, "rollouts": _int(1, MAX_ROLLOUTS),
                      "chunks": Param("ints", 0, 10 ** 6), "forced": Param("bool"),
                      "prefix": Param("choice", choices=("faithful", "clean"))},
    "long_context_heads": {"question": TEXT, "answer_start": TEXT,
                           "lengths": Param("ints", 1, 10 ** 6),
                           "depths": Param("floats", 0.0, 1.0),
                           "max_new_tokens": _int(1, 200), "bins": _int(1, 4096),
                           "passkey_length": _int(1, 10 ** 6), "sink": _int(1, 10 ** 6),
                           "recent": _int(1, 10 ** 6), "seed": _int(0, 2 ** 31 - 1)},
}


def check_params(kind: str, params: tuple[tuple[str, Any], ...]) -> None:
    """InputError naming the first unknown or invalid parameter of a request of `kind`."""
    schema = SCHEMAS[kind]
    for name, value in params:
        if name not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise InputError(f"Unknown parameter '{name}' for {kind} analyses "
                             f"(they take: {known}).")
        schema[name].check(name, value)

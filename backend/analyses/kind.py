"""What an analysis kind declares: its parameters, its computation, its result and its
capabilities.

A kind's module defines its parameters as a frozen dataclass (see backend.analyses.params), its
result as a `Result` dataclass with one field per stored array, a `compute(ctx, task) -> result`
function, and one `Kind` naming them; the registry (`backend.analyses.KINDS`) lists the kinds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from backend.analyses.request import AnalysisRequest
from backend.store import AnalysisRecord

P = TypeVar("P")


@dataclass(frozen=True)
class Task(Generic[P]):
    """What a kind's compute function gets besides the job context: the request, its params
    parsed into the kind's dataclass, the analysis id, and the rollout log (the Store, or a
    job's log on another process; only for resumable kinds: others return their result and
    never write)."""

    request: AnalysisRequest
    params: P
    id: str
    store: Any = None

    def record(self, fingerprint: str, meta: dict) -> AnalysisRecord:
        """The result's record: the request with every parameter, and `meta`."""
        r = self.request
        return AnalysisRecord(self.id, r.kind, r.model, fingerprint, r.text, dict(r.params),
                              meta)


def stored(name: str) -> Any:
    """A result field stored under another name than its own (`global`, a Python keyword)."""
    return field(metadata={"stored": name})


@dataclass(frozen=True)
class Result:
    """A finished analysis: its record, and in a kind's subclass one field per stored array
    (stored under the field's name unless `stored(...)` says otherwise; None: not stored, as a
    role a short text cannot give). `save` and `load` go through the store."""

    record: AnalysisRecord

    # The record's identity, as attributes of the result.
    id = property(lambda self: self.record.id)
    kind = property(lambda self: self.record.kind)
    model = property(lambda self: self.record.model)
    text = property(lambda self: self.record.text)
    meta = property(lambda self: self.record.meta)

    @classmethod
    def _stored_names(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("stored", f.name) for f in dataclasses.fields(cls)
                if f.name != "record" and f.metadata.get("array", True)}

    def arrays(self) -> dict[str, np.ndarray]:
        """{stored name: array} of what this result holds."""
        return {name: getattr(self, attr) for attr, name in self._stored_names().items()
                if getattr(self, attr) is not None}

    @property
    def names(self) -> list[str]:
        return sorted(self.arrays())

    def __getitem__(self, name: str) -> np.ndarray:
        arrays = self.arrays()
        if name not in arrays:
            raise KeyError(f"A {self.kind} analysis has no array '{name}'; it has: "
                           f"{', '.join(sorted(arrays)) or 'none'}.")
        return arrays[name]

    def save(self, store) -> None:
        store.save(self.record, self.arrays())

    @classmethod
    def load(cls, store, aid: str) -> "Result":
        record = store.load(aid)
        present = set(store.array_names(aid))
        return cls(record, **{attr: store.load_array(aid, name) if name in present else None
                              for attr, name in cls._stored_names().items()})


@dataclass(frozen=True)
class NamedArrays(Result):
    """A result whose array names follow its input (one per layer, per metric): name -> array."""

    named: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.named)

    @classmethod
    def load(cls, store, aid: str) -> "NamedArrays":
        return cls(store.load(aid), {n: store.load_array(aid, n) for n in store.array_names(aid)})


Compute = Callable[[Any, Task], Result]


@dataclass(frozen=True)
class Kind:
    """name: what requests and records call it. params: its parameters' dataclass. result: its
    result's dataclass. rollout_pool(request, model fingerprint): the pool of saved rollouts it
    reads and extends as it goes (Thought Anchors), so a restarted or extended job continues
    where the last one stopped; such a kind is resumable and is given the rollout log."""

    name: str
    params: type
    compute: Compute
    result: type[Result] = NamedArrays
    rollout_pool: Callable[[Any, str], str] | None = None

    @property
    def resumable(self) -> bool:
        return self.rollout_pool is not None


@dataclass(frozen=True)
class NoParams:
    """The parameters of a kind that takes none."""
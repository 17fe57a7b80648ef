"""What an analysis kind declares: its parameters, its computation and its capabilities.

A kind's module defines its parameters as a frozen dataclass (see backend.analyses.params), a
`compute(ctx, task) -> (AnalysisRecord, {name: array})` function, and one `Kind` naming them;
the registry (`backend.analyses.KINDS`) lists the kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from backend.analyses.request import AnalysisRequest
from backend.store import AnalysisRecord

P = TypeVar("P")


@dataclass(frozen=True)
class Task(Generic[P]):
    """What a kind's compute function gets besides the job context: the request, its params
    parsed into the kind's dataclass, the analysis id, and the store (only for kinds that
    declare `resumable`; others return their result and never write)."""

    request: AnalysisRequest
    params: P
    id: str
    store: Any = None

    def record(self, fingerprint: str, meta: dict) -> AnalysisRecord:
        """The result's record: the request with every parameter, and `meta`."""
        r = self.request
        return AnalysisRecord(self.id, r.kind, r.model, fingerprint, r.text, dict(r.params),
                              meta)


Compute = Callable[[Any, Task], "tuple[AnalysisRecord, dict[str, np.ndarray]]"]


@dataclass(frozen=True)
class Kind:
    """name: what requests and records call it. params: its parameters' dataclass.
    resumable: it saves partial results in the store as it goes (Thought Anchors rollouts), so
    a restarted or extended job continues where the last one stopped; it is given the store."""

    name: str
    params: type
    compute: Compute
    resumable: bool = False


@dataclass(frozen=True)
class NoParams:
    """The parameters of a kind that takes none."""

"""The rollout-engine interface: prompts (token ids) in, continuations out as each one finishes.

An engine takes `Prompt`s (token ids, how many continuations, a key the caller chooses) and one
`SamplingParams`, and yields a `Continuation` the moment it finishes, in whatever order they
finish, so the caller can save it at once (a restarted job asks only for what is missing).
`RolloutMeter` measures what progress reports: rollouts/s, tokens/s and the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from backend.errors import AtlasError

# Degenerate repetition: the last REPEAT_WINDOW tokens (at least 3 periods) repeat with some
# period up to REPEAT_MAX_PERIOD tokens ("A: A: A: ...").
REPEAT_WINDOW = 60
REPEAT_MAX_PERIOD = 40
FINISH_REASONS = ("stop", "answer", "repetition", "length")


class EngineError(AtlasError):
    """An engine could not produce rollouts (a server down, a model it cannot run)."""


@dataclass(frozen=True)
class Prompt:
    """`n` continuations of `token_ids`. `key` identifies it in the results (e.g. (chunk, forced)).
    `text`: the same prompt as text, for servers that take text only. `first_index`: index of
    the first continuation (continuations already saved are not asked for again).
    `max_new_tokens`: per-continuation caps (length n) below the common one, else None."""

    key: Hashable
    token_ids: Sequence[int]
    n: int
    text: str | None = None
    first_index: int = 0
    max_new_tokens: Sequence[int] | None = None

    def cap(self, i: int, default: int) -> int:
        """Cap of new tokens for continuation i (0-based within this prompt)."""
        return min(default, self.max_new_tokens[i]) if self.max_new_tokens else default


TEMPERATURE = 0.6  # the Thought Anchors reference runs
TOP_P = 0.95


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 is greedy. `stop_token_ids` end a continuation (not included in it).
    `stop_at_repetition`: end degenerate repetition (finish_reason "repetition").
    `answer_stop`: optional `AnswerStop` ending a continuation after its first complete answer."""

    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = 0
    stop_at_repetition: bool = True
    answer_stop: "AnswerStop | None" = None


@dataclass(frozen=True)
class Continuation:
    """One finished rollout. `index`: its number within its prompt (first_index, first_index+1...).
    finish_reason: "stop" (an end token), "answer", "repetition" or "length" (the cap)."""

    key: Hashable
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass
class AnswerStop:
    """Ends a continuation once `complete(text)` holds for its decoded text, checked only after a
    token from `trigger_ids` appeared (e.g. tokens containing "boxed"), so most rows are never
    decoded while they run."""

    trigger_ids: frozenset[int]
    complete: Callable[[str], bool]
    decode: Callable[[list[int]], str]

    def reached(self, tokens: list[int], since: int) -> bool:
        """True when tokens[since:] (since = the first trigger's position) hold a whole answer."""
        return self.complete(self.decode(tokens[since:]))


def degenerate(tokens: Sequence[int], window: int = REPEAT_WINDOW,
               max_period: int = REPEAT_MAX_PERIOD) -> bool:
    """True when the last max(window, 3 x period) tokens repeat with a period of at most
    `max_period` tokens (every one equals the token `period` places before it)."""
    if len(tokens) < window:
        return False
    tail = np.asarray(tokens[-max(window, 3 * max_period):])
    for period in range(1, max_period + 1):
        span = max(window, 3 * period)
        if span > len(tail):
            break
        part = tail[-span:]
        if (part[period:] == part[:-period]).all():
            return True
    return False


@dataclass
class RolloutMeter:
    """Counts finished rollouts and generated tokens; rates from the first finished one on."""

    total: int
    done: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, continuation: Continuation) -> None:
        self.done += 1
        self.tokens += len(continuation.token_ids)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rollouts_per_s(self) -> float | None:
        return self.done / self.elapsed if self.done and self.elapsed > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.elapsed if self.tokens and self.elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.rollouts_per_s
        return (self.total - self.done) / rate if rate else None

    def detail(self) -> dict:
        return {"rollouts_done": self.done, "rollouts_total": self.total,
                "rollouts_per_s": self.rollouts_per_s, "tokens_per_s": self.tokens_per_s,
                "eta_s": self.eta_s}

    def describe(self) -> str:
        """"Rollouts 340/2,000 · 52.1 rollouts/s · 10,400 tokens/s · about 32 s left"."""
        text = f"Rollouts {self.done:,}/{self.total:,}"
        if self.rollouts_per_s:
            text += (f" · {self.rollouts_per_s:.2f} rollouts/s · {self.tokens_per_s or 0:,.0f} "
                     f"tokens/s · about {self.eta_s:,.0f} s left")
        return text


Progress = Callable[[RolloutMeter], None]


class RolloutEngine(Protocol):
    """What resampling and trace generation call. `run` yields continuations as they finish and
    polls `should_stop` (raises JobCancelled: the continuations yielded so far are all there
    is); `progress` gets the meter after each one."""

    name: str

    def run(self, prompts: Iterable[Prompt], params: SamplingParams,
            progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Continuation]: ...

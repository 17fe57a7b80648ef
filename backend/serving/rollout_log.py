"""A job's rollout log on a model-worker replica: the Store's two rollout methods without the
Store, so a resumable analysis runs unchanged away from the cache file.

The ingress (the cache's only writer) reads the pools a job resumes from and sends their rows
with the job; rows the job samples go back to the ingress, which saves them as they come.
"""

from __future__ import annotations

from typing import Callable

# The Store's order (backend.store.Store.load_rollouts): by sentence, forced flag, sampling order.
_ORDER = lambda row: (row["chunk_idx"], row["forced"], row["rollout_idx"])  # noqa: E731


class RolloutLog:
    """Saved rows in (`saved`: {pool: rows}), new rows out through `send(pool, rows)`."""

    def __init__(self, saved: dict[str, list[dict]], send: Callable[[str, list[dict]], None]):
        self._rows = {pool: list(rows) for pool, rows in saved.items()}
        self._send = send

    def load_rollouts(self, pool: str) -> list[dict]:
        if pool not in self._rows:  # the ingress sends every pool a request reads
            raise KeyError(f"The rollout pool '{pool}' was not sent with the job.")
        return sorted(self._rows[pool], key=_ORDER)

    def save_rollouts(self, pool: str, rows: list[dict]) -> None:
        self.load_rollouts(pool)  # the same refusal for an unknown pool
        self._rows[pool].extend(dict(row) for row in rows)
        self._send(pool, [dict(row) for row in rows])

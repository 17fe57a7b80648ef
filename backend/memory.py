"""One byte budget for every in-process cache of the service (layers, rollouts, comparisons).

Entries are evicted least recently used first once their bytes pass the budget; an entry larger
than the whole budget is returned but not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


def nbytes(value: Any) -> int:
    """Bytes of numpy arrays and torch tensors inside value (tuples, lists, dicts, dataclasses)."""
    if hasattr(value, "nbytes") and not callable(value.nbytes):
        return int(value.nbytes)
    if hasattr(value, "element_size"):  # a torch tensor
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 64


class BoundedCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = load()
        size = nbytes(value)
        with self._lock:
            if key not in self._items and size <= self.max_bytes:
                self._items[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, freed) = self._items.popitem(last=False)
                    self._bytes -= freed
        return value

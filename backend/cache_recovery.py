"""Moving a damaged cache file aside, so a new one can start while the old one is kept."""

from __future__ import annotations

import time
from pathlib import Path


def move_aside(path: Path) -> Path:
    """Rename the cache file (and its write-ahead log) to `<name>.damaged-<time>`; returns the
    new name. Nothing is deleted: the old file can still be inspected or repaired."""
    path = Path(path)
    base = f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    target, serial = path.with_name(base), 1
    while target.exists():
        target, serial = path.with_name(f"{base}-{serial}"), serial + 1
    path.rename(target)
    wal = path.with_name(f"{path.name}.wal")
    if wal.exists():
        wal.rename(target.with_name(f"{target.name}.wal"))
    return target

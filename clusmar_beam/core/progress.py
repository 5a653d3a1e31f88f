"""Live counts for the terminal display of `clusmar round` (rows read, clusters left, ...).

Beam metrics are only final when a pipeline ends; these counts are read while it runs.
They are seen when the work runs in this process (DirectRunner's default in-process
workers); work on other processes or machines leaves them at zero and the display shows
elapsed time only.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_counts: dict[str, int] = {}


def add(name: str, amount: int) -> None:
    with _lock:
        _counts[name] = _counts.get(name, 0) + int(amount)


def set_value(name: str, value: int) -> None:
    with _lock:
        _counts[name] = int(value)


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        _counts.clear()


def describe() -> str:
    """'rows read 1,000,000, active clusters 12,345' (empty when nothing was reported)."""
    return ", ".join(f"{name} {value:,}" for name, value in snapshot().items())

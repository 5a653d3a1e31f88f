"""`Batch`: the columnar element every PCollection of this project carries, and its checks.

A Batch holds thousands of rows: the Python runners cost tens of microseconds
per element per step, so one element per example would dominate a run.
Its Beam coder is registered by clusmar_beam.transforms (coders.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from clusmar_beam.core.errors import InputError, rows_text

PROBS_SUM_TOLERANCE = 1e-3


@dataclasses.dataclass
class Batch:
    """A slice of a table: equal-length numpy columns plus the file they came from.

    `id` is int64, or an object array of `bytes` for text/binary ids;
    `id_type` remembers which ("int64", "binary" or "string") so outputs can
    write ids exactly as the pool had them.
    """
    source: str
    columns: dict
    id_type: str = "int64"

    def __len__(self):
        return len(next(iter(self.columns.values()))) if self.columns else 0

    @property
    def ids(self) -> np.ndarray:
        return self.columns["id"]

    def take(self, index) -> "Batch":
        return Batch(self.source, {k: v[index] for k, v in self.columns.items()}, self.id_type)

    def with_columns(self, **columns) -> "Batch":
        return Batch(self.source, {**self.columns, **columns}, self.id_type)


def concat_batches(batches, source: str = "") -> Batch | None:
    """One batch from many with the same columns (None when there are none)."""
    batches = [b for b in batches if len(b)]
    if not batches:
        return None
    names = batches[0].columns.keys()
    columns = {name: np.concatenate([b.columns[name] for b in batches]) for name in names}
    return Batch(source or batches[0].source, columns, batches[0].id_type)


def check_finite(batch: Batch, names=("embedding", "probs", "margin")) -> None:
    for name in names:
        values = batch.columns.get(name)
        if values is None:
            continue
        finite = np.isfinite(values)
        bad = int(np.count_nonzero(~finite.all(axis=1) if finite.ndim == 2 else ~finite))
        if bad:
            raise InputError(f"{batch.source}: column {name!r} has {rows_text(bad)} with NaN or infinite values")


def check_probabilities(batch: Batch) -> None:
    """Probabilities must be non-negative and sum to about 1 in every row."""
    probs = batch.columns["probs"]
    if probs.shape[1] < 2:
        raise InputError(f"{batch.source}: column 'probs' has {probs.shape[1]} class(es); margins need at least 2")
    negative = int(np.count_nonzero((probs < 0).any(axis=1)))
    if negative:
        raise InputError(f"{batch.source}: column 'probs' has {rows_text(negative)} with negative probabilities")
    sums = probs.sum(axis=1, dtype=np.float64)
    off = int(np.count_nonzero(np.abs(sums - 1.0) > PROBS_SUM_TOLERANCE))
    if off:
        raise InputError(f"{batch.source}: column 'probs' has {rows_text(off)} whose probabilities do not sum to 1 "
                         f"(tolerance {PROBS_SUM_TOLERANCE}; e.g. sum {sums[np.abs(sums - 1.0) > PROBS_SUM_TOLERANCE][0]:.4f})")


def find_duplicates(ids: np.ndarray) -> tuple[int, list]:
    """(number of ids that occur more than once, a few examples)."""
    if len(ids) < 2:
        return 0, []
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return 0, []
    distinct = np.unique(repeated)
    return len(distinct), [x.decode(errors="replace") if isinstance(x, bytes) else int(x) for x in distinct[:3]]

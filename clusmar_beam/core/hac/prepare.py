"""Input checks, the float64 rows the clustering works on, and exact duplicate rows."""
from __future__ import annotations

import numpy as np

from clusmar_beam.core.hashing import mix64
from clusmar_beam.core.validate import check_int, check_number

METRICS = ("cosine", "sqeuclidean")
# Queries per FAISS call / re-ranking batch: bounds temporary memory.
CHUNK = 1 << 15


class HacError(ValueError):
    """Input that average_linkage cannot cluster; the message says how many rows."""


# ---------------------------------------------------------------- input checks


def check_threshold(t) -> float:
    return check_number("distance_threshold", t, 0, strict=True, error=HacError)


def check_target(target_mean_cluster_size) -> float:
    return check_number("target mean cluster size", target_mean_cluster_size, 1, error=HacError)


def check_delta(delta) -> float:
    """The merge approximation: 0 is exact average linkage (see average_linkage)."""
    return check_number("approximation delta", delta, 0, error=HacError)


def check_count(name, value) -> int:
    return check_int(name, value, 1, error=HacError)


def prepare(embeddings, metric: str, copy: bool = True) -> np.ndarray:
    """Validated float64 rows, unit for cosine, centred for sqeuclidean.

    A copy, unless `copy` is false and the input is float64 C-ordered: then
    the input itself is changed.  Centring does not change squared Euclidean
    distances but removes the cancellation error a large common offset would
    cause.
    """
    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise HacError(f"embeddings must be a 2-D array (rows x dims), got shape {X.shape}")
    n, d = X.shape
    if not np.issubdtype(X.dtype, np.floating):
        raise HacError(f"embeddings must be floating point, got dtype {X.dtype} for {n} rows")
    if n == 0 or d == 0:
        raise HacError(f"embeddings are empty: {n} rows x {d} columns")
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise HacError(f"embeddings contain NaN or inf in {bad.size} of {n} rows "
                       f"(first at row {bad[0]})")
    X = np.array(X, dtype=np.float64, order="C", copy=True if copy else None)
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", X, X))
        zero = norms == 0
        if zero.any():
            bad = np.flatnonzero(zero)
            raise HacError(f"{bad.size} of {n} embedding rows have zero norm and cannot be "
                           f"normalised for cosine distance (first at row {bad[0]})")
        if not np.isfinite(norms).all():
            bad = np.flatnonzero(~np.isfinite(norms))
            raise HacError(f"{bad.size} of {n} embedding rows are too large to normalise "
                           f"(first at row {bad[0]})")
        X /= norms[:, None]
    else:
        X -= X.mean(axis=0)
    X += 0.0  # -0.0 -> +0.0 so equal rows have equal bits
    return X


# ------------------------------------------------------------ duplicate rows


def collapse_duplicates(X: np.ndarray):
    """Group bit-identical rows: (group of each row, first row of each group, sizes).

    Exact ties make nearest neighbours ambiguous and RAC slow (a pile of equal
    points merges one pair per round), and they merge at distance 0 anyway.
    Groups are numbered by first appearance so tie-breaking by id follows input
    order.
    """
    n, d = X.shape
    mult = np.random.default_rng(0x5EED).integers(1, 2**63, size=d, dtype=np.uint64) | np.uint64(1)
    bits = X.view(np.uint64)
    h = np.empty(n, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, n, CHUNK):
            # mix64 makes the row hash non-linear in the float bits
            h[s:s + CHUNK] = (mix64(bits[s:s + CHUNK]) * mult).sum(axis=1)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    group, rep = _renumber(first, inverse.reshape(-1))
    if rep.size < n and not _rows_match(X, group, rep):
        # A hash collision: astronomically unlikely, but stay exact.
        _, first, inverse = np.unique(X, axis=0, return_index=True, return_inverse=True)
        group, rep = _renumber(first, inverse.reshape(-1))
    counts = np.bincount(group, minlength=rep.size)
    return group, rep, counts


def _renumber(first: np.ndarray, inverse: np.ndarray):
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64), first[order].astype(np.int64)


def _rows_match(X, group, rep) -> bool:
    for s in range(0, X.shape[0], CHUNK):
        if not np.array_equal(X[s:s + CHUNK], X[rep[group[s:s + CHUNK]]]):
            return False
    return True


def number_by_first_appearance(keys: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)]

"""Cells of a vector space: FAISS k-means centroids, each row's nearest cells, rows grouped by key.

The HAC's IVF lists, the threshold sample's cells and the sharded
clustering's partitions are all cells of this kind.
"""
from __future__ import annotations

import faiss
import numpy as np

# FAISS computes exact distances without BLAS while queries x dims is below
# 128000, a crossover tuned on many-core hosts; with few threads BLAS wins far
# earlier (facebookresearch/faiss PR 5109 measured about 800 per thread; see
# docs/perf-log.md, issue 3, second session: "HAC speed").  Set once, for the process.
faiss.cvar.distance_compute_blas_threshold = 800 * faiss.omp_get_max_threads()


def train_centroids(sample: np.ndarray, num_cells: int, seed: int, niter: int = 20) -> np.ndarray:
    """FAISS k-means centroids of the (prepared) sample; never more cells than rows."""
    num_cells = max(1, min(int(num_cells), sample.shape[0]))
    if num_cells == 1:
        return sample.mean(axis=0, keepdims=True).astype(np.float32)
    kmeans = faiss.Kmeans(sample.shape[1], num_cells, niter=niter, seed=int(seed) & 0x7FFFFFFF,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.ascontiguousarray(kmeans.centroids, np.float32)


def probe_cells(centroids: np.ndarray, x: np.ndarray, nprobe: int) -> np.ndarray:
    """(n, nprobe) nearest cells of each row, nearest (the home cell) first."""
    nprobe = min(nprobe, centroids.shape[0])
    return faiss.knn(x, centroids, nprobe)[1].astype(np.int64)


def split_by_key(keys: np.ndarray):
    """(key, positions) for each distinct value of a 1-D int array: keys ascending,
    positions ascending within a key.  Nothing for an empty array."""
    if keys.size == 0:
        return
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    for s, e in zip(bounds[:-1], bounds[1:]):
        yield int(ordered[s]), order[s:e]

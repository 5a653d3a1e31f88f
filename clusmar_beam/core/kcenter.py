"""Greedy k-center (Sener & Savarese's core-set): a diversity baseline that needs no labels of the pool.

Each step takes the point farthest from everything labeled or already taken.
Ties go to the lowest row, so the same rows give the same picks.
"""
from __future__ import annotations

import faiss
import numpy as np


def k_center_greedy(points: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    """Indices of k rows of `points`, in the order taken; distances are Euclidean."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    norms = np.einsum("ij,ij->i", x, x)
    if len(centers):
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(np.ascontiguousarray(centers, dtype=np.float32))
        nearest = index.search(x, 1)[0][:, 0]
    else:
        nearest = np.full(n, np.inf, dtype=np.float32)
    taken = np.empty(k, dtype=np.int64)
    scratch = np.empty(n, dtype=np.float32)
    for step in range(k):
        best = int(np.argmax(nearest))
        taken[step] = best
        # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, one matrix-vector product per step
        np.dot(x, x[best], out=scratch)
        scratch *= -2.0
        scratch += norms
        scratch += norms[best]
        np.minimum(nearest, scratch, out=nearest)
        nearest[best] = -np.inf
    return taken

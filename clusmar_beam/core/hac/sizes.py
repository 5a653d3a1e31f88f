"""The cluster-size summary of clustering.json: counts that add up across buckets, then a histogram."""
from __future__ import annotations

import numpy as np


def size_counts(sizes: np.ndarray) -> dict:
    """Cluster counts by size bucket 1, 2-3, 4-7, ... (keyed by log2), the largest, the singletons."""
    counts = {"num_clusters": int(sizes.size), "largest_cluster": int(sizes.max()) if sizes.size else 0,
              "singletons": int(np.count_nonzero(sizes == 1)), "histogram": {}}
    if sizes.size:
        powers = np.floor(np.log2(sizes)).astype(int)
        for b, count in zip(*np.unique(powers, return_counts=True)):
            counts["histogram"][int(b)] = int(count)
    return counts


def add_size_counts(parts) -> dict:
    """The size_counts of the union of disjoint sets of clusters."""
    out = size_counts(np.zeros(0, np.int64))
    for part in parts:
        out["num_clusters"] += part["num_clusters"]
        out["singletons"] += part["singletons"]
        out["largest_cluster"] = max(out["largest_cluster"], part["largest_cluster"])
        for b, count in part["histogram"].items():
            out["histogram"][b] = out["histogram"].get(b, 0) + count
    return out


def size_histogram(counts: dict) -> dict:
    """size_counts with the histogram keyed "1", "2-3", "4-7", ... as clustering.json writes it."""
    histogram = {}
    for b in sorted(counts["histogram"]):
        low, high = 2 ** b, 2 ** (b + 1) - 1
        histogram[str(low) if low == high else f"{low}-{high}"] = counts["histogram"][b]
    return {**counts, "histogram": histogram}


def size_summary(sizes: np.ndarray) -> dict:
    """The cluster count, largest, singletons and size histogram of these cluster sizes."""
    return size_histogram(size_counts(sizes))

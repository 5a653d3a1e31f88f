"""HAC speed against the exact and the graph-restricted references, side by side in one run.

Usage:
  .venv/bin/python benchmarks/bench_hac_speed.py [--small 20000] [--large 100000] [--eps 0.15] [--knn 16] [--repeat 3]

Data: the first rows of the synthetic pool (`data.synthetic_embeddings`: 64-d, 100 classes,
seed 0, the same generator as `clusmar generate-pool`), cosine distance.

- small: `hac.average_linkage` (its own FAISS neighbour search included) against
  fastcluster's exact average linkage cut at the same distance; ARI between the two;
- large: `hac.average_linkage` against scikit-learn's
  `AgglomerativeClustering(linkage="average", connectivity=kNN graph)` (the kNN graph's
  construction included in its time); ARI between the two.

Ours runs `--repeat` times and counts with its median (every time is printed): this host's
speed swings by 1.3x from one run to the next. The references run once each (4 minutes for
scikit-learn). A warm-up run through the IVF path comes first, so that loading libraries and
starting thread pools, which happen once per process, are not counted.

Prints one JSON line per comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac
from data import exact_average_linkage
from data import synthetic_embeddings as pool


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def timed_ours(X, eps, repeat):
    """Our labels and the median of `repeat` runs (each time is printed: the host is noisy)."""
    times = []
    for _ in range(repeat):
        labels, seconds = timed(lambda: hac.average_linkage(X, eps, "cosine").labels)
        times.append(seconds)
    return labels, statistics.median(times), times


def against_fastcluster(n, eps, repeat):
    from scipy.cluster.hierarchy import fcluster
    X = pool(n)
    ours, t_ours, runs = timed_ours(X, eps, repeat)
    ref, t_ref = timed(lambda: fcluster(exact_average_linkage(X, "cosine"), eps, "distance"))
    return {"n": n, "reference": "fastcluster exact average linkage", "ours_s": round(t_ours, 2),
            "ours_runs_s": [round(t, 2) for t in runs],
            "reference_s": round(t_ref, 2), "speedup": round(t_ref / t_ours, 1),
            "ari": round(float(adjusted_rand_score(ref, ours)), 5)}


def against_sklearn(n, eps, knn, repeat):
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.neighbors import kneighbors_graph
    X = pool(n)
    ours, t_ours, runs = timed_ours(X, eps, repeat)

    def sklearn_run():
        graph = kneighbors_graph(X, knn, metric="cosine", include_self=False)
        model = AgglomerativeClustering(n_clusters=None, distance_threshold=eps, linkage="average",
                                        metric="cosine", connectivity=graph, compute_full_tree=True)
        return model.fit_predict(X)

    ref, t_ref = timed(sklearn_run)
    return {"n": n, "reference": f"sklearn AgglomerativeClustering average, connectivity {knn}-NN graph",
            "ours_s": round(t_ours, 2), "ours_runs_s": [round(t, 2) for t in runs], "reference_s": round(t_ref, 2),
            "speedup": round(t_ref / t_ours, 1),
            "ari": round(float(adjusted_rand_score(ref, ours)), 5)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--knn", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    # Warm-up, through the IVF path too: library loading, FAISS's and our thread pools.
    hac.average_linkage(pool(20_000), args.eps, "cosine", exact_search_max=1000)
    print(json.dumps(against_fastcluster(args.small, args.eps, args.repeat)), flush=True)
    print(json.dumps(against_sklearn(args.large, args.eps, args.knn, args.repeat)), flush=True)


if __name__ == "__main__":
    main()

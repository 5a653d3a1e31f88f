"""The clustering on scikit-learn's bundled labelled sets, one worker and sharded, against exact average linkage.

Real data has what a generator does not: integer features with exact ties (digits), duplicate rows (iris),
no cluster structure at all (diabetes). For each set and metric this cuts fastcluster's exact average
linkage midway between two merge heights at each quantile (a cut on a height would hinge on its last bit)
and prints one JSON line per run: `hac.average_linkage` at `--delta` (what `clusmar cluster` runs on one
worker) and `sharded.sharded_average_linkage` (what `--hac-shards` runs) at each partition count and halo.
The sets are small, so the sharded rounds finish on one worker after round 1 (`clusmar cluster`'s default
`--hac-one-worker-clusters`); with a small `--one-worker-clusters` they stay partitioned as a large pool's
do. Either way the partitions hold a few dozen points, where a halo's misses show. The sets ship with
scikit-learn: nothing is downloaded.

    .venv/bin/python benchmarks/bench_real_sets.py
    .venv/bin/python benchmarks/bench_real_sets.py --shards 4 8 --halo-cells 2 3 --one-worker-clusters 8
    .venv/bin/python benchmarks/bench_real_sets.py --shards 4 8 --halo-rows 32768 0   # widened halo, and not
"""
import argparse
import itertools
import json

import numpy as np
from scipy.cluster.hierarchy import fcluster
from sklearn import datasets
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac
from clusmar_beam.core.hac import sharded
from data import exact_average_linkage


def _standardised(x):
    return (x - x.mean(axis=0)) / x.std(axis=0)


SETS = {
    "iris": lambda: datasets.load_iris().data,
    "wine": lambda: _standardised(datasets.load_wine().data),
    "diabetes": lambda: datasets.load_diabetes().data,  # centred and scaled as shipped
    "breast_cancer": lambda: _standardised(datasets.load_breast_cancer().data),
    "digits": lambda: datasets.load_digits().data,
}


def between_heights(merges: np.ndarray, quantile: float) -> float:
    heights = np.unique(merges[:, 2])
    i = int(quantile * (heights.size - 1))
    return float((heights[i] + heights[min(i + 1, heights.size - 1)]) / 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--metrics", nargs="+", default=["cosine", "sqeuclidean"])
    parser.add_argument("--quantiles", nargs="+", type=float, default=[0.5, 0.8, 0.95])
    parser.add_argument("--delta", type=float, default=hac.DEFAULT_DELTA)
    parser.add_argument("--shards", nargs="+", type=int, default=[4])
    parser.add_argument("--halo-cells", nargs="+", type=int, default=[2])
    parser.add_argument("--halo-rows", nargs="+", type=int, default=[sharded.HALO_ROWS],
                        help="halo_width's: 0 keeps the halo at --halo-cells")
    parser.add_argument("--one-worker-clusters", type=int, default=sharded.FINISH_ON_ONE_WORKER,
                        help="the sharded rounds finish on one worker at this many clusters")
    args = parser.parse_args()
    for name in args.sets:
        X = np.asarray(SETS[name](), np.float64)
        for metric in args.metrics:
            merges = exact_average_linkage(X, metric)
            for quantile in args.quantiles:
                eps = between_heights(merges, quantile)
                reference = fcluster(merges, eps, "distance")
                row = {"set": name, "n": len(X), "dim": X.shape[1], "metric": metric, "quantile": quantile,
                       "eps": float(f"{eps:.6g}"), "exact_clusters": int(reference.max()), "delta": args.delta}
                one = hac.average_linkage(X, eps, metric, delta=args.delta).labels
                print(json.dumps({**row, "path": "one worker",
                                  "ari": round(adjusted_rand_score(reference, one), 5)}), flush=True)
                for shards in args.shards:
                    for halo, halo_rows in itertools.product(args.halo_cells, args.halo_rows):
                        labels, _ = sharded.sharded_average_linkage(
                            X, eps, metric, shards=shards, halo_cells=halo, delta=args.delta,
                            one_worker_clusters=args.one_worker_clusters, halo_rows=halo_rows)
                        print(json.dumps({**row, "path": "sharded", "shards": shards, "halo_cells": halo,
                                          "halo_rows": halo_rows,
                                          "ari": round(adjusted_rand_score(reference, labels), 5)}), flush=True)


if __name__ == "__main__":
    main()

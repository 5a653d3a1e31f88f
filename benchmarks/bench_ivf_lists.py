"""IVF lists of the HAC's first round at scale: flat 4*sqrt(n) lists against two-level n/250 lists.

Usage:
  .venv/bin/python benchmarks/bench_ivf_lists.py --pool '/tmp/w/pool10m/pool-*.parquet' [--queries 5000]

The first RAC round searches every point in the `nprobe` lists nearest to the centroid of
its own list (`hac.IvfIndex`), and every row of a probed list is scanned exactly, so a
point's true nearest neighbour is found exactly when the neighbour's list is one of the
point's probe lists. This script measures that (1-NN recall of round 1) on a sample of
queries, against exact FAISS flat search over the whole pool (cosine, unit rows), for

- flat: nlist = 4*sqrt(n) lists, k-means over all centroids, flat assignment (the code's
  choice up to `hac.index._FLAT_QUANTISER_MAX` lists; at 10M its lists hold ~790 points);
- two-level: nlist = n / `hac.index._LIST_SIZE` lists behind `hac.TwoLevelQuantiser` (the
  code's choice above that; lists of ~250 points at any n),

with the training time and the time to assign every point to a list (timed on 1M rows,
scaled to n). Prints one JSON line per configuration and nprobe.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from clusmar_beam import hac  # noqa: E402
from clusmar_beam.hac import index as hac_index  # noqa: E402
from hac_on_pool import load  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    x = load(args.pool)
    n = x.shape[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vecs = np.zeros((n, x.shape[1] + 1), np.float32)   # the HAC's augmented rows: [mu, 0] for singletons
    vecs[:, :-1] = x
    del x
    rng = np.random.default_rng(args.seed)
    queries = np.sort(rng.choice(n, args.queries, replace=False))
    start = time.perf_counter()
    found = faiss.knn(vecs[queries], vecs, 2, metric=faiss.METRIC_INNER_PRODUCT)[1]
    truth = np.where(found[:, 0] == queries, found[:, 1], found[:, 0])
    exact_s = time.perf_counter() - start
    configs = [("flat", int(round(4 * math.sqrt(n))), 1 << 30),
               ("two-level", -(-n // hac_index._LIST_SIZE), 0)]
    for name, nlist, flat_max in configs:
        hac_index._FLAT_QUANTISER_MAX = flat_max
        train = vecs[np.sort(rng.choice(n, min(n, hac_index.TRAIN_PER_LIST * nlist), replace=False))]
        start = time.perf_counter()
        quantiser = hac.TwoLevelQuantiser(train, nlist, args.seed)
        train_s = time.perf_counter() - start
        part = min(n, 1_000_000)
        start = time.perf_counter()
        quantiser.assign(vecs[:part])
        assign_s = (time.perf_counter() - start) * n / part
        own = quantiser.assign(vecs[queries])
        of_truth = quantiser.assign(vecs[truth])
        for nprobe in (16, 32):
            probe = faiss.knn(quantiser.centroids, quantiser.centroids, nprobe)[1]
            hit = (probe[own] == of_truth[:, None]).any(axis=1)
            print(json.dumps({"n": n, "lists": name, "nlist": int(quantiser.centroids.shape[0]),
                              "mean_list_size": round(n / quantiser.centroids.shape[0], 1), "nprobe": nprobe,
                              "rows_scanned_per_query": round(nprobe * n / quantiser.centroids.shape[0]),
                              "recall_at_1": round(float(hit.mean()), 4), "train_s": round(train_s, 1),
                              "assign_all_s": round(assign_s, 1), "exact_truth_s": round(exact_s, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()

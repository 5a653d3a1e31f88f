"""`clusmar cluster` single-worker HAC vs sharded HAC (--hac-shards S) on the same pool, side by side.

Usage:
  .venv/bin/python benchmarks/bench_hac.py --pool 'GLOB' --distance-threshold EPS [--metric cosine]
      [--hac-shards 64] [--work DIR] [--exact] [beam flags...]
Prints wall time of each run, the numbers of clusters and the ARI between the two labelings.
With --exact, also exact average linkage of the same pool: `hac.average_linkage` with
exact (flat) search throughout, which gives fastcluster's clusters (ARI 1.0 in
tests/test_hac.py and bench_hac_ivf_quality.py) where fastcluster's n^2 memory does not fit,
and the ARI of each run against it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from clusmar_beam import cli, hac  # noqa: E402
from hac_on_pool import load as embeddings_by_id  # noqa: E402


def labels(directory):
    t = pq.read_table(sorted(glob.glob(os.path.join(directory, "clusters-*.parquet"))))
    ids = np.asarray(t.column("id").to_pylist())
    order = np.argsort(ids)
    return np.asarray(t.column("cluster_id").to_numpy())[order]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--distance-threshold", required=True)
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--hac-shards", default="64")
    ap.add_argument("--work", default="/tmp/bench_hac")
    ap.add_argument("--exact", action="store_true", help="also compare both with exact average linkage")
    args, beam_args = ap.parse_known_args(argv)
    res = {}
    for name, flags in (("single", []), ("sharded", ["--hac-shards", args.hac_shards])):
        out = os.path.join(args.work, name)
        t = time.perf_counter()
        assert cli.main(["cluster", "--pool", args.pool, "--output", out, "--distance-threshold",
                         args.distance_threshold, "--metric", args.metric, "--overwrite", *flags, *beam_args]) == 0
        info = json.load(open(os.path.join(out, "clustering.json")))
        res[name] = {"seconds": round(time.perf_counter() - t, 1), "clusters": info["num_clusters"],
                     "mean_cluster_size": round(info["mean_cluster_size"], 3)}
        print(name, res[name], flush=True)
    got = {name: labels(os.path.join(args.work, name)) for name in ("single", "sharded")}
    res["ari"] = round(float(adjusted_rand_score(got["single"], got["sharded"])), 5)
    if args.exact:
        X = embeddings_by_id(args.pool)
        t = time.perf_counter()
        exact = hac.average_linkage(X, float(args.distance_threshold), args.metric, exact_search_max=len(X))
        res["exact"] = {"seconds": round(time.perf_counter() - t, 1), "clusters": exact.num_clusters}
        for name in ("single", "sharded"):
            res[f"ari_{name}_vs_exact"] = round(float(adjusted_rand_score(exact.labels, got[name])), 5)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

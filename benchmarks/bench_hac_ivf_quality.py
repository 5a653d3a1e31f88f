"""Quality of the HAC's IVF search phase against exact average linkage (fastcluster).

Usage:
  .venv/bin/python benchmarks/bench_hac_ivf_quality.py --pool-file 'benchmarks/work/1m/pool/pool-00000-of-00010.parquet' \
      [--sample 30000] [--distance-threshold 0.15]

A uniform sample (seed 1) of the file's embeddings, cosine; fastcluster's exact average
linkage cut at the threshold is the reference. `hac.average_linkage` runs with exact
search throughout, with the default `exact_search_max` (IVF while more clusters than that
are active), and with `exact_search_max=500`, which forces the IVF phase until 500 clusters
are left, at several nprobe values. Prints ARI per run.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from clusmar_beam import hac  # noqa: E402


def main(argv=None):
    import fastcluster
    from scipy.cluster.hierarchy import fcluster
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool-file", required=True)
    ap.add_argument("--sample", type=int, default=30_000)
    ap.add_argument("--distance-threshold", type=float, default=0.15)
    args = ap.parse_args(argv)
    column = pq.read_table(args.pool_file, columns=["embedding"]).column("embedding").combine_chunks()
    X = column.values.to_numpy().reshape(len(column), -1).astype(np.float32)
    X = X[np.sort(np.random.default_rng(1).choice(len(X), args.sample, replace=False))]
    eps = args.distance_threshold
    start = time.perf_counter()
    ref = fcluster(fastcluster.linkage(X.astype(np.float64), "average", metric="cosine"), eps, "distance")
    print(f"fastcluster: {time.perf_counter() - start:.1f} s, {ref.max()} clusters", flush=True)
    runs = [("exact search throughout", {"exact_search_max": len(X)}),
            (f"default (exact below {hac.EXACT_SEARCH_MAX} active clusters)", {})] + [
        (f"IVF phase, nprobe {p}", {"exact_search_max": 500, "nprobe": p}) for p in (8, 16, 32, 64, 128)]
    for name, kwargs in runs:
        labels = hac.average_linkage(X, eps, "cosine", **kwargs).labels
        print(f"{name}: ARI {adjusted_rand_score(ref, labels):.5f}", flush=True)


if __name__ == "__main__":
    main()

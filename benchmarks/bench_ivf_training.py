"""Cost of the HAC's IVF lists for k-means settings: training, assignment, and the first round's search work.

Usage:
  .venv/bin/python benchmarks/bench_ivf_training.py [--n 1000000] [--repeat 2] CONFIG [CONFIG ...]

Each CONFIG is `per_list=P,iterations=I` (k-means on P sampled points per list, I
iterations); the lists are those `hac.Rac._build_index` makes for the first n rows of the
synthetic pool (`bench_hac_speed.py`'s data, cosine, 4*sqrt(n) or n/250 lists, nprobe 32).
Prints per configuration and repeat: k-means and assignment wall time, the largest list,
and the first round's search work: the sum over lists L of |L| times the rows of L's
probe lists, which is the row pairs the block searches compare. Better-balanced lists
mean fewer; the time of the searches follows it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac, knn  # noqa: E402

NPROBE = 32  # hac.average_linkage's default


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args(argv)
    n = args.n
    stats = hac.prepare(pool(n), "cosine")
    rac = hac.Rac(stats, np.ones(n), "cosine", 0.15, exact_search_max=hac.EXACT_SEARCH_MAX, nlist=None, nprobe=NPROBE,
                  seed=0, log=None, t0=time.perf_counter(), k=hac.DEFAULT_K)
    rows = rac._vectors(np.arange(n), True)
    nlist = hac.default_nlist(n)
    for _ in range(args.repeat):
        for config in args.configs:
            values = {k: int(v) for k, v in (item.split("=") for item in config.split(","))}
            sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, values["per_list"] * nlist),
                                                             replace=False))
            start = time.perf_counter()
            centroids = knn.train_centroids(rows[sample], nlist, 0, niter=values["iterations"])
            trained = time.perf_counter() - start
            start = time.perf_counter()
            lists = knn.probe_cells(centroids, rows, 1)[:, 0]
            assigned = time.perf_counter() - start
            sizes = np.bincount(lists, minlength=centroids.shape[0])
            probe = faiss.knn(centroids, centroids, NPROBE)[1]
            work = int((sizes * sizes[probe].sum(axis=1)).sum())
            print(f"{config}: k-means {trained:.2f} s, assignment {assigned:.2f} s, {centroids.shape[0]} lists, "
                  f"largest {sizes.max()}, first-round search work {work / 1e9:.3f} G row pairs "
                  f"({work / (n * NPROBE * n / centroids.shape[0]):.2f}x balanced lists)", flush=True)


if __name__ == "__main__":
    main()

"""When to switch the HAC from IVF to exact search, at 100K points; and where the time goes.

Usage:
  .venv/bin/python benchmarks/bench_exact_switch.py [--n 100000] [--eps 0.15] [--switch 5000 20000] [--repeat 3]

`hac.average_linkage` on the first n rows of the synthetic pool (as `bench_hac_speed.py`
takes them), cosine, with each `exact_search_max` in turn, the round repeated; then the
default run once more under cProfile, its 8 largest items.  With n at most 20,000 the
labels are also compared with fastcluster's (ARI).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--switch", type=int, nargs="+", default=[hac.EXACT_SEARCH_MAX, 20_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    hac.average_linkage(pool(1000), args.eps, "cosine")   # warm-up
    X = pool(args.n)
    reference = None
    if args.n <= 20_000:
        import fastcluster
        from scipy.cluster.hierarchy import fcluster
        from sklearn.metrics import adjusted_rand_score
        reference = fcluster(fastcluster.linkage(X.astype(np.float64), "average", metric="cosine"),
                             args.eps, "distance")
    for _ in range(args.repeat):
        for exact_search_max in args.switch:
            start = time.perf_counter()
            result = hac.average_linkage(X, args.eps, "cosine", exact_search_max=exact_search_max)
            line = (f"exact_search_max {exact_search_max}: {time.perf_counter() - start:.2f} s, "
                    f"{result.num_clusters} clusters")
            if reference is not None:
                line += f", ARI vs fastcluster {adjusted_rand_score(reference, result.labels):.5f}"
            print(line, flush=True)
    profile = cProfile.Profile()
    profile.runcall(hac.average_linkage, X, args.eps, "cosine")
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()

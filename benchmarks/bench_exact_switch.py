"""When to switch the HAC from IVF to exact search, at 100K points; and where the time goes.

Usage:
  .venv/bin/python benchmarks/bench_exact_switch.py [--n 100000] [--eps 0.15]

`hac.average_linkage` on the first n rows of the synthetic pool (as `bench_hac_speed.py`
takes them), cosine, with `exact_search_max` 20,000 (the default) and 50,000, alternating
twice in one process; then the default run once more under cProfile, its 8 largest items.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    args = ap.parse_args(argv)
    hac.average_linkage(pool(1000), args.eps, "cosine")   # warm-up
    X = pool(args.n)
    for exact_search_max in (20_000, 50_000, 20_000, 50_000):
        start = time.perf_counter()
        result = hac.average_linkage(X, args.eps, "cosine", exact_search_max=exact_search_max)
        print(f"exact_search_max {exact_search_max}: {time.perf_counter() - start:.2f} s, "
              f"{result.num_clusters} clusters", flush=True)
    profile = cProfile.Profile()
    profile.runcall(hac.average_linkage, X, args.eps, "cosine")
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()

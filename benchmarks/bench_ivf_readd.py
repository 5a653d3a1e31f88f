"""How often a merged cluster's list, picked among its old list's probe lists, is not its nearest list.

Usage:
  .venv/bin/python benchmarks/bench_ivf_readd.py [--n 100000] [--eps 0.15]

Clusters the first n rows of the synthetic pool (as `bench_hac_speed.py` takes them,
cosine) with `hac.average_linkage`, and for every re-added cluster also asks the quantiser
for its nearest list among all lists. Prints the re-adds, how many got another list, and
the cluster count.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    args = ap.parse_args(argv)
    counts = {"re-added": 0, "not the nearest list": 0}
    among_probes = hac.IvfIndex._nearest_probe_list

    def counting(index, vecs, old):
        lists = among_probes(index, vecs, old)
        counts["re-added"] += lists.size
        counts["not the nearest list"] += int((lists != index.quantiser.assign(vecs)).sum())
        return lists

    hac.IvfIndex._nearest_probe_list = counting
    result = hac.average_linkage(pool(args.n), args.eps, "cosine")
    print(f"n {args.n}: {counts['re-added']} re-added clusters, {counts['not the nearest list']} not in their "
          f"nearest list; {result.num_clusters} clusters")


if __name__ == "__main__":
    main()

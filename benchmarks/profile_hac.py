"""Where `hac.average_linkage`'s time goes: wall time per stage, for round 1 and in all.

Usage:
  .venv/bin/python benchmarks/profile_hac.py [--n 1000000] [--eps 0.15]

Data: the first n rows of the synthetic pool, as `bench_hac_speed.py` takes them (cosine).
Each listed method is timed where it is called (nested stages count in their callers too):
index building (`_build_index`: k-means of the IVF lists, `TwoLevelQuantiser.__init__`, and
assigning the points, `assign`), searches (`IvfIndex.search`, blocked and per query;
`search_own_lists`, the retirement check), and the per-round bookkeeping (`_resolve`,
`_combine`, `_symmetrise`), and how many clusters were searched and resolved without a
search after round 1 (from the rounds' log lines). One run; for comparisons between versions use
`bench_hac_versions.py`, which alternates them.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402
from clusmar_beam.hac import rac as hac_rac  # noqa: E402

STAGES = [(hac.Rac, "_build_index"), (hac.TwoLevelQuantiser, "__init__"), (hac.TwoLevelQuantiser, "assign"),
          (hac.Rac, "_search"), (hac.Rac, "_widen"), (hac.IvfIndex, "search"),
          (hac.IvfIndex, "search_own_lists"), (hac.Rac, "_resolve"), (hac.Rac, "_combine"),
          (hac.Rac, "_nearest_of"), (hac.Rac, "_merge"), (hac.IvfIndex, "add"), (hac.IvfIndex, "remove")]


def timed_stages():
    spent = collections.defaultdict(float)

    def wrap(owner, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[f"{owner}.{name}"] += time.perf_counter() - start
        return timed

    for cls, name in STAGES:
        setattr(cls, name, wrap(cls.__name__, name, getattr(cls, name)))
    hac_rac._symmetrise = wrap("hac", "_symmetrise", hac_rac._symmetrise)
    return spent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--eps", type=float, default=0.15)
    args = ap.parse_args(argv)
    X = pool(args.n)
    hac.average_linkage(X[:1000], args.eps, "cosine")  # warm-up: library loading, thread pools
    spent = timed_stages()
    rounds = []
    start = time.perf_counter()
    lines = []

    def log(line):
        rounds.append((time.perf_counter() - start, dict(spent)))
        lines.append(line)

    result = hac.average_linkage(X, args.eps, "cosine", log=log)
    total = time.perf_counter() - start
    first_end, first = rounds[0]
    print(f"n {args.n}: {total:.1f} s, {result.num_clusters} clusters, {result.rounds} rounds; "
          f"round 1 ended at {first_end:.1f} s")
    later = [line for line in lines if line.startswith("round ") and not line.startswith("round 1:")]
    searched = sum(int(line.split("searched ")[1].split(",")[0]) for line in later)
    resolved = sum(int(line.split("without search ")[1].split(",")[0]) for line in later)
    print(f"after round 1: {searched} clusters searched, {resolved} resolved without search")
    print(f"{'stage':40s} {'all':>8s} {'round 1':>8s}")
    for stage in sorted(spent, key=lambda s: -spent[s]):
        print(f"{stage:40s} {spent[stage]:8.2f} {first.get(stage, 0.0):8.2f}")


if __name__ == "__main__":
    main()

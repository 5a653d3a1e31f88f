"""HAC speed and merges under other parameters, side by side in one process.

Usage:
  .venv/bin/python benchmarks/bench_hac_params.py [--n 100000] [--repeat 3] CONFIG [CONFIG ...]

Each CONFIG is "default" or comma-separated settings: `average_linkage` keywords (`k=12`,
`nlist=632`, `nprobe=16`, `exact_search_max=5000`) and module constants of the IVF
quantiser (`train_per_list=16`, `train_iterations=5`, `flat_quantiser_max=0`: two-level
lists, `groups_searched=16`) and of the renumbering of the rounds' arrays
(`compact_below=0.7`, `compact_min=1000000000`: never), and of the IVF searches
(`crowded_list=32`: queries of a list searched as one block from 32, `scan_block=256`:
queries per per-query scan on one thread). The configurations run interleaved, `--repeat` times, on the first n rows of the synthetic pool (cosine, ε 0.15,
as `bench_hac_speed.py` takes them). Prints the median and each time, the cluster count, and the ARI
against the first configuration. CPU time (both cores' work) is less at the mercy of the
host's neighbours than wall time, though not immune.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402
from clusmar_beam.hac import index as hac_index, rac as hac_rac  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

CONSTANTS = {"train_per_list": "TRAIN_PER_LIST", "train_iterations": "_TRAIN_ITERATIONS",
             "flat_quantiser_max": "_FLAT_QUANTISER_MAX", "groups_searched": "_GROUPS_SEARCHED",
             "compact_below": "_COMPACT_BELOW", "compact_min": "_COMPACT_MIN", "crowded_list": "_CROWDED_LIST",
             "scan_block": "_SCAN_BLOCK"}
# A constant lives in hac.index or hac.rac; rac has its own binding of those it imports (TRAIN_PER_LIST).
MODULES = (hac_index, hac_rac)
DEFAULTS = {name: getattr(next(m for m in MODULES if hasattr(m, attr)), attr) for name, attr in CONSTANTS.items()}


def parse(config: str):
    keywords, constants = {}, {}
    if config != "default":
        for setting in config.split(","):
            name, value = setting.split("=")
            (constants if name in CONSTANTS else keywords)[name] = float(value) if "." in value else int(value)
    return keywords, constants


def set_constants(constants: dict):
    """Set hac's module constants to `constants`, the others back to their defaults."""
    for name, attr in CONSTANTS.items():
        for module in MODULES:
            if hasattr(module, attr):
                setattr(module, attr, constants.get(name, DEFAULTS[name]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args(argv)
    hac.average_linkage(pool(1000), args.eps, "cosine")   # warm-up
    X = pool(args.n)
    times = {config: [] for config in args.configs}
    cpu = {config: [] for config in args.configs}
    labels = {}
    for _ in range(args.repeat):
        for config in args.configs:
            keywords, constants = parse(config)
            set_constants(constants)
            start, start_cpu = time.perf_counter(), time.process_time()
            labels[config] = hac.average_linkage(X, args.eps, "cosine", **keywords).labels
            times[config].append(time.perf_counter() - start)
            cpu[config].append(time.process_time() - start_cpu)
    set_constants({})
    first = labels[args.configs[0]]
    for config in args.configs:
        print(f"{config}: median {statistics.median(times[config]):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times[config])}), CPU median {statistics.median(cpu[config]):.2f} s, "
              f"{labels[config].max() + 1} clusters, "
              f"ARI vs {args.configs[0]} {adjusted_rand_score(first, labels[config]):.5f}", flush=True)


if __name__ == "__main__":
    main()

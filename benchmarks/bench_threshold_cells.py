"""Threshold from a target mean cluster size on a big pool: flat cells against two-level cells.

Usage (peak memory from /usr/bin/time):
  .venv/bin/python benchmarks/bench_threshold_cells.py --pool 'DIR/pool-*.parquet' [--target 10] \
      [--metric cosine] [--check]

`hac.choose_threshold` cuts the pool into n / 2,500 k-means cells and draws whole cells.
Both ways of finding a row's cells run in this one process, one after the other:
- flat: every cell centroid is compared with every row (the code before the two-level cells,
  forced here by lifting `hac.threshold._FLAT_SAMPLE_CELLS_MAX`);
- two-level: the default above `hac.threshold._FLAT_SAMPLE_CELLS_MAX` cells (`hac.TwoLevelQuantiser`).
Prints, per way, the time, the chosen eps and the sample's own estimate of the mean size.
With --check, the whole pool is then clustered once, at the larger eps (`hac.average_linkage`),
and the mean cluster size each eps really gives is read off the merge heights (a cut at eps
keeps the merges of height <= eps); the issue asks for the target within +-20%.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from hac_on_pool import load  # noqa: E402
from clusmar_beam import hac  # noqa: E402
from clusmar_beam.hac import threshold as hac_threshold  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--target", type=float, default=10.0)
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    embeddings = load(args.pool)
    n = len(embeddings)
    default_max = hac_threshold._FLAT_SAMPLE_CELLS_MAX
    chosen = {}
    for way, flat_max in (("flat", 1 << 40), ("two-level", default_max)):
        hac_threshold._FLAT_SAMPLE_CELLS_MAX = flat_max
        start = time.perf_counter()
        choice = hac.choose_threshold(embeddings, args.metric, args.target)
        seconds = time.perf_counter() - start
        chosen[way] = choice.distance_threshold
        print(json.dumps({"n": n, "cells": way, "seconds": round(seconds, 1), **choice.as_dict()}), flush=True)
    hac_threshold._FLAT_SAMPLE_CELLS_MAX = default_max
    if args.check:
        start = time.perf_counter()
        result = hac.average_linkage(embeddings, max(chosen.values()), args.metric)
        hac_seconds = round(time.perf_counter() - start, 1)
        for way, eps in chosen.items():
            clusters = n - int((result.heights <= eps).sum())
            print(json.dumps({"n": n, "cells": way, "distance_threshold": eps, "clusters": clusters,
                              "mean_cluster_size": round(n / clusters, 2), "target": args.target,
                              "hac_seconds": hac_seconds}), flush=True)


if __name__ == "__main__":
    main()

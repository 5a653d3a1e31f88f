"""FAISS's BLAS threshold at the shapes the HAC searches, its default against ours, side by side.

Usage:
  .venv/bin/python benchmarks/bench_faiss_blas.py [--repeat 3]

`faiss.knn` (inner product, k = 8) of the HAC's crowded-list blocks at 100K points
(1,265 blocks of 80 queries against 32 lists x 79 rows, 65 dims: the augmented means) and
an exact flat search of 1,000 queries against 20,000 rows, with FAISS's default
`distance_compute_blas_threshold` (1.15: queries x dims < 128,000 skip BLAS) and with
the value `clusmar_beam.knn` sets (800 x OpenMP threads), alternating. Unit random rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import faiss
import numpy as np

FAISS_DEFAULT = faiss.cvar.distance_compute_blas_threshold

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clusmar_beam import knn  # noqa: E402,F401  (sets the threshold)

OURS = faiss.cvar.distance_compute_blas_threshold


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((20_000, 65)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries, block = rows[:80].copy(), rows[:32 * 79].copy()
    flat = faiss.IndexFlatIP(65)
    flat.add(rows)
    print(f"threads {faiss.omp_get_max_threads()}; thresholds: FAISS default {FAISS_DEFAULT}, ours {OURS}")
    for _ in range(args.repeat):
        for name, threshold in (("default", FAISS_DEFAULT), ("ours", OURS)):
            faiss.cvar.distance_compute_blas_threshold = threshold
            start = time.perf_counter()
            for _ in range(1265):
                faiss.knn(queries, block, 8, metric=faiss.METRIC_INNER_PRODUCT)
            blocks = time.perf_counter() - start
            start = time.perf_counter()
            flat.search(rows[:1000], 8)
            search = time.perf_counter() - start
            print(f"{name:8s} 1,265 blocks 80 x 2,528: {blocks:.2f} s; flat 1,000 x 20,000: {search * 1000:.0f} ms",
                  flush=True)
    faiss.cvar.distance_compute_blas_threshold = OURS


if __name__ == "__main__":
    main()

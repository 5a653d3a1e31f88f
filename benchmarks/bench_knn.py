"""Sharded kNN graph (clusmar_beam.knn.ShardedKnn on DirectRunner) vs FAISS IndexIVFFlat in one process.

Everything is measured side by side in one run on the same data:
  * the BLAS rate (float32 GEMM of one cell's shape) -> the GEMM floor
    2 * n * nprobe * cell_size * d FLOPs / rate;
  * exact top-k of a sample of queries (FAISS flat) -> recall@k of both;
  * the Beam pipeline (centroid training + routing + per-cell search + merge),
    wall time;
  * FAISS IndexIVFFlat with the *same* centroids and nprobe (so the same
    candidates and recall): add + search of every point, wall time.

Usage:
  .venv/bin/python benchmarks/bench_knn.py [--pool 'benchmarks/work/1m/pool/pool-*.parquet']
      [--num-points N (when generating)] [--k 10] [--num-cells 1024] [--nprobe 8] [--cells-per-group 128]
      [--queries 20000] [--metric cosine]
      [beam flags, e.g. --direct_num_workers=2 --direct_running_mode=multi_threading]
If the pool glob matches nothing, a pool is generated with `clusmar generate-pool` (64-d, 100 classes).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import apache_beam as beam
import faiss
import numpy as np
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clusmar_beam import cli, io, knn, runner  # noqa: E402


def load_pool(pattern, n):
    files = sorted(glob.glob(pattern))
    if not files:
        out = os.path.dirname(pattern)
        assert cli.main(["generate-pool", "--output", out, "--num-examples", str(n), "--dim", "64",
                         "--num-classes", "100", "--seed", "0"]) == 0
        files = sorted(glob.glob(pattern))
    table = pq.read_table(files, columns=["id", "embedding"])
    ids = table.column("id").to_numpy().astype(np.int64)
    emb = table.column("embedding").combine_chunks()
    d = len(emb[0])
    x = np.asarray(emb.flatten().to_numpy(), np.float32).reshape(-1, d)
    return ids, x


def blas_rate(m, n, d, repeat=5):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, d), dtype=np.float32)
    b = rng.standard_normal((d, n), dtype=np.float32)
    a @ b
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * n * d / best


def recall(found_ids, truth_ids, k):
    hits = 0
    for f, t in zip(found_ids, truth_ids):
        hits += len(set(f[:k].tolist()) & set(t[:k].tolist()))
    return hits / (k * len(truth_ids))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="benchmarks/work/1m/pool/pool-*.parquet")
    ap.add_argument("--num-points", type=int, default=1_000_000, help="pool size when the pool is generated")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--num-cells", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--cells-per-group", type=int, default=knn.CELLS_PER_GROUP)
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--metric", default="cosine", choices=knn.METRICS)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--json", help="write the results here too")
    args, beam_args = ap.parse_known_args(argv)
    k = args.k

    t = time.perf_counter()
    ids, x = load_pool(args.pool, args.num_points)
    n, d = x.shape
    print(f"pool: {n} x {d} loaded in {time.perf_counter() - t:.1f}s", flush=True)
    y = knn.prepare_vectors(x, args.metric)

    # exact ground truth for a sample of queries
    rng = np.random.default_rng(1)
    qrows = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
    t = time.perf_counter()
    metric = faiss.METRIC_INNER_PRODUCT if args.metric == "cosine" else faiss.METRIC_L2
    _, truth = faiss.knn(y[qrows], y, k + 1, metric=metric)
    truth_ids = [ids[row[row != q]][:k] for row, q in zip(truth, qrows)]
    print(f"exact flat search of {qrows.size} queries: {time.perf_counter() - t:.1f}s", flush=True)

    # Beam sharded kNN
    tmp = tempfile.mkdtemp(prefix="bench_knn_")
    qset = set(ids[qrows].tolist())
    qid_arr = np.sort(ids[qrows])
    options = PipelineOptions(beam_args)
    t = time.perf_counter()
    pipeline = runner.make_pipeline(options)

    def keep_queries(batch: knn.KnnBatch):
        m = np.isin(batch.ids, qid_arr)
        return [(batch.ids[m], batch.neighbors[m])], int(len(batch))

    result = (pipeline
              | io.ReadTable(args.pool, required=["id", "embedding"], batch_size=args.batch)
              | knn.ShardedKnn(k=k, num_cells=args.num_cells, nprobe=args.nprobe, metric=args.metric, temp_dir=tmp,
                               cells_per_group=args.cells_per_group)
              | beam.Map(keep_queries)
              | beam.combiners.ToList())
    out_path = os.path.join(tmp, "beam_out.npz")

    def save(lst):
        qids = np.concatenate([p[0][0][0] for p in lst])
        nbrs = np.concatenate([p[0][0][1] for p in lst])
        np.savez(out_path, qids=qids, nbrs=nbrs, points=sum(p[1] for p in lst))

    _ = result | beam.Map(save)
    counters = {c.key.metric.name: c.committed
                for c in runner.run_pipeline(pipeline, "bench_knn").metrics().query()["counters"]}
    beam_wall = time.perf_counter() - t
    saved = np.load(out_path)
    got = dict(zip(saved["qids"].tolist(), saved["nbrs"]))
    beam_recall = recall([got[i] for i in ids[qrows].tolist()], truth_ids, k)
    assert int(saved["points"]) == n and len(got) == len(qset)
    # rows per point through the shuffle: one as a database row, the rest as queries
    rows_per_point = 1 + counters["query_rows"] / n
    print(f"beam ShardedKnn: {beam_wall:.1f}s, recall@{k} {beam_recall:.4f}, "
          f"{rows_per_point:.2f} rows per point shuffled", flush=True)

    # FAISS IndexIVFFlat with the same centroids and nprobe, one process
    centroids = np.load(sorted(glob.glob(os.path.join(tmp, "centroids-*.npy")))[0])
    nlist = centroids.shape[0]
    t = time.perf_counter()
    quantizer = faiss.IndexFlatL2(d)  # L2 cell assignment, as in the Beam route
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    index.is_trained = True
    index.add_with_ids(y, np.ascontiguousarray(ids))
    ivf_add = time.perf_counter() - t
    index.nprobe = args.nprobe
    t = time.perf_counter()
    _, found = index.search(y, k + 1)
    ivf_search = time.perf_counter() - t
    home = knn.probe_cells(centroids, y, 1)[:, 0]
    probes = knn.probe_cells(centroids, y, args.nprobe)
    ivf_found = [row[row != ids[q]][:k] for row, q in zip(found[qrows], qrows)]
    ivf_recall = recall(ivf_found, truth_ids, k)
    cell_sizes = np.bincount(home, minlength=nlist)
    cell_group = np.load(sorted(glob.glob(os.path.join(tmp, "cell-groups-*.npy")))[0])
    group_rows = np.bincount(cell_group[home])
    group_rows = group_rows[group_rows > 0]  # rows per group: the balance of the search step
    pairs = float(np.sum(np.bincount(probes.reshape(-1), minlength=nlist) * cell_sizes))
    del index, found
    print(f"faiss IndexIVFFlat ({nlist} lists, nprobe {args.nprobe}): add {ivf_add:.1f}s, "
          f"search {ivf_search:.1f}s, recall@{k} {ivf_recall:.4f}", flush=True)

    mean_cell = n / nlist
    rate = blas_rate(int(args.nprobe * mean_cell), int(mean_cell), d)
    flops = 2.0 * pairs * d  # = 2 * n * nprobe * (cell size seen) * d
    floor = flops / rate
    res = {
        "n": n, "d": d, "k": k, "num_cells": nlist, "nprobe": args.nprobe, "metric": args.metric,
        "queries": int(qrows.size), "cells_per_group": args.cells_per_group,
        "rows_per_point_shuffled": round(rows_per_point, 3), "groups": int(group_rows.size),
        "largest_group_rows_over_mean": round(float(group_rows.max() / group_rows.mean()), 2),
        "beam_seconds": round(beam_wall, 2), "beam_recall": round(beam_recall, 4),
        "ivf_add_seconds": round(ivf_add, 2), "ivf_search_seconds": round(ivf_search, 2),
        "ivf_total_seconds": round(ivf_add + ivf_search, 2), "ivf_recall": round(ivf_recall, 4),
        "ratio_beam_over_ivf_search": round(beam_wall / ivf_search, 3),
        "ratio_beam_over_ivf_add_search": round(beam_wall / (ivf_add + ivf_search), 3),
        "gemm_flops": flops, "blas_gflops": round(rate / 1e9, 1), "gemm_floor_seconds": round(floor, 2),
        "beam_over_floor": round(beam_wall / floor, 2), "beam_args": beam_args,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

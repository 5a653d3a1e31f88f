"""`clusmar select` at scale (10M pool, k_t = 1M, k_m = 10M) against a one-process numpy run.

Usage:
  .venv/bin/python benchmarks/bench_select.py --work DIR [--num-examples 10000000] [--batch-size 1000000]

Generates the pool with `clusmar generate-pool` (64-d, 100 classes, seed 0) unless DIR/pool
holds a completed one, and writes DIR/clusters from the generator's own sub-clusters
(`synthetic.true_cluster_ids`): selection's cost depends on how many clusters there are
and their sizes, not on how they were found, and clustering 10M points is a benchmark of
its own. Then, side by side in one run:

- pipeline: `clusmar select` on DirectRunner under /usr/bin/time -v (wall, peak RSS);
- numpy: one process, no Beam: read id + probs with pyarrow, margins, the k_m lowest,
  round-robin order (the same library functions), in memory.

Checks that both chose the same ids in the same order and prints the row of figures
that benchmarks/RESULTS.md quotes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from clusmar_beam.core import selection, synthetic
from clusmar_beam.core.batch import Batch
from clusmar_beam.core.hashing import pick_hash, tiebreak_hash
from clusmar_beam.core.margins import top2_margins
from clusmar_beam.transforms import storage
from data import CLI, generate_pool, timed_command


def make_inputs(work, n):
    pool = os.path.join(work, "pool")
    _, timing = generate_pool(pool, n, time_file=os.path.join(work, "generate.time"))
    if timing:
        print(f"generate-pool: {timing[0]:.1f} s, {timing[1]:.2f} GB", flush=True)
    clusters = os.path.join(work, "clusters")
    if not os.path.exists(os.path.join(clusters, "clustering.json")):
        plan = synthetic.make_plan(n, 64, 100, 0)
        os.makedirs(clusters, exist_ok=True)
        step = 1_000_000
        count = -(-n // step)
        for i, start in enumerate(range(0, n, step)):
            end = min(n, start + step)
            truth = synthetic.true_cluster_ids(plan, start, end)
            storage.write_parquet(os.path.join(clusters, f"clusters-{i:05d}-of-{count:05d}.parquet"),
                             pa.table({"id": np.arange(start, end, dtype=np.int64),
                                       "cluster_id": truth["cluster"]}))
        storage.write_json_atomic(os.path.join(clusters, "clustering.json"),
                             {"source": "synthetic.true_cluster_ids (benchmark input)", "num_points": n})
    return pool, clusters


def numpy_select(pool, clusters, k_t, k_m, seed, round_index):
    start = time.perf_counter()
    files = sorted(glob.glob(os.path.join(pool, "pool-*.parquet")))
    ids, margins = [], []
    for path in files:
        table = pq.read_table(path, columns=["id", "probs"])
        probs = table.column("probs").combine_chunks()
        width = len(probs[0])
        ids.append(table.column("id").to_numpy())
        margins.append(top2_margins(probs.values.to_numpy().reshape(-1, width)))
    ids, margins = np.concatenate(ids), np.concatenate(margins)
    ct = pq.read_table(sorted(glob.glob(os.path.join(clusters, "clusters-*.parquet"))))
    cluster_of = np.empty(len(ids), np.int64)
    cluster_of[ct.column("id").to_numpy()] = ct.column("cluster_id").to_numpy()  # ids are 0..n-1 here
    keep = selection.lowest(margins, tiebreak_hash(ids, seed), ids, min(k_m, len(ids)))
    cand = Batch("numpy", {"id": ids[keep], "margin": margins[keep], "cluster_id": cluster_of[ids[keep]],
                           "pick": pick_hash(ids[keep], seed, round_index)})
    chosen = selection.order_candidates(cand, "cluster-margin", k_t)
    return chosen.ids, time.perf_counter() - start


def manifest_ids(directory):
    files = sorted(glob.glob(os.path.join(directory, "manifest-*.tfrecord")))
    ds = tf.data.TFRecordDataset(files).batch(1 << 16).map(
        lambda s: tf.io.parse_example(s, {"id": tf.io.FixedLenFeature([], tf.int64),
                                          "rank": tf.io.FixedLenFeature([], tf.int64)}))
    ids, ranks = [], []
    for b in ds:
        ids.append(b["id"].numpy())
        ranks.append(b["rank"].numpy())
    ids, ranks = np.concatenate(ids), np.concatenate(ranks)
    return ids[np.argsort(ranks)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--num-examples", type=int, default=10_000_000)
    ap.add_argument("--batch-size", type=int, default=1_000_000)
    args, beam_args = ap.parse_known_args(argv)
    os.makedirs(args.work, exist_ok=True)
    n, k_t = args.num_examples, args.batch_size
    pool, clusters = make_inputs(args.work, n)
    manifest = os.path.join(args.work, "manifest")
    wall, rss = timed_command([*CLI, "select", "--pool", os.path.join(pool, "pool-*.parquet"),
                               "--clusters", clusters, "--batch-size", str(k_t), "--candidates", str(n),
                               "--output", manifest, "--overwrite", *beam_args], os.path.join(args.work, "select.time"))
    print(f"pipeline: {wall:.1f} s wall, {rss:.2f} GB peak RSS", flush=True)
    ref_ids, ref_seconds = numpy_select(pool, clusters, k_t, n, 0, 0)
    print(f"numpy one process: {ref_seconds:.1f} s", flush=True)
    got = manifest_ids(manifest)
    same = bool(np.array_equal(got, ref_ids))
    summary = json.load(open(os.path.join(manifest, "manifest.json")))
    print(json.dumps({"pool": n, "k_t": k_t, "k_m": summary.get("k_m"), "selected": summary.get("selected"),
                      "pipeline_s": round(wall, 1), "pipeline_peak_gb": round(rss, 2),
                      "numpy_s": round(ref_seconds, 1), "same_manifest": same}))
    if not same:
        sys.exit("the pipeline's manifest differs from the one-process selection")


if __name__ == "__main__":
    main()

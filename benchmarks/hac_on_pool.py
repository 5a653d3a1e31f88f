"""`hac.average_linkage` on a pool's embeddings in one plain process (no Beam), for timing.

Usage (peak memory from /usr/bin/time):
  /usr/bin/time -v .venv/bin/python benchmarks/hac_on_pool.py --pool 'benchmarks/work/1m/pool/pool-*.parquet' \
      --distance-threshold 0.15 [--metric cosine] [--shards S --halo-cells H] [--labels-out labels.npy]

Rows are put in id order, as `clusmar cluster` does; prints the RAC round lines (searched,
resolved without search, merged, ...) and the HAC's own time and cluster count. With
--shards, the partitioned rounds of `hac_sharded.sharded_average_linkage` run instead, in
this one process.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from clusmar_beam import hac, hac_sharded  # noqa: E402


def load(pool_glob):
    table = pq.read_table(sorted(glob.glob(pool_glob)), columns=["id", "embedding"])
    column = table.column("embedding").combine_chunks()
    embeddings = column.values.to_numpy().reshape(len(column), -1).astype(np.float32)
    return embeddings[np.argsort(table.column("id").to_numpy(), kind="stable")]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", required=True)
    ap.add_argument("--distance-threshold", type=float, required=True)
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--shards", type=int)
    ap.add_argument("--halo-cells", type=int, default=2)
    ap.add_argument("--labels-out")
    args = ap.parse_args(argv)
    embeddings = load(args.pool)
    start = time.perf_counter()

    def log(line):
        print(line, flush=True)

    if args.shards:
        labels, _ = hac_sharded.sharded_average_linkage(embeddings, args.distance_threshold, args.metric,
                                                        shards=args.shards, halo_cells=args.halo_cells, log=log)
    else:
        labels = hac.average_linkage(embeddings, args.distance_threshold, args.metric, log=log).labels
    print(f"hac: {len(embeddings)} points -> {labels.max() + 1} clusters, {time.perf_counter() - start:.1f} s")
    if args.labels_out:
        np.save(args.labels_out, labels)


if __name__ == "__main__":
    main()

"""Sharded `clusmar cluster` as the pool grows: the largest element, side input and partition stay flat.

Usage:
  .venv/bin/python benchmarks/bench_cluster_scale.py [--sizes 200000,1000000,4000000]
      [--rows-per-shard 15625] [--dim 64] [--region-sizes lognormal|heavy-tailed]
      [--distance-threshold 0.15] [--one-worker 1000000] [--work DIR] [beam flags...]

For each size it generates a pool (once; kept in --work), runs `clusmar cluster --hac-shards S`
with S = size / rows-per-shard (shards proportional to the pool) in a subprocess under
/usr/bin/time, and prints one JSON line: wall time, peak RSS, clusters, the sharded rounds, and
the largest element per step (the Beam Distributions of clusmar_beam.transforms.element_sizes: every shuffle
and side input of the cluster pipeline, and `partition_state`, the statistics one worker merges).
Sizes listed in --one-worker are also clustered on one worker (--hac-shards 1) in the same run,
and the ARI between the two is printed.
"""
from __future__ import annotations

import argparse
import json
import os

from sklearn.metrics import adjusted_rand_score

from data import PY, ROOT, cluster_labels, generate_pool, timed_command

_CLUSTER = """
import json, sys
import logging
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("clusmar").setLevel(logging.INFO)
from clusmar_beam.pipelines import cluster
info = cluster.run(sys.argv[2:])
json.dump(info, open(sys.argv[1], "w"))
"""


def cluster(pool, out, flags, beam_args):
    info_file = out + ".info.json"
    wall, rss = timed_command([PY, "-c", _CLUSTER, info_file, "--pool", pool, "--output", out, "--overwrite",
                               *flags, *beam_args])
    return wall, rss, json.load(open(info_file))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200000,1000000,4000000")
    ap.add_argument("--rows-per-shard", type=int, default=15625)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--region-sizes", default="lognormal")
    ap.add_argument("--distance-threshold", default="0.15")
    ap.add_argument("--one-worker", default="", help="sizes also clustered on one worker, comma-separated")
    ap.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "scale"))
    args, beam_args = ap.parse_known_args(argv)
    one_worker = {int(s) for s in args.one_worker.split(",") if s}
    for size in (int(s) for s in args.sizes.split(",")):
        base = os.path.join(args.work, f"{args.region_sizes}-{size}-{args.dim}")
        glob_, _ = generate_pool(os.path.join(base, "pool"), size, dim=args.dim, region_sizes=args.region_sizes)
        flags = ["--distance-threshold", args.distance_threshold]
        shards = max(2, size // args.rows_per_shard)
        wall, rss, info = cluster(glob_, os.path.join(base, "sharded"), flags + ["--hac-shards", str(shards)],
                                  beam_args)
        row = {"size": size, "region_sizes": args.region_sizes, "dim": args.dim, "hac_shards": shards,
               "seconds": wall, "peak_rss_gib": rss, "clusters": info["num_clusters"],
               "rounds": info["rounds"], "waiting": info.get("waiting"),
               "sharded_rounds": [(r["clusters"], r["parts"], r["merges"], r["waiting"])
                                  for r in info.get("sharded_rounds", [])],
               "largest_element_bytes": info["largest_element_bytes"]}
        if size in one_worker:
            wall1, rss1, info1 = cluster(glob_, os.path.join(base, "one"), flags, beam_args)
            row["one_worker"] = {"seconds": wall1, "peak_rss_gib": rss1, "clusters": info1["num_clusters"]}
            row["ari_vs_one_worker"] = round(float(adjusted_rand_score(
                cluster_labels(os.path.join(base, "one"))[1], cluster_labels(os.path.join(base, "sharded"))[1])), 5)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

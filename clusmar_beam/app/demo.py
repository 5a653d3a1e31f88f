"""`make demo`: one Cluster-Margin round on a generated 100K-example pool, on DirectRunner.

generate-pool -> cluster -> select (k_t = 10K, k_m = 100K), then a short summary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo-output")
    parser.add_argument("--num-examples", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--distance-threshold", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args, beam_flags = parser.parse_known_args(argv)

    from clusmar_beam.app import cli
    pool, clusters, manifest = (os.path.join(args.workdir, name) for name in ("pool", "clusters", "manifest"))
    started = time.time()
    steps = [
        ["generate-pool", "--output", pool, "--num-examples", str(args.num_examples), "--dim", "64",
         "--num-classes", "10", "--seed", str(args.seed), "--overwrite"],
        ["cluster", "--pool", os.path.join(pool, "pool-*.parquet"), "--output", clusters,
         "--distance-threshold", str(args.distance_threshold), "--overwrite"],
        ["select", "--pool", os.path.join(pool, "pool-*.parquet"), "--clusters", clusters,
         "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--output", manifest, "--overwrite"],
    ]
    for step in steps:
        code = cli.main(step + beam_flags)
        if code:
            return code
    from clusmar_beam.transforms.storage import read_json
    clustering = read_json(os.path.join(clusters, "clustering.json"))
    summary = read_json(os.path.join(manifest, "manifest.json"))
    print()
    print(f"manifest:   {os.path.abspath(manifest)}/manifest-*.tfrecord ({len(summary['files'])} file(s))")
    print(f"pool:       {summary['pool_count']:,} examples")
    print(f"clusters:   {clustering['num_clusters']:,} (average linkage, cosine, cut at "
          f"{clustering['parameters']['distance_threshold']}; mean size {clustering['mean_cluster_size']:.1f}, "
          f"largest {clustering['largest_cluster']:,})")
    print(f"candidates: {summary['k_m']:,} lowest-margin of {summary['unlabeled_count']:,} unlabeled")
    print(f"selected:   {summary['selected']:,} from {summary['clusters_selected']:,} clusters (cluster-margin)")
    print(f"time:       {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

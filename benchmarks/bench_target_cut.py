"""--target-mean-cluster-size: how close the cut comes, and how faithful it is, one-worker and sharded.

Usage:
  .venv/bin/python benchmarks/bench_target_cut.py [--n 200000] [--target 10] [--shards 64]

Data: the first n rows of the synthetic pool (`data.synthetic_embeddings`: 64-d, 100 classes, seed 0), cosine.
All in this one process, in order:
- the sample's estimate (`hac.choose_threshold`) and the mean size that estimate really gives;
- one worker: merged up to the sample's threshold for 2 x the target, cut at the target
  (`hac.average_linkage(..., target_mean_cluster_size=M)`), against a run straight at the
  threshold of the cut (the cut should be that clustering);
- sharded (`clusmar_beam.core.hac.sharded.sharded_average_linkage`, the rounds of `clusmar cluster --hac-shards`):
  partitions up to the sample's estimate, last round past it, cut at the target; against a
  one-worker run straight at the sharded cut's threshold, and against the one-worker cut.
Prints one JSON line per step.
"""
from __future__ import annotations

import argparse
import json
import time

from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac
from clusmar_beam.core.hac import sharded
from data import synthetic_embeddings as pool


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 1)


def show(**fields):
    print(json.dumps(fields), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--target", type=float, default=10.0)
    ap.add_argument("--shards", type=int, default=64)
    args = ap.parse_args(argv)
    X, n, target = pool(args.n), args.n, args.target
    ari = adjusted_rand_score

    choice, seconds = timed(lambda: hac.choose_threshold(X, "cosine", target))
    one, one_s = timed(lambda: hac.average_linkage(X, choice.merge_threshold, "cosine",
                                                   target_mean_cluster_size=target))
    at_estimate = n / (n - int((one.heights <= choice.distance_threshold).sum()))
    show(step="sample", seconds=seconds, estimate=choice.distance_threshold, merge_threshold=choice.merge_threshold,
         mean_size_at_estimate=round(at_estimate, 3))
    direct, direct_s = timed(lambda: hac.average_linkage(X, one.distance_threshold, "cosine"))
    show(step="one worker, cut at the target", seconds=one_s, cut=one.distance_threshold,
         merged_up_to=one.merged_up_to, mean_size=n / one.num_clusters,
         straight_at_cut=dict(seconds=direct_s, mean_size=round(n / direct.num_clusters, 3),
                              ari=round(ari(one.labels, direct.labels), 5)))
    (labels, info), sharded_s = timed(lambda: sharded.sharded_average_linkage(
        X, choice.distance_threshold, "cosine", target_mean_cluster_size=target,
        merge_threshold=choice.merge_threshold, shards=args.shards))
    straight = hac.average_linkage(X, info["distance_threshold"], "cosine")
    show(step=f"sharded ({args.shards} partitions), cut at the target", seconds=sharded_s,
         cut=info["distance_threshold"], merged_up_to=info["merged_up_to"], mean_size=n / (labels.max() + 1),
         ari_one_worker_straight_at_this_cut=round(ari(labels, straight.labels), 5),
         one_worker_mean_size_at_this_cut=round(n / straight.num_clusters, 3),
         ari_one_worker_cut=round(ari(labels, one.labels), 5))


if __name__ == "__main__":
    main()

"""The sharded rounds kept partitioned, against exact average linkage, on pools unlike the generator's.

At test size a pool's clusters soon fall to `--hac-one-worker-clusters` and the last round
is exact RAC on one worker; a 100M-example pool's never do, so its rounds stay partitioned
to the end. This holds a small pool in that regime with a small `one_worker_clusters` and
compares `sharded.sharded_average_linkage` (the rounds `clusmar cluster --hac-shards`
runs) with fastcluster's exact average linkage cut at the same threshold, on two shapes:
the generator's heavy-tailed regions (`--region-sizes heavy-tailed`, other seeds and
dimensions) and a near-duplicate flood (`data.flood_embeddings`). Thresholds are quantiles
of the exact merge heights, so every metric is cut as coarsely. One JSON line per run:
ARI, clusters, rounds, members still waiting after the last, and whether the last round
ran on one worker. With --one-worker, also `hac.average_linkage` (the one-worker path) at each
cut; with --stability NOISE, also the exact clustering of the pool with Gaussian noise of
NOISE × mean |x| added, against the exact clustering itself: how far the exact cut moves on
its own, the scale against which an ARI below 1 reads.

    .venv/bin/python benchmarks/bench_sharded_exact.py --n 15000 --shards 16 32 --one-worker-clusters 1500
    .venv/bin/python benchmarks/bench_sharded_exact.py --n 30000 --dim 32 --seeds 21 --flood-seeds 5 \
        --shards 8 64 --one-worker-clusters 262144 --one-worker --stability 0.001
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac
from clusmar_beam.core.hac import sharded
from data import exact_average_linkage, flood_embeddings, synthetic_embeddings, with_noise


def pools(args):
    for seed in args.seeds:
        yield f"heavy-tailed {args.dim}-d seed {seed}", synthetic_embeddings(args.n, args.dim, 10, seed, "heavy-tailed")
    for seed in args.flood_seeds:
        yield f"flood 20-d seed {seed}", flood_embeddings(args.n, 20, seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=15_000)
    parser.add_argument("--dim", type=int, default=24, help="of the heavy-tailed pools")
    parser.add_argument("--seeds", type=int, nargs="*", default=[13, 14, 15], help="heavy-tailed pools")
    parser.add_argument("--flood-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--metrics", nargs="+", default=["cosine", "sqeuclidean"])
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.97],
                        help="of the exact merge heights: the thresholds")
    parser.add_argument("--shards", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--one-worker-clusters", type=int, default=1500)
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--halo-rows", type=int, nargs="+", default=[sharded.HALO_ROWS],
                        help="halo_width's: 0 keeps the halo at two cells")
    parser.add_argument("--delta", type=float, default=hac.DEFAULT_DELTA)
    parser.add_argument("--one-worker", action="store_true", help="also hac.average_linkage at each cut")
    parser.add_argument("--stability", type=float, help="noise scale of the exact-vs-exact comparison")
    args = parser.parse_args()

    from scipy.cluster.hierarchy import fcluster

    for name, X in pools(args):
        for metric in args.metrics:
            tree = exact_average_linkage(X, metric)
            noisy_tree = None
            if args.stability:
                noisy_tree = exact_average_linkage(with_noise(X, args.stability, 1), metric)
            for quantile in args.quantiles:
                eps = float(np.quantile(tree[:, 2], quantile))
                reference = fcluster(tree, eps, "distance")
                row = {"pool": name, "n": args.n, "metric": metric, "quantile": quantile, "eps": round(eps, 6)}
                if noisy_tree is not None:
                    print(json.dumps({**row, "noise": args.stability, "exact_vs_exact_with_noise_ari": round(
                        adjusted_rand_score(reference, fcluster(noisy_tree, eps, "distance")), 5)}), flush=True)
                if args.one_worker:
                    start = time.perf_counter()
                    result = hac.average_linkage(X, eps, metric, delta=args.delta)
                    print(json.dumps({**row, "path": "one worker", "ari": round(
                        adjusted_rand_score(reference, result.labels), 5), "clusters": result.num_clusters,
                        "seconds": round(time.perf_counter() - start, 1)}), flush=True)
                for shards, halo_rows in itertools.product(args.shards, args.halo_rows):
                    start = time.perf_counter()
                    labels, info = sharded.sharded_average_linkage(
                        X, eps, metric, shards=shards, delta=args.delta, max_rounds=args.max_rounds,
                        one_worker_clusters=args.one_worker_clusters, halo_rows=halo_rows)
                    rounds = info["rounds"]
                    print(json.dumps({
                        **row, "path": "sharded", "shards": shards, "halo_rows": halo_rows,
                        "one_worker_clusters": args.one_worker_clusters,
                        "ari": round(adjusted_rand_score(reference, labels), 5),
                        "clusters": int(labels.max()) + 1, "reference_clusters": int(reference.max()),
                        "rounds": len(rounds), "waiting": info["waiting"],
                        "last_on_one_worker": bool(rounds) and rounds[-1]["parts"] == 1,
                        "parts": [r["parts"] for r in rounds],
                        "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()

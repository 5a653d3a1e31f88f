"""Average-linkage HAC on heavy-tailed pools: quality and speed against fastcluster, rounds by pool size.

Usage:
  .venv/bin/python benchmarks/bench_hac_heavy_tailed.py quality [--n 30000] [--dim 64] [--seed 0] [--nprobe 32]
      [--deltas 0 0.05 0.1 0.2] [--cosine-eps 0.15 0.3] [--sqeuclidean-eps 0.3 0.6] [--target 10]
      [--stability 0.001]
  .venv/bin/python benchmarks/bench_hac_heavy_tailed.py scale [--sizes 10000 100000 1000000] [--eps 0.3]
      [--deltas 0.05] [--region-sizes heavy-tailed] [--knn 16]
  .venv/bin/python benchmarks/bench_hac_heavy_tailed.py first-round [--n 1000000]

Data: `clusmar generate-pool --region-sizes heavy-tailed` rows (`data.synthetic_embeddings`, 10 classes): a
few large diffuse regions hold 10-20% of the pool each, the rest a long tail, with
near-duplicate bursts.

- quality: for each metric, fastcluster's exact average linkage of the pool once (its time
  printed), then `hac.average_linkage` for every approximation delta at every threshold and
  at the target mean cluster size; the ARI of each against fastcluster cut at the same
  distance, ours' rounds and time.  One JSON line per run.
- scale: `hac.average_linkage` at each pool size: rounds, time, clusters searched for their
  nearest (round 1's included) and resolved from their kept candidates instead, peak memory
  of the run (the process's peak RSS grows monotonically, so sizes run smallest first, each in
  a new process), largest cluster's share.  One JSON line per size.
- first-round: the first round's IVF index (build) and nearest-cluster search of every point,
  on a lognormal and a heavy-tailed pool of the same size, and how even the lists are
  (largest list, E[size^2] / E[size]^2, and the block search's work per point: the sum over
  lists of their queries times the rows of their probe lists).  One JSON line per pool.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac
from data import exact_average_linkage, synthetic_embeddings, with_noise


def pool(n: int, dim: int, seed: int, region_sizes: str = "heavy-tailed") -> np.ndarray:
    return synthetic_embeddings(n, dim, 10, seed, region_sizes)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def quality(args) -> None:
    from scipy.cluster.hierarchy import fcluster

    X = pool(args.n, args.dim, args.seed)
    hac.average_linkage(X[:2000], 0.1, "cosine")  # warm-up: libraries and thread pools
    for metric, thresholds in (("cosine", args.cosine_eps), ("sqeuclidean", args.sqeuclidean_eps)):
        start = time.perf_counter()
        tree = exact_average_linkage(X, metric)
        reference_seconds = time.perf_counter() - start
        emit({"metric": metric, "n": args.n, "fastcluster_seconds": round(reference_seconds, 2)})
        if args.stability:
            noisy_tree = exact_average_linkage(with_noise(X, args.stability, args.seed + 1), metric)
            for eps in thresholds:
                emit({"metric": metric, "n": args.n, "dim": args.dim, "seed": args.seed, "eps": eps,
                      "noise": args.stability, "exact_vs_exact_with_noise_ari": round(adjusted_rand_score(
                          fcluster(tree, eps, "distance"), fcluster(noisy_tree, eps, "distance")), 5)})
        runs = [(eps, None) for eps in thresholds] + [(thresholds[0], args.target)]
        for delta in args.deltas:
            for eps, target in runs:
                start = time.perf_counter()
                result = hac.average_linkage(X, eps, metric, target_mean_cluster_size=target, delta=delta,
                                             nprobe=args.nprobe)
                seconds = time.perf_counter() - start
                reference = fcluster(tree, result.distance_threshold, "distance")
                emit({"metric": metric, "n": args.n, "dim": args.dim, "seed": args.seed, "nprobe": args.nprobe,
                      "delta": delta,
                      "eps": round(result.distance_threshold, 6), "target": target,
                      "ari": round(adjusted_rand_score(reference, result.labels), 5),
                      "clusters": result.num_clusters, "reference_clusters": int(reference.max()),
                      "rounds": result.rounds, "seconds": round(seconds, 2),
                      "per_query_probing": None if result.probing is None else result.probing["per_query"],
                      "speedup": round(reference_seconds / seconds, 1),
                      "largest_share": round(float(np.bincount(result.labels).max()) / args.n, 4)})


def logged_count(rounds_log: list, field: str) -> int:
    """The sum over the rounds' log lines ("round N: searched X, resolved without search Y, ...") of one count."""
    return sum(int(line.split(f"{field} ")[1].split(",")[0]) for line in rounds_log if line.startswith("round "))


def scale(args) -> None:
    if args.one is not None:
        X = pool(args.one, args.dim, args.seed, args.region_sizes)
        hac.average_linkage(X[:2000], 0.1, "cosine")  # warm-up
        for delta in args.deltas:
            rounds_log = []
            start = time.perf_counter()
            result = hac.average_linkage(X, args.eps, "cosine", delta=delta, k=args.knn, log=rounds_log.append)
            seconds = time.perf_counter() - start
            emit({"n": args.one, "region_sizes": args.region_sizes, "eps": args.eps, "delta": delta, "knn": args.knn,
                  "rounds": result.rounds, "seconds": round(seconds, 1),
                  "searched": logged_count(rounds_log, "searched"),
                  "resolved_without_search": logged_count(rounds_log, "resolved without search"),
                  "clusters": result.num_clusters,
                  "largest_share": round(float(np.bincount(result.labels).max()) / args.one, 4),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
        return
    for n in sorted(args.sizes):
        command = [sys.executable, __file__, "scale", "--one", str(n), "--eps", str(args.eps), "--dim",
                   str(args.dim), "--seed", str(args.seed), "--region-sizes", args.region_sizes, "--knn", str(args.knn),
                   "--deltas", *map(str, args.deltas)]
        subprocess.run(command, check=True)


def first_round(args) -> None:
    for region_sizes in ("lognormal", "heavy-tailed"):
        X = hac.prepare(pool(args.n, args.dim, args.seed, region_sizes), "cosine")
        rac = hac.Rac(X, np.ones(args.n), "cosine", 0.3, exact_search_max=hac.EXACT_SEARCH_MAX, nlist=None,
                      nprobe=32, seed=args.seed, log=None, t0=time.perf_counter(), k=hac.DEFAULT_K)
        start = time.perf_counter()
        rac._build_index(np.arange(args.n))
        build = time.perf_counter() - start
        start = time.perf_counter()
        rac._search(np.arange(args.n))
        search = time.perf_counter() - start
        index = rac.index.index
        sizes = np.array([index.invlists.list_size(lst) for lst in range(index.nlist)], np.float64)
        emit({"n": args.n, "region_sizes": region_sizes, "lists": int(sizes.size), "largest_list": int(sizes.max()),
              "size_square_ratio": round(float((sizes ** 2).mean() / sizes.mean() ** 2), 2),
              "block_work_per_point": round(float((sizes * sizes[rac.index.probe].sum(axis=1)).sum() / args.n)),
              "build_seconds": round(build, 1), "search_seconds": round(search, 1)})
        del X, rac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--n", type=int, default=30_000)
    q.add_argument("--cosine-eps", type=float, nargs="+", default=[0.15, 0.3])
    q.add_argument("--sqeuclidean-eps", type=float, nargs="+", default=[0.3, 0.6])
    q.add_argument("--target", type=float, default=10.0)
    q.add_argument("--nprobe", type=int, default=32, help="IVF lists probed (hac.average_linkage's nprobe)")
    q.add_argument("--stability", type=float, default=0.0,
                   help="also cluster exactly with noise of this relative scale and report the ARI (0: skip)")
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    s.add_argument("--eps", type=float, default=0.3)
    s.add_argument("--region-sizes", default="heavy-tailed")
    s.add_argument("--knn", type=int, default=hac.DEFAULT_K, help="candidates kept per cluster (hac.average_linkage's k)")
    s.add_argument("--one", type=int, help=argparse.SUPPRESS)
    f = sub.add_parser("first-round")
    f.add_argument("--n", type=int, default=1_000_000)
    for p in (q, s, f):
        p.add_argument("--dim", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--deltas", type=float, nargs="+",
                       default=[0.0, 0.05, 0.1, 0.2] if p is q else [hac.DEFAULT_DELTA])
    args = ap.parse_args()
    {"quality": quality, "scale": scale, "first-round": first_round}[args.mode](args)


if __name__ == "__main__":
    main()

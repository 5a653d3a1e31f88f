"""How close the sharded clustering comes to one worker, against how close one worker comes to itself.

The one-worker HAC searches nearest clusters with IVF above a few thousand active
clusters, and its seed picks the IVF training sample; on pools with huge diffuse
regions that alone moves the members at those regions' edges. This prints the pairwise
ARI of: one worker at seed 0 and at seed 1, the sharded rounds (S = n / 15,625), and
(with --exact) one worker with exact search, which no seed changes. In process, the same
calls `clusmar cluster` makes. With --fastcluster, fastcluster's exact average linkage is
cut at the same threshold and every run's ARI against it printed too (its distance matrix
is 8 n^2 / 2 bytes, and the run peaks at about twice that: 50K is the most a 24 GB host takes).

    .venv/bin/python benchmarks/bench_sharded_agreement.py --n 250000 --region-sizes heavy-tailed --exact
    .venv/bin/python benchmarks/bench_sharded_agreement.py --n 50000 --region-sizes heavy-tailed --exact --fastcluster
"""
import argparse
import itertools
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import hac, synthetic
from clusmar_beam.core.hac import sharded
from data import exact_average_linkage


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--region-sizes", default="heavy-tailed")
    parser.add_argument("--distance-threshold", type=float, help="default 0.3 heavy-tailed, 0.15 lognormal")
    parser.add_argument("--delta", type=float, default=hac.DEFAULT_DELTA)
    parser.add_argument("--exact", action="store_true", help="also one worker with exact search (slow)")
    parser.add_argument("--fastcluster", action="store_true", help="also fastcluster's exact cut (n^2 memory)")
    args = parser.parse_args()
    eps = args.distance_threshold or (0.3 if args.region_sizes == "heavy-tailed" else 0.15)
    plan = synthetic.make_plan(args.n, args.dim, 100, 0, region_sizes=args.region_sizes)
    X = np.asarray(synthetic.generate_rows(plan, 0, args.n)["embedding"], np.float32)
    shards = max(2, round(args.n / 15_625))
    runs = {
        "one worker, seed 0": lambda: hac.average_linkage(X, eps, "cosine", delta=args.delta, seed=0).labels,
        "one worker, seed 1": lambda: hac.average_linkage(X, eps, "cosine", delta=args.delta, seed=1).labels,
        f"sharded, S {shards}": lambda: sharded.sharded_average_linkage(X, eps, "cosine", shards=shards,
                                                                        delta=args.delta)[0],
    }
    if args.exact:
        runs["one worker, exact search"] = lambda: hac.average_linkage(
            X, eps, "cosine", delta=args.delta, exact_search_max=args.n + 1).labels
    if args.fastcluster:
        runs["fastcluster (exact)"] = lambda: _fastcluster_cut(X, eps)
    labels = {}
    for name, run in runs.items():
        start = time.perf_counter()
        labels[name] = np.asarray(run())
        print(f"{name}: {labels[name].max() + 1:,} clusters in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\n{args.n:,} x {args.dim}-d {args.region_sizes}, cosine eps {eps}, delta {args.delta}: ARI")
    for a, b in itertools.combinations(labels, 2):
        print(f"  {a:26s} vs {b:26s} {adjusted_rand_score(labels[a], labels[b]):.5f}")


def _fastcluster_cut(X, eps):
    from scipy.cluster.hierarchy import fcluster
    return fcluster(exact_average_linkage(X, "cosine"), eps, "distance") - 1


if __name__ == "__main__":
    main()

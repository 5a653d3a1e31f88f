"""`clusmar cluster` on pool shapes the generator does not make, one worker and sharded, against fastcluster.

Each shape is written as Parquet part files the way other writers leave them (unequal parts, an
empty part, text or sparse int64 ids, rows in no order) and clustered through the CLI, with and
without `--hac-shards`; the ARI is against fastcluster's exact average linkage cut at the run's
threshold. The shapes:

- `flood`: 32-d, Pareto-sized regions plus 40% near-duplicates of five rows and 15% exact
  duplicates, text ids (cosine);
- `offset`: 5-d regions far from the origin (every value near 1,000; squared Euclidean);
- `packed`: 16-d, every value positive (ReLU-like), so all cosines are near 1 and the cut is
  in the thousandths (cosine);
- `wide`: 300-d regions of very different spreads (cosine);
- `line`: 1-d squared Euclidean; `tiny`: 100 rows in 64 partitions;
- `dominant`: 128-d, 40% of the rows in one low-rank region, 20% in floods of near-duplicates, the
  rest in Pareto-sized regions of tenfold different spreads, most far from every other (cosine; at
  the coarse cut a small region's nearest cluster can lie in any IVF list).

With `--stability NOISE` each cut is also compared with the exact cut of the pool plus Gaussian
noise of NOISE x its mean |x| (|x - mean| for squared Euclidean), `exact_vs_exact_with_noise_ari`:
how far the exact clustering moves on its own, the scale the approximate cuts' ARI reads against.

    .venv/bin/python benchmarks/bench_pool_shapes.py [--shapes flood offset ...] [--approximation D] [--stability NOISE] [--work DIR]
"""
import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import adjusted_rand_score

from data import CLI, ROOT, cluster_labels, exact_average_linkage, timed_command, with_noise


def _regions(rng, n, dim, regions, spread, alpha=1.2):
    """Pareto-sized Gaussian regions, each point with its own noise scale."""
    weights = rng.pareto(alpha, regions) + 1.0
    region = np.repeat(np.arange(regions), rng.multinomial(n, weights / weights.sum()))
    scale = spread * rng.lognormal(0.0, 0.6, n) / np.sqrt(dim)
    return rng.normal(size=(regions, dim))[region] + rng.normal(size=(n, dim)) * scale[:, None]


def _flood(rng):
    base = _regions(rng, 9000, 32, 40, 0.5)
    anchors = rng.normal(size=(5, 32))[rng.integers(0, 5, 8000)]
    near = anchors * (1 + 1e-3 * rng.normal(size=(8000, 1))) + 1e-3 * rng.normal(size=(8000, 32))
    X = np.concatenate([base, near, base[rng.integers(0, 9000, 3000)]])
    ids = np.array([f"page-{i:06d}-{rng.integers(1 << 30):x}".encode() for i in range(len(X))], dtype=object)
    return X, ids


def _dominant(rng, n=20000, dim=128):
    n1, n2 = int(0.4 * n), int(0.2 * n)
    centre = rng.normal(size=dim)
    basis = rng.normal(size=(8, dim)) * np.linspace(0.6, 0.05, 8)[:, None]
    dominant = (centre / np.linalg.norm(centre) + rng.normal(size=(n1, 8)) @ basis * 3 / np.sqrt(dim)
                + rng.normal(scale=0.02, size=(n1, dim)))

    def pareto_sizes(total, shape, step, cap):
        sizes = np.minimum((rng.pareto(shape, size=total) + 1).astype(int) * step, cap)
        sizes = sizes[np.cumsum(sizes) <= total]
        sizes = np.append(sizes, total - sizes.sum())
        return sizes[sizes > 0]

    sizes = pareto_sizes(n2, 1.1, 3, n2 // 10)
    floods = (np.repeat(rng.normal(size=(sizes.size, dim)), sizes, axis=0)
              + rng.normal(scale=1e-3, size=(n2, dim)) * rng.choice([0, 1], size=(n2, 1), p=[0.3, 0.7]))
    n3 = n - n1 - n2
    sizes = pareto_sizes(n3, 1.3, 5, n3)
    spread = np.exp(rng.uniform(np.log(0.03), np.log(0.3), size=sizes.size))
    tail = (np.repeat(rng.normal(size=(sizes.size, dim)), sizes, axis=0)
            + rng.normal(size=(n3, dim)) * np.repeat(spread, sizes)[:, None])
    return np.concatenate([dominant, floods, tail])[rng.permutation(n)], None


SHAPES = {
    # name: (rows and ids, metric, thresholds, shards)
    "flood": (_flood, "cosine", [0.2, 0.05], 6),
    "offset": (lambda rng: (_regions(rng, 15000, 5, 60, 0.4, 1.0) * 3 + 1000.0, None), "sqeuclidean", [0.5, 2.0], 6),
    "packed": (lambda rng: (np.maximum(_regions(rng, 20000, 16, 50, 0.6) + 2.0, 0) + 0.01, None), "cosine",
               [0.002, 0.008], 8),
    "wide": (lambda rng: (_regions(rng, 8000, 300, 30, 0.9, 1.5), None), "cosine", [0.5], 4),
    "line": (lambda rng: (_regions(rng, 5000, 1, 20, 0.3, 1.0) * 10, None), "sqeuclidean", [0.5], 4),
    "tiny": (lambda rng: (_regions(rng, 100, 8, 5, 0.5), None), "cosine", [0.3], 64),
    "dominant": (_dominant, "cosine", [0.15, 0.75], 4),  # last: the shapes before keep their seeds
}


def write_pool(directory, X, ids):
    """Unequal part files, one of them empty, rows in no order."""
    os.makedirs(directory)
    n = len(X)
    cuts = [0, 0, n // 2, n // 2 + n // 20, n]
    for part, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        id_array = pa.array(list(ids[start:stop]), pa.binary()) if ids.dtype == object else pa.array(ids[start:stop])
        embedding = pa.array(list(X[start:stop]), pa.list_(pa.float32()))
        pq.write_table(pa.table({"id": id_array, "embedding": embedding}),
                       os.path.join(directory, f"part-{part:05d}.parquet"))


def _exact_tree(X, metric):
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return exact_average_linkage(X, metric)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--work", default=os.path.join(ROOT, "benchmarks", "work", "shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--approximation", type=float, help="clusmar cluster's --approximation (default: its own)")
    parser.add_argument("--stability", type=float, default=0.0,
                        help="also cut fastcluster on the pool plus this much relative noise (0: do not)")
    args = parser.parse_args()
    for name in args.shapes:
        make, metric, thresholds, shards = SHAPES[name]
        rng = np.random.default_rng([args.seed, list(SHAPES).index(name)])
        X, ids = make(rng)
        X = X.astype(np.float32)
        if ids is None:
            ids = rng.permutation(len(X)).astype(np.int64) * 7919 + (1 << 40)   # sparse, unordered
        order = rng.permutation(len(X))
        X, ids = X[order], ids[order]
        pool = os.path.join(args.work, name, "pool")
        shutil.rmtree(os.path.join(args.work, name), ignore_errors=True)
        write_pool(pool, X, ids)
        Z = _exact_tree(np.asarray(X, np.float64), metric)
        # Noise in proportion to the pool's spread: about the origin for cosine (an angle), about the mean
        # for squared Euclidean (which a shift does not change).
        spread = X - X.mean(axis=0) if metric == "sqeuclidean" else X
        noisy = _exact_tree(with_noise(spread, args.stability, args.seed + 1), metric) if args.stability else None
        by_id = np.argsort(ids, kind="stable")
        for eps in thresholds:
            reference = fcluster(Z, eps, criterion="distance")[by_id]
            if noisy is not None:
                print(json.dumps({"shape": name, "n": len(X), "dim": X.shape[1], "metric": metric, "eps": eps,
                                  "noise": args.stability, "exact_vs_exact_with_noise_ari": round(adjusted_rand_score(
                                      reference, fcluster(noisy, eps, criterion="distance")[by_id]), 5)}), flush=True)
            for shard_flag in ("1", str(shards)):
                out = os.path.join(args.work, name, f"out-{eps}-{shard_flag}")
                seconds, rss = timed_command([*CLI, "cluster", "--pool", os.path.join(pool, "*.parquet"),
                                             "--output", out, "--metric", metric, "--distance-threshold", str(eps),
                                             "--hac-shards", shard_flag,
                                             *([] if args.approximation is None else
                                               ["--approximation", str(args.approximation)])])
                got_ids, labels = cluster_labels(out)
                assert len(got_ids) == len(ids)
                info = json.load(open(os.path.join(out, "clustering.json")))
                print(json.dumps({"shape": name, "n": len(X), "dim": X.shape[1], "metric": metric, "eps": eps,
                                  "hac_shards": int(shard_flag),
                                  "approximation": info["parameters"]["approximation"], "ari": round(adjusted_rand_score(reference, labels), 5),
                                  "clusters": int(labels.max()) + 1, "exact_clusters": int(reference.max()),
                                  "nprobe": (info.get("ivf_probing") or {}).get("nprobe"),
                                  "seconds": seconds, "peak_rss_gib": rss}), flush=True)


if __name__ == "__main__":
    main()

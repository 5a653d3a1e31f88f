"""`clusmar cluster`: average-linkage HAC of the pool's embeddings, cut at a distance.

The pool is read in columnar batches and checked in parallel; the clustering
itself currently runs on one worker (clusmar_beam.hac: exact linkage from
cluster statistics, nearest clusters by FAISS), and the assignments are written
back out in parallel shards, then clustering.json last.
"""
from __future__ import annotations

import logging
import math
import sys
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa

from clusmar_beam import hac, io, runner
from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")
ROWS_PER_CLUSTER_SHARD = 1_000_000


class ClusterOptions(runner.CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--distance-threshold", dest="distance_threshold", type=float,
                            help="cut the average-linkage tree at this distance (epsilon)")
        parser.add_argument("--metric", default="cosine", help="cosine (1 - cosine similarity) | sqeuclidean")
        parser.add_argument("--knn", type=int, default=hac.DEFAULT_K,
                            help="neighbours fetched per nearest-cluster search (self included), re-ranked by "
                                 "exact linkage")
        parser.add_argument("--exact-search-max", dest="exact_search_max", type=int, default=50_000,
                            help="exact (flat) FAISS search up to this many active clusters, IVF above")
        parser.add_argument("--nprobe", type=int, default=32, help="IVF cells probed per search")
        parser.add_argument("--num-shards", dest="num_shards", type=int,
                            help=f"output files (default: one per {ROWS_PER_CLUSTER_SHARD} rows)")


def size_histogram(labels: np.ndarray) -> dict:
    """Cluster counts by size bucket: 1, 2-3, 4-7, ... (powers of two)."""
    sizes = np.bincount(labels)
    buckets = np.floor(np.log2(sizes)).astype(int)
    histogram = {}
    for b in range(int(buckets.max()) + 1 if len(sizes) else 0):
        count = int(np.count_nonzero(buckets == b))
        if count:
            low, high = 2 ** b, 2 ** (b + 1) - 1
            histogram[str(low) if low == high else f"{low}-{high}"] = count
    return histogram


def _validated(batch: io.Batch) -> io.Batch:
    io.check_finite(batch, ("embedding",))
    return batch


def cluster_pool(batches, opts_dict: dict, pool_glob: str) -> dict:
    """All batches -> id-sorted ids, labels and clustering statistics (one worker)."""
    widths = {}
    for batch in batches:
        widths.setdefault(batch.columns["embedding"].shape[1], batch.source)
    if len(widths) > 1:
        detail = "; ".join(f"{width} in {source}" for width, source in sorted(widths.items()))
        raise InputError(f"--pool: column 'embedding' has different lengths across files: {detail}")
    pool = io.concat_batches(batches)
    if pool is None:
        raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows)")
    count, examples = io.find_duplicates(pool.ids)
    if count:
        raise InputError(f"--pool {pool_glob!r}: column 'id' has {count} duplicated ids (e.g. {examples})")
    order = np.argsort(pool.ids, kind="stable")   # a fixed row order makes the clustering deterministic
    ids = pool.ids[order]
    embeddings = pool.columns["embedding"][order]
    start = time.time()
    try:
        result = hac.average_linkage(
            embeddings, opts_dict["distance_threshold"], opts_dict["metric"], k=opts_dict["knn"],
            exact_search_max=opts_dict["exact_search_max"], nprobe=opts_dict["nprobe"], seed=opts_dict["seed"],
            log=LOG.info)
    except hac.HacError as exc:
        raise InputError(f"--pool {pool_glob!r}: {exc}") from exc
    elapsed = time.time() - start
    beam.metrics.Metrics.counter("cluster", "points").inc(len(ids))
    beam.metrics.Metrics.counter("cluster", "clusters").inc(result.num_clusters)
    beam.metrics.Metrics.counter("cluster", "merges").inc(result.merges)
    LOG.info("cluster: %d points -> %d clusters in %d rounds (%.1f s)", len(ids), result.num_clusters,
             result.rounds, elapsed)
    return {"ids": ids, "labels": result.labels, "id_type": pool.id_type, "rounds": result.rounds,
            "merges": result.merges, "merges_per_round": list(result.merges_per_round), "hac_seconds": elapsed,
            "dim": embeddings.shape[1]}


def _shards(result: dict, num_shards: int | None):
    n = len(result["ids"])
    count = num_shards or max(1, math.ceil(n / ROWS_PER_CLUSTER_SHARD))
    bounds = np.linspace(0, n, count + 1).astype(np.int64)
    for index in range(count):
        part = slice(bounds[index], bounds[index + 1])
        yield index, count, (result["ids"][part], result["labels"][part], result["id_type"])


def _write_clusters_shard(path: str, payload) -> None:
    ids, labels, id_type = payload
    io.write_parquet(path, pa.table({"id": io.ids_to_arrow(ids, id_type),
                                     "cluster_id": pa.array(labels, type=pa.int64())}))


def run(argv=None) -> dict:
    options, opts = runner.parse_options(ClusterOptions, argv)
    pool_glob = runner.require(opts.pool, "--pool")
    output_dir = runner.require(opts.output, "--output")
    eps = runner.require(opts.distance_threshold, "--distance-threshold")
    if not (math.isfinite(eps) and eps > 0):
        raise InputError(f"--distance-threshold must be a positive number (got {eps})")
    if opts.metric not in ("cosine", "sqeuclidean"):
        raise InputError(f"--metric {opts.metric!r}: choose cosine or sqeuclidean")
    if opts.knn < 2:
        raise InputError(f"--knn must be at least 2 (got {opts.knn})")
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num-shards must be positive (got {opts.num_shards})")
    reader = io.ReadTable(pool_glob, required=["id", "embedding"], flag="--pool")
    output = io.OutputDir(output_dir, "clusters", "clustering.json", None, opts.overwrite)
    params = {"distance_threshold": eps, "metric": opts.metric, "knn": opts.knn,
              "exact_search_max": opts.exact_search_max, "nprobe": opts.nprobe, "seed": opts.seed}

    def summary(names, result):
        labels = result["labels"]
        sizes = np.bincount(labels)
        return {"parameters": {**params, "linkage": "average"}, "pool": pool_glob,
                "num_points": int(len(labels)), "num_clusters": int(len(sizes)),
                "mean_cluster_size": float(len(labels) / max(len(sizes), 1)),
                "largest_cluster": int(sizes.max()) if len(sizes) else 0,
                "singletons": int(np.count_nonzero(sizes == 1)),
                "cluster_size_histogram": size_histogram(labels), "dim": result["dim"],
                "rounds": result["rounds"], "merges": result["merges"],
                "merges_per_round": result["merges_per_round"], "files": names}

    start = time.time()
    pipeline = runner.make_pipeline(options)
    result = (pipeline
              | reader
              | "Check" >> beam.Map(_validated)
              | "Gather" >> beam.combiners.ToList()
              | "Cluster" >> beam.Map(cluster_pool, params, pool_glob))
    _ = (result
         | "Shards" >> beam.FlatMap(_shards, opts.num_shards)
         | "Write" >> io.WriteShards(output, ".parquet", _write_clusters_shard, summary, result))
    try:
        runner.run_pipeline(pipeline, "cluster")
    finally:
        output.remove_temp()
    info = io.read_json(output.join("clustering.json"))
    LOG.info("cluster: %d points, %d clusters (mean size %.1f) in %.1f s -> %s", info["num_points"],
             info["num_clusters"], info["mean_cluster_size"], time.time() - start, output.path)
    return info


if __name__ == "__main__":
    from clusmar_beam.cli import main
    sys.exit(main(["cluster"] + sys.argv[1:]))

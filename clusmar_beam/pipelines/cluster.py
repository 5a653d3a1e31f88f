"""`clusmar cluster`: average-linkage HAC of the pool's embeddings, cut at a distance.

The pool is read in columnar batches and checked in parallel.  With
`--hac-shards 1` (the default) the clustering runs on one worker
(clusmar_beam.core.hac: exact linkage from cluster statistics, nearest clusters by
FAISS, reciprocal pairs plus (1+delta)-good stars with `--approximation`).
With `--hac-shards S > 1` nothing gathers the pool: the rows are numbered in id
order by ranges of ids (clusmar_beam.transforms.ranks) and the HAC runs as Beam rounds
(clusmar_beam.transforms.sharded_hac: partitions of about n / S clusters by coarse cell,
merges inside each with the neighbouring cells' clusters visible but frozen,
as many rounds as merges are left across borders); each point's cluster is
found by joins keyed by row range, and every output file is written from its
own keyed shard.  `--target-mean-cluster-size M` estimates
how far to merge on a sample of whole k-means cells plus their border
(hac.choose_threshold on the one worker; with --hac-shards, the same steps as
Beam transforms, sharded_hac.ThresholdFromTarget), then cuts the pool's own
merges where the mean size reaches M and reports that cut in clustering.json.
The assignments are written back out in parallel shards, then clustering.json
last.
"""
from __future__ import annotations

import logging
import math

import apache_beam as beam

from clusmar_beam.core import hac
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.hac import sharded
from clusmar_beam.core.hac.index import WIDEN_ROWS_MAX
from clusmar_beam.core.hac.rac import DEEP_STAR_LEAVES, SMALL_STAR_SLACK
from clusmar_beam.pipelines.options import CommonOptions, build_and_run, require
from clusmar_beam.transforms import element_sizes, memory, storage
from clusmar_beam.transforms.cluster import (ROWS_PER_CLUSTER_SHARD, ClusterOnOneWorker, ClusterSharded,
                                             write_clusters_shard)

LOG = logging.getLogger("clusmar")
# `--hac-shards auto`: one worker while its modelled peak (transforms.memory; deploy/README.md, "Sizing the
# cluster step") is at most this ...
AUTO_ONE_WORKER_BYTES = 9 * memory.GiB
# ... and above, sharded with a partition per this many bytes of float32 embeddings.
AUTO_EMBEDDING_BYTES_PER_SHARD = 64 << 20


def _shards_flag(value: str):
    """--hac-shards: a number of partitions, or auto."""
    return value if value == "auto" else int(value)


def auto_shards(num_points: int, dim: int) -> int:
    """`--hac-shards auto`: 1 (one worker) for a pool whose one-worker HAC is modelled within
    AUTO_ONE_WORKER_BYTES, else a partition per AUTO_EMBEDDING_BYTES_PER_SHARD of its embeddings."""
    if memory.one_worker_hac_bytes(num_points, dim) <= AUTO_ONE_WORKER_BYTES:
        return 1
    return max(2, math.ceil(num_points * dim * 4 / AUTO_EMBEDDING_BYTES_PER_SHARD))


class ClusterOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--distance-threshold", dest="distance_threshold", type=float,
                            help="cut the average-linkage tree at this distance (epsilon)")
        parser.add_argument("--target-mean-cluster-size", dest="target_mean_cluster_size", type=float,
                            help="instead of --distance-threshold: cut where clusters average this many "
                                 "examples (a sample of whole k-means cells estimates how far to merge; the "
                                 "pool's own merges are then cut at the target); the epsilon of the cut is "
                                 "reported in clustering.json")
        parser.add_argument("--threshold-sample-size", dest="threshold_sample_size", type=int, default=10_000,
                            help="points (whole cells) in the sample that picks epsilon for "
                                 "--target-mean-cluster-size")
        parser.add_argument("--metric", default="cosine", help="cosine (1 - cosine similarity) | sqeuclidean")
        parser.add_argument("--knn", type=int, default=hac.DEFAULT_K,
                            help="one worker: neighbours fetched per nearest-cluster search (self included), "
                                 "re-ranked by exact linkage and kept for the next rounds")
        parser.add_argument("--exact-search-max", dest="exact_search_max", type=int, default=hac.EXACT_SEARCH_MAX,
                            help="one worker: exact (flat) FAISS search up to this many active clusters, IVF above")
        parser.add_argument("--nprobe", type=int, default=32,
                            help="one worker: IVF cells probed per search (a sharded partition probes "
                                 f"{sharded.PARTITION_NPROBE} of half as many lists); doubled while a sample's "
                                 "nearest neighbours are missed and a search stays within "
                                 f"{WIDEN_ROWS_MAX} rows")
        parser.add_argument("--approximation", type=float, default=hac.DEFAULT_DELTA,
                            help="delta >= 0: a merge round also lets each merging pair absorb the clusters "
                                 "whose nearest it was while each merge's exact linkage is within (1 + delta) of "
                                 "the lowest either side could have ((1+delta)-good merges, as in TeraHAC; "
                                 f"a pair fewer than {DEEP_STAR_LEAVES} clusters point at takes "
                                 f"{SMALL_STAR_SLACK:g} of delta); bounds the rounds dense regions take; 0 is exact "
                                 "average linkage")
        parser.add_argument("--warn-largest-share", dest="warn_largest_share", type=float, default=0.05,
                            help="warn (log and clustering.json) when one cluster holds more than this share of "
                                 "the pool: a sign that the threshold is too large for this data")
        parser.add_argument("--hac-shards", dest="hac_shards", type=_shards_flag, default=1,
                            help="partitions of the first sharded HAC round (1: the whole HAC on one worker; "
                                 ">1: merges inside partitions of about n / S clusters on many workers, round "
                                 "after round, with nothing gathered on one worker; auto: one worker while its memory, "
                                 f"modelled from the points and dimension, is at most "
                                 f"{AUTO_ONE_WORKER_BYTES / memory.GiB:g} GiB, else one partition per "
                                 f"{AUTO_EMBEDDING_BYTES_PER_SHARD >> 20} MiB of float32 embeddings)")
        parser.add_argument("--hac-halo-cells", dest="hac_halo_cells", type=int, default=2,
                            help="sharded HAC: a cluster is also visible (frozen) in the partitions of its "
                                 "next nearest cells, at least this many (more where partitions are small: as "
                                 f"many as keep a partition with its halo at about {sharded.HALO_ROWS} clusters and "
                                 f"a round's copies of clusters at most {sharded.HALO_ROUTED_MAX:,}, up to "
                                 f"{sharded.HALO_CELLS_MAX})")
        parser.add_argument("--hac-one-worker-clusters", dest="hac_one_worker_clusters", type=int,
                            default=sharded.FINISH_ON_ONE_WORKER,
                            help="sharded HAC: once at most this many clusters are left (or take part in a "
                                 "round that repeats the threshold), the round runs on one worker, which holds "
                                 "about this many x (8 dim + 24) bytes of cluster statistics")
        parser.add_argument("--max-rounds", dest="max_rounds", type=int,
                            help="sharded HAC: at most this many rounds (they stop earlier once no merge is left "
                                 f"across a partition border; default {sharded.DEFAULT_MAX_ROUNDS}, or 2 for a "
                                 "Parquet pool small enough for the second round to finish on one worker)")
        parser.add_argument("--num-shards", dest="num_shards", type=int,
                            help=f"output files (default: one per {ROWS_PER_CLUSTER_SHARD} rows)")


# A partition that sees fewer points than this with its halo is warned about: it sees the clusters across its
# borders only in its halo, and where that is this small the ones it misses move the clusters
# (benchmarks/RESULTS.md, "Real labelled sets").  The halo widens for small partitions
# (core.hac.sharded.halo_width), so only partitions far smaller than the pool's are.
SMALL_PARTITION = 1000


def _partition_warnings(num_points: int, shards: int, halo_cells: int) -> list[str]:
    size = math.ceil(num_points / max(shards, 1))
    parts = math.ceil(num_points / max(size, 1))
    halo = sharded.halo_width({"parts": parts, "clusters": num_points}, halo_cells)
    if parts > 1 and halo < parts - 1 and (1 + halo) * size < SMALL_PARTITION:
        return [f"--hac-shards {shards} on {num_points} points makes partitions of about {size} points that see "
                f"{halo} cells past their borders, {(1 + halo) * size} points in all: with fewer than "
                f"{SMALL_PARTITION} they miss nearest neighbours across the borders often enough to move the "
                "clusters away from exact average linkage; use fewer shards, --hac-shards auto or --hac-shards 1"]
    return []


def _warnings(largest: int, n: int, share: float) -> list[str]:
    """Warnings about the clusters for clustering.json (run logs them where the user sees them)."""
    if n and largest > share * n:
        return [f"the largest cluster holds {largest} of {n} points ({largest / n:.1%}, more than "
                f"--warn-largest-share {share:g}): the distance threshold may be too large for this data; "
                "Cluster-Margin picks at most one example per cluster per pass"]
    return []


def _check(opts) -> None:
    """Every flag's range, before anything is read."""
    require(opts.pool, "--pool")
    require(opts.output, "--output")
    eps, target = opts.distance_threshold, opts.target_mean_cluster_size
    if (eps is None) == (target is None):
        raise InputError("give exactly one of --distance-threshold EPS and --target-mean-cluster-size M")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise InputError(f"--distance-threshold must be a positive number (got {eps})")
    if target is not None and not (math.isfinite(target) and target >= 1):
        raise InputError(f"--target-mean-cluster-size must be a number >= 1 (got {target})")
    if opts.threshold_sample_size < 2:
        raise InputError(f"--threshold-sample-size must be at least 2 (got {opts.threshold_sample_size})")
    if opts.metric not in hac.METRICS:
        raise InputError(f"--metric {opts.metric!r}: choose {' or '.join(hac.METRICS)}")
    if opts.knn < 2:
        raise InputError(f"--knn must be at least 2 (got {opts.knn})")
    if opts.hac_shards != "auto" and opts.hac_shards < 1:
        raise InputError(f"--hac-shards must be at least 1 or auto (got {opts.hac_shards})")
    if opts.hac_halo_cells < 0:
        raise InputError(f"--hac-halo-cells must be >= 0 (got {opts.hac_halo_cells})")
    if opts.hac_one_worker_clusters < 1:
        raise InputError(f"--hac-one-worker-clusters must be at least 1 (got {opts.hac_one_worker_clusters})")
    if opts.max_rounds is not None and opts.max_rounds < 1:
        raise InputError(f"--max-rounds must be >= 1 (got {opts.max_rounds})")
    if not (math.isfinite(opts.approximation) and opts.approximation >= 0):
        raise InputError(f"--approximation must be a number >= 0 (got {opts.approximation})")
    if not (0 < opts.warn_largest_share <= 1):
        raise InputError(f"--warn-largest-share must be in (0, 1] (got {opts.warn_largest_share})")
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num-shards must be positive (got {opts.num_shards})")


def build(pipeline: beam.Pipeline, opts: ClusterOptions) -> storage.OutputDir:
    """The cluster step on `pipeline`: read the pool, cluster on one worker or sharded, write the files and
    clustering.json last.  Returns the output directory (its temporary files are the caller's to remove)."""
    _check(opts)
    pool_glob, eps, target = opts.pool, opts.distance_threshold, opts.target_mean_cluster_size
    reader = storage.ReadTable(pool_glob, required=["id", "embedding"], flag="--pool")
    shards_flag = opts.hac_shards
    # From the Parquet footers: the --hac-shards auto choice, the rounds built, the one-worker step's memory hint.
    pool_rows, embedding_bytes, dim = storage.footprint(reader.files, reader.format, "embedding")
    # TFRecord files are not counted: at most their bytes over a row's float32 embedding.
    num_points = pool_rows if pool_rows is not None else embedding_bytes // (4 * max(dim, 1))
    if shards_flag == "auto":
        opts.hac_shards = auto_shards(num_points, dim)
        LOG.info("cluster: --hac-shards auto: %d points x %d dimensions, one worker modelled at %.1f GiB -> %s",
                 num_points, dim, memory.one_worker_hac_bytes(num_points, dim) / memory.GiB,
                 "one worker" if opts.hac_shards == 1 else f"{opts.hac_shards} partitions")
    output = storage.OutputDir(opts.output, "clusters", "clustering.json", None, opts.overwrite)
    params = {"distance_threshold": eps, "target_mean_cluster_size": target,
              "threshold_sample_size": opts.threshold_sample_size, "metric": opts.metric, "knn": opts.knn,
              "exact_search_max": opts.exact_search_max, "nprobe": opts.nprobe, "seed": opts.seed,
              "approximation": opts.approximation, "hac_shards": opts.hac_shards}
    if shards_flag == "auto":
        params["hac_shards_flag"] = "auto"
    partition_warnings = _partition_warnings(num_points, opts.hac_shards, opts.hac_halo_cells)  # run logs them

    def summary(names, result):
        chosen = {"distance_threshold": result.get("distance_threshold", eps)}
        if result.get("threshold_choice") is not None:
            chosen["threshold_choice"] = result["threshold_choice"]
        n, largest = result["num_points"], result["largest_cluster"]
        info = {"parameters": {**params, **chosen, "linkage": "average"}, "pool": pool_glob,
                "num_points": n, "num_clusters": result["num_clusters"],
                "mean_cluster_size": float(n / max(result["num_clusters"], 1)),
                "largest_cluster": largest, "largest_cluster_share": largest / max(n, 1),
                "warnings": _warnings(largest, n, opts.warn_largest_share) + partition_warnings,
                "singletons": result["singletons"],
                "singleton_share_of_points": result["singletons"] / max(n, 1),
                "singleton_share_of_clusters": result["singletons"] / max(result["num_clusters"], 1),
                "cluster_size_histogram": result["cluster_size_histogram"], "dim": result["dim"],
                "rounds": result["rounds"], "merges": result["merges"],
                "merges_per_round": result["merges_per_round"], "ivf_probing": result.get("ivf_probing"),
                "files": names}
        if "sharded_rounds" in result:
            info["sharded_rounds"] = result["sharded_rounds"]
            info["waiting"] = result["waiting"]
            if result["waiting"]:
                info["warnings"].append(
                    f"{result['waiting']} clusters still had a neighbour within the threshold across a partition "
                    f"border after --max-rounds {opts.max_rounds} sharded rounds: raise --max-rounds, or lower "
                    "--hac-shards")
        return info

    if opts.hac_shards > 1:
        if opts.max_rounds is None:
            # Each round is a fixed part of the pipeline, run even when nothing is left to merge; a pool of at
            # most --hac-one-worker-clusters points needs two (the second finishes on one worker).
            small = pool_rows is not None and pool_rows <= opts.hac_one_worker_clusters
            opts.max_rounds = 2 if small else sharded.DEFAULT_MAX_ROUNDS
        params.update(hac_halo_cells=opts.hac_halo_cells, max_rounds=opts.max_rounds,
                      hac_one_worker_clusters=opts.hac_one_worker_clusters)
        clustered = pipeline | reader | "Cluster" >> ClusterSharded(
            pool_glob, eps, target, opts.metric, opts.hac_shards, opts.hac_halo_cells, opts.max_rounds, opts.seed,
            opts.approximation, opts.threshold_sample_size, opts.num_shards, opts.hac_one_worker_clusters)
    else:
        clustered = pipeline | reader | "Cluster" >> ClusterOnOneWorker(params, pool_glob, output.temp,
                                                                         opts.num_shards, num_points, dim)
    shards, result = clustered["shards"], clustered["result"]
    _ = shards | "Write" >> storage.WriteShards(output, ".parquet", write_clusters_shard, summary, result)
    return output


def run(argv: list[str] | ClusterOptions | None = None) -> dict:
    """Run the pipeline from its flags (a list), or from typed values (a ClusterOptions); returns the summary."""
    info, outcome, seconds, output = build_and_run(ClusterOptions, argv, build, "cluster", "clustering.json")
    if info.get("dry_run"):
        return info
    sizes = element_sizes.largest(outcome)
    if sizes:
        LOG.info("cluster: largest element per step (bytes): %s",
                 ", ".join(f"{step} {size}" for step, size in sorted(sizes.items())))
    info["largest_element_bytes"] = sizes  # returned to a caller, not written: clustering.json is already final
    for warning in info["warnings"]:
        LOG.warning("cluster: %s", warning)
    LOG.info("cluster: %d points, %d clusters (mean size %.1f) in %.1f s -> %s", info["num_points"],
             info["num_clusters"], info["mean_cluster_size"], seconds, output)
    return info

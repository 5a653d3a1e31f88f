"""`clusmar cluster`: average-linkage HAC of the pool's embeddings, cut at a distance.

The pool is read in columnar batches and checked in parallel.  With
`--hac-shards 1` (the default) the clustering runs on one worker
(clusmar_beam.hac: exact linkage from cluster statistics, nearest clusters by
FAISS, reciprocal pairs plus (1+delta)-good stars with `--approximation`).
With `--hac-shards S > 1` only the ids are gathered (to number the rows in id
order) and the HAC runs as Beam rounds (clusmar_beam.hac_sharded:
S partitions by coarse cell, reciprocal-nearest merges inside each with the
neighbouring cells' clusters visible but frozen, S/4 partitions next round,
..., the remainder on one worker).  `--target-mean-cluster-size M` estimates
how far to merge on a sample of whole k-means cells plus their border
(hac.choose_threshold on the one worker; with --hac-shards, the same steps as
Beam transforms, hac_sharded.ThresholdFromTarget), then cuts the pool's own
merges where the mean size reaches M and reports that cut in clustering.json.
The assignments are written back out in parallel shards, then clustering.json
last.
"""
from __future__ import annotations

import logging
import math
import sys
import time

import io as pyio
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from clusmar_beam import hac, io, runner
from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")
ROWS_PER_CLUSTER_SHARD = 1_000_000


class ClusterOptions(runner.CommonOptions):
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
                            help="neighbours fetched per nearest-cluster search (self included), re-ranked by "
                                 "exact linkage")
        parser.add_argument("--exact-search-max", dest="exact_search_max", type=int, default=hac.EXACT_SEARCH_MAX,
                            help="exact (flat) FAISS search up to this many active clusters, IVF above")
        parser.add_argument("--nprobe", type=int, default=32, help="IVF cells probed per search")
        parser.add_argument("--approximation", type=float, default=hac.DEFAULT_DELTA,
                            help="delta >= 0: a merge round also lets each merging pair absorb the clusters "
                                 "whose nearest it was while their exact linkage is within (1 + delta) of the "
                                 "pair's ((1+delta)-good merges, as in TeraHAC); bounds the rounds dense regions "
                                 "take; 0 is exact average linkage")
        parser.add_argument("--warn-largest-share", dest="warn_largest_share", type=float, default=0.05,
                            help="warn (log and clustering.json) when one cluster holds more than this share of "
                                 "the pool: a sign that the threshold is too large for this data")
        parser.add_argument("--hac-shards", dest="hac_shards", type=int, default=1,
                            help="partitions of the first sharded HAC round (1: the whole HAC on one worker; "
                                 ">1: reciprocal-nearest merges inside partitions on many workers, fewer "
                                 "partitions each round, the remainder on one worker)")
        parser.add_argument("--hac-halo-cells", dest="hac_halo_cells", type=int, default=2,
                            help="sharded HAC: a cluster is also visible (frozen) in the partitions of its "
                                 "next nearest cells, this many")
        parser.add_argument("--max-rounds", dest="max_rounds", type=int, default=8,
                            help="sharded HAC: at most this many partitioned rounds before the one-worker finish")
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


def every_few_seconds(log, seconds: float = 10.0):
    """A log function that passes on a RAC round line at most every `seconds`
    (a 1M pool takes hundreds of rounds); other lines always pass."""
    last = [-math.inf]

    def emit(line: str) -> None:
        now = time.monotonic()
        if not line.startswith("round ") or now - last[0] >= seconds:
            last[0] = now
            log("cluster: " + (line if line.startswith("hac") else "hac " + line))
    return emit


def _validated(batch: io.Batch) -> io.Batch:
    io.check_finite(batch, ("embedding",))
    beam.metrics.Metrics.counter("cluster", "points_read").inc(len(batch))
    return batch


def spill(batch: io.Batch, temp_dir: str) -> dict:
    """Write a batch's ids and embeddings to a temporary file and pass on only its name.

    The one-worker HAC needs every embedding in one place, but a runner moves one
    element in one message (gRPC caps it at 2 GB: 8M x 64 float32), so the gather
    collects file names, not arrays.
    """
    path = FileSystems.join(temp_dir, f"gather-{uuid.uuid4().hex}.npy")
    with FileSystems.create(path) as handle:
        np.save(handle, batch.columns["embedding"])
        np.save(handle, batch.ids, allow_pickle=batch.id_type != "int64")
    return {"path": path, "width": int(batch.columns["embedding"].shape[1]), "source": batch.source,
            "id_type": batch.id_type}


def _load_spilled(spilled: list[dict]) -> list[io.Batch]:
    batches = []
    for part in spilled:   # any order: the rows are put in id order next
        with FileSystems.open(part["path"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = pyio.BytesIO(handle.read())
        embedding = np.load(data)
        ids = np.load(data, allow_pickle=part["id_type"] != "int64")
        batches.append(io.Batch(part["source"], {"id": ids, "embedding": embedding}, part["id_type"]))
    return batches


def _one_width(width_and_source) -> int:
    """The embedding length shared by every batch; an error naming the files otherwise."""
    widths = {}
    for width, source in width_and_source:
        widths.setdefault(width, source)
    if len(widths) > 1:
        detail = "; ".join(f"{width} in {source}" for width, source in sorted(widths.items()))
        raise InputError(f"--pool: column 'embedding' has different lengths across files: {detail}")
    return next(iter(widths), 0)


def _check_ids(ids, pool_glob: str) -> None:
    if ids is None or not len(ids):
        raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows)")
    count, examples = io.find_duplicates(ids)
    if count:
        raise InputError(f"--pool {pool_glob!r}: column 'id' has {count} duplicated ids (e.g. {examples})")


def cluster_pool(spilled, opts_dict: dict, pool_glob: str) -> dict:
    """All batches -> id-sorted ids, labels and clustering statistics (one worker)."""
    _one_width((part["width"], part["source"]) for part in spilled)
    batches = _load_spilled(spilled)
    pool = io.concat_batches(batches)
    del batches
    _check_ids(pool.ids if pool is not None else None, pool_glob)
    LOG.info("cluster: gathered %d points (dim %d) from %d batches", len(pool), pool.columns["embedding"].shape[1],
             len(spilled))
    order = np.argsort(pool.ids, kind="stable")   # a fixed row order makes the clustering deterministic
    ids = pool.ids[order]
    embeddings = pool.columns["embedding"][order]
    id_type = pool.id_type
    del pool, order   # the id-ordered copies are all the HAC needs
    start = time.time()
    eps, choice, target = opts_dict["distance_threshold"], None, opts_dict["target_mean_cluster_size"]
    try:
        if eps is None:
            choice = hac.choose_threshold(embeddings, opts_dict["metric"], target,
                                          sample_size=opts_dict["threshold_sample_size"], seed=opts_dict["seed"],
                                          log=every_few_seconds(LOG.info), delta=opts_dict["approximation"])
            eps = _count_choice(choice).merge_threshold
        dim = embeddings.shape[1]
        # The HAC works on a float64 copy: make it here and let the HAC use it
        # in place, so the float32 rows are not held through the run.
        embeddings = embeddings.astype(np.float64)
        result = hac.average_linkage(
            embeddings, eps, opts_dict["metric"], target_mean_cluster_size=target, k=opts_dict["knn"],
            exact_search_max=opts_dict["exact_search_max"], nprobe=opts_dict["nprobe"], seed=opts_dict["seed"],
            log=every_few_seconds(LOG.info), overwrite_input=True, delta=opts_dict["approximation"])
        del embeddings  # overwritten by the HAC
    except hac.HacError as exc:
        raise InputError(f"--pool {pool_glob!r}: {exc}") from exc
    elapsed = time.time() - start
    beam.metrics.Metrics.counter("cluster", "points").inc(len(ids))
    beam.metrics.Metrics.counter("cluster", "clusters").inc(result.num_clusters)
    beam.metrics.Metrics.counter("cluster", "merges").inc(result.merges)
    beam.metrics.Metrics.counter("cluster", "rounds").inc(result.rounds)
    for i, merged in enumerate(result.merges_per_round):
        beam.metrics.Metrics.counter("cluster", f"merges_round_{i + 1:04d}").inc(merged)
    LOG.info("cluster: %d points -> %d clusters in %d rounds (%.1f s)", len(ids), result.num_clusters,
             result.rounds, elapsed)
    return {"ids": ids, "labels": result.labels, "id_type": id_type, "rounds": result.rounds,
            "distance_threshold": result.distance_threshold,
            "threshold_choice": _choice_report(choice, result.merged_up_to),
            "merges": result.merges, "merges_per_round": list(result.merges_per_round), "hac_seconds": elapsed,
            "dim": dim, "ivf_probing": result.probing}


def _choice_report(choice: hac.ThresholdChoice | None, merged_up_to: float | None) -> dict | None:
    """How the threshold was picked: the sample's estimates, then how far the pool was merged before the cut."""
    if choice is None:
        return None
    return {**choice.as_dict(), "merged_up_to": merged_up_to,
            "method": "pool merged up to merged_up_to (from the sample's threshold for "
                      f"{hac.TARGET_OVERSHOOT:g} x the target, raised while short of it), "
                      "then cut where the mean cluster size reaches the target"}


def _count_choice(choice: hac.ThresholdChoice) -> hac.ThresholdChoice:
    """Both paths count the points the threshold sample clustered (its cost)."""
    beam.metrics.Metrics.counter("cluster", "threshold_sample_points").inc(choice.sample_points_with_margin)
    return choice


def _reported_choice(choice: hac.ThresholdChoice) -> hac.ThresholdChoice:
    """The sharded path's choice, counted and logged as the one-worker path does."""
    LOG.info("cluster: hac threshold: %s", choice.describe())
    return _count_choice(choice)


def _row_numbers(id_batches, pool_glob: str) -> dict:
    """All ids (only ids) on one worker -> sorted ids; a point's row is its rank."""
    dim = _one_width((width, source) for _, width, source in id_batches)
    parts = [ids for ids, _, _ in id_batches if len(ids)]
    ids = np.concatenate(parts) if parts else None
    _check_ids(ids, pool_glob)
    return {"ids": np.sort(ids, kind="stable"), "dim": dim}


def _to_rows(batch: io.Batch, index: dict, metric: str, pool_glob: str):
    try:
        hac.prepare(batch.columns["embedding"], metric)  # zero norms etc.: a clear error, counted per batch
    except hac.HacError as exc:
        raise InputError(f"--pool {pool_glob!r} ({batch.source}): {exc}") from exc
    return np.searchsorted(index["ids"], batch.ids).astype(np.int64), batch.columns["embedding"]


def _sharded_result(hac_result: dict, index: dict, id_type: str, started: float,
                    choice: hac.ThresholdChoice | None) -> dict:
    labels = hac_result["labels"]
    n, num_clusters = len(labels), int(labels.max()) + 1
    beam.metrics.Metrics.counter("cluster", "points").inc(n)
    beam.metrics.Metrics.counter("cluster", "clusters").inc(num_clusters)
    beam.metrics.Metrics.counter("cluster", "merges").inc(hac_result["merges"])
    LOG.info("cluster: sharded HAC: %d points -> %d clusters (%.1f s)", n, num_clusters, time.time() - started)
    return {"ids": index["ids"], "labels": labels, "id_type": id_type, "rounds": hac_result["rounds"],
            "distance_threshold": hac_result["distance_threshold"],
            "threshold_choice": _choice_report(choice, hac_result["merged_up_to"]), "merges": hac_result["merges"],
            "merges_per_round": None, "hac_seconds": time.time() - started, "dim": index["dim"]}


def _warnings(largest: int, n: int, share: float) -> list[str]:
    """Warnings about the clusters for clustering.json (run logs them where the user sees them)."""
    if n and largest > share * n:
        return [f"the largest cluster holds {largest} of {n} points ({largest / n:.1%}, more than "
                f"--warn-largest-share {share:g}): the distance threshold may be too large for this data; "
                "Cluster-Margin picks at most one example per cluster per pass"]
    return []


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
    eps, target = opts.distance_threshold, opts.target_mean_cluster_size
    if (eps is None) == (target is None):
        raise InputError("give exactly one of --distance-threshold EPS and --target-mean-cluster-size M")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise InputError(f"--distance-threshold must be a positive number (got {eps})")
    if target is not None and not (math.isfinite(target) and target >= 1):
        raise InputError(f"--target-mean-cluster-size must be a number >= 1 (got {target})")
    if opts.threshold_sample_size < 2:
        raise InputError(f"--threshold-sample-size must be at least 2 (got {opts.threshold_sample_size})")
    if opts.metric not in ("cosine", "sqeuclidean"):
        raise InputError(f"--metric {opts.metric!r}: choose cosine or sqeuclidean")
    if opts.knn < 2:
        raise InputError(f"--knn must be at least 2 (got {opts.knn})")
    if opts.hac_shards < 1:
        raise InputError(f"--hac-shards must be at least 1 (got {opts.hac_shards})")
    if opts.hac_halo_cells < 0:
        raise InputError(f"--hac-halo-cells must be >= 0 (got {opts.hac_halo_cells})")
    if opts.max_rounds < 0:
        raise InputError(f"--max-rounds must be >= 0 (got {opts.max_rounds})")
    if not (math.isfinite(opts.approximation) and opts.approximation >= 0):
        raise InputError(f"--approximation must be a number >= 0 (got {opts.approximation})")
    if not (0 < opts.warn_largest_share <= 1):
        raise InputError(f"--warn-largest-share must be in (0, 1] (got {opts.warn_largest_share})")
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num-shards must be positive (got {opts.num_shards})")
    reader = io.ReadTable(pool_glob, required=["id", "embedding"], flag="--pool")
    output = io.OutputDir(output_dir, "clusters", "clustering.json", None, opts.overwrite)
    params = {"distance_threshold": eps, "target_mean_cluster_size": target,
              "threshold_sample_size": opts.threshold_sample_size, "metric": opts.metric, "knn": opts.knn,
              "exact_search_max": opts.exact_search_max, "nprobe": opts.nprobe, "seed": opts.seed,
              "approximation": opts.approximation}

    def summary(names, result):
        labels = result["labels"]
        sizes = np.bincount(labels)
        chosen = {"distance_threshold": result.get("distance_threshold", eps)}
        if result.get("threshold_choice") is not None:
            chosen["threshold_choice"] = result["threshold_choice"]
        largest = int(sizes.max()) if len(sizes) else 0
        return {"parameters": {**params, **chosen, "linkage": "average"}, "pool": pool_glob,
                "num_points": int(len(labels)), "num_clusters": int(len(sizes)),
                "mean_cluster_size": float(len(labels) / max(len(sizes), 1)),
                "largest_cluster": largest, "largest_cluster_share": largest / max(len(labels), 1),
                "warnings": _warnings(largest, len(labels), opts.warn_largest_share),
                "singletons": int(np.count_nonzero(sizes == 1)),
                "cluster_size_histogram": size_histogram(labels), "dim": result["dim"],
                "rounds": result["rounds"], "merges": result["merges"],
                "merges_per_round": result["merges_per_round"], "ivf_probing": result.get("ivf_probing"),
                "files": names}

    start = time.time()
    pipeline = runner.make_pipeline(options)
    if opts.hac_shards > 1:
        from clusmar_beam import hac_sharded
        params.update(hac_shards=opts.hac_shards, hac_halo_cells=opts.hac_halo_cells, max_rounds=opts.max_rounds)
        batches = pipeline | reader | "Check" >> beam.Map(_validated)
        index = (batches
                 | "Ids" >> beam.Map(lambda b: (b.ids, b.columns["embedding"].shape[1], b.source))
                 | "GatherIds" >> beam.combiners.ToList()
                 | "RowNumbers" >> beam.Map(_row_numbers, pool_glob))
        id_type = (batches | "IdType" >> beam.Map(lambda b: b.id_type)
                   | "OneIdType" >> beam.CombineGlobally(lambda types: sorted(set(types))[0] if types else "int64"))
        rows = batches | "Rows" >> beam.Map(_to_rows, beam.pvalue.AsSingleton(index), opts.metric, pool_glob)
        threshold, merge_threshold, choice = eps, None, None
        if target is not None:
            choice = (rows
                      | "ChooseThreshold" >> hac_sharded.ThresholdFromTarget(
                          target, opts.metric, sample_size=opts.threshold_sample_size, seed=opts.seed,
                          delta=opts.approximation)
                      | "ReportThreshold" >> beam.Map(_reported_choice))
            # partitions merge up to the sample's estimate, the last round (one worker) on past it
            threshold = choice | "Eps" >> beam.Map(lambda c: c.distance_threshold)
            merge_threshold = choice | "MergeEps" >> beam.Map(lambda c: c.merge_threshold)
        merged = rows | "ShardedHac" >> hac_sharded.ShardedHac(threshold, opts.metric, shards=opts.hac_shards,
                                                                halo_cells=opts.hac_halo_cells,
                                                                max_rounds=opts.max_rounds, seed=opts.seed,
                                                                target_mean_cluster_size=target,
                                                                merge_threshold=merge_threshold,
                                                                delta=opts.approximation)
        result = merged | "Result" >> beam.Map(_sharded_result, beam.pvalue.AsSingleton(index),
                                               beam.pvalue.AsSingleton(id_type), time.time(),
                                               beam.pvalue.AsSingleton(choice) if choice is not None else None)
    else:
        result = (pipeline
                  | reader
                  | "Check" >> beam.Map(_validated)
                  | "Spill" >> beam.Map(spill, output.temp)
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
    for warning in info["warnings"]:
        LOG.warning("cluster: %s", warning)
    LOG.info("cluster: %d points, %d clusters (mean size %.1f) in %.1f s -> %s", info["num_points"],
             info["num_clusters"], info["mean_cluster_size"], time.time() - start, output.path)
    return info


if __name__ == "__main__":
    from clusmar_beam.cli import main
    sys.exit(main(["cluster"] + sys.argv[1:]))

"""`clusmar cluster`: average-linkage HAC of the pool's embeddings, cut at a distance.

The pool is read in columnar batches and checked in parallel.  With
`--hac-shards 1` (the default) the clustering runs on one worker
(clusmar_beam.hac: exact linkage from cluster statistics, nearest clusters by
FAISS, reciprocal pairs plus (1+delta)-good stars with `--approximation`).
With `--hac-shards S > 1` nothing gathers the pool: the rows are numbered in id
order by ranges of ids (clusmar_beam.ranks) and the HAC runs as Beam rounds
(clusmar_beam.hac_sharded: partitions of about n / S clusters by coarse cell,
merges inside each with the neighbouring cells' clusters visible but frozen,
as many rounds as merges are left across borders); each point's cluster is
found by joins keyed by row range, and every output file is written from its
own keyed shard.  `--target-mean-cluster-size M` estimates
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

from clusmar_beam import element_sizes, hac, hac_sharded, io, knn, ranks, runner
from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")
ROWS_PER_CLUSTER_SHARD = 1_000_000
# `--hac-shards auto`: the one-worker HAC peaks at 6-8 times the embeddings' bytes (benchmarks/RESULTS.md), so
# up to this many bytes of embeddings it runs on one worker ...
AUTO_ONE_WORKER_EMBEDDING_BYTES = 1 << 30
# ... and above, sharded with a partition per this many bytes of them.
AUTO_EMBEDDING_BYTES_PER_SHARD = 64 << 20


def _shards_flag(value: str):
    """--hac-shards: a number of partitions, or auto."""
    return value if value == "auto" else int(value)


def auto_shards(embedding_bytes: int) -> int:
    """`--hac-shards auto`: 1 (one worker) for a pool whose embeddings fit one worker comfortably, else
    a partition per AUTO_EMBEDDING_BYTES_PER_SHARD."""
    if embedding_bytes <= AUTO_ONE_WORKER_EMBEDDING_BYTES:
        return 1
    return max(2, math.ceil(embedding_bytes / AUTO_EMBEDDING_BYTES_PER_SHARD))


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
        parser.add_argument("--hac-shards", dest="hac_shards", type=_shards_flag, default=1,
                            help="partitions of the first sharded HAC round (1: the whole HAC on one worker; "
                                 ">1: merges inside partitions of about n / S clusters on many workers, round "
                                 "after round, with nothing gathered on one worker; auto: one worker up to "
                                 f"{AUTO_ONE_WORKER_EMBEDDING_BYTES >> 30} GiB of embeddings, else one partition "
                                 f"per {AUTO_EMBEDDING_BYTES_PER_SHARD >> 20} MiB of them)")
        parser.add_argument("--hac-halo-cells", dest="hac_halo_cells", type=int, default=2,
                            help="sharded HAC: a cluster is also visible (frozen) in the partitions of its "
                                 "next nearest cells, this many")
        parser.add_argument("--max-rounds", dest="max_rounds", type=int,
                            help="sharded HAC: at most this many rounds (they stop earlier once no merge is left "
                                 f"across a partition border; default {hac_sharded.DEFAULT_MAX_ROUNDS}, or 2 for a "
                                 "Parquet pool small enough for the second round to finish on one worker)")
        parser.add_argument("--num-shards", dest="num_shards", type=int,
                            help=f"output files (default: one per {ROWS_PER_CLUSTER_SHARD} rows)")


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


def _checked_for_hac(batch: io.Batch, metric: str, pool_glob: str) -> io.Batch:
    """Zero norms etc.: one clear error naming the file, checked where the batch is read."""
    try:
        hac.prepare(batch.columns["embedding"], metric)
    except hac.HacError as exc:
        raise InputError(f"--pool {pool_glob!r} ({batch.source}): {exc}") from exc
    return batch


def _widths(batch: io.Batch):
    return {int(batch.columns["embedding"].shape[1]): batch.source} if len(batch) else {}


def _union(dicts):
    out = {}
    for d in dicts:
        for key, value in d.items():
            out.setdefault(key, value)
    return out


def _checked_pool(duplicates, count: int, widths: dict, pool_glob: str) -> int:
    """The sharded path's pool-wide checks, from what each part found where its rows are; the width."""
    _one_width(widths.items())
    if not count:
        raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows)")
    found, examples = duplicates
    if found:
        raise InputError(f"--pool {pool_glob!r}: column 'id' has {found} duplicated ids (e.g. {examples})")
    return next(iter(widths))


def _shard_count(n: int, num_shards: int | None) -> int:
    return num_shards or max(1, math.ceil(n / ROWS_PER_CLUSTER_SHARD))


def _shard_of(rows: np.ndarray, n: int, num_shards: int | None) -> np.ndarray:
    """Output shard of each row: contiguous row ranges, as `_shards` cuts them."""
    bounds = np.linspace(0, n, _shard_count(n, num_shards) + 1).astype(np.int64)
    return np.searchsorted(bounds, rows, side="right") - 1


def _by_shard(rows, values, tag, n, num_shards):
    for index, pos in knn.split_by_key(_shard_of(rows, n, num_shards)):
        yield index, (tag, rows[pos], values[pos])


def _shard_payload(element, n, num_shards, id_type):
    """One output file's rows, in row (id) order: (index, count, (ids, labels, id_type))."""
    index, parts = element
    got = {"ids": [], "labels": []}
    for tag, rows, values in parts:
        got[tag].append((rows, values))
    rows_i = np.concatenate([r for r, _ in got["ids"]])
    ids = np.concatenate([v for _, v in got["ids"]])
    rows_l = np.concatenate([r for r, _ in got["labels"]])
    labels = np.concatenate([v for _, v in got["labels"]])
    order_i, order_l = np.argsort(rows_i), np.argsort(rows_l)
    if not np.array_equal(rows_i[order_i], rows_l[order_l]):
        raise RuntimeError(f"cluster: shard {index}: the rows with ids and the rows with clusters differ")
    return index, _shard_count(n, num_shards), (ids[order_i], labels[order_l], id_type)


def _sharded_summary(hac_summary: dict, dim: int, id_type: str, choice: hac.ThresholdChoice | None) -> dict:
    """What clustering.json needs from the sharded path (all of it from combiners)."""
    for name in ("merges", "num_clusters"):
        beam.metrics.Metrics.counter("cluster", name.replace("num_", "")).inc(hac_summary[name])
    beam.metrics.Metrics.counter("cluster", "points").inc(hac_summary["merges"] + hac_summary["num_clusters"])
    return {"num_points": hac_summary["merges"] + hac_summary["num_clusters"],
            "num_clusters": hac_summary["num_clusters"], "largest_cluster": hac_summary["largest_cluster"],
            "singletons": hac_summary["singletons"], "cluster_size_histogram": hac_summary["histogram"],
            "rounds": hac_summary["rounds"], "merges": hac_summary["merges"], "merges_per_round": None,
            "distance_threshold": hac_summary["distance_threshold"],
            "threshold_choice": _choice_report(choice, hac_summary["merged_up_to"]), "dim": dim,
            "sharded_rounds": hac_summary["sharded_rounds"], "waiting": hac_summary["waiting"],
            "id_type": id_type}


def _one_worker_summary(result: dict) -> dict:
    """The one-worker result without its per-row arrays: what clustering.json needs."""
    sizes = hac_sharded.size_summary(np.bincount(result["labels"]))
    return {"num_points": int(len(result["labels"])), "num_clusters": sizes["num_clusters"],
            "largest_cluster": sizes["largest_cluster"], "singletons": sizes["singletons"],
            "cluster_size_histogram": sizes["histogram"],
            **{k: v for k, v in result.items() if k not in ("ids", "labels")}}


def _warnings(largest: int, n: int, share: float) -> list[str]:
    """Warnings about the clusters for clustering.json (run logs them where the user sees them)."""
    if n and largest > share * n:
        return [f"the largest cluster holds {largest} of {n} points ({largest / n:.1%}, more than "
                f"--warn-largest-share {share:g}): the distance threshold may be too large for this data; "
                "Cluster-Margin picks at most one example per cluster per pass"]
    return []


def _shards(result: dict, num_shards: int | None):
    n = len(result["ids"])
    count = _shard_count(n, num_shards)
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
    if opts.hac_shards != "auto" and opts.hac_shards < 1:
        raise InputError(f"--hac-shards must be at least 1 or auto (got {opts.hac_shards})")
    if opts.hac_halo_cells < 0:
        raise InputError(f"--hac-halo-cells must be >= 0 (got {opts.hac_halo_cells})")
    if opts.max_rounds is not None and opts.max_rounds < 1:
        raise InputError(f"--max-rounds must be >= 1 (got {opts.max_rounds})")
    if not (math.isfinite(opts.approximation) and opts.approximation >= 0):
        raise InputError(f"--approximation must be a number >= 0 (got {opts.approximation})")
    if not (0 < opts.warn_largest_share <= 1):
        raise InputError(f"--warn-largest-share must be in (0, 1] (got {opts.warn_largest_share})")
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num-shards must be positive (got {opts.num_shards})")
    reader = io.ReadTable(pool_glob, required=["id", "embedding"], flag="--pool")
    shards_flag, pool_rows = opts.hac_shards, None
    if shards_flag == "auto" or (shards_flag != 1 and opts.max_rounds is None):
        pool_rows, embedding_bytes = io.footprint(reader.files, reader.format, "embedding")
    if shards_flag == "auto":
        opts.hac_shards = auto_shards(embedding_bytes)
        LOG.info("cluster: --hac-shards auto: %.1f MiB of embeddings -> %s", embedding_bytes / (1 << 20),
                 "one worker" if opts.hac_shards == 1 else f"{opts.hac_shards} partitions")
    output = io.OutputDir(output_dir, "clusters", "clustering.json", None, opts.overwrite)
    params = {"distance_threshold": eps, "target_mean_cluster_size": target,
              "threshold_sample_size": opts.threshold_sample_size, "metric": opts.metric, "knn": opts.knn,
              "exact_search_max": opts.exact_search_max, "nprobe": opts.nprobe, "seed": opts.seed,
              "approximation": opts.approximation, "hac_shards": opts.hac_shards}
    if shards_flag == "auto":
        params["hac_shards_flag"] = "auto"

    def summary(names, result):
        chosen = {"distance_threshold": result.get("distance_threshold", eps)}
        if result.get("threshold_choice") is not None:
            chosen["threshold_choice"] = result["threshold_choice"]
        n, largest = result["num_points"], result["largest_cluster"]
        info = {"parameters": {**params, **chosen, "linkage": "average"}, "pool": pool_glob,
                "num_points": n, "num_clusters": result["num_clusters"],
                "mean_cluster_size": float(n / max(result["num_clusters"], 1)),
                "largest_cluster": largest, "largest_cluster_share": largest / max(n, 1),
                "warnings": _warnings(largest, n, opts.warn_largest_share),
                "singletons": result["singletons"],
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

    start = time.time()
    pipeline = runner.make_pipeline(options)
    if opts.hac_shards > 1:
        if opts.max_rounds is None:
            # Each round is a fixed part of the pipeline, run even when nothing is left to merge; a pool of at
            # most FINISH_ON_ONE_WORKER points needs two (the second finishes on one worker).
            small = pool_rows is not None and pool_rows <= hac_sharded.FINISH_ON_ONE_WORKER
            opts.max_rounds = 2 if small else hac_sharded.DEFAULT_MAX_ROUNDS
        params.update(hac_halo_cells=opts.hac_halo_cells, max_rounds=opts.max_rounds)
        side = beam.pvalue.AsSingleton
        batches = (pipeline | reader | "Check" >> beam.Map(_validated)
                   | "CheckForHac" >> beam.Map(_checked_for_hac, opts.metric, pool_glob))
        widths = batches | "Widths" >> beam.Map(_widths) | "AllWidths" >> beam.CombineGlobally(_union)
        id_type = (batches | "IdType" >> beam.Map(lambda b: b.id_type)
                   | "OneIdType" >> beam.CombineGlobally(lambda types: sorted(set(types))[0] if types else "int64"))
        # Batches of another width would fail inside a range: the ranking waits for the width check.
        width = widths | "OneWidth" >> beam.Map(lambda found: _one_width(found.items()))
        ranked = (batches
                  | "AfterWidthCheck" >> beam.Map(lambda batch, _: batch, side(width))
                  | "RankIds" >> ranks.RankIds())
        n = ranked["count"]
        dim = (ranked["duplicates"]
               | "CheckPool" >> beam.Map(_checked_pool, side(n), side(widths), pool_glob))
        rows = ranked["ranked"] | "Rows" >> beam.Map(lambda b, _: (b.columns["row"], b.columns["embedding"]),
                                                     side(dim))
        threshold, merge_threshold, choice = eps, None, None
        if target is not None:
            choice = (rows
                      | "ChooseThreshold" >> hac_sharded.ThresholdFromTarget(
                          target, opts.metric, sample_size=opts.threshold_sample_size, seed=opts.seed,
                          delta=opts.approximation)
                      | "ReportThreshold" >> beam.Map(_reported_choice))
            # the rounds merge up to the sample's estimate, then on past it, and are cut at the target
            threshold = choice | "Eps" >> beam.Map(lambda c: c.distance_threshold)
            merge_threshold = choice | "MergeEps" >> beam.Map(lambda c: c.merge_threshold)
        merged = rows | "ShardedHac" >> hac_sharded.ShardedHac(threshold, opts.metric, shards=opts.hac_shards,
                                                                halo_cells=opts.hac_halo_cells,
                                                                max_rounds=opts.max_rounds, seed=opts.seed,
                                                                target_mean_cluster_size=target,
                                                                merge_threshold=merge_threshold,
                                                                delta=opts.approximation)
        result = merged["summary"] | "Result" >> beam.Map(_sharded_summary, side(dim), side(id_type),
                                                          side(choice) if choice is not None else None)
        ids = ranked["ranked"] | "IdsByShard" >> beam.FlatMap(
            lambda b, n: _by_shard(b.columns["row"], b.ids, "ids", n, opts.num_shards), side(n))
        labels = merged["labels"] | "LabelsByShard" >> beam.FlatMap(
            lambda rl, n: _by_shard(rl[0], rl[1], "labels", n, opts.num_shards), side(n))
        shards = ((ids | "MeasureIds" >> element_sizes.measured("shard_ids"),
                   labels | "MeasureLabels" >> element_sizes.measured("shard_labels"))
                  | "ShardRows" >> beam.Flatten()
                  | "GroupShard" >> beam.GroupByKey()
                  | "Shards" >> beam.Map(_shard_payload, side(n), opts.num_shards, side(id_type)))
    else:
        result = (pipeline
                  | reader
                  | "Check" >> beam.Map(_validated)
                  | "Spill" >> beam.Map(spill, output.temp)
                  | "Gather" >> beam.combiners.ToList()
                  | "Cluster" >> beam.Map(cluster_pool, params, pool_glob))
        shards = result | "Shards" >> beam.FlatMap(_shards, opts.num_shards)
        result = result | "Summary" >> beam.Map(_one_worker_summary)
    _ = shards | "Write" >> io.WriteShards(output, ".parquet", _write_clusters_shard, summary, result)
    try:
        outcome = runner.run_pipeline(pipeline, "cluster")
    finally:
        output.remove_temp()
    info = io.read_json(output.join("clustering.json"))
    sizes = element_sizes.largest(outcome)
    if sizes:
        LOG.info("cluster: largest element per step (bytes): %s",
                 ", ".join(f"{step} {size}" for step, size in sorted(sizes.items())))
    info["largest_element_bytes"] = sizes  # returned to a caller, not written: clustering.json is already final
    for warning in info["warnings"]:
        LOG.warning("cluster: %s", warning)
    LOG.info("cluster: %d points, %d clusters (mean size %.1f) in %.1f s -> %s", info["num_points"],
             info["num_clusters"], info["mean_cluster_size"], time.time() - start, output.path)
    return info


if __name__ == "__main__":
    from clusmar_beam.cli import main
    sys.exit(main(["cluster"] + sys.argv[1:]))

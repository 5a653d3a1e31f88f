"""The cluster step as two Beam transforms: the HAC on one worker, or sharded across workers.

Both take the pool's batches (id + embedding) and give {"shards": (index,
count, (ids, labels, id_type)) one per output file, "result": singleton dict
for clustering.json}; files are numbered the same way by both, so equal
clusters give byte-identical files.
"""
from __future__ import annotations

import io
import logging
import math
import time
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from clusmar_beam.core import hac
from clusmar_beam.core.batch import Batch, check_finite, concat_batches, find_duplicates
from clusmar_beam.core.cells import split_by_key
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.hac.sizes import size_summary
from clusmar_beam.transforms import element_sizes, memory, ranks, sharded_hac, storage

LOG = logging.getLogger("clusmar")
ROWS_PER_CLUSTER_SHARD = 1_000_000


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


def _validated(batch: Batch) -> Batch:
    check_finite(batch, ("embedding",))
    beam.metrics.Metrics.counter("cluster", "points_read").inc(len(batch))
    return batch


def spill(batch: Batch, temp_dir: str) -> dict:
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
            "id_type": batch.id_type, "rows": len(batch)}


def _load_spilled(spilled: list[dict]) -> list[Batch]:
    batches = []
    for part in spilled:   # any order: the rows are put in id order next
        with FileSystems.open(part["path"], compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = io.BytesIO(handle.read())
        embedding = np.load(data)
        ids = np.load(data, allow_pickle=part["id_type"] != "int64")
        batches.append(Batch(part["source"], {"id": ids, "embedding": embedding}, part["id_type"]))
    return batches


def _one_width(width_and_source) -> int:
    return storage.one_across_files(width_and_source, "--pool", "embedding", "different lengths", 0)


def _check_ids(ids, pool_glob: str) -> None:
    if ids is None or not len(ids):
        raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows)")
    count, examples = find_duplicates(ids)
    if count:
        raise InputError(f"--pool {pool_glob!r}: column 'id' has {count} duplicated ids (e.g. {examples})")


def cluster_pool(spilled, opts_dict: dict, pool_glob: str) -> dict:
    """All batches -> id-sorted ids, labels and clustering statistics (one worker)."""
    _one_width((part["width"], part["source"]) for part in spilled)
    storage.one_id_type(((part["id_type"], part["source"]) for part in spilled if part["rows"]), "--pool")
    batches = _load_spilled(spilled)
    pool = concat_batches(batches)
    del batches
    _check_ids(pool.ids if pool is not None else None, pool_glob)
    LOG.info("cluster: gathered %d points (dim %d) from %d batches", len(pool), pool.columns["embedding"].shape[1],
             len(spilled))
    order = np.argsort(pool.ids, kind="stable")   # a fixed row order makes the clustering deterministic
    ids = pool.ids[order]
    # Held only in this dict, so popping it into the call hands flat_clusters the one reference: it frees the
    # float32 rows once its float64 copy exists.
    held = {"embedding": pool.columns["embedding"][order]}
    dim = held["embedding"].shape[1]
    id_type = pool.id_type
    del pool, order   # the id-ordered copies are all the HAC needs
    start = time.time()
    eps, choice, target = opts_dict["distance_threshold"], None, opts_dict["target_mean_cluster_size"]
    try:
        result, choice = hac.flat_clusters(
            held.pop("embedding"), opts_dict["metric"], eps, target, sample_size=opts_dict["threshold_sample_size"],
            seed=opts_dict["seed"], delta=opts_dict["approximation"], log=every_few_seconds(LOG.info),
            on_choice=_count_choice, k=opts_dict["knn"], exact_search_max=opts_dict["exact_search_max"],
            nprobe=opts_dict["nprobe"])
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


def _checked_for_hac(batch: Batch, metric: str, pool_glob: str) -> Batch:
    """Zero norms etc.: one clear error naming the file, checked where the batch is read."""
    try:
        hac.prepare(batch.columns["embedding"], metric)
    except hac.HacError as exc:
        raise InputError(f"--pool {pool_glob!r} ({batch.source}): {exc}") from exc
    return batch


def _widths(batch: Batch):
    return {int(batch.columns["embedding"].shape[1]): batch.source} if len(batch) else {}


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
    for index, pos in split_by_key(_shard_of(rows, n, num_shards)):
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
    sizes = size_summary(np.bincount(result["labels"]))
    return {"num_points": int(len(result["labels"])), "num_clusters": sizes["num_clusters"],
            "largest_cluster": sizes["largest_cluster"], "singletons": sizes["singletons"],
            "cluster_size_histogram": sizes["histogram"],
            **{k: v for k, v in result.items() if k not in ("ids", "labels")}}


def _shards(result: dict, num_shards: int | None):
    n = len(result["ids"])
    count = _shard_count(n, num_shards)
    bounds = np.linspace(0, n, count + 1).astype(np.int64)
    for index in range(count):
        part = slice(bounds[index], bounds[index + 1])
        yield index, count, (result["ids"][part], result["labels"][part], result["id_type"])


def write_clusters_shard(path: str, payload) -> None:
    ids, labels, id_type = payload
    storage.write_parquet(path, pa.table({"id": storage.ids_to_arrow(ids, id_type),
                                     "cluster_id": pa.array(labels, type=pa.int64())}))


class ClusterOnOneWorker(beam.PTransform):
    """The pool gathered on one worker (as temporary files, not one element) and clustered by core.hac."""

    def __init__(self, params: dict, pool_glob: str, temp_dir: str, num_shards: int | None, num_points: int,
                 dim: int):
        super().__init__()
        self.params, self.pool_glob, self.temp_dir, self.num_shards = params, pool_glob, temp_dir, num_shards
        self.num_points, self.dim = num_points, dim

    def expand(self, batches):
        result = (batches
                  | "Check" >> beam.Map(_validated)
                  | "Spill" >> beam.Map(spill, self.temp_dir)
                  | "Gather" >> beam.combiners.ToList()
                  | "Cluster" >> memory.with_min_ram(beam.Map(cluster_pool, self.params, self.pool_glob),
                                                     memory.one_worker_hac_bytes(self.num_points, self.dim)))
        shards = result | "Shards" >> beam.FlatMap(_shards, self.num_shards)
        return {"shards": shards, "result": result | "Summary" >> beam.Map(_one_worker_summary)}


class ClusterSharded(beam.PTransform):
    """Rows numbered in id order (ranks.RankIds), the HAC in partitioned rounds (sharded_hac.ShardedHac), each
    output file written from its own keyed shard: no element grows with the pool."""

    def __init__(self, pool_glob: str, eps: float | None, target: float | None, metric: str, shards: int,
                 halo_cells: int, max_rounds: int, seed: int, delta: float, threshold_sample_size: int,
                 num_shards: int | None, one_worker_clusters: int | None = None):
        super().__init__()
        self.one_worker_clusters = one_worker_clusters
        self.pool_glob, self.eps, self.target, self.metric = pool_glob, eps, target, metric
        self.shards, self.halo_cells, self.max_rounds, self.seed = shards, halo_cells, max_rounds, seed
        self.delta, self.threshold_sample_size, self.num_shards = delta, threshold_sample_size, num_shards

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        batches = (batches | "Check" >> beam.Map(_validated)
                   | "CheckForHac" >> beam.Map(_checked_for_hac, self.metric, self.pool_glob))
        widths = (batches | "Widths" >> beam.Map(_widths)
                  | "AllWidths" >> beam.CombineGlobally(storage.first_file_of_each))
        id_type = batches | "IdType" >> storage.OneIdType("--pool")
        # Batches of another width would fail inside a range: the ranking waits for the width check.
        width = widths | "OneWidth" >> beam.Map(lambda found: _one_width(found.items()))
        ranked = (batches
                  | "AfterWidthCheck" >> beam.Map(lambda batch, _: batch, side(width))
                  | "RankIds" >> ranks.RankIds())
        n = ranked["count"]
        dim = (ranked["duplicates"]
               | "CheckPool" >> beam.Map(_checked_pool, side(n), side(widths), self.pool_glob))
        rows = ranked["ranked"] | "Rows" >> beam.Map(lambda b, _: (b.columns["row"], b.columns["embedding"]),
                                                     side(dim))
        threshold, merge_threshold, choice = self.eps, None, None
        if self.target is not None:
            choice = (rows
                      | "ChooseThreshold" >> sharded_hac.ThresholdFromTarget(
                          self.target, self.metric, sample_size=self.threshold_sample_size, seed=self.seed,
                          delta=self.delta)
                      | "ReportThreshold" >> beam.Map(_reported_choice))
            # the rounds merge up to the sample's estimate, then on past it, and are cut at the target
            threshold = choice | "Eps" >> beam.Map(lambda c: c.distance_threshold)
            merge_threshold = choice | "MergeEps" >> beam.Map(lambda c: c.merge_threshold)
        merged = rows | "ShardedHac" >> sharded_hac.ShardedHac(threshold, self.metric, shards=self.shards,
                                                                halo_cells=self.halo_cells,
                                                                max_rounds=self.max_rounds, seed=self.seed,
                                                                target_mean_cluster_size=self.target,
                                                                merge_threshold=merge_threshold,
                                                                delta=self.delta,
                                                                one_worker_clusters=self.one_worker_clusters)
        result = merged["summary"] | "Result" >> beam.Map(_sharded_summary, side(dim), side(id_type),
                                                          side(choice) if choice is not None else None)
        ids = ranked["ranked"] | "IdsByShard" >> beam.FlatMap(
            lambda b, n: _by_shard(b.columns["row"], b.ids, "ids", n, self.num_shards), side(n))
        labels = merged["labels"] | "LabelsByShard" >> beam.FlatMap(
            lambda rl, n: _by_shard(rl[0], rl[1], "labels", n, self.num_shards), side(n))
        shards = ((ids | "MeasureIds" >> element_sizes.measured("shard_ids"),
                   labels | "MeasureLabels" >> element_sizes.measured("shard_labels"))
                  | "ShardRows" >> beam.Flatten()
                  | "GroupShard" >> beam.GroupByKey()
                  | "Shards" >> beam.Map(_shard_payload, side(n), self.num_shards, side(id_type)))
        return {"shards": shards, "result": result}

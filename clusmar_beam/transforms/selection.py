"""Cluster-Margin selection as a Beam transform: the pool joined with clusters and labels, then the lowest rows.

Rows are routed to buckets by id, so duplicate ids, the labeled set and the
cluster assignments are joined per bucket; each bucket keeps only its lowest
rows (core.selection) and one combine keeps the global lowest.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from clusmar_beam.core.batch import Batch, concat_batches, find_duplicates
from clusmar_beam.core.diagnostics import margin_histogram
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.hashing import id_keys, mix64
from clusmar_beam.core.selection import NO_CLUSTER, lowest_for, scored_rows
from clusmar_beam.transforms import memory

# ---------------------------------------------------------------- sharded join

def bucket_of(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    return (mix64(id_keys(ids)) % np.uint64(num_buckets)).astype(np.int64)


class _SplitByBucket(beam.DoFn):
    def __init__(self, tag: str, num_buckets: int):
        self._tag, self._num_buckets = tag, num_buckets

    def process(self, batch: Batch):
        if not len(batch):
            return
        buckets = bucket_of(batch.ids, self._num_buckets)
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(self._num_buckets + 1))
        for bucket in range(self._num_buckets):
            if bounds[bucket] < bounds[bucket + 1]:
                yield int(bucket), (self._tag, batch.take(order[bounds[bucket]:bounds[bucket + 1]]))


class _JoinBucket(beam.DoFn):
    """Per bucket: check ids, drop labeled rows, attach clusters, keep the lowest rows."""

    def __init__(self, strategy: str, keep: int, seed: int, round_index: int, clusters_flag: str | None):
        self._strategy, self._keep = strategy, keep
        self._seed, self._round = seed, round_index
        self._clusters_flag = clusters_flag
        self._rows = beam.metrics.Metrics.counter("select", "pool_rows")
        self._labeled = beam.metrics.Metrics.counter("select", "labeled_rows_excluded")

    def process(self, element):
        _, tagged = element
        parts = {"pool": [], "clusters": [], "labeled": []}
        for tag, batch in tagged:
            parts[tag].append(batch)
        pool = concat_batches(parts["pool"])
        stats = {"pool": 0, "labeled_in_pool": 0, "labeled_not_in_pool": 0, "unlabeled": 0,
                 "cluster_rows_not_in_pool": 0}
        labeled = concat_batches(parts["labeled"])
        labeled_ids = np.unique(labeled.ids) if labeled is not None else np.zeros(0, dtype=np.int64)
        if pool is None:
            stats["labeled_not_in_pool"] = len(labeled_ids)
            yield beam.pvalue.TaggedOutput("stats", stats)
            return
        ids = pool.ids
        count, examples = find_duplicates(ids)
        if count:
            # Reported after all buckets are joined, so the message carries the pool-wide count.
            stats["problem:duplicate_ids"] = count
            stats["examples:duplicate_ids"] = examples
        is_labeled = np.isin(ids, labeled_ids) if len(labeled_ids) else np.zeros(len(ids), dtype=bool)
        stats["pool"] = len(ids)
        stats["labeled_in_pool"] = int(is_labeled.sum())
        stats["labeled_not_in_pool"] = len(labeled_ids) - stats["labeled_in_pool"]
        self._rows.inc(len(ids))
        self._labeled.inc(stats["labeled_in_pool"])

        cluster_ids = np.full(len(ids), NO_CLUSTER, dtype=np.int64)
        if self._clusters_flag is not None:
            clusters = concat_batches(parts["clusters"])
            cluster_index = clusters.ids if clusters is not None else np.zeros(0, dtype=ids.dtype)
            count, examples = find_duplicates(cluster_index)
            if count:
                stats["problem:cluster_duplicate_ids"] = count
                stats["examples:cluster_duplicate_ids"] = examples
            order = np.argsort(cluster_index, kind="stable")
            if len(order):
                position = np.minimum(np.searchsorted(cluster_index[order], ids), len(order) - 1)
                found = cluster_index[order][position] == ids
                cluster_ids = np.where(found, clusters.columns["cluster_id"][order][position], NO_CLUSTER)
            else:
                found = np.zeros(len(ids), dtype=bool)
            missing = int(np.count_nonzero(~found))
            if missing:
                stats["problem:uncovered_ids"] = missing
                stats["examples:uncovered_ids"] = [_printable(x) for x in ids[~found][:3]]
            stats["cluster_rows_not_in_pool"] = len(cluster_index) - int(found.sum())
        if any(key.startswith("problem:") for key in stats):
            yield beam.pvalue.TaggedOutput("stats", stats)
            return

        keep_rows = np.flatnonzero(~is_labeled)
        stats["unlabeled"] = len(keep_rows)
        stats["histogram:unlabeled_margins"] = margin_histogram(pool.columns["margin"][keep_rows]).tolist()
        ids = ids[keep_rows]
        candidates = scored_rows(pool.source, ids, pool.columns["margin"][keep_rows], cluster_ids[keep_rows],
                                 self._seed, self._round, pool.id_type)
        yield candidates.take(lowest_for(candidates, self._strategy, self._keep))
        yield beam.pvalue.TaggedOutput("stats", stats)


class _KeepLowest(beam.CombineFn):
    """Exact global k lowest rows; the total order makes the result merge-order independent."""

    def __init__(self, strategy: str, keep: int):
        self._strategy, self._keep = strategy, keep

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, batch):
        return self._compact(accumulator + [batch])

    def merge_accumulators(self, accumulators):
        return self._compact([b for acc in accumulators for b in acc])

    def _compact(self, batches):
        if len(batches) < 8:
            return batches
        merged = concat_batches(batches)
        return [merged.take(lowest_for(merged, self._strategy, self._keep))] if merged is not None else []

    def extract_output(self, accumulator):
        merged = concat_batches(accumulator)
        if merged is None:
            return None
        return merged.take(lowest_for(merged, self._strategy, self._keep))


def _printable(value):
    return value.decode(errors="replace") if isinstance(value, bytes) else int(value)


def _sum_stats(dicts):
    """Counts add up; example lists keep the first few, in sorted order."""
    total = {}
    for d in dicts:
        for key, value in d.items():
            if key.startswith("examples:"):
                total[key] = sorted(total.get(key, []) + list(value), key=str)[:3]
            elif key.startswith("histogram:"):
                total[key] = (np.add(total[key], value) if key in total else np.asarray(value)).tolist()
            else:
                total[key] = total.get(key, 0) + value
    return total


def raise_on_problems(stats: dict, pool_flag: str, clusters_flag: str | None) -> None:
    """Turn the pool-wide problem counts gathered by the join into one clear error."""
    if stats.get("problem:duplicate_ids"):
        raise InputError(f"{pool_flag}: column 'id' has {stats['problem:duplicate_ids']} duplicated ids "
                         f"(e.g. {stats['examples:duplicate_ids']}); ids must be unique across the pool")
    if stats.get("problem:cluster_duplicate_ids"):
        raise InputError(f"{clusters_flag}: column 'id' has {stats['problem:cluster_duplicate_ids']} ids assigned "
                         f"to more than one cluster (e.g. {stats['examples:cluster_duplicate_ids']})")
    if stats.get("problem:uncovered_ids"):
        raise InputError(f"{clusters_flag}: clusters do not cover the pool: {stats['problem:uncovered_ids']} "
                         f"pool ids have no cluster_id (e.g. {stats['examples:uncovered_ids']})")


class SelectCandidates(beam.PTransform):
    """{"pool": batches with `margin`, "clusters": ..., "labeled": ...} -> (candidates, stats).

    "clusters" and "labeled" may be left out.

    The candidates are one Batch: the k_m lowest-margin unlabeled rows for
    cluster-margin, the k_t lowest for margin, the k_t lowest pick hashes for
    random. Stats count pool, labeled and unlabeled rows.
    """

    def __init__(self, strategy: str, keep: int, seed: int, round_index: int, num_buckets: int,
                 clusters_flag: str | None):
        super().__init__()
        self.strategy, self.keep, self.seed, self.round = strategy, keep, seed, round_index
        self.num_buckets, self.clusters_flag = num_buckets, clusters_flag

    def expand(self, inputs):
        pool, clusters, labeled = inputs["pool"], inputs.get("clusters"), inputs.get("labeled")
        tagged = [pool | "BucketPool" >> beam.ParDo(_SplitByBucket("pool", self.num_buckets))]
        if clusters is not None:
            tagged.append(clusters | "BucketClusters" >> beam.ParDo(_SplitByBucket("clusters", self.num_buckets)))
        if labeled is not None:
            tagged.append(labeled | "BucketLabeled" >> beam.ParDo(_SplitByBucket("labeled", self.num_buckets)))
        joined = (tagged
                  | "Together" >> beam.Flatten()
                  | "ByBucket" >> beam.GroupByKey()
                  | "Join" >> beam.ParDo(_JoinBucket(self.strategy, self.keep, self.seed, self.round,
                                                     self.clusters_flag)).with_outputs("stats", main="rows"))
        candidates = joined.rows | "KeepLowest" >> memory.with_min_ram(
            beam.CombineGlobally(_KeepLowest(self.strategy, self.keep)), memory.candidates_bytes(self.keep))
        stats = joined.stats | "SumStats" >> beam.CombineGlobally(_sum_stats)
        return candidates, stats


class _CountPickClusters(beam.CombineFn):
    """Per picked cluster, its rows in the clustering: a vector over at most k_t clusters."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, counts):
        return counts if accumulator is None else accumulator + counts

    def merge_accumulators(self, accumulators):
        parts = [a for a in accumulators if a is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def extract_output(self, accumulator):
        return accumulator


def _count_in_batch(batch: Batch, wanted: np.ndarray) -> np.ndarray:
    counts = np.zeros(len(wanted), dtype=np.int64)
    if len(wanted) and len(batch):
        found, found_counts = np.unique(batch.columns["cluster_id"], return_counts=True)
        position = np.minimum(np.searchsorted(wanted, found), len(wanted) - 1)
        hit = wanted[position] == found
        np.add.at(counts, position[hit], found_counts[hit])
    return counts


class PickClusterSizes(beam.PTransform):
    """Cluster batches + the chosen batch (singleton) -> each chosen row's cluster size in the whole clustering.

    Only the picked clusters are counted (a side input of at most k_t ids), so
    nothing grows with the pool.
    """

    def __init__(self, chosen):
        super().__init__()
        self.chosen = chosen

    def expand(self, clusters):
        wanted = self.chosen | "PickedClusters" >> beam.Map(
            lambda c: np.unique(c.columns["cluster_id"]) if c is not None else np.zeros(0, np.int64))
        counts = (clusters
                  | "CountInBatch" >> beam.Map(_count_in_batch, beam.pvalue.AsSingleton(wanted))
                  | "Sum" >> beam.CombineGlobally(_CountPickClusters()))

        def per_pick(chosen, wanted, counts):
            if chosen is None or counts is None:
                return None
            return counts[np.searchsorted(wanted, chosen.columns["cluster_id"])]

        return self.chosen | "PerPick" >> beam.Map(per_pick, beam.pvalue.AsSingleton(wanted),
                                                   beam.pvalue.AsSingleton(counts))

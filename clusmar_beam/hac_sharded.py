"""Sharded average-linkage HAC: reciprocal-nearest merges inside partitions, then one worker.

Clusters are kept as statistics (count n, vector sum S and, for squared
Euclidean, the within-cluster sum of squared deviations W), so every linkage
is exact (see clusmar_beam.hac).  One sharded round:

1. coarse centroids of the current cluster means (FAISS k-means on a
   deterministic sample) cut the clusters into `P` partitions (home cell);
2. each cluster is also sent, frozen, to the partitions of its next
   `halo_cells` nearest cells, so a partition sees the clusters just across
   its border;
3. inside a partition, reciprocal-nearest pairs within the threshold merge
   in rounds (RAC, clusmar_beam.hac machinery); frozen clusters are
   searched as neighbours but never merge, so a member whose nearest
   cluster lies in another partition waits;
4. merged statistics are contracted into new clusters.

Each later round uses fewer partitions (P / `shrink`), so pairs split by a
border in one round share a partition in the next; the last round is one
partition on one worker, which is exactly the single-machine RAC on what is
left.  Every merge made inside a partition is a merge of globally reciprocal
nearest clusters as long as each member's nearest cluster was visible (member
or frozen neighbour), so the result is exact average linkage up to the
clusters a partition could not see; shard-count invariance is tested.

`sharded_average_linkage` runs the rounds in one process (reference and
tests); `ShardedHac` is the same as Beam transforms (GroupByKey per round).
`ThresholdFromTarget` picks eps for a target mean cluster size inside the
pipeline, by the same steps as hac.choose_threshold.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
import numpy as np

from clusmar_beam import hac, knn

LOG = logging.getLogger("clusmar")


@dataclasses.dataclass
class Clusters:
    """Statistics of many clusters: ids (the smallest point row in each), n, S, W."""

    ids: np.ndarray
    cnt: np.ndarray
    S: np.ndarray
    W: np.ndarray

    def __len__(self):
        return int(self.ids.size)

    def take(self, idx):
        return Clusters(self.ids[idx], self.cnt[idx], self.S[idx], self.W[idx])

    @staticmethod
    def concat(parts):
        parts = [p for p in parts if len(p)]
        return Clusters(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("ids", "cnt", "S", "W")))

    def means(self):
        return self.S / self.cnt[:, None]


def initial_clusters(X: np.ndarray, rows: np.ndarray | None = None) -> Clusters:
    """One cluster per (prepared) point; ids are the row numbers."""
    rows = np.arange(X.shape[0], dtype=np.int64) if rows is None else rows
    return Clusters(rows.astype(np.int64), np.ones(X.shape[0]), np.array(X, np.float64), np.zeros(X.shape[0]))


def rac_on_clusters(members: Clusters, eps: float, metric: str, frozen: Clusters | None = None,
                    seed: int = 0, k: int = hac.DEFAULT_K, delta: float = 0.0):
    """RAC among `members` with `frozen` clusters visible but never merged.

    Returns (merged member clusters, merge edges, their heights, merge rounds).  An edge
    joins the ids of two clusters that merged (one of which the merged
    cluster keeps); the clusters are the connected components of the edges
    of all rounds (hac.labels_from_edges).  `delta` is hac.average_linkage's.
    """
    m = len(members)
    if m == 0:
        return members, np.zeros((0, 2), np.int64), np.zeros(0)
    members = members.take(np.argsort(members.ids, kind="stable"))  # lower row = lower id
    both = members if frozen is None or not len(frozen) else Clusters.concat([members, frozen])
    is_frozen = np.zeros(len(both), bool)
    is_frozen[m:] = True
    S = np.array(both.S, np.float64)
    cnt = np.array(both.cnt, np.float64)
    W = np.array(both.W, np.float64)
    rac = hac.Rac(S, cnt, metric, eps, exact_search_max=hac.EXACT_SEARCH_MAX, nlist=None, nprobe=32, seed=seed,
                  log=None, t0=time.perf_counter(), k=k, W=W, frozen=is_frozen, delta=delta)
    left, merges_per_round = rac.run(first_round_extra=0)
    heights = np.concatenate(rac.heights) if rac.heights else np.zeros(0)
    pairs = np.concatenate(rac.pairs) if rac.pairs else np.zeros((0, 2), np.int64)
    alive = left.ids < m  # the frozen rows come after the members, and only members merge
    out = Clusters(members.ids[left.ids[alive]], left.cnt[alive], left.S[alive],
                   left.W[alive] if left.W is not None else np.zeros(np.count_nonzero(alive)))
    return out, members.ids[pairs], heights, len(merges_per_round)


def finish(clusters: Clusters, eps: float, metric: str, seed: int = 0, *, target: float | None = None,
           n: int = 0, merged_before: int = 0, merge_threshold: float | None = None, delta: float = 0.0):
    """The one-worker end: RAC on all that is left, up to eps.

    With a target mean cluster size, up to `merge_threshold` (when higher),
    and with n points of which `merged_before` merges were made already,
    merging goes on with the threshold raised by hac.TARGET_RAISE while the
    clusters average fewer than the target (the cut comes after, see
    `cut`).  Returns (edges, heights, eps merged up to, merge rounds).
    """
    if target is not None and merge_threshold is not None:
        eps = max(eps, merge_threshold)
    edges, heights, rounds = [], [], 0
    while True:
        clusters, e, h, r = rac_on_clusters(clusters, eps, metric, None, seed, delta=delta)
        edges.append(e)
        heights.append(h)
        rounds += r
        merged_before += len(e)
        # Once eps is above every linkage all clusters merge into one, so this ends.
        if target is None or len(clusters) <= 1 or n / (n - merged_before) >= target:
            return np.concatenate(edges), np.concatenate(heights), eps, rounds
        eps *= hac.TARGET_RAISE


def cut(n: int, edges, heights, eps: float, target: float | None = None):
    """Flat labels of rows 0..n-1 and the threshold they are cut at.

    Without a target that is eps, which every merge is within; with one, the
    threshold whose cut of these merges leaves n / target clusters.
    """
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    heights = np.asarray(heights, np.float64)
    if target is not None:
        eps = hac.threshold_from_heights(heights, n, target)
    return hac.labels_from_edges(n, edges[heights <= eps]), eps


PARTITION_KMEANS_ITERATIONS = 15


def _partition_centroids(clusters: Clusters, parts: int, seed: int, sample_per_part: int = 64):
    """k-means centroids of cluster means, on the clusters with the lowest id hashes."""
    parts = max(1, min(parts, len(clusters)))
    order = np.lexsort((clusters.ids, knn.hash_ids(clusters.ids, seed)))[:parts * sample_per_part]
    order = np.sort(order)
    sample = np.ascontiguousarray(clusters.means()[order], np.float32)
    return knn.train_centroids(sample, parts, seed, niter=PARTITION_KMEANS_ITERATIONS)


def route(clusters: Clusters, centroids: np.ndarray, halo_cells: int):
    """(home cell, cells where the cluster is a frozen neighbour)."""
    cells = knn.probe_cells(centroids, np.ascontiguousarray(clusters.means(), np.float32), 1 + halo_cells)
    return cells[:, 0], cells[:, 1:]


def _halo_rows(halo: np.ndarray) -> dict:
    """cell -> rows of the clusters that are frozen neighbours in that cell."""
    if halo.size == 0:  # no halo cells, or fewer cells than 2
        return {}
    return {c: pos // halo.shape[1] for c, pos in knn.split_by_key(halo.reshape(-1))}


def _partition_round(clusters: Clusters, eps, metric, parts, halo_cells, seed, delta):
    centroids = _partition_centroids(clusters, parts, seed)
    home, halo = route(clusters, centroids, halo_cells)
    frozen_rows = _halo_rows(halo)
    outs, edges, heights, rounds = [], [], [], 0
    for c, mem in knn.split_by_key(home):
        fro = frozen_rows.get(c, np.zeros(0, np.int64))
        out, e, h, r = rac_on_clusters(clusters.take(mem), eps, metric, clusters.take(fro), seed, delta=delta)
        outs.append(out)
        edges.append(e)
        heights.append(h)
        rounds = max(rounds, r)  # partitions merge side by side
    return Clusters.concat(outs), np.concatenate(edges), np.concatenate(heights), rounds


def check_shard_params(shards, halo_cells, shrink, max_rounds):
    for name, value in (("shards", shards), ("halo_cells", halo_cells + 1), ("shrink", shrink - 1),
                        ("max_rounds", max_rounds + 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise hac.HacError(f"{name} out of range: shards >= 1, halo_cells >= 0, shrink >= 2, max_rounds >= 0")


def sharded_average_linkage(embeddings, distance_threshold, metric="cosine", *, target_mean_cluster_size=None,
                            merge_threshold=None, shards=64, halo_cells=2, shrink=4, max_rounds=8, seed=0,
                            log=None, delta=0.0):
    """Flat average-linkage clusters by partitioned RAC rounds, remainder on one worker.

    `shards` partitions in the first round, `shards / shrink` in the next, ...
    until one partition is left or `max_rounds` sharded rounds ran; then
    exact RAC on the remaining clusters.  With `target_mean_cluster_size`,
    the partitioned rounds merge up to `distance_threshold` and the last one
    up to `merge_threshold` (default: the same), raised while short of the
    target, and the result is cut at the target as in hac.average_linkage.
    Every RAC round merges (1 + delta)-good stars as hac.average_linkage
    does.  Labels numbered by first appearance.  Returns (labels, info dict
    with the cut, clusters and merges per round).
    """
    eps = hac.check_threshold(distance_threshold)
    merge_threshold = None if merge_threshold is None else hac.check_threshold(merge_threshold)
    target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
    if metric not in hac.METRICS:
        raise hac.HacError(f"unknown metric {metric!r}")
    check_shard_params(shards, halo_cells, shrink, max_rounds)
    delta = hac.check_delta(delta)
    X = hac.prepare(embeddings, metric)
    n = X.shape[0]
    clusters = initial_clusters(X)
    edges, heights = [], []
    info = {"rounds": []}
    parts, rnd = shards, 0
    while parts > 1 and rnd < max_rounds and len(clusters) > 1:
        t = time.perf_counter()
        clusters, e, h, r = _partition_round(clusters, eps, metric, parts, halo_cells, seed + rnd, delta)
        edges.append(e)
        heights.append(h)
        info["rounds"].append({"partitions": parts, "merges": len(e), "clusters": len(clusters), "merge_rounds": r})
        if log:
            log(f"sharded hac round {rnd + 1}: {parts} partitions, {len(e)} merges, {len(clusters)} clusters "
                f"({time.perf_counter() - t:.1f}s)")
        parts = max(1, parts // shrink)
        rnd += 1
    merged_before = sum(len(e) for e in edges)
    e, h, info["merged_up_to"], r = finish(clusters, eps, metric, seed, target=target, n=n,
                                           merged_before=merged_before, merge_threshold=merge_threshold, delta=delta)
    edges.append(e)
    heights.append(h)
    info["rounds"].append({"partitions": 1, "merges": len(e), "clusters": len(clusters) - len(e), "merge_rounds": r})
    info["merge_rounds"] = sum(part["merge_rounds"] for part in info["rounds"])
    labels, info["distance_threshold"] = cut(n, np.concatenate(edges), np.concatenate(heights), eps, target)
    info["num_clusters"] = int(labels.max()) + 1
    return labels, info


# --------------------------------------------------------------------- Beam


def _to_clusters(batch, metric):
    """(row ids, embeddings) batch -> initial Clusters (prepared vectors)."""
    rows, x = batch
    beam.metrics.Metrics.counter("hac", "points").inc(len(rows))
    prepared = hac.prepare(x, metric)  # validates; unit rows for cosine
    if metric != "cosine":
        # prepare centres on this batch's mean; batches must share one origin
        prepared = np.array(x, np.float64)
    return initial_clusters(prepared, np.asarray(rows, np.int64))


def _ids_and_means(clusters: Clusters):
    return clusters.ids, clusters.means()


def _train(sample, parts, seed, round_name="round"):
    """Centroids from the bottom-k sample, in id order (as `_partition_centroids` takes them)."""
    _, ids, means = sample
    LOG.info("sharded hac %s: %d partitions (centroids from a sample of %d clusters)", round_name, parts, ids.size)
    return knn.train_centroids(np.ascontiguousarray(means[np.argsort(ids)], np.float32), parts, seed,
                               niter=PARTITION_KMEANS_ITERATIONS)


class _RouteClusters(beam.DoFn):
    def __init__(self, halo_cells):
        self.halo_cells = halo_cells

    def process(self, clusters, centroids):
        if not len(clusters):
            return
        home, halo = route(clusters, centroids, self.halo_cells)
        for c, rows in knn.split_by_key(home):
            yield c, ("m", clusters.take(rows))
        for c, rows in _halo_rows(halo).items():
            yield c, ("f", clusters.take(rows))


class _LocalRac(beam.DoFn):
    EDGES = "edges"

    def __init__(self, metric, seed, round_index, delta):
        self.metric, self.seed, self.round_index, self.delta = metric, seed, round_index, delta
        self.round_name = f"round_{round_index + 1}"

    def process(self, element, eps):
        _, parts = element
        parts = list(parts)
        mem = [p[1] for p in parts if p[0] == "m"]
        if not mem:
            return
        members = Clusters.concat(mem)  # rac_on_clusters puts them in id order: delivery order does not matter
        fro = [p[1] for p in parts if p[0] == "f"]
        frozen = Clusters.concat(fro) if fro else None
        if frozen is not None:
            frozen = frozen.take(np.argsort(frozen.ids, kind="stable"))
        out, edges, heights, rounds = rac_on_clusters(members, eps, self.metric, frozen, self.seed, delta=self.delta)
        beam.metrics.Metrics.counter("hac", f"merges_{self.round_name}").inc(len(edges))
        beam.metrics.Metrics.counter("hac", f"clusters_after_{self.round_name}").inc(len(out))
        beam.metrics.Metrics.counter("hac", f"partitions_{self.round_name}").inc(1)
        yield out
        yield beam.pvalue.TaggedOutput(self.EDGES, (edges, heights, self.round_index, rounds))


def _finish(cluster_parts, eps, metric, seed, target, n, merged_before, merge_eps, delta):
    """The last round on one worker: (edges, heights, eps merged up to, merge rounds)."""
    clusters = Clusters.concat(list(cluster_parts)) if cluster_parts else None
    if clusters is None or not len(clusters):
        return np.zeros((0, 2), np.int64), np.zeros(0), eps, 0
    t = time.time()
    edges, heights, merged_up_to, rounds = finish(clusters, eps, metric, seed, target=target, n=n,
                                                  merged_before=merged_before, merge_threshold=merge_eps,
                                                  delta=delta)
    beam.metrics.Metrics.counter("hac", "merges_final").inc(len(edges))
    beam.metrics.Metrics.counter("hac", "clusters").inc(len(clusters) - len(edges))
    LOG.info("sharded hac: final round on one worker: %d clusters -> %d, merged up to %.6g (%.1f s)",
             len(clusters), len(clusters) - len(edges), merged_up_to, time.time() - t)
    return edges, heights, merged_up_to, rounds


def _cut(parts, final, n, eps, target):
    """Every partition's (edges, heights, round, merge rounds) and the last round's -> the labels of
    rows 0..n-1, the threshold of the cut and the merge rounds (partitions of a round run side by side)."""
    edges = np.concatenate([p[0] for p in parts] + [final[0]])
    heights = np.concatenate([p[1] for p in parts] + [final[1]])
    labels, eps = cut(n, edges, heights, eps, target)
    longest = {}
    for p in parts:
        longest[p[2]] = max(longest.get(p[2], 0), p[3])
    return {"labels": labels, "distance_threshold": eps, "merged_up_to": final[2],
            "merges": int(n - (labels.max() + 1 if n else 0)), "rounds": sum(longest.values()) + final[3]}


def _threshold_argument(value):
    """A checked threshold, or a singleton PCollection (checked when it is computed, in expand)."""
    return value if isinstance(value, beam.pvalue.PCollection) else hac.check_threshold(value)


class ShardedHac(beam.PTransform):
    """PCollection of (row ids int64, embeddings) batches, rows 0..n-1 -> singleton
    PCollection of a dict: `labels` of rows 0..n-1 (numbered by first appearance),
    `distance_threshold` (the cut), `merged_up_to`, `merges` and merge `rounds`.

    `distance_threshold` is a number, or a singleton PCollection holding it (an
    eps computed in the same pipeline, e.g. by ThresholdFromTarget).  With
    `target_mean_cluster_size` the partitioned rounds merge up to it, the
    last round, on one worker, up to `merge_threshold` (the same kinds of
    value; default distance_threshold), raised while the clusters average
    fewer than the target, and the merges are then cut at the target (as
    hac.average_linkage does).  The partitions are kept to the lower
    threshold because a partition's mistakes (a member whose nearest cluster
    it cannot see merges with the next best) grow with the threshold, and a
    cut below the threshold a mistake was made at undoes the merge but not
    the merge it prevented.  On a 1M pool with 256 partitions, merging
    everything up to twice the target's threshold agreed with the one-worker
    target clusters at ARI 0.977, stopping the partitions at the sample's
    estimate at 0.985; most of what is left is the slightly lower cut that
    the partitions' few extra merges call for (benchmarks/RESULTS.md).
    """

    def __init__(self, distance_threshold, metric="cosine", shards=64, halo_cells=2, shrink=4, max_rounds=8,
                 seed=0, target_mean_cluster_size=None, merge_threshold=None, delta=0.0):
        super().__init__()
        self.delta = hac.check_delta(delta)
        self.eps = _threshold_argument(distance_threshold)
        self.merge_eps = None if merge_threshold is None else _threshold_argument(merge_threshold)
        if metric not in hac.METRICS:
            raise hac.HacError(f"unknown metric {metric!r}")
        check_shard_params(shards, halo_cells, shrink, max_rounds)
        self.target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
        self.metric, self.shards, self.halo_cells = metric, shards, halo_cells
        self.shrink, self.max_rounds, self.seed = shrink, max_rounds, seed

    def expand(self, batches):
        side = beam.pvalue.AsSingleton

        def checked(value, label):  # a number was checked in __init__; a PCollection is checked here
            if not isinstance(value, beam.pvalue.PCollection):
                return value
            return side(value | label >> beam.Map(hac.check_threshold))

        eps, merge_eps = checked(self.eps, "CheckEps"), checked(self.merge_eps, "CheckMergeEps")
        n = side(batches | "CountPoints" >> beam.Map(lambda batch: len(batch[0])) | "SumPoints" >> beam.CombineGlobally(sum))
        clusters = batches | "Init" >> beam.Map(_to_clusters, self.metric)
        round_merges = []
        parts, rnd = self.shards, 0
        while parts > 1 and rnd < self.max_rounds:
            name = f"Round{rnd + 1}"
            seed = self.seed + rnd
            centroids = (clusters
                         | f"{name}Sample" >> beam.CombineGlobally(knn.BottomKByHash(parts * 64, seed, _ids_and_means)).without_defaults()
                         | f"{name}Train" >> beam.Map(_train, parts, seed, f"round {rnd + 1}"))
            result = (clusters
                      | f"{name}Route" >> beam.ParDo(_RouteClusters(self.halo_cells),
                                                     beam.pvalue.AsSingleton(centroids))
                      | f"{name}Group" >> beam.GroupByKey()
                      | f"{name}Rac" >> beam.ParDo(_LocalRac(self.metric, seed, rnd, self.delta), eps)
                      .with_outputs(_LocalRac.EDGES, main="clusters"))
            clusters = result.clusters
            round_merges.append(result[_LocalRac.EDGES])
            parts = max(1, parts // self.shrink)
            rnd += 1
        merges = (tuple(round_merges) | "RoundMerges" >> beam.Flatten(pipeline=batches.pipeline)
                  | "GatherMerges" >> beam.combiners.ToList())
        merged_before = merges | "CountMerges" >> beam.Map(lambda parts: sum(len(p[0]) for p in parts))
        final = (clusters
                 | "FinalGather" >> beam.combiners.ToList()
                 | "FinalRac" >> beam.Map(_finish, eps, self.metric, self.seed, self.target, n, side(merged_before),
                                         merge_eps, self.delta))
        return merges | "Cut" >> beam.Map(_cut, side(final), n, eps, self.target)


# ------------------------------------------------- threshold from a target size


def _row_count(batch):
    return len(batch[0])


def _layout(n, sample_size, seed):
    """The pool size -> number of threshold cells and the rows that train them (one worker)."""
    num_cells = hac.threshold_cells(n, sample_size)
    return {"num_cells": num_cells, "training_rows": hac.training_rows(n, num_cells, seed)}


def _training_part(batch, layout):
    rows, x = batch
    keep = np.isin(rows, layout["training_rows"])
    return rows[keep], x[keep]


def _in_row_order(parts):
    """(rows, columns...) pieces from many batches -> one of each, sorted by row: delivery order must not matter."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return None
    rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(rows)
    return [np.concatenate([p[i] for p in parts])[order] for i in range(1, len(parts[0]))]


def _train_cells(training_parts, layout, metric, margin_cells, seed):
    gathered = _in_row_order(training_parts)
    train_x = gathered[0] if gathered else None
    return hac.SampleCells.train(train_x, metric, layout["num_cells"], margin_cells, seed)


def _assign(batch, cells):
    rows, x = batch
    return rows, x, cells.assign(x)


def _cell_counts(assigned, cells):
    return np.bincount(assigned[2][:, 0], minlength=cells.num_cells)


def _draw(sizes, cells, sample_size, seed):
    sizes = np.zeros(cells.num_cells, np.int64) + sizes  # sum() of no batches is 0
    return hac.draw_cells(sizes, sample_size, seed)


def _sample_part(assigned, draw):
    rows, x, cells = assigned
    pos, core = draw.select(rows, cells)
    return rows[pos], x[pos], core


def _threshold(sample_parts, draw, metric, target, seed, delta):
    gathered = _in_row_order(sample_parts)
    x, core = gathered if gathered else (np.zeros((0, 0), np.float32), np.zeros(0, bool))
    return hac.threshold_from_sample(x, core, metric, target, seed, draw, delta)


class ThresholdFromTarget(beam.PTransform):
    """PCollection of (row ids int64, embeddings) batches, rows 0..n-1 -> singleton
    PCollection: the hac.ThresholdChoice that hac.choose_threshold gives on the same
    rows, whatever the batching, order or number of workers.

    Each step of hac.choose_threshold runs where its data is: counting rows and
    assigning cells per batch, training the cells (on the rows of lowest hash),
    drawing cells from the summed cell counts and the final clustering of the
    gathered sample on one worker.  Only small arrays (training rows, centroids,
    a mask over cells) travel as side inputs.
    """

    def __init__(self, target_mean_cluster_size, metric="cosine", sample_size=10_000, margin_cells=3, seed=0,
                 delta=0.0):
        super().__init__()
        self.target = hac.check_target(target_mean_cluster_size)
        self.delta = hac.check_delta(delta)
        if metric not in hac.METRICS:
            raise hac.HacError(f"unknown metric {metric!r}")
        hac.check_count("sample_size", sample_size)
        self.metric, self.sample_size, self.margin_cells, self.seed = metric, sample_size, margin_cells, seed

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        layout = (batches
                  | "CountRows" >> beam.Map(_row_count)
                  | "SumRows" >> beam.CombineGlobally(sum)
                  | "Layout" >> beam.Map(_layout, self.sample_size, self.seed))
        cells = (batches
                 | "TrainingRows" >> beam.Map(_training_part, side(layout))
                 | "GatherTraining" >> beam.combiners.ToList()
                 | "TrainCells" >> beam.Map(_train_cells, side(layout), self.metric, self.margin_cells, self.seed))
        assigned = batches | "AssignCells" >> beam.Map(_assign, side(cells))
        draw = (assigned
                | "CellCounts" >> beam.Map(_cell_counts, side(cells))
                | "SumCellCounts" >> beam.CombineGlobally(sum)
                | "DrawCells" >> beam.Map(_draw, side(cells), self.sample_size, self.seed))
        return (assigned
                | "SampleRows" >> beam.Map(_sample_part, side(draw))
                | "GatherSample" >> beam.combiners.ToList()
                | "Threshold" >> beam.Map(_threshold, side(draw), self.metric, self.target, self.seed, self.delta))

"""Sharded average-linkage HAC: merges inside partitions, round after round, on many workers.

Clusters are kept as statistics (count n, vector sum S and, for squared
Euclidean, the within-cluster sum of squared deviations W), so every linkage
is exact (see clusmar_beam.hac).  One sharded round:

1. coarse centroids of the current cluster means (FAISS k-means on the
   clusters of lowest id hash) cut the clusters into partitions (home cell),
   as many as the clusters left need at the first round's partition size;
2. each cluster is also sent, frozen, to the partitions of its next
   `halo_cells` nearest cells, so a partition sees the clusters just across
   its border;
3. inside a partition, reciprocal-nearest pairs and (1+delta)-good stars
   within the threshold merge in RAC rounds (clusmar_beam.hac); frozen
   clusters are searched as neighbours but never merge, so a member whose
   nearest cluster lies in another partition waits;
4. the merged statistics are the next round's clusters, and each partition's
   merges (a forest over its members' ids) go on as one element.

Rounds go on until no member waited (nothing within the threshold was left
across a border), with as many partitions as the clusters left need; once
those fit one partition the round is exact RAC on one worker, bounded by the
partition size.  With a target mean cluster size, the rounds then go on up to
the merge threshold and raise it while short of the target, and the merges
are cut at the target.  A point's cluster is found by following its merges
back from the last round (a join per round keyed by row range), never by
gathering them.

`sharded_average_linkage` runs the rounds in one process (reference and
tests); `ShardedHac` is the same as Beam transforms.  `ThresholdFromTarget`
picks eps for a target mean cluster size inside the pipeline, by the same
steps as hac.choose_threshold.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import apache_beam as beam
import numpy as np

import scipy.sparse
import scipy.sparse.csgraph

from clusmar_beam import element_sizes, hac, io, knn, ranks

LOG = logging.getLogger("clusmar")


@dataclasses.dataclass
class Clusters:
    """Statistics of many clusters: ids (the smallest point row in each), n, S, W; and `route`, the point
    a cluster is partitioned by (NaN: its own mean; a cluster that waited on a neighbour across a border
    is routed with it)."""

    ids: np.ndarray
    cnt: np.ndarray
    S: np.ndarray
    W: np.ndarray
    route: np.ndarray | None = None
    # Single points may travel as the pool's float32 rows (half the bytes of float64 statistics): S is then
    # the raw embedding, prepared for this metric (hac.prepare, row by row) where it is used.
    raw_metric: str | None = None

    def __len__(self):
        return int(self.ids.size)

    def take(self, idx):
        return Clusters(self.ids[idx], self.cnt[idx], self.S[idx], self.W[idx],
                        None if self.route is None else self.route[idx], self.raw_metric)

    @staticmethod
    def concat(parts):
        parts = [p for p in parts if len(p)]
        if len({p.raw_metric for p in parts}) > 1:
            raise ValueError("cannot join raw points and cluster statistics")
        routes = None
        if any(p.route is not None for p in parts):
            routes = np.concatenate([p.route if p.route is not None else np.full(p.S.shape, np.nan, np.float32)
                                     for p in parts])
        return Clusters(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "cnt", "S", "W")),
                        routes, parts[0].raw_metric if parts else None)

    def sums(self) -> np.ndarray:
        """S as float64 statistics (raw points prepared)."""
        if self.raw_metric == "cosine":
            return hac.prepare(self.S, "cosine")
        return np.array(self.S, np.float64)

    def means(self):
        return self.sums() / self.cnt[:, None]

    def routing_points(self) -> np.ndarray:
        points = np.ascontiguousarray(self.means(), np.float32)
        if self.route is not None:
            given = ~np.isnan(self.route[:, 0])
            points[given] = self.route[given]
        return points


def initial_clusters(X: np.ndarray, rows: np.ndarray | None = None) -> Clusters:
    """One cluster per (prepared) point; ids are the row numbers."""
    rows = np.arange(X.shape[0], dtype=np.int64) if rows is None else rows
    return Clusters(rows.astype(np.int64), np.ones(X.shape[0]), np.array(X, np.float64), np.zeros(X.shape[0]))


def rac_on_clusters(members: Clusters, eps: float, metric: str, frozen: Clusters | None = None,
                    seed: int = 0, k: int = hac.DEFAULT_K, delta: float = 0.0):
    """RAC among `members` with `frozen` clusters visible but never merged.

    Returns (merged member clusters, merge edges, their heights, merge rounds,
    members left waiting on a frozen neighbour within eps).  An edge joins
    the ids of two clusters that merged (one of which the merged cluster
    keeps); the clusters are the connected components of the edges of all
    rounds (hac.labels_from_edges).  `delta` is hac.average_linkage's.
    """
    m = len(members)
    if m == 0:
        return members, np.zeros((0, 2), np.int64), np.zeros(0), 0, 0
    members = members.take(np.argsort(members.ids, kind="stable"))  # lower row = lower id
    both = members if frozen is None or not len(frozen) else Clusters.concat([members, frozen])
    is_frozen = np.zeros(len(both), bool)
    is_frozen[m:] = True
    S = both.sums()
    cnt = np.array(both.cnt, np.float64)
    W = np.array(both.W, np.float64)
    rac = hac.Rac(S, cnt, metric, eps, exact_search_max=hac.EXACT_SEARCH_MAX, nlist=None, nprobe=32, seed=seed,
                  log=None, t0=time.perf_counter(), k=k, W=W, frozen=is_frozen, delta=delta)
    left, merges_per_round = rac.run(first_round_extra=0)
    heights = np.concatenate(rac.heights) if rac.heights else np.zeros(0)
    pairs = np.concatenate(rac.pairs) if rac.pairs else np.zeros((0, 2), np.int64)
    alive = left.ids < m  # the frozen rows come after the members, and only members merge
    edges = members.ids[pairs]
    # A star keeps its pair's id, which a leaf's can be below: name every cluster by its smallest row, so
    # that clusters are numbered by first appearance and a cut finds a cluster under its own id.
    ids = smallest_connected(edges, members.ids[left.ids[alive]]) if len(edges) else members.ids[left.ids[alive]]
    out = Clusters(ids, left.cnt[alive], left.S[alive],
                   left.W[alive] if left.W is not None else np.zeros(np.count_nonzero(alive)))
    if rac.waiting:
        # A member waiting on a cluster across the border goes, next round, where the lower-id one of the
        # two is routed: a pair split by a border is not split the same way again.
        row_of = np.full(len(both), -1, np.int64)
        row_of[left.ids] = np.arange(left.ids.size)
        member, other = rac.waiting_on[:, 0], rac.waiting_on[:, 1]
        lead = np.where(both.ids[other] < both.ids[member], other, member)
        lead_row = row_of[lead]
        route = np.full(out.S.shape, np.nan, np.float32)
        at = np.searchsorted(left.ids[alive], member)  # members' rows in `out` (left.ids ascending)
        route[at] = (left.S[lead_row] / left.cnt[lead_row][:, None]).astype(np.float32)
        out.route = route
    return out, edges, heights, len(merges_per_round), rac.waiting


PARTITION_KMEANS_ITERATIONS = 15
SAMPLE_PER_PARTITION = 64  # clusters of lowest id hash per partition that train the partition centroids
SAMPLE_MAX = 1 << 16  # ... but never more than this many: the sample is one element
ROWS_PER_BUCKET = 1 << 17  # rows per bucket of the joins that follow merges back to the points
DEFAULT_MAX_ROUNDS = 20
# A round goes on to a higher threshold (a target's) once at most this share of the clusters waited on a
# neighbour across a border: repeating the threshold for them would cost a whole round each time.
WAITING_TO_MOVE_ON = 0.01
# A round that repeats its threshold for members still waiting across a border runs on one worker once
# at most this many clusters are left (the stated one-worker bound: it does not grow with the pool).
FINISH_ON_ONE_WORKER = 1 << 18


def partition_sample_size(shards: int) -> int:
    return min(shards * SAMPLE_PER_PARTITION, SAMPLE_MAX)


def _partition_centroids(clusters: Clusters, parts: int, seed: int, sample_size: int):
    """k-means centroids of cluster means, on the `sample_size` clusters with the lowest id hashes."""
    parts = max(1, min(parts, len(clusters)))
    order = np.lexsort((clusters.ids, knn.hash_ids(clusters.ids, seed)))[:sample_size]
    order = order[np.argsort(clusters.ids[order])]  # in id order, as the Beam transform trains them
    sample = np.ascontiguousarray(clusters.means()[order], np.float32)
    return knn.train_centroids(sample, parts, seed, niter=PARTITION_KMEANS_ITERATIONS)


def route(clusters: Clusters, centroids: np.ndarray, halo_cells: int):
    """(home cell, cells where the cluster is a frozen neighbour)."""
    cells = knn.probe_cells(centroids, clusters.routing_points(), 1 + halo_cells)
    return cells[:, 0], cells[:, 1:]


def _halo_rows(halo: np.ndarray) -> dict:
    """cell -> rows of the clusters that are frozen neighbours in that cell."""
    if halo.size == 0:  # no halo cells, or fewer cells than 2
        return {}
    return {c: pos // halo.shape[1] for c, pos in knn.split_by_key(halo.reshape(-1))}


def check_shard_params(shards, halo_cells, max_rounds):
    for name, value in (("shards", shards), ("halo_cells", halo_cells + 1), ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise hac.HacError(f"{name} out of range: shards >= 1, halo_cells >= 0, max_rounds >= 1")


def next_round(prev: dict | None, clusters: int, waiting: int, n: int, shards: int, eps: float,
               merge_eps: float | None = None, target: float | None = None) -> dict:
    """The plan of a sharded round: {"parts": partitions (0: nothing is left to merge), "eps": merge up to,
    "finish": raise eps on one worker until the target is reached}.

    Partitions hold at most about n / shards clusters, the first round's
    size.  A round repeats its threshold while members waited on a
    neighbour across a border; once none did, the rounds go on up to
    `merge_eps` (a target's threshold), then, while the clusters average
    fewer than `target`, with the threshold raised by hac.TARGET_RAISE.
    Once at most FINISH_ON_ONE_WORKER clusters are left, a round that would
    repeat or go higher does all that is left on one worker instead.
    """
    size = max(1, math.ceil(n / shards))
    if clusters <= 1 or (prev is not None and prev["parts"] == 0):
        return {"parts": 0, "eps": eps if prev is None else prev["eps"], "finish": False}
    if prev is None:
        step = eps
    else:
        higher = None
        if merge_eps is not None and prev["eps"] < merge_eps:
            higher = merge_eps
        elif target is not None and n / clusters < target:
            higher = prev["eps"] * hac.TARGET_RAISE
        if higher is None and not waiting:
            return {"parts": 0, "eps": prev["eps"], "finish": False}
        if clusters <= FINISH_ON_ONE_WORKER:
            return {"parts": 1, "eps": max(prev["eps"], merge_eps or 0.0), "finish": target is not None}
        # the few waiting pairs are within the higher threshold too
        step = higher if higher is not None and waiting <= WAITING_TO_MOVE_ON * clusters else prev["eps"]
    return {"parts": max(1, math.ceil(clusters / size)), "eps": step, "finish": False}


def merge_partition(members: Clusters, frozen: Clusters | None, plan: dict, metric: str, seed: int, delta: float,
                    n: int, target: float | None):
    """RAC of one partition as the round's plan says: (clusters, edges, heights, rounds, waiting, eps reached).

    A finishing round holds every cluster left: it raises the threshold
    until they average the target size, as hac.average_linkage does.
    """
    eps = plan["eps"]
    out, edges, heights, rounds, waiting = rac_on_clusters(members, eps, metric, frozen, seed, delta=delta)
    if not plan.get("finish"):
        return out, edges, heights, rounds, waiting, eps
    edges, heights = [edges], [heights]
    while len(out) > 1 and n / len(out) < target:
        eps *= hac.TARGET_RAISE
        out, e, h, r, _ = rac_on_clusters(out, eps, metric, None, seed, delta=delta)
        edges.append(e)
        heights.append(h)
        rounds += r
    return out, np.concatenate(edges), np.concatenate(heights), rounds, 0, eps


def partition_round(clusters: Clusters, plan: dict, metric: str, halo_cells: int, seed: int, delta: float,
                    sample_size: int, n: int, target: float | None):
    """One sharded round in one process: merge_partition's result for each partition."""
    if plan["parts"] == 1:
        return [merge_partition(clusters, None, plan, metric, seed, delta, n, target)]
    centroids = _partition_centroids(clusters, plan["parts"], seed, sample_size)
    home, halo = route(clusters, centroids, halo_cells)
    frozen_rows = _halo_rows(halo)
    return [merge_partition(clusters.take(mem), clusters.take(frozen_rows.get(c, np.zeros(0, np.int64))), plan,
                            metric, seed, delta, n, target)
            for c, mem in knn.split_by_key(home)]


def smallest_connected(edges: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The smallest id connected to each of `ids` by the edges (itself when none is)."""
    keys = np.unique(np.concatenate([ids, edges.reshape(-1)]))
    local = np.searchsorted(keys, edges)
    graph = scipy.sparse.coo_matrix((np.ones(len(edges), np.int8), (local[:, 0], local[:, 1])),
                                    shape=(keys.size, keys.size))
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1 if component.size else 0, np.iinfo(np.int64).max)
    np.minimum.at(smallest, component, keys)
    return smallest[component[np.searchsorted(keys, ids)]]


def images(absorbed: np.ndarray, edges: np.ndarray, heights: np.ndarray, cut: float) -> np.ndarray:
    """Where each absorbed cluster of a partition went: the smallest id of its component among the edges at
    most `cut` high (itself when none is).  A partition's clusters are named by their smallest row (see
    rac_on_clusters), so when the cut keeps a merged cluster whole that is the cluster's own id."""
    return smallest_connected(edges[heights <= cut], absorbed)


def sharded_average_linkage(embeddings, distance_threshold, metric="cosine", *, target_mean_cluster_size=None,
                            merge_threshold=None, shards=64, halo_cells=2, max_rounds=DEFAULT_MAX_ROUNDS, seed=0,
                            log=None, delta=0.0):
    """Flat average-linkage clusters by partitioned RAC rounds (see the module docstring).

    With `target_mean_cluster_size`, the rounds merge up to
    `distance_threshold`, then `merge_threshold` (default: the same), raised
    while short of the target, and the result is cut at the target as in
    hac.average_linkage.  Labels numbered by first appearance.  Returns
    (labels, info dict with the cut, the rounds and the members still
    waiting after the last one).
    """
    eps = hac.check_threshold(distance_threshold)
    merge_eps = None if merge_threshold is None else hac.check_threshold(merge_threshold)
    target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
    if metric not in hac.METRICS:
        raise hac.HacError(f"unknown metric {metric!r}")
    check_shard_params(shards, halo_cells, max_rounds)
    delta = hac.check_delta(delta)
    X = hac.prepare(embeddings, metric)
    n = X.shape[0]
    clusters = initial_clusters(X)
    edges, heights = [np.zeros((0, 2), np.int64)], [np.zeros(0)]
    info = {"rounds": []}
    plan, waiting, merge_rounds = None, 0, 0
    for rnd in range(max_rounds):
        plan = next_round(plan, len(clusters), waiting, n, shards, eps, merge_eps, target)
        if plan["parts"] == 0:
            break
        t = time.perf_counter()
        parts = partition_round(clusters, plan, metric, halo_cells, seed + rnd, delta,
                                partition_sample_size(shards), n, target)
        clusters = Clusters.concat([p[0] for p in parts])
        edges += [p[1] for p in parts]
        heights += [p[2] for p in parts]
        merge_rounds += max(p[3] for p in parts)  # partitions merge side by side
        waiting = sum(p[4] for p in parts)
        merged = sum(len(p[1]) for p in parts)
        plan = {**plan, "eps": max(p[5] for p in parts)}  # a finishing round raises it
        info["rounds"].append({**plan, "merges": merged, "clusters": len(clusters), "waiting": waiting})
        if log:
            log(f"sharded hac round {rnd + 1}: {plan['parts']} partitions up to {plan['eps']:.6g}, {merged} merges, "
                f"{len(clusters)} clusters, {waiting} waiting ({time.perf_counter() - t:.1f}s)")
    edges, heights = np.concatenate(edges), np.concatenate(heights)
    cut = eps if target is None else hac.threshold_from_heights(heights, n, target)
    labels = hac.labels_from_edges(n, edges[heights <= cut])
    info.update(distance_threshold=cut, merged_up_to=plan["eps"], merge_rounds=merge_rounds, waiting=waiting,
                num_clusters=int(labels.max()) + 1)
    return labels, info


# --------------------------------------------------------------------- Beam


def _to_clusters(batch, metric):
    """(row ids, embeddings) batch -> initial Clusters: the raw float32 rows, prepared where they merge
    (for sqeuclidean without hac.prepare's centring on a mean: batches must share one origin)."""
    rows, x = batch
    beam.metrics.Metrics.counter("hac", "points").inc(len(rows))
    hac.prepare(x, metric)  # validates (zero norms, NaN)
    n = len(rows)
    x = np.asarray(x)
    raw = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)  # as given: rounding would change it
    return Clusters(np.asarray(rows, np.int64), np.ones(n), raw, np.zeros(n), raw_metric=metric)


def _ids_and_means(clusters: Clusters):
    return clusters.ids, clusters.means().astype(np.float32)  # as _partition_centroids trains on them


def _train(sample, plan, seed):
    """Centroids for the round's partitions from the bottom-k sample, in id order (as
    `_partition_centroids` takes them); None for one partition or none."""
    if sample is None or plan["parts"] < 2:
        return None
    _, ids, means = sample
    return knn.train_centroids(np.ascontiguousarray(means[np.argsort(ids)], np.float32), plan["parts"], seed,
                               niter=PARTITION_KMEANS_ITERATIONS)


class _RouteClusters(beam.DoFn):
    PASSED = "passed"

    def __init__(self, halo_cells):
        self.halo_cells = halo_cells

    def process(self, clusters, centroids, plan):
        if not len(clusters):
            return
        if plan["parts"] == 0:
            yield beam.pvalue.TaggedOutput(self.PASSED, clusters)
        elif centroids is None:
            yield 0, ("m", clusters)
        else:
            home, halo = route(clusters, centroids, self.halo_cells)
            for c, rows in knn.split_by_key(home):
                yield c, ("m", clusters.take(rows))
            for c, rows in _halo_rows(halo).items():
                yield c, ("f", clusters.take(rows))


class _LocalRac(beam.DoFn):
    MERGES, STATS = "merges", "stats"

    def __init__(self, metric, seed, round_index, delta, target):
        self.metric, self.seed, self.round_index, self.delta, self.target = metric, seed, round_index, delta, target

    def process(self, element, plan, n):
        _, parts = element
        mem, fro = [], []
        for kind, clusters in parts:
            (mem if kind == "m" else fro).append(clusters)
        if not mem:
            return
        members = Clusters.concat(mem)  # rac_on_clusters puts them in id order: delivery order does not matter
        del mem
        frozen = Clusters.concat(fro) if fro else None
        del fro
        if frozen is not None:
            frozen = frozen.take(np.argsort(frozen.ids, kind="stable"))
        out, edges, heights, rounds, waiting, reached = merge_partition(members, frozen, plan, self.metric,
                                                                        self.seed, self.delta, n, self.target)
        beam.metrics.Metrics.counter("hac", f"merges_round_{self.round_index + 1}").inc(len(edges))
        beam.metrics.Metrics.counter("hac", f"partitions_round_{self.round_index + 1}").inc(1)
        beam.metrics.Metrics.distribution("hac", "partition_members").update(len(members))
        beam.metrics.Metrics.distribution("hac", "partition_frozen").update(len(frozen) if frozen else 0)
        # A worker's state for the partition: the statistics it merges (the RAC's own arrays are a few times
        # that).  A finishing round's one partition is bounded by FINISH_ON_ONE_WORKER, not the partition size.
        state = "finish_state" if plan["parts"] == 1 else "partition_state"
        beam.metrics.Metrics.distribution(element_sizes.NAMESPACE, state).update(
            element_sizes.element_bytes(members) + (element_sizes.element_bytes(frozen) if frozen else 0))
        yield out
        if len(edges):
            absorbed = np.setdiff1d(edges.reshape(-1), out.ids)
            yield beam.pvalue.TaggedOutput(self.MERGES, (absorbed, edges, heights))
        yield beam.pvalue.TaggedOutput(self.STATS, {"merges": len(edges), "rounds": rounds, "waiting": waiting,
                                                    "partitions": 1, "reached": reached})


def _add_stats(parts):
    total = {"merges": 0, "rounds": 0, "waiting": 0, "partitions": 0, "reached": -np.inf}
    for p in parts:
        for key in ("merges", "waiting", "partitions"):
            total[key] += p[key]
        total["rounds"] = max(total["rounds"], p["rounds"])  # partitions merge side by side
        total["reached"] = max(total["reached"], p["reached"])
    return total


def _buckets(n: int) -> int:
    return max(1, math.ceil(n / ROWS_PER_BUCKET))


def _bucket_of(rows: np.ndarray, n: int) -> np.ndarray:
    """Row-range bucket of rows 0..n-1 (a join's key: rows are spread evenly)."""
    return (rows.astype(np.int64) * _buckets(n)) // max(n, 1)


def _split_by_bucket(keys: np.ndarray, n: int, *columns):
    """(bucket, (keys, columns...)) pieces of rows keyed by `keys`."""
    for b, pos in knn.split_by_key(_bucket_of(keys, n)):
        yield b, (keys[pos], *(c[pos] for c in columns))


def _children(merges, cut, n):
    """A partition's merges -> (bucket of image, (image, absorbed)) pieces: each absorbed cluster and the
    cluster it is part of after the cut (the bucket of the image is where its own cluster is found)."""
    absorbed, edges, heights = merges
    to = images(absorbed, edges, heights, cut)
    yield from _split_by_bucket(to, n, absorbed)


def _roots_of(clusters: Clusters, n):
    """The last round's clusters: every one is its own root."""
    yield from _split_by_bucket(clusters.ids, n, clusters.ids)


class _FollowMerges(beam.DoFn):
    """Per bucket: the root of each parent (a cluster at the start of the next round) is known; each
    child (absorbed this round) takes its image's root, or its image when that is no parent (a cluster
    split off by the cut).  Children stream through; only the bucket's parents are held."""

    def process(self, element):
        _, grouped = element
        parents = list(grouped["parents"])
        if parents:
            rows = np.concatenate([p[0] for p in parents])
            roots = np.concatenate([p[1] for p in parents])
            order = np.argsort(rows)
            rows, roots = rows[order], roots[order]
            yield rows, roots
        else:
            rows = roots = np.zeros(0, np.int64)
        for image, absorbed in grouped["children"]:
            if rows.size:
                pos = np.minimum(np.searchsorted(rows, image), rows.size - 1)
                found = rows[pos] == image
                yield absorbed, np.where(found, roots[pos], image)
            else:
                yield absorbed, image


def _root_batch(labels):
    """(rows, roots) -> the roots among them, as an io.Batch to number."""
    rows, roots = labels
    return io.Batch("", {"id": rows[rows == roots]})


def _numbered_by_bucket(batch, n):
    yield from _split_by_bucket(batch.ids, n, batch.columns["row"])


def _members_by_bucket(labels, n):
    rows, roots = labels
    yield from _split_by_bucket(roots, n, rows)


class _Number(beam.DoFn):
    """Per bucket of roots: every row gets its root's number (its rank among the roots, which numbers the
    clusters by first appearance in row order); the cluster sizes are counted here, where all of a root's rows
    are."""
    SIZES = "sizes"

    def process(self, element):
        _, grouped = element
        numbered = list(grouped["numbered"])
        roots = np.concatenate([p[0] for p in numbered]) if numbered else np.zeros(0, np.int64)
        numbers = np.concatenate([p[1] for p in numbered]) if numbered else np.zeros(0, np.int64)
        order = np.argsort(roots)
        roots, numbers = roots[order], numbers[order]
        sizes = np.zeros(roots.size, np.int64)
        for root, rows in grouped["members"]:
            pos = np.searchsorted(roots, root)
            np.add.at(sizes, pos, 1)
            yield rows, numbers[pos]
        yield beam.pvalue.TaggedOutput(self.SIZES, _size_summary(sizes))


def _size_summary(sizes: np.ndarray) -> dict:
    """Cluster counts by size bucket 1, 2-3, 4-7, ..., the largest, the singletons: summable across buckets."""
    summary = {"num_clusters": int(sizes.size), "largest_cluster": int(sizes.max()) if sizes.size else 0,
               "singletons": int(np.count_nonzero(sizes == 1)), "histogram": {}}
    if sizes.size:
        powers = np.floor(np.log2(sizes)).astype(int)
        for b, count in zip(*np.unique(powers, return_counts=True)):
            summary["histogram"][int(b)] = int(count)
    return summary


class SizeSummary(beam.CombineFn):
    def create_accumulator(self):
        return _size_summary(np.zeros(0, np.int64))

    def add_input(self, acc, summary):
        return self.merge_accumulators([acc, summary])

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out["num_clusters"] += acc["num_clusters"]
            out["singletons"] += acc["singletons"]
            out["largest_cluster"] = max(out["largest_cluster"], acc["largest_cluster"])
            for b, count in acc["histogram"].items():
                out["histogram"][b] = out["histogram"].get(b, 0) + count
        return out

    def extract_output(self, acc):
        histogram = {}
        for b in sorted(acc["histogram"]):
            low, high = 2 ** b, 2 ** (b + 1) - 1
            histogram[str(low) if low == high else f"{low}-{high}"] = acc["histogram"][b]
        return {**acc, "histogram": histogram}


def size_summary(sizes: np.ndarray) -> dict:
    """The cluster count, largest, singletons and size histogram ("1", "2-3", "4-7", ...) of these sizes."""
    return SizeSummary().extract_output(_size_summary(sizes))


# Exact cut at a target: the m-th lowest merge height, found 16 bits at a time from histograms.
_DIGIT_BITS = 16


def _ordered_bits(h: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 values (negative values included)."""
    bits = np.ascontiguousarray(h, np.float64).view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


def _from_ordered_bits(key: int) -> float:
    key = np.uint64(key)
    sign = np.uint64(1 << 63)
    bits = key & ~sign if key & sign else ~key
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def _digit_counts(heights, state):
    """Counts of the next 16-bit digit among the heights whose higher digits are the prefix so far."""
    keys = _ordered_bits(heights)
    shift = np.uint64(64 - _DIGIT_BITS * (state["digit"] + 1))
    if state["digit"]:
        high = np.uint64(64 - _DIGIT_BITS * state["digit"])
        keys = keys[(keys >> high) == np.uint64(state["prefix"])]
    return np.bincount(((keys >> shift) & np.uint64((1 << _DIGIT_BITS) - 1)).astype(np.int64),
                       minlength=1 << _DIGIT_BITS)


def _sum_counts(parts):
    total = np.zeros(1 << _DIGIT_BITS, np.int64)
    for p in parts:
        total += p
    return total


def _next_digit(counts, state):
    """Narrow the search to the digit holding the wanted rank."""
    if state["rank"] < 0:
        return {**state, "digit": state["digit"] + 1}
    below = np.cumsum(counts)
    digit = int(np.searchsorted(below, state["rank"], side="right"))
    rank = state["rank"] - (int(below[digit - 1]) if digit else 0)
    return {**state, "digit": state["digit"] + 1, "prefix": (state["prefix"] << _DIGIT_BITS) | digit, "rank": rank}


def _height_facts(heights, facts_of_value=None):
    """Count, largest, smallest positive (and, given a value, the smallest above it) of some heights."""
    h = np.asarray(heights, np.float64)
    above = h[h > facts_of_value] if facts_of_value is not None else h[:0]
    positive = h[h > 0]
    return {"count": int(h.size), "max": float(h.max()) if h.size else -np.inf,
            "min_positive": float(positive.min()) if positive.size else np.inf,
            "min_above": float(above.min()) if above.size else np.inf}


def _merge_facts(parts):
    out = {"count": 0, "max": -np.inf, "min_positive": np.inf, "min_above": np.inf}
    for p in parts:
        out["count"] += p["count"]
        out["max"] = max(out["max"], p["max"])
        out["min_positive"] = min(out["min_positive"], p["min_positive"])
        out["min_above"] = min(out["min_above"], p["min_above"])
    return out


def _first_state(facts, n, target):
    """The rank to find: the highest merge kept when n / target clusters are left (hac.threshold_from_heights)."""
    keep = int(np.clip(round(n - n / float(target)), 0, facts["count"]))
    return {"digit": 0, "prefix": 0, "rank": keep - 1, "keep": keep}


def _cut_from(state, facts, below):
    """hac.cut_keeping from the kept height, the first height above it and the extremes."""
    if not facts["min_positive"] < np.inf:
        return 1.0  # all points identical: any threshold gives one cluster
    keep = state["keep"]
    if keep == 0:
        return float(facts["min_positive"] / 2)  # as few merges as possible
    if keep >= facts["count"] or not below["min_above"] < np.inf:
        return float(facts["max"] * 1.5 + 1e-12)  # ties up to the highest merge move the cut past it
    kept = _from_ordered_bits(state["prefix"])
    if kept <= 0:
        return float(facts["min_positive"] / 2)
    return float((kept + below["min_above"]) / 2)


class CutAtTarget(beam.PTransform):
    """PCollection of merge-height arrays -> singleton: the threshold whose cut leaves n / target
    clusters, exactly as hac.threshold_from_heights gives on all heights at once (no worker holds
    them all: the kept height is found a 16-bit digit at a time)."""

    def __init__(self, n, target):
        super().__init__()
        self.n, self.target = n, target

    def expand(self, heights):
        side = beam.pvalue.AsSingleton
        facts = (heights | "Facts" >> beam.Map(_height_facts)
                 | "AllFacts" >> beam.CombineGlobally(_merge_facts))
        state = facts | "Rank" >> beam.Map(_first_state, self.n, self.target)
        for digit in range(64 // _DIGIT_BITS):
            counts = (heights | f"Digit{digit}" >> beam.Map(_digit_counts, side(state))
                      | f"SumDigit{digit}" >> beam.CombineGlobally(_sum_counts))
            state = counts | f"Narrow{digit}" >> beam.Map(_next_digit, side(state))
        kept = state | "Kept" >> beam.Map(lambda s: _from_ordered_bits(s["prefix"]) if s["keep"] else None)
        above = (heights | "Above" >> beam.Map(_height_facts, side(kept))
                 | "AllAbove" >> beam.CombineGlobally(_merge_facts))
        return state | "Cut" >> beam.Map(_cut_from, side(facts), side(above))


def _threshold_argument(value):
    """A checked threshold, or a singleton PCollection (checked when it is computed, in expand)."""
    return value if isinstance(value, beam.pvalue.PCollection) else hac.check_threshold(value)


def _plan(count, prev, waiting, n, eps, merge_eps, shards, target):
    return next_round(prev, count, waiting, n, shards, eps, merge_eps, target)


def _tagged(stats, plan, round_index):
    """A round's statistics with its plan; the eps it reached (a finishing round raises the plan's)."""
    return {**stats, **plan, "eps": max(plan["eps"], stats["reached"]), "round": round_index + 1}


def _summary(stats, cut, sizes, n):
    """The result's summary from the rounds' statistics, the cut and the cluster sizes."""
    rounds = sorted(stats, key=lambda r: r["round"])
    active = [r for r in rounds if r["parts"]]
    return {"distance_threshold": cut, "merged_up_to": (active or rounds)[-1]["eps"] if rounds else None,
            "merges": int(n - sizes["num_clusters"]), "rounds": sum(r["rounds"] for r in active),
            "waiting": active[-1]["waiting"] if active else 0,
            "sharded_rounds": [{k: r[k] for k in ("round", "parts", "eps", "merges", "waiting")} for r in active],
            **sizes}


class ShardedHac(beam.PTransform):
    """PCollection of (row ids int64, embeddings) batches, rows 0..n-1 -> {"labels": (rows, labels) pieces
    covering every row, labels numbered by first appearance in row order; "summary": singleton dict with
    `distance_threshold` (the cut), `merged_up_to`, `merges`, merge `rounds`, `waiting` (members whose
    nearest cluster within the threshold was across a border when the rounds ran out), the sharded
    rounds, `num_clusters`, `largest_cluster`, `singletons` and the size `histogram`}.

    `distance_threshold` is a number, or a singleton PCollection holding it (an
    eps computed in the same pipeline, e.g. by ThresholdFromTarget).  With
    `target_mean_cluster_size` the rounds merge up to it, then up to
    `merge_threshold` (the same kinds of value; default distance_threshold),
    raised while the clusters average fewer than the target, and the merges
    are then cut at the target (as hac.average_linkage does).  Every element,
    side input and partition is bounded by the partition size (about n /
    `shards` clusters plus their halo), ROWS_PER_BUCKET, SAMPLE_MAX or
    FINISH_ON_ONE_WORKER, not by n.
    """

    def __init__(self, distance_threshold, metric="cosine", shards=64, halo_cells=2, max_rounds=DEFAULT_MAX_ROUNDS,
                 seed=0, target_mean_cluster_size=None, merge_threshold=None, delta=0.0):
        super().__init__()
        self.delta = hac.check_delta(delta)
        self.eps = _threshold_argument(distance_threshold)
        self.merge_eps = None if merge_threshold is None else _threshold_argument(merge_threshold)
        if metric not in hac.METRICS:
            raise hac.HacError(f"unknown metric {metric!r}")
        check_shard_params(shards, halo_cells, max_rounds)
        self.target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
        self.metric, self.shards, self.halo_cells = metric, shards, halo_cells
        self.max_rounds, self.seed = max_rounds, seed

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        measured = element_sizes.measured

        def checked(value, label):  # a number was checked in __init__; a PCollection is checked here
            if not isinstance(value, beam.pvalue.PCollection):
                return value
            return side(value | label >> beam.Map(hac.check_threshold))

        eps, merge_eps = checked(self.eps, "CheckEps"), checked(self.merge_eps, "CheckMergeEps")
        n = side(batches | "CountPoints" >> beam.Map(lambda batch: len(batch[0]))
                 | "SumPoints" >> beam.CombineGlobally(sum))
        clusters = batches | "Init" >> beam.Map(_to_clusters, self.metric)
        plan, waiting, merges, stats = None, None, [], []
        for rnd in range(self.max_rounds):
            name = f"Round{rnd + 1}"
            seed = self.seed + rnd
            plan = (clusters
                    | f"{name}Count" >> beam.Map(len)
                    | f"{name}Clusters" >> beam.CombineGlobally(sum)
                    | f"{name}Plan" >> beam.Map(_plan, side(plan) if plan is not None else None,
                                                side(waiting) if waiting is not None else 0, n, eps, merge_eps,
                                                self.shards, self.target))
            centroids = (clusters
                         | f"{name}Sample" >> beam.CombineGlobally(
                             knn.BottomKByHash(partition_sample_size(self.shards), seed, _ids_and_means))
                         .without_defaults()
                         | f"{name}MeasureSample" >> measured("partition_sample")
                         | f"{name}Train" >> beam.Map(_train, side(plan), seed)
                         | f"{name}MeasureCentroids" >> measured("partition_centroids"))
            routed = (clusters
                      | f"{name}Route" >> beam.ParDo(_RouteClusters(self.halo_cells),
                                                     side(centroids, default_value=None), side(plan))
                      .with_outputs(_RouteClusters.PASSED, main="routed"))
            result = (routed.routed
                      | f"{name}MeasureRouted" >> measured("partition_pieces")
                      | f"{name}Group" >> beam.GroupByKey()
                      | f"{name}Rac" >> beam.ParDo(_LocalRac(self.metric, seed, rnd, self.delta, self.target),
                                                   side(plan), n)
                      .with_outputs(_LocalRac.MERGES, _LocalRac.STATS, main="clusters"))
            merges.append(result[_LocalRac.MERGES] | f"{name}MeasureMerges" >> measured("partition_merges"))
            round_stats = (result[_LocalRac.STATS]
                           | f"{name}Stats" >> beam.CombineGlobally(_add_stats)
                           | f"{name}Tag" >> beam.Map(_tagged, side(plan), rnd))
            stats.append(round_stats)
            waiting = round_stats | f"{name}Waiting" >> beam.Map(lambda s: s["waiting"])
            clusters = ((result.clusters, routed[_RouteClusters.PASSED])
                        | f"{name}Next" >> beam.Flatten())

        heights = (tuple(merges) | "AllMerges" >> beam.Flatten(pipeline=batches.pipeline)
                   | "Heights" >> beam.Map(lambda m: m[2]))
        if self.target is None:
            cut = batches.pipeline | "Cut" >> beam.Create([None]) | "Eps" >> beam.Map(lambda _, e: e, eps)
        else:
            cut = heights | "CutAtTarget" >> CutAtTarget(n, self.target)

        # Follow the merges back from the last round: labels are root rows until numbered.
        labels = clusters | "Roots" >> beam.FlatMap(_roots_of, n)
        for rnd in reversed(range(self.max_rounds)):
            name = f"Follow{rnd + 1}"
            children = merges[rnd] | f"{name}Children" >> beam.FlatMap(_children, side(cut), n)
            labels = ({"parents": labels | f"{name}MeasureParents" >> measured("follow_parents"),
                       "children": children | f"{name}MeasureChildren" >> measured("follow_children")}
                      | f"{name}Join" >> beam.CoGroupByKey()
                      | f"{name}Relabel" >> beam.ParDo(_FollowMerges())
                      | f"{name}Rebucket" >> beam.FlatMap(lambda l, n: _split_by_bucket(l[0], n, l[1]), n))
        labels = labels | "Unbucket" >> beam.Map(lambda kv: kv[1])
        numbered = (labels
                    | "RootRows" >> beam.Map(_root_batch)
                    | "RankRoots" >> ranks.RankIds())
        numbers = (numbered["ranked"] | "NumbersByBucket" >> beam.FlatMap(_numbered_by_bucket, n))
        members = labels | "MembersByBucket" >> beam.FlatMap(_members_by_bucket, n)
        result = ({"numbered": numbers | "MeasureNumbers" >> measured("number_roots"),
                   "members": members | "MeasureMembers" >> measured("number_members")}
                  | "NumberJoin" >> beam.CoGroupByKey()
                  | "Number" >> beam.ParDo(_Number()).with_outputs(_Number.SIZES, main="labels"))
        sizes = result[_Number.SIZES] | "Sizes" >> beam.CombineGlobally(SizeSummary())
        all_stats = (tuple(stats) | "AllRoundStats" >> beam.Flatten()
                     | "RoundStats" >> beam.combiners.ToList())
        summary = all_stats | "Summary" >> beam.Map(_summary, side(cut), side(sizes), n)
        return {"labels": result.labels, "summary": summary}


# ------------------------------------------------- threshold from a target size


def _row_count(batch):
    return len(batch[0])


def _layout(n, sample_size):
    """The pool size -> number of threshold cells and how many rows train them."""
    num_cells = hac.threshold_cells(n, sample_size)
    return {"num_cells": num_cells, "training_size": hac.training_size(num_cells)}


def _in_row_order(parts):
    """(rows, columns...) pieces from many batches -> one of each, sorted by row: delivery order must not matter."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return None
    rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(rows)
    return [np.concatenate([p[i] for p in parts])[order] for i in range(1, len(parts[0]))]


def _train_cells(lowest, layout, metric, margin_cells, seed):
    """Cells trained on the rows of lowest hash (hac.training_rows), in row order."""
    train_x = None
    if lowest is not None and layout["training_size"]:
        _, rows, x = lowest
        keep = np.sort(np.argsort(knn.hash_ids(rows, seed), kind="stable")[:layout["training_size"]])
        train_x = x[keep][np.argsort(rows[keep])]
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
        measured = element_sizes.measured
        layout = (batches
                  | "CountRows" >> beam.Map(_row_count)
                  | "SumRows" >> beam.CombineGlobally(sum)
                  | "Layout" >> beam.Map(_layout, self.sample_size))
        cells = (batches
                 | "TrainingRows" >> beam.CombineGlobally(
                     knn.BottomKByHash(hac.threshold.TRAIN_ROWS_MAX, self.seed, lambda batch: batch))
                 .without_defaults()
                 | "MeasureTraining" >> measured("threshold_training")
                 | "TrainCells" >> beam.Map(_train_cells, side(layout), self.metric, self.margin_cells, self.seed)
                 | "MeasureCells" >> measured("threshold_cells"))
        assigned = batches | "AssignCells" >> beam.Map(_assign, side(cells))
        draw = (assigned
                | "CellCounts" >> beam.Map(_cell_counts, side(cells))
                | "SumCellCounts" >> beam.CombineGlobally(sum)
                | "DrawCells" >> beam.Map(_draw, side(cells), self.sample_size, self.seed)
                | "MeasureDraw" >> measured("threshold_draw"))
        return (assigned
                | "SampleRows" >> beam.Map(_sample_part, side(draw))
                | "GatherSample" >> beam.combiners.ToList()
                | "MeasureSample" >> measured("threshold_sample")
                | "Threshold" >> beam.Map(_threshold, side(draw), self.metric, self.target, self.seed, self.delta))

"""Sharded average-linkage HAC: merges inside partitions, round after round, on many workers.

Clusters are kept as statistics (count n, vector sum S and, for squared
Euclidean, the within-cluster sum of squared deviations W), so every linkage
is exact (see clusmar_beam.core.hac).  One sharded round:

1. coarse centroids of the current cluster means (FAISS k-means on the
   clusters of lowest id hash) cut the clusters into partitions (home cell),
   as many as the clusters left need at the first round's partition size;
2. each cluster is also sent, frozen, to the partitions of its next
   nearest cells (`halo_width`: `halo_cells`, or more where partitions are
   small), so a partition sees the clusters just across its border;
3. inside a partition, reciprocal-nearest pairs and (1+delta)-good stars
   within the threshold merge in RAC rounds (clusmar_beam.core.hac.rac); frozen
   clusters are searched as neighbours but never merge, so a member whose
   nearest cluster lies in another partition waits;
4. the merged statistics are the next round's clusters, and each partition's
   merges (a forest over its members' ids) go on as one element; the
   clusters its members waited on are told so in their own partition (a
   join keyed by partition), and get a route too.

Rounds go on until no member waited (nothing within the threshold was left
across a border).  A round that repeats the threshold takes only the
clusters with a route, the members that waited and the clusters they waited
on: any other cluster found nothing within the threshold among the clusters
it saw, and by reducibility merges elsewhere cannot bring those nearer, so
it sits the repeats out.  (It gives up the chance that a repeat's other
partitions gave it to meet a neighbour its halo hid; once all the clusters
left fit one worker, FINISH_ON_ONE_WORKER, the round takes them all, exact
RAC, and that chance comes back.)  Each round has as many partitions as the
clusters taking part need, or one once they are that few.  With a target
mean cluster size, the rounds then go on up to the merge threshold and
raise it while short of the target, and the merges are cut at the target.
A point's cluster is found by following its merges back from the last
round (a join per round keyed by row range), never by gathering them.

`sharded_average_linkage` runs the rounds in one process (the reference of
the tests); clusmar_beam.transforms.sharded_hac.ShardedHac runs the same
rounds as Beam transforms, one partition per element.
"""
from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from clusmar_beam.core import hac, hashing
from clusmar_beam.core.cells import probe_cells, split_by_key, train_centroids
from clusmar_beam.core.hac.clusters import Clusters
from clusmar_beam.core.validate import check_int


def initial_clusters(X: np.ndarray, rows: np.ndarray | None = None) -> Clusters:
    """One cluster per (prepared) point; ids are the row numbers."""
    rows = np.arange(X.shape[0], dtype=np.int64) if rows is None else rows
    return Clusters(rows.astype(np.int64), np.ones(X.shape[0]), np.array(X, np.float64), np.zeros(X.shape[0]))


def rac_on_clusters(members: Clusters, eps: float, metric: str, frozen: Clusters | None = None,
                    seed: int = 0, k: int = hac.DEFAULT_K, delta: float = 0.0):
    """RAC among `members` with `frozen` clusters visible but never merged.

    Returns (merged member clusters, merge edges, their heights, merge rounds,
    members left waiting on a frozen neighbour within eps, the ids of the
    frozen clusters they wait on).  An edge joins
    the ids of two clusters that merged (one of which the merged cluster
    keeps); the clusters are the connected components of the edges of all
    rounds (hac.labels_from_edges).  `delta` is hac.average_linkage's.
    """
    m = len(members)
    if m == 0:
        return members, np.zeros((0, 2), np.int64), np.zeros(0), 0, 0, np.zeros(0, np.int64)
    members = members.take(np.argsort(members.ids, kind="stable"))  # lower row = lower id
    both = members if frozen is None or not len(frozen) else Clusters.concat([members, frozen])
    is_frozen = np.zeros(len(both), bool)
    is_frozen[m:] = True
    S = both.sums()
    cnt = np.array(both.cnt, np.float64)
    W = np.array(both.W, np.float64)
    # Pool rows reach a partition uncentred (a pool-wide mean would need a pass of its own): squared
    # Euclidean linkages do not move with the origin, but FAISS's float32 distances lose all precision
    # far from it.  The members' mean is the partition's origin; the clusters go back to the pool's after.
    origin = members.means().mean(axis=0) if metric == "sqeuclidean" else None
    if origin is not None:
        S -= cnt[:, None] * origin
    nlist = max(1, round(hac.default_nlist(len(both)) / PARTITION_LIST_GROWTH))
    rac = hac.Rac(S, cnt, metric, eps, exact_search_max=hac.EXACT_SEARCH_MAX, nlist=nlist,
                  nprobe=PARTITION_NPROBE, seed=seed, log=None, t0=time.perf_counter(), k=k, W=W, frozen=is_frozen,
                  delta=delta)
    # The Rac owns S, cnt, W and is_frozen from here (it compacts them in place).
    left, merges_per_round = rac.run(first_round_extra=0)  # the members' clusters: frozen ones never merge
    if origin is not None:
        left.S += left.cnt[:, None] * origin
    heights = np.concatenate(rac.heights) if rac.heights else np.zeros(0)
    pairs = np.concatenate(rac.pairs) if rac.pairs else np.zeros((0, 2), np.int64)
    edges = members.ids[pairs]
    # A star keeps its pair's id, which a leaf's can be below: name every cluster by its smallest row, so
    # that clusters are numbered by first appearance and a cut finds a cluster under its own id.
    ids = smallest_connected(edges, members.ids[left.ids]) if len(edges) else members.ids[left.ids]
    out = Clusters(ids, left.cnt, left.S, left.W if left.W is not None else np.zeros(len(left)))
    targets = np.zeros(0, np.int64)
    if rac.waiting:
        # A member waiting on a cluster across the border goes, next round, where the lower-id one of the
        # two is routed: a pair split by a border is not split the same way again.
        member, other = rac.waiting_on[:, 0], rac.waiting_on[:, 1]
        lead = np.where(both.ids[other] < both.ids[member], other, member)
        at = np.searchsorted(left.ids, member)  # members' rows in `out` (left.ids ascending)
        lead_row = np.minimum(np.searchsorted(left.ids, lead), len(left) - 1)
        lead_sum, lead_cnt = left.S[lead_row], left.cnt[lead_row]
        frozen_lead = lead >= m  # rows past the members are frozen (the Rac compacts is_frozen in place)
        if frozen_lead.any():  # as it came: a frozen cluster never merges
            as_given = frozen.take(lead[frozen_lead] - m)
            lead_sum[frozen_lead], lead_cnt[frozen_lead] = as_given.sums(), as_given.cnt
        route = np.full(out.S.shape, np.nan, np.float32)
        route[at] = (lead_sum / lead_cnt[:, None]).astype(np.float32)
        out.route = route
        targets = np.unique(both.ids[other[other >= m]])
    return out, edges, heights, len(merges_per_round), rac.waiting, targets


PARTITION_KMEANS_ITERATIONS = 15
# A partition's IVF index has this many times fewer, larger lists than one worker's, and probes that many times
# fewer: a search scans as many rows, and the quantiser, trained and searched once per partition, costs a
# fraction (its k-means grows with the square of the lists).
PARTITION_LIST_GROWTH = 2
PARTITION_NPROBE = 16
SAMPLE_PER_PARTITION = 64  # clusters of lowest id hash per partition that train the partition centroids
SAMPLE_MAX = 1 << 16  # ... but never more than this many: the sample is one element
DEFAULT_MAX_ROUNDS = 20
# A round goes on to a higher threshold (a target's) once at most this share of the clusters waited on a
# neighbour across a border: repeating the threshold for them would cost a whole round each time.
WAITING_TO_MOVE_ON = 0.01
# A round that repeats its threshold for members still waiting across a border runs on one worker once
# at most this many clusters are left (the stated one-worker bound: it does not grow with the pool).
FINISH_ON_ONE_WORKER = 1 << 18
# A round's halo widens past halo_cells while a partition with its halo averages at most this many clusters
# (halo_width): as many as one worker searches exactly (rac.EXACT_SEARCH_MAX); while the round routes at most
# HALO_ROUTED_MAX copies of clusters in all (it makes a small pool's shuffle a few times larger, never a large
# pool's); and up to HALO_CELLS_MAX cells.
HALO_ROWS = hac.EXACT_SEARCH_MAX
HALO_ROUTED_MAX = 1 << 19
HALO_CELLS_MAX = 15


def partition_sample_size(shards: int) -> int:
    return min(shards * SAMPLE_PER_PARTITION, SAMPLE_MAX)


def _partition_centroids(clusters: Clusters, parts: int, seed: int, sample_size: int):
    """k-means centroids of cluster means, on the `sample_size` clusters with the lowest id hashes."""
    parts = max(1, min(parts, len(clusters)))
    order = np.lexsort((clusters.ids, hashing.row_hash(clusters.ids, seed)))[:sample_size]
    order = order[np.argsort(clusters.ids[order])]  # in id order, as the Beam transform trains them
    return partition_centroids(clusters.means()[order].astype(np.float32), parts, seed)  # as the Beam sample


def partition_centroids(sample_means: np.ndarray, parts: int, seed: int) -> np.ndarray:
    """k-means centroids of a sample of cluster means (in id order), trained about the sample's mean.

    FAISS's float32 distances lose their precision far from the origin (pool rows are not centred
    for squared Euclidean): k-means and routing both work relative to a mean."""
    origin = sample_means.mean(axis=0, dtype=np.float64)
    centred = np.ascontiguousarray(sample_means - origin, np.float32)
    return train_centroids(centred, parts, seed, niter=PARTITION_KMEANS_ITERATIONS) + origin.astype(np.float32)


def route(clusters: Clusters, centroids: np.ndarray, halo_cells: int):
    """(home cell, cells where the cluster is a frozen neighbour), found relative to the centroids' mean."""
    origin = centroids.mean(axis=0, dtype=np.float64)
    cells = probe_cells(np.ascontiguousarray(centroids - origin, np.float32),
                        np.ascontiguousarray(clusters.routing_points() - origin, np.float32), 1 + halo_cells)
    return cells[:, 0], cells[:, 1:]


def halo_rows(halo: np.ndarray) -> dict:
    """cell -> rows of the clusters that are frozen neighbours in that cell."""
    if halo.size == 0:  # no halo cells, or fewer cells than 2
        return {}
    return {c: pos // halo.shape[1] for c, pos in split_by_key(halo.reshape(-1))}


def halo_width(plan: dict, halo_cells: int, halo_rows: int = None) -> int:
    """The nearest cells past its home a round routes each cluster to, frozen: at least `halo_cells`, and as
    many as keep a partition with its halo within `halo_rows` (default HALO_ROWS) clusters on average and
    the round's copies of the clusters within HALO_ROUTED_MAX, up to HALO_CELLS_MAX.

    A member whose nearest cluster lies beyond its partition's halo merges with the nearest one it sees.
    Where partitions are small most members are near a border and a few cells reach little way, so the
    clusters moved away from exact average linkage (benchmarks/RESULTS.md, "Real labelled sets" and
    "Pool shapes", the `dominant` shape).  The widening is for small pools, since every copy is shuffled:
    a 100M pool's partitions keep `halo_cells`.
    """
    halo_rows = HALO_ROWS if halo_rows is None else halo_rows
    parts = plan["parts"]
    if parts < 2:
        return 0
    clusters = max(plan["clusters"], 1)
    fits = min(halo_rows * parts // clusters, HALO_ROUTED_MAX // clusters) - 1  # cells of a mean partition's size
    return int(min(parts - 1, max(halo_cells, min(fits, HALO_CELLS_MAX))))


def check_shard_params(shards, halo_cells, max_rounds, one_worker=None, halo_rows=None):
    if one_worker is not None:
        check_int("one_worker_clusters", one_worker, 1, error=hac.HacError)
    check_int("shards", shards, 1, error=hac.HacError)
    check_int("halo_cells", halo_cells, 0, error=hac.HacError)
    if halo_rows is not None:
        check_int("halo_rows", halo_rows, 0, error=hac.HacError)
    check_int("max_rounds", max_rounds, 1, error=hac.HacError)


def next_round(prev: dict | None, clusters: int, waiting: int, n: int, shards: int, eps: float,
               merge_eps: float | None = None, target: float | None = None, routed: int | None = None,
               one_worker: int | None = None) -> dict:
    """The plan of a sharded round: {"parts": partitions (0: nothing is left to merge), "eps": merge up to,
    "finish": raise eps on one worker until the target is reached, "repeat": only the clusters with a route
    take part, "clusters": how many take part, "waited": the members that waited before it}.

    Partitions hold at most about n / shards clusters, the first round's
    size.  A round repeats its threshold while members waited on a
    neighbour across a border, with only those members and the clusters
    they waited on (`routed` of the `clusters`: the others found nothing
    within the threshold, and merges elsewhere cannot bring anything nearer,
    by reducibility) as long as that converges: the waiting members at
    least halve from one round to the next.  Otherwise every repeat from
    then on takes every cluster, in partitions as large as one worker takes
    (`one_worker` clusters, or the first round's size if larger): where the
    threshold reaches across many partitions (a coarse cut, a near-duplicate
    flood), most members wait on a frozen neighbour round after round, and
    fewer, larger partitions have fewer borders to wait across.  Once none
    waited, the rounds go on, with every cluster, up to `merge_eps` (a
    target's threshold), then,
    while the clusters average fewer than `target`, with the threshold
    raised by hac.TARGET_RAISE.  Once at most `one_worker` (default
    FINISH_ON_ONE_WORKER) clusters are left, a round that would repeat or go
    higher takes them all on one worker (exact RAC, which also merges what a
    halo hid, and, going higher, up to the target); a repeat with at most
    that many taking part runs them on one worker too.
    """
    one_worker = FINISH_ON_ONE_WORKER if one_worker is None else one_worker
    size = max(1, math.ceil(n / shards))

    stalled = prev is not None and prev.get("stalled", False)

    def plan(parts, step, taking, finish=False, repeat=False):
        return {"parts": parts, "eps": step, "finish": finish, "repeat": repeat, "clusters": taking,
                "waited": waiting, "stalled": stalled}

    if clusters <= 1 or (prev is not None and prev["parts"] == 0):
        return plan(0, eps if prev is None else prev["eps"], 0)
    if prev is None:
        return plan(max(1, math.ceil(clusters / size)), eps, clusters)
    higher = None
    if merge_eps is not None and prev["eps"] < merge_eps:
        higher = merge_eps
    elif target is not None and n / clusters < target:
        higher = prev["eps"] * hac.TARGET_RAISE
    if higher is None and not waiting:
        return plan(0, prev["eps"], 0)
    if higher is not None and clusters <= one_worker:
        return plan(1, max(prev["eps"], merge_eps or 0.0), clusters, finish=target is not None)
    if higher is not None and waiting <= WAITING_TO_MOVE_ON * clusters:  # the few waiting pairs are within it too
        return plan(max(1, math.ceil(clusters / size)), higher, clusters)
    if clusters <= one_worker:  # all of them on one worker: that also finds what halos hid
        return plan(1, prev["eps"], clusters)
    stalled = stalled or bool(prev.get("waited")) and 2 * waiting > prev["waited"]
    if stalled:  # not converging on the few: all of them, from now on, in partitions as large as one worker takes
        return plan(max(1, math.ceil(clusters / max(size, one_worker))), prev["eps"], clusters)
    routed = clusters if routed is None else routed
    return plan(1 if routed <= one_worker else max(1, math.ceil(routed / size)), prev["eps"], routed, repeat=True)


def merge_partition(members: Clusters, frozen: Clusters | None, plan: dict, metric: str, seed: int, delta: float,
                    n: int, target: float | None):
    """RAC of one partition as the round's plan says: (clusters, edges, heights, rounds, waiting, eps reached,
    ids of the frozen clusters waited on).

    A finishing round holds every cluster left: it raises the threshold
    until they average the target size, as hac.average_linkage does.
    """
    eps = plan["eps"]
    out, edges, heights, rounds, waiting, targets = rac_on_clusters(members, eps, metric, frozen, seed, delta=delta)
    if not plan.get("finish"):
        return out, edges, heights, rounds, waiting, eps, targets
    edges, heights = [edges], [heights]
    while len(out) > 1 and n / len(out) < target:
        eps *= hac.TARGET_RAISE
        out, e, h, r, *_ = rac_on_clusters(out, eps, metric, None, seed, delta=delta)
        edges.append(e)
        heights.append(h)
        rounds += r
    return out, np.concatenate(edges), np.concatenate(heights), rounds, 0, eps, targets


def mark_waited_on(out: Clusters, edges: np.ndarray, targets: np.ndarray) -> Clusters:
    """A partition's merged clusters with a route (their own mean) also on the clusters that members of
    other partitions waited on (`targets`, ids of this partition's members at the start of the round):
    they take part in the next round that repeats the threshold, with those members."""
    if not targets.size:
        return out
    now = smallest_connected(edges, targets) if len(edges) else targets  # the clusters they are part of now
    rows = np.flatnonzero(np.isin(out.ids, now))
    route = out.route if out.route is not None else np.full(out.S.shape, np.nan, np.float32)
    unset = rows[np.isnan(route[rows, 0])]
    route[unset] = out.take(unset).means()
    out.route = route
    return out


def taking_part(clusters: Clusters, plan: dict) -> np.ndarray:
    """Mask of the clusters a round takes: all, or in a round that repeats the threshold those with a route."""
    return clusters.routed() if plan["repeat"] else np.ones(len(clusters), bool)


def partition_round(clusters: Clusters, plan: dict, metric: str, halo: int, seed: int, delta: float,
                    sample_size: int, n: int, target: float | None):
    """One sharded round in one process, on the clusters taking part (`halo`: the round's halo_width): the
    merged clusters of every partition, marked as mark_waited_on marks them, and merge_partition's other
    results."""
    if plan["parts"] == 1:
        return [merge_partition(clusters, None, plan, metric, seed, delta, n, target)]
    centroids = _partition_centroids(clusters, plan["parts"], seed, sample_size)
    home, halo = route(clusters, centroids, halo)
    frozen_rows = halo_rows(halo)
    parts = {c: merge_partition(clusters.take(mem), clusters.take(frozen_rows.get(c, np.zeros(0, np.int64))), plan,
                                metric, seed, delta, n, target)
             for c, mem in split_by_key(home)}
    targets = np.concatenate([p[6] for p in parts.values()])
    by_id = np.argsort(clusters.ids)
    home_of = home[by_id[np.searchsorted(clusters.ids, targets, sorter=by_id)]]
    waited_on = dict(split_by_key(home_of))
    return [(mark_waited_on(p[0], p[1], targets[waited_on.get(c, np.zeros(0, np.int64))]), *p[1:])
            for c, p in parts.items()]


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
                            log=None, delta=0.0, one_worker_clusters=None, halo_rows=None):
    """Flat average-linkage clusters by partitioned RAC rounds (see the module docstring).

    With `target_mean_cluster_size`, the rounds merge up to
    `distance_threshold`, then `merge_threshold` (default: the same), raised
    while short of the target, and the result is cut at the target as in
    hac.average_linkage.  `one_worker_clusters` is next_round's
    `one_worker`; `halo_cells` and `halo_rows` are halo_width's.  Labels numbered by first appearance.  Returns (labels,
    info dict with the cut, the rounds and the members still waiting after
    the last one).
    """
    eps = hac.check_threshold(distance_threshold)
    merge_eps = None if merge_threshold is None else hac.check_threshold(merge_threshold)
    target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
    if metric not in hac.METRICS:
        raise hac.HacError(f"unknown metric {metric!r}")
    check_shard_params(shards, halo_cells, max_rounds, one_worker_clusters, halo_rows)
    delta = hac.check_delta(delta)
    X = hac.prepare(embeddings, metric)
    n = X.shape[0]
    clusters = initial_clusters(X)
    edges, heights = [np.zeros((0, 2), np.int64)], [np.zeros(0)]
    info = {"rounds": []}
    plan, waiting, merge_rounds = None, 0, 0
    for rnd in range(max_rounds):
        plan = next_round(plan, len(clusters), waiting, n, shards, eps, merge_eps, target,
                          int(np.count_nonzero(clusters.routed())), one_worker_clusters)
        if plan["parts"] == 0:
            break
        t = time.perf_counter()
        taking = taking_part(clusters, plan)
        idle = clusters.take(np.flatnonzero(~taking))
        clusters = clusters.take(np.flatnonzero(taking))
        parts = partition_round(clusters, plan, metric, halo_width(plan, halo_cells, halo_rows), seed + rnd, delta,
                                partition_sample_size(shards), n, target)
        idle.route = None  # found nothing within the threshold: it waits for a higher one
        clusters = Clusters.concat([p[0] for p in parts] + [idle])
        edges += [p[1] for p in parts]
        heights += [p[2] for p in parts]
        merge_rounds += max(p[3] for p in parts)  # partitions merge side by side
        waiting = sum(p[4] for p in parts)
        merged = sum(len(p[1]) for p in parts)
        plan = {**plan, "eps": max(p[5] for p in parts)}  # a finishing round raises it
        info["rounds"].append({**plan, "merges": merged, "clusters_left": len(clusters), "waiting": waiting})
        if log:
            log(f"sharded hac round {rnd + 1}: {plan['clusters']} clusters in {plan['parts']} partitions up to "
                f"{plan['eps']:.6g}, {merged} merges, {len(clusters)} clusters left, {waiting} waiting "
                f"({time.perf_counter() - t:.1f}s)")
    edges, heights = np.concatenate(edges), np.concatenate(heights)
    cut = eps if target is None else hac.threshold_from_heights(heights, n, target)
    labels = hac.labels_from_edges(n, edges[heights <= cut])
    info.update(distance_threshold=cut, merged_up_to=plan["eps"], merge_rounds=merge_rounds, waiting=waiting,
                num_clusters=int(labels.max()) + 1)
    return labels, info

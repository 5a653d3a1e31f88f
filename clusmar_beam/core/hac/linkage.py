"""Average-linkage HAC cut at a distance threshold, without an n x n matrix.

Average linkage between two clusters depends only on their counts, vector sums
and (for squared Euclidean) within-cluster sums of squares, so clusters are
kept as those statistics and the nearest cluster is found with FAISS on
augmented vectors whose L2 order equals the linkage order.  Merging is done by
reciprocal agglomerative clustering (RAC): every round merges all pairs that
are each other's nearest neighbour within the threshold.  Average linkage is
reducible, so this gives the same flat clusters as sequential HAC, and a
cluster's nearest-neighbour distance never decreases; that is why only
clusters touched by a merge are searched again, and why a cluster whose
nearest neighbour is beyond the threshold can be dropped for good.  With an
approximation delta > 0 a round also lets each merged pair absorb the clusters
pointing at it while each merge is (1 + delta)-good, which bounds the rounds
that dense regions take (see average_linkage).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from clusmar_beam.core.hac.prepare import (METRICS, HacError, check_count, check_delta, check_target, check_threshold,
                                      collapse_duplicates, number_by_first_appearance, prepare)
from clusmar_beam.core.hac.index import widen_rows_max
from clusmar_beam.core.hac.rac import DEFAULT_K, EXACT_SEARCH_MAX, Rac, keep_rows

# With a target mean cluster size the pool is merged up to the sample's
# threshold for this many times the target, then cut at the target: the
# sample's threshold for the target itself falls short of it on a whole pool
# (docs/perf-log.md, issue 3: "the target mean cluster size is cut from the
# pool's own merges").
TARGET_OVERSHOOT = 2.0
# With a target mean cluster size, merging that stopped short of it goes on
# with the threshold raised by this factor.
TARGET_RAISE = 1.5
# Passes over the clusters left after an IVF run, at one threshold, that merge what its searches missed.
MAX_REPAIRS = 1


@dataclasses.dataclass
class HacResult:
    """Flat clusters plus how much work the merging took.

    `merges` always equals n - num_clusters.  Exact duplicate rows are
    collapsed before the first search and counted in round 1, since they are
    reciprocal nearest neighbours at distance 0 anyway.
    """

    labels: np.ndarray
    num_clusters: int
    rounds: int
    merges: int
    merges_per_round: list[int]
    # Every merge made, as an edge between two input rows (one row of each
    # side) and its linkage distance; exact duplicates merge at 0.  Cutting at
    # eps keeps the connected components of the edges of height <= eps.
    # With a target mean size the merging went past the cut, so these hold
    # more merges than `merges` (and merges_per_round counts them all).
    heights: np.ndarray | None = None
    pairs: np.ndarray | None = None
    # The cut: the threshold given, or the one picked for a target mean size.
    distance_threshold: float | None = None
    # With a target: the threshold the merging reached before it was cut.
    merged_up_to: float | None = None
    # How the first IVF index was probed (IvfIndex.choose_probing); None when every search was exact.
    probing: dict | None = None


def average_linkage(
    embeddings: np.ndarray,
    distance_threshold: float,
    metric: str = "cosine",
    *,
    target_mean_cluster_size: float | None = None,
    exact_search_max: int = EXACT_SEARCH_MAX,
    nlist: int | None = None,
    nprobe: int = 32,
    seed: int = 0,
    k: int = DEFAULT_K,
    log: Callable[[str], None] | None = None,
    overwrite_input: bool = False,
    delta: float = 0.0,
) -> HacResult:
    """Cut the average-linkage dendrogram of `embeddings` at `distance_threshold`.

    Same partition as scipy's ``fcluster(linkage(X, 'average', metric), t,
    'distance')``; cosine distance is 1 - cosine similarity.  Labels are
    numbered 0..C-1 by first appearance.  Nearest clusters are searched exactly
    while at most `exact_search_max` clusters are active, otherwise with an
    IVF index (`nlist` lists, default the larger of 4*sqrt(n) and n/250;
    `nprobe` lists probed), which
    may miss a few neighbours.  A cluster whose search found nothing within
    the threshold retires for good, so when clusters retired on IVF searches
    the clusters left are merged once more in an index of their own, which
    finds most of what was missed (MAX_REPAIRS).  `log`, if given, gets one
    line per round.
    Deterministic for a given input order and `seed`.

    With `target_mean_cluster_size` M, `distance_threshold` is only where
    the merging stops first: while the clusters average fewer than M points
    it goes on from the clusters it has, the threshold raised by
    TARGET_RAISE each time, and the result is then the cut of the merges made
    that leaves n / M clusters (rounded to a whole merge, and moved up past
    tied heights), midway between two merge heights: `distance_threshold` of
    the result.  A cut of the dendrogram below where it was merged is the
    clustering at that threshold, so the mean size lands on M however far
    off the first threshold was.

    With `delta` > 0 a round also grows each merged pair into a star:
    it absorbs, nearest first, the clusters whose nearest neighbour was
    one of the pair while each merge's exact linkage stays within (1 +
    delta) of the lowest either side could have to any cluster (TeraHAC's
    (1+delta)-good merges; a star that fewer than DEEP_STAR_LEAVES clusters
    point at uses SMALL_STAR_SLACK of delta; see Rac._absorb).  Merge heights stay exact; only
    the order of merges is approximate, by at most that factor.  A dense
    region whose growing cluster is everyone's nearest neighbour then takes
    tens of rounds instead of one round per member.  `delta` = 0, this
    function's default, is exact; `clusmar cluster` passes DEFAULT_DELTA,
    and so should a caller whose pool has large dense regions, where exact
    merging takes rounds in the thousands.

    With `overwrite_input`, float64 C-ordered `embeddings` are used as the
    working copy and their contents are lost: a caller that holds its only
    copy in float64 then holds no second one through the run (at 10M the
    float32 input next to the copy was 2.6 GB of the peak).
    """
    eps = check_threshold(distance_threshold)
    delta = check_delta(delta)
    target = None if target_mean_cluster_size is None else check_target(target_mean_cluster_size)
    if metric not in METRICS:
        raise HacError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    check_count("exact_search_max", exact_search_max)
    check_count("nprobe", nprobe)
    if nlist is not None:
        check_count("nlist", nlist)
    t0 = time.perf_counter()
    X = prepare(embeddings, metric, copy=not overwrite_input)
    n = X.shape[0]
    if n == 1:
        return HacResult(np.zeros(1, np.int64), 1, 0, 0, [], np.zeros(0), np.zeros((0, 2), np.int64), eps,
                         None if target is None else eps)

    group, rep, counts = collapse_duplicates(X)
    u = rep.size
    if u == n:
        S = X  # rep is 0..n-1 in order: reuse the buffer instead of copying
    else:
        # The caller's buffer stays alive anyway: use it rather than add a copy.
        S = keep_rows(X, rep) if overwrite_input else X[rep]
        S *= counts[:, None]
    del X
    dup = np.flatnonzero(rep[group] != np.arange(n))
    pairs = [np.stack([rep[group[dup]], dup], axis=1)]
    heights = [np.zeros(dup.size)]
    # The clusters still to merge (as rows of the duplicate-free statistics) and their statistics.
    live, cnt, W = np.arange(u, dtype=np.int64), counts.astype(np.float64), None
    merges_per_round = []
    probing = None
    repairs = 0
    while True:
        # The clusters left come back with their statistics (at 10M, 650 MB): merging on needs them.
        rac = Rac(S, cnt, metric, eps, exact_search_max=exact_search_max, nlist=nlist, nprobe=nprobe, seed=seed,
                  log=log, t0=t0, k=k, W=W, delta=delta, widen_rows_max=widen_rows_max(n))
        S = cnt = W = None  # the rounds shrink rac's copies as clusters retire: hold no others
        left, rounds = rac.run(first_round_extra=n - u if not merges_per_round else 0,
                               rounds_done=len(merges_per_round))
        merges_per_round += rounds
        probing = probing or rac.probing
        pairs += [rep[live[p]] for p in rac.pairs]
        heights += rac.heights
        if rac.retired_by_search and left.ids.size > 1 and repairs < MAX_REPAIRS:
            # IVF searches can miss a neighbour within eps, and a cluster that found none retired for good.
            # The clusters left, searched again in an index of their own, find what was missed.
            repairs += 1
            if log is not None:
                log(f"hac: {rac.retired_by_search} clusters retired on IVF searches: {left.ids.size} clusters "
                    f"searched again up to {eps:.6g}")
        # Once eps is above every linkage all clusters merge into one, so this ends.
        elif target is None or n / left.ids.size >= target or left.ids.size == 1:
            break
        else:
            eps *= TARGET_RAISE
            repairs = 0
            if log is not None:
                log(f"hac: mean cluster size {n / left.ids.size:.2f} < target {target:g}: merging on "
                    f"up to {eps:.6g}")
        live, S, cnt, W = live[left.ids], left.S, left.cnt, left.W
        del rac, left
    pairs = np.concatenate(pairs)
    heights = np.concatenate(heights)
    merged_up_to = eps
    if target is not None:
        eps = threshold_from_heights(heights, n, target)
    labels = labels_from_edges(n, pairs[heights <= eps])  # without a target: every merge
    num_clusters = int(labels.max()) + 1
    if log is not None:
        log(f"hac done: {n} points -> {num_clusters} clusters in {len(merges_per_round)} rounds, "
            f"{time.perf_counter() - t0:.1f}s")
    return HacResult(labels, num_clusters, len(merges_per_round), n - num_clusters, merges_per_round, heights,
                     pairs, eps, None if target is None else merged_up_to, probing)


def labels_from_edges(n: int, edges: np.ndarray) -> np.ndarray:
    """Flat cluster labels 0..C-1 (by first appearance) of rows 0..n-1 joined by merge edges.

    Each edge joins one row of each merged cluster; the clusters are the
    connected components of the edges.
    """
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    if not len(edges):
        return np.arange(n, dtype=np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return number_by_first_appearance(component)


def merge_all_threshold(X: np.ndarray, metric: str) -> float:
    """A threshold above every average-linkage merge height of X (float64 rows)."""
    if metric == "cosine":
        return 2.5  # average cosine distance of unit vectors is at most 2
    c = X - X.mean(axis=0)
    return float(4.0 * np.einsum("ij,ij->i", c, c).max() * 1.01 + 1.0)


def threshold_from_heights(heights: np.ndarray, n: int, target: float) -> float:
    """Threshold whose cut of a dendrogram with these merge heights leaves n/target clusters.

    The cut at eps keeps every merge of height <= eps (average linkage is
    monotone), so the clusters left are n minus that count.  The threshold is
    put midway between two consecutive heights, never on one.
    """
    h = np.sort(np.asarray(heights, np.float64))
    if not (h > 0).any():
        return 1.0  # all points identical: any threshold gives one cluster
    return cut_keeping(h, int(np.clip(round(n - n / float(target)), 0, h.size)))


def cut_keeping(h: np.ndarray, m: int) -> float:
    """Threshold keeping the m lowest of the sorted merge heights h (some > 0).

    Midway between two distinct heights, never on one: a cut cannot split tied
    heights, so ties move it up.
    """
    while 0 < m < h.size and h[m] == h[m - 1]:
        m += 1
    if m >= h.size:
        return float(h[-1] * 1.5 + 1e-12)
    if m == 0 or h[m - 1] <= 0:
        return float(h[h > 0][0] / 2)  # as few merges as possible: below the smallest positive height
    return float((h[m - 1] + h[m]) / 2)

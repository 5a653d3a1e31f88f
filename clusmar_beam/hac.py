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
nearest neighbour is beyond the threshold can be dropped for good.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Callable

import faiss
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from clusmar_beam import knn, progress
from clusmar_beam.selection import mix64

METRICS = ("cosine", "sqeuclidean")

# Default neighbours asked from FAISS per query (self included).  More than the
# one we need, so that the exact float64 re-ranking can repair float32 near-ties.
DEFAULT_K = 8
# With a target mean cluster size the pool is merged up to the sample's
# threshold for this many times the target, then cut at the target: on a 1M
# pool the sample's threshold for 10 gave a mean size of 6.8, its threshold
# for 20 a mean of 12.7 (benchmarks/RESULTS.md).
TARGET_OVERSHOOT = 2.0
# With a target mean cluster size, merging that stopped short of it goes on
# with the threshold raised by this factor.
TARGET_RAISE = 1.5
# Up to this many active clusters nearest clusters are searched exactly (FAISS
# flat), above it with the IVF index.  Switching to exact search re-searches
# every active cluster (n^2 work), so it is kept small enough to be cheap:
# at 20K points a switch at 5K active clusters took 1.5 s against 2.1 s for
# one at 20K (exact search throughout), ARI 0.99999 against fastcluster, and
# at 100K it gave the same labels as a switch at 20K
# (benchmarks/bench_exact_switch.py, RESULTS.md).
EXACT_SEARCH_MAX = 5_000
# Queries per FAISS call / re-ranking batch: bounds temporary memory.
_CHUNK = 1 << 15
# Rows whose FAISS vectors are made and added to an index at a time (a block is 68 MB at 64-d).
_ADD_BLOCK = 1 << 18
# Training sample for the IVF coarse quantiser, in points per list, and its
# k-means iterations: 5 took half the time of 10 and gave lists as balanced
# (the first round's search work 3.6% lower at 1M), exact's clusters at 100K,
# and clusters as close to exact in the forced-IVF test data
# (benchmarks/bench_ivf_training.py, bench_ivf_settings.py; RESULTS.md).
_TRAIN_PER_LIST = 32
_TRAIN_ITERATIONS = 5
# IVF lists hold at most about this many clusters on average (more lists than
# 4*sqrt(n) above 1M clusters): a search scans nprobe lists, so a bounded list
# size keeps the cost of a search independent of the pool size.
_LIST_SIZE = 250
# Up to this many lists a point's list is found among all centroids; above, a
# coarse k-means picks a group of lists first (_TwoLevelQuantiser).
_FLAT_QUANTISER_MAX = 8192
# Groups whose lists are compared when a point is given its list.
_GROUPS_SEARCHED = 8
# Queries in one IVF list from which the list is searched as one block.
_CROWDED_LIST = 16
# Queries per FAISS per-query scan on one thread (see _on_all_cores).
_SCAN_BLOCK = 512
# The rounds' arrays are renumbered down to the active clusters once these
# are at most this fraction of them (and more than _COMPACT_MIN rows): a
# round's bookkeeping then costs in proportion to the clusters still merging,
# not to the pool, through the long tail of small rounds.
_COMPACT_BELOW = 0.5
_COMPACT_MIN = 1024


class HacError(ValueError):
    """Input that average_linkage cannot cluster; the message says how many rows."""


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
    # side, the lower first) and its linkage distance; exact duplicates merge
    # at 0.  Cutting at eps keeps the connected components of the edges of
    # height <= eps.  With a target mean size the merging went past the cut,
    # so these hold more merges than `merges` (and merges_per_round counts
    # them all).
    heights: np.ndarray | None = None
    pairs: np.ndarray | None = None
    # The cut: the threshold given, or the one picked for a target mean size.
    distance_threshold: float | None = None
    # With a target: the threshold the merging reached before it was cut.
    merged_up_to: float | None = None


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
    may miss a few neighbours.  `log`, if given, gets one line per round.
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

    With `overwrite_input`, float64 C-ordered `embeddings` are used as the
    working copy and their contents are lost: a caller that holds its only
    copy in float64 then holds no second one through the run (at 10M the
    float32 input next to the copy was 2.6 GB of the peak).
    """
    eps = _check_threshold(distance_threshold)
    target = None if target_mean_cluster_size is None else check_target(target_mean_cluster_size)
    if metric not in METRICS:
        raise HacError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    _check_count("exact_search_max", exact_search_max)
    _check_count("nprobe", nprobe)
    if nlist is not None:
        _check_count("nlist", nlist)
    t0 = time.perf_counter()
    X = _prepare(embeddings, metric, copy=not overwrite_input)
    n = X.shape[0]
    if n == 1:
        return HacResult(np.zeros(1, np.int64), 1, 0, 0, [], np.zeros(0), np.zeros((0, 2), np.int64), eps,
                         None if target is None else eps)

    group, rep, counts = _collapse_duplicates(X)
    u = rep.size
    if u == n:
        S = X  # rep is 0..n-1 in order: reuse the buffer instead of copying
    else:
        # The caller's buffer stays alive anyway: use it rather than add a copy.
        S = _keep_rows(X, rep) if overwrite_input else X[rep]
        S *= counts[:, None]
    del X
    dup = np.flatnonzero(rep[group] != np.arange(n))
    pairs = [np.stack([rep[group[dup]], dup], axis=1)]
    heights = [np.zeros(dup.size)]
    # The clusters still to merge (as rows of the duplicate-free statistics) and their statistics.
    live, cnt, W = np.arange(u, dtype=np.int64), counts.astype(np.float64), None
    merges_per_round = []
    while True:
        # Only merging on towards a target needs the statistics of the clusters left (at 10M, 650 MB).
        rac = _Rac(S, cnt, metric, eps, exact_search_max, nlist, nprobe, seed, log, t0, k, W=W,
                   statistics_left=target is not None, delta=delta)
        S = cnt = W = None  # the rounds shrink rac's copies as clusters retire: hold no others
        left, rounds = rac.run(first_round_extra=n - u if not merges_per_round else 0)
        merges_per_round += rounds
        pairs += [rep[live[p]] for p in rac.pairs]
        heights += rac.heights
        # Once eps is above every linkage all clusters merge into one, so this ends.
        if target is None or n / left.ids.size >= target or left.ids.size == 1:
            break
        eps *= TARGET_RAISE
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
                     pairs, eps, None if target is None else merged_up_to)


def default_nlist(n: int) -> int:
    """IVF lists for n clusters: 4*sqrt(n), or more to keep lists near _LIST_SIZE."""
    return max(int(round(4 * math.sqrt(n))), -(-n // _LIST_SIZE))


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
    return _number_by_first_appearance(component)


# ---------------------------------------------------------------- input checks


def _check_threshold(t) -> float:
    if isinstance(t, (bool, np.bool_)):
        raise HacError(f"distance_threshold must be a number > 0, got {t!r}")
    try:
        eps = float(t)
    except (TypeError, ValueError):
        raise HacError(f"distance_threshold must be a number > 0, got {t!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise HacError(f"distance_threshold must be finite and > 0, got {t!r}")
    return eps


def _check_count(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HacError(f"{name} must be an integer >= 1, got {value!r}")


def _prepare(embeddings, metric: str, copy: bool = True) -> np.ndarray:
    """Validated float64 rows, unit for cosine, centred for sqeuclidean.

    A copy, unless `copy` is false and the input is float64 C-ordered: then
    the input itself is changed.  Centring does not change squared Euclidean
    distances but removes the cancellation error a large common offset would
    cause.
    """
    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise HacError(f"embeddings must be a 2-D array (rows x dims), got shape {X.shape}")
    n, d = X.shape
    if not np.issubdtype(X.dtype, np.floating):
        raise HacError(f"embeddings must be floating point, got dtype {X.dtype} for {n} rows")
    if n == 0 or d == 0:
        raise HacError(f"embeddings are empty: {n} rows x {d} columns")
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise HacError(f"embeddings contain NaN or inf in {bad.size} of {n} rows "
                       f"(first at row {bad[0]})")
    X = np.array(X, dtype=np.float64, order="C", copy=True if copy else None)
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", X, X))
        zero = norms == 0
        if zero.any():
            bad = np.flatnonzero(zero)
            raise HacError(f"{bad.size} of {n} embedding rows have zero norm and cannot be "
                           f"normalised for cosine distance (first at row {bad[0]})")
        if not np.isfinite(norms).all():
            bad = np.flatnonzero(~np.isfinite(norms))
            raise HacError(f"{bad.size} of {n} embedding rows are too large to normalise "
                           f"(first at row {bad[0]})")
        X /= norms[:, None]
    else:
        X -= X.mean(axis=0)
    X += 0.0  # -0.0 -> +0.0 so equal rows have equal bits
    return X


# ------------------------------------------------------------ duplicate rows


def _collapse_duplicates(X: np.ndarray):
    """Group bit-identical rows: (group of each row, first row of each group, sizes).

    Exact ties make nearest neighbours ambiguous and RAC slow (a pile of equal
    points merges one pair per round), and they merge at distance 0 anyway.
    Groups are numbered by first appearance so tie-breaking by id follows input
    order.
    """
    n, d = X.shape
    mult = np.random.default_rng(0x5EED).integers(1, 2**63, size=d, dtype=np.uint64) | np.uint64(1)
    bits = X.view(np.uint64)
    h = np.empty(n, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, n, _CHUNK):
            # mix64 makes the row hash non-linear in the float bits
            h[s:s + _CHUNK] = (mix64(bits[s:s + _CHUNK]) * mult).sum(axis=1)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    group, rep = _renumber(first, inverse.reshape(-1))
    if rep.size < n and not _rows_match(X, group, rep):
        # A hash collision: astronomically unlikely, but stay exact.
        _, first, inverse = np.unique(X, axis=0, return_index=True, return_inverse=True)
        group, rep = _renumber(first, inverse.reshape(-1))
    counts = np.bincount(group, minlength=rep.size)
    return group, rep, counts


def _renumber(first: np.ndarray, inverse: np.ndarray):
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64), first[order].astype(np.int64)


def _rows_match(X, group, rep) -> bool:
    for s in range(0, X.shape[0], _CHUNK):
        if not np.array_equal(X[s:s + _CHUNK], X[rep[group[s:s + _CHUNK]]]):
            return False
    return True


def _number_by_first_appearance(keys: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)]


# ---------------------------------------------------------------------- RAC


@dataclasses.dataclass
class _Clusters:
    """Clusters left by a run: their input row ids (ascending) and statistics (None unless asked for)."""

    ids: np.ndarray
    S: np.ndarray | None
    cnt: np.ndarray | None
    W: np.ndarray | None


class _Rac:
    """Cluster statistics, the FAISS index over active clusters, and the rounds.

    Cluster ids are row numbers of the statistics; a merged pair keeps the
    lower id.  As clusters retire the rows are renumbered (_compact) in
    order, so the lower id stays the lower; `orig` maps them back to the
    input rows, in which `pairs` are recorded.  For sqeuclidean the
    within-cluster sum of squared deviations W is kept instead of the sum of
    squared norms Q (W = Q - |S|^2/n): the pairwise update of W is stable
    where Q/n - |mu|^2 would cancel.
    """

    def __init__(self, S, cnt, metric, eps, exact_search_max, nlist, nprobe, seed, log, t0, k, W=None,
                 frozen=None, statistics_left=True, delta=0.0):
        self.k = k
        self.delta = float(delta)
        # Whether run returns the statistics of the clusters left, or only their ids.
        self.statistics_left = statistics_left
        self.S = S
        self.cnt = cnt
        self.cos = metric == "cosine"
        self.W = None if self.cos else (np.zeros(S.shape[0]) if W is None else W)
        # Frozen clusters are searched as neighbours but never merge or retire.
        self.frozen = np.zeros(S.shape[0], bool) if frozen is None else np.asarray(frozen, bool)
        # FAISS works in float32: bring squared Euclidean data to unit scale
        # (L2 order does not care) so tiny or huge values neither underflow
        # nor overflow.
        self.scale = 1.0
        if not self.cos:
            top = np.max(np.maximum(S.max(axis=1), -S.min(axis=1)) / cnt)
            if top > 0:
                self.scale = 1.0 / top
        # The scaled means in float32: FAISS's rows, and (cosine) the
        # screening of candidates before their linkage is computed in float64.
        self.means32 = np.empty(S.shape, np.float32)
        for s in range(0, S.shape[0], _CHUNK):
            self._set_means32(np.arange(s, min(s + _CHUNK, S.shape[0])))
        self.eps = eps
        self.exact_search_max = int(exact_search_max)
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.seed = int(seed)
        self.log = log
        self.t0 = t0
        self.index = None
        self.heights = []
        self.pairs = []
        self.orig = np.arange(S.shape[0], dtype=np.int64)
        self._retired = []  # _Clusters set aside by _compact
        # Each cluster's last search results (cluster ids, sorted; -1 = none) and a
        # lower bound on its linkage to every cluster not in that list; see _resolve.
        u = S.shape[0]
        self.cand = np.full((u, k), -1, np.int64)
        self.bound = np.full(u, -np.inf)
        # The linkage of each kept candidate, when it was computed, and
        # when each cluster last changed (a merge), on one clock (self.now):
        # a kept linkage is still valid while neither side has changed, so
        # _resolve only recomputes those of candidates that merged.  A kept
        # linkage is exact (float64) where cand_exact says so, else FAISS's
        # float32 value, within self.tol of it (see _nearest_of).
        self.cand_d = np.full((u, k), np.inf)
        self.cand_exact = np.zeros((u, k), bool)
        self.computed = np.full(u, -1, np.int64)
        self.changed = np.full(u, -1, np.int64)
        self.now = 0
        # Slack for float32 ranking inside FAISS: |error| of an augmented L2
        # distance is a few float32 ulps of the squared norms involved.
        if self.cos:
            self.tol = 2e-5
        else:
            sq = np.einsum("ij,ij->i", S, S) / (cnt * cnt) * self.scale ** 2
            self.tol = 2e-5 * max(1.0, float(sq.max()) if sq.size else 1.0) / self.scale ** 2

    # --- linkage and vectors

    def _mu(self, ids):
        mu = self.S[ids]
        mu /= self.cnt[ids, None]  # in place: one temporary, not two
        return mu

    def _var(self, ids):
        return self.W[ids] / self.cnt[ids]

    def _set_means32(self, ids):
        mu = self._mu(ids)
        if self.scale != 1.0:
            mu *= self.scale
        self.means32[ids] = mu

    def _linkage(self, mu_a, var_a, ids_b):
        """Exact average linkage between rows mu_a and clusters ids_b.

        Written so that d(a, b) and d(b, a) are bit-identical; the
        reciprocity test and the symmetrisation rely on it.  Clusters keep
        vector sums (means are one division away) and the dot products use
        numpy's pairwise sum: with means updated incrementally, or einsum,
        the last bits change and exact ties in integer data (digits,
        sqeuclidean) broke differently from fastcluster (ARI 0.9895).
        """
        mu_b = self._mu(ids_b)
        if self.cos:
            mu_b *= mu_a
            return 1.0 - mu_b.sum(axis=1)
        mu_b -= mu_a  # the sign does not change the square
        mu_b *= mu_b
        return mu_b.sum(axis=1) + (var_a + self._var(ids_b))

    def _vectors(self, ids, database: bool):
        """FAISS rows: [mu, e] for the database, [mu, 0] for queries.

        |[mu_a,0] - [mu_b,e_b]|^2 = linkage(a, b) + const(a) when e_b^2 is
        1 - |mu_b|^2 (cosine) or the variance of b (sqeuclidean).
        """
        out = np.zeros((ids.size, self.means32.shape[1] + 1), np.float32)
        out[:, :-1] = self.means32[ids]
        if database:
            if self.cos:
                # float32 is enough: an inner-product search ignores this
                # column (queries have 0 there); it only places the row in a list.
                e2 = 1.0 - np.einsum("ij,ij->i", out[:, :-1], out[:, :-1])
                out[:, -1] = np.sqrt(np.maximum(e2, 0.0))
            else:
                out[:, -1] = np.sqrt(np.maximum(self._var(ids), 0.0)) * self.scale
        return out

    # --- index

    def _build_index(self, ids):
        dim = self.S.shape[1] + 1
        if ids.size <= self.exact_search_max:
            self.index = _FlatIndex(dim, self.cos)
        else:
            nlist = self.nlist or default_nlist(ids.size)
            nlist = max(1, min(nlist, ids.size))
            rng = np.random.default_rng(self.seed)
            m = min(ids.size, _TRAIN_PER_LIST * nlist)
            sample = np.sort(rng.choice(ids.size, size=m, replace=False))
            self.index = _IvfIndex(self._vectors(ids[sample], True), nlist, self.nprobe,
                                   self.seed, self.S.shape[0], inner_product=self.cos)
        for s in range(0, ids.size, _ADD_BLOCK):
            part = ids[s:s + _ADD_BLOCK]
            self.index.add(part, self._vectors(part, True))

    def _search(self, ids, own_lists=False):
        """Nearest active cluster of each id: FAISS candidates, exact re-ranking.

        Ties go to the lower id.  Keeps the candidates and a lower bound on the
        linkage to every other cluster for _resolve.  With `own_lists` an IVF
        search probes the lists nearest each cluster itself rather than those
        nearest its list (see run).
        """
        nn = np.full(ids.size, -1, np.int64)
        nd = np.full(ids.size, np.inf)
        k = min(self.k, self.index.ntotal)
        if k == 0:
            return nn, nd
        everything = self.index.ntotal <= k  # every indexed cluster was returned
        queries = functools.partial(self._vectors, database=False)
        if own_lists:
            cand, score = self.index.search_own_lists(ids, queries, functools.partial(self._vectors, database=True), k)
        else:
            cand, score = self.index.search(ids, queries, k)
        for s in range(0, ids.size, _CHUNK):
            q = ids[s:s + _CHUNK]
            c = cand[s:s + _CHUNK]
            c[c == q[:, None]] = -1
            order = np.argsort(c, axis=1)
            c = np.take_along_axis(c, order, axis=1)
            if self.cos:
                # FAISS's float32 inner products of unit-norm augmented rows
                # are within tol of the linkage: only the near-nearest are
                # recomputed in float64 (_nearest_of).
                dist = 1.0 - np.take_along_axis(score[s:s + _CHUNK], order, axis=1).astype(np.float64)
                none = np.zeros(c.shape, bool)  # none exact yet, none stale
                nn[s:s + q.size], nd[s:s + q.size], dist, exact = self._nearest_of(q, c, dist, none, none)
            else:
                # float32 L2 errors grow with the squared norms: every candidate in float64.
                nn[s:s + q.size], nd[s:s + q.size], dist, exact = self._nearest_of(q, c)
            self._keep(q, c, dist, exact)
            valid = c >= 0
            # Whatever FAISS did not return ranked (in float32) after its k-th
            # result, so it is at least as far as the farthest one returned,
            # up to float32 error.  An IVF search gives no such guarantee, but
            # the bound is only as approximate as the search itself.
            farthest = np.where(valid, dist, -np.inf).max(axis=1) - 2 * self.tol
            full = valid.sum(axis=1) >= k - 1
            self.bound[q] = np.inf if everything else np.where(full, farthest, -np.inf)
        return nn, nd

    def _widen(self, ids):
        """Nearest active cluster of each id, searched this round from its list, in the lists nearest itself too.

        Only the lists that the first search did not probe are searched;
        their candidates join the kept ones, the nearest k are kept, and the
        bound is the lowest of the first search's, the new search's and the
        best candidate dropped.
        """
        kk = self.cand.shape[1]
        k = min(self.k, self.index.ntotal)
        cand, score = self.index.search_own_lists(
            ids, functools.partial(self._vectors, database=False), functools.partial(self._vectors, database=True),
            k, searched=self.index.list_of[ids])
        nn = np.empty(ids.size, np.int64)
        nd = np.empty(ids.size)
        for s in range(0, ids.size, _CHUNK):
            q = ids[s:s + _CHUNK]
            new = cand[s:s + _CHUNK]  # never q itself: its own list is among those skipped
            valid = new >= 0
            c = np.concatenate([self.cand[q], new], axis=1)
            exact = np.concatenate([self.cand_exact[q], np.zeros(new.shape, bool)], axis=1)
            if self.cos:  # as in _search: FAISS's float32 values, the near-nearest redone in float64
                new_d = 1.0 - score[s:s + _CHUNK].astype(np.float64)
                need = np.zeros(c.shape, bool)
            else:
                new_d = np.full(new.shape, np.inf)
                need = np.concatenate([np.zeros(new.shape, bool), valid], axis=1)
            dist = np.concatenate([self.cand_d[q], new_d], axis=1)
            nn[s:s + q.size], nd[s:s + q.size], dist, exact = self._nearest_of(q, c, dist, exact, need)
            # A search that returned fewer than k found everything in its lists.
            farthest = np.where(valid, dist[:, kk:], -np.inf).max(axis=1) - 2 * self.tol
            new_bound = np.where(valid.sum(axis=1) >= k - 1, farthest, np.inf)
            # A cluster is in one list only, so new and kept candidates never repeat.
            dropped = self._keep_nearest(q, c, dist, exact)
            self.bound[q] = np.minimum(np.minimum(self.bound[q], new_bound), dropped)
        return nn, nd

    def _keep_nearest(self, q, c, dist, exact):
        """Keep the k nearest of more than k candidates; returns a bound on those dropped."""
        k = self.cand.shape[1]
        order = np.lexsort((c, dist), axis=1)
        c = np.take_along_axis(c, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        exact = np.take_along_axis(exact, order, axis=1)
        self._keep(q, c[:, :k], dist[:, :k], exact[:, :k])
        return np.where(exact[:, k], dist[:, k], dist[:, k] - self.tol)  # float32 values: within tol

    def _keep(self, q, c, dist, exact):
        """Keep candidates c of clusters q (fewer columns than k: the rest empty) and their linkages."""
        width = c.shape[1]
        self.cand[q, :width] = c
        self.cand[q, width:] = -1
        self.cand_d[q, :width] = dist
        self.cand_d[q, width:] = np.inf
        self.cand_exact[q, :width] = exact
        self.cand_exact[q, width:] = False
        self.computed[q] = self.now

    def _nearest_of(self, q, c, dist=None, exact=None, need=None):
        """Exact nearest of each q among its candidate row c (-1 = none), ties to the lower id.

        Without `dist` every linkage is computed; given `dist` (same shape
        as c), those marked in `need`.  For cosine they are first computed
        in float32 (within self.tol), and a value not marked `exact` is
        recomputed in float64 only if it could be the nearest: one more
        than 2 tol above the smallest value is more than tol above the
        smallest linkage.  For sqeuclidean float32 errors grow with the
        norms, so every linkage is computed in float64.  Returns (nearest,
        its linkage, linkages, which are exact); the nearest linkage is
        always exact.
        """
        valid = c >= 0
        c = np.where(valid, c, q[:, None])  # any valid row; masked below
        if dist is None:
            dist = np.empty(c.shape)
            exact = np.zeros(c.shape, bool)
            need = valid
        else:
            need = valid & need
        dist[~valid] = np.inf
        if self.cos:
            rows, cols = np.nonzero(need)
            if rows.size:
                dist[rows, cols] = 1.0 - np.einsum("ij,ij->i", self.means32[q[rows]],
                                                   self.means32[c[rows, cols]]).astype(np.float64)
            exact = exact & ~need
            near = dist.min(axis=1)
            need = valid & ~exact & (dist <= near[:, None] + 2 * self.tol)
        self._fill(q, c, dist, need)
        exact = exact | need
        best = dist.argmin(axis=1)
        r = np.arange(q.size)
        nd = dist[r, best]
        nn = np.where(np.isfinite(nd), c[r, best], -1)
        return nn, nd, dist, exact

    def _fill(self, q, c, dist, mask):
        """dist[mask] = exact linkages of the masked (query row, candidate) pairs."""
        rows, cols = np.nonzero(mask)
        if rows.size:
            qq = q[rows]
            dist[rows, cols] = self._linkage(self._mu(qq), None if self.cos else self._var(qq), c[rows, cols])

    def _resolve(self, ids, parent, active):
        """Nearest clusters found from the kept candidates, without a search.

        A candidate that merged stands for its merged cluster.  Every cluster
        outside the list is at least `bound` away: it was when the list was
        made, and average linkage is reducible, so a merge never brings a
        cluster closer than the nearer of its two parts.  If the best
        candidate is within the bound it is the nearest cluster; if the bound
        and every candidate are beyond eps the cluster can retire.  Returns
        (resolved mask, nn, nd) for `ids`.
        """
        done = np.zeros(ids.size, bool)
        nn = np.full(ids.size, -1, np.int64)
        nd = np.full(ids.size, np.inf)
        for s in range(0, ids.size, _CHUNK):
            q = ids[s:s + _CHUNK]
            bound = self.bound[q]
            c = self.cand[q]
            c = _live(q, c, parent, active)
            order = np.argsort(c, axis=1)
            c = np.take_along_axis(c, order, axis=1)
            dist = np.take_along_axis(self.cand_d[q], order, axis=1)
            exact = np.take_along_axis(self.cand_exact[q], order, axis=1)
            c[:, 1:][c[:, 1:] == c[:, :-1]] = -1  # the same merged cluster twice
            # q has not changed since its list was made (a merged q gets a new
            # list in _combine), so only candidates that changed are recomputed.
            need = self.changed[np.maximum(c, 0)] >= self.computed[q][:, None]
            near, near_d, dist, exact = self._nearest_of(q, c, dist, exact, need)
            self._keep(q, c, dist, exact)
            found = near_d < bound
            gone = ~found & (bound > self.eps) & (near_d > self.eps)
            done[s:s + q.size] = found | gone
            nn[s:s + q.size] = np.where(found, near, -1)
            nd[s:s + q.size] = np.where(found, near_d, np.inf)
        return done, nn, nd

    def _combine(self, a, b, parent, active):
        """Candidates of merged cluster a (which absorbed b): the nearest of both lists.

        The union bounds everything else by min(bound a, bound b), since a
        linkage to the merged cluster is a weighted mean of the linkages to
        its parts; candidates dropped to keep k lower the bound to their
        distance.
        """
        for s in range(0, a.size, _CHUNK):
            q, other = a[s:s + _CHUNK], b[s:s + _CHUNK]
            c = np.concatenate([self.cand[q], self.cand[other]], axis=1)
            c = _live(q, c, parent, active)
            c.sort(axis=1)
            c[:, 1:][c[:, 1:] == c[:, :-1]] = -1
            _, _, dist, exact = self._nearest_of(q, c)
            dropped = self._keep_nearest(q, c, dist, exact)
            self.bound[q] = np.minimum(np.minimum(self.bound[q], self.bound[other]), dropped)

    # --- rounds

    def run(self, first_round_extra: int):
        """Merge until nothing is within eps: (the clusters left, merges per round)."""
        u = self.S.shape[0]
        eps = self.eps
        parent = np.arange(u, dtype=np.int64)
        active = np.ones(u, bool)
        stale = ~self.frozen  # frozen clusters are only ever searched for, never searched from
        nn = np.full(u, -1, np.int64)
        nd = np.full(u, np.inf)
        fresh = np.zeros(u, bool)
        self._build_index(np.arange(u, dtype=np.int64))
        merges_per_round = []
        while (active & ~self.frozen).any():
            self.now = 3 * len(merges_per_round)  # searches; then merges at now + 1, new lists at now + 2
            if active.size > _COMPACT_MIN and np.count_nonzero(active) <= _COMPACT_BELOW * active.size:
                parent, active, stale, nn, nd = self._compact(parent, active, stale, nn, nd)
                fresh = np.zeros(active.size, bool)
            u = active.size
            free = ~self.frozen
            act = np.flatnonzero(active & free)
            if not self.index.exact and np.count_nonzero(active) <= self.exact_search_max:
                # Few enough left: switch to exact search and redo every
                # neighbour, repairing what the IVF index may have missed.
                self._build_index(np.flatnonzero(active))
                stale[act] = True
                self.bound[:] = -np.inf
            todo = np.flatnonzero(stale & active)
            renewed = todo  # these get a new nearest this round (searched or resolved)
            fresh[renewed] = True
            known = todo[self.bound[todo] > -np.inf]
            if known.size:
                done, nn_k, nd_k = self._resolve(known, parent, active)
                nn[known[done]], nd[known[done]] = nn_k[done], nd_k[done]
                resolved = known[done]
                todo = np.setdiff1d(todo, resolved, assume_unique=True)
            else:
                resolved = known
            if todo.size:
                nn[todo], nd[todo] = self._search(todo)
            stale[todo] = False
            stale[resolved] = False
            if not self.index.exact:
                # An IVF search probes the lists nearest the cluster's list and
                # can miss the neighbours of a cluster far from that list's
                # centre.  Retiring is for good, so a cluster about to retire
                # is searched again in the lists nearest itself: at 100K that
                # gave the clusters of exact search (benchmarks/RESULTS.md).
                # One searched this round only needs the lists it missed.
                doubt = np.flatnonzero(fresh & (nd > eps))
                searched = np.isin(doubt, todo, assume_unique=True)
                widen, again = doubt[searched], doubt[~searched]
                if widen.size:
                    nn[widen], nd[widen] = self._widen(widen)
                if again.size:
                    nn[again], nd[again] = self._search(again, own_lists=True)
            _symmetrise(act, nn, nd, fresh)
            fresh[renewed] = False

            # Beyond eps now means beyond eps forever (reducibility).
            far = nd[act] > eps
            retired = act[far]
            active[retired] = False
            act = act[~far]

            partner = nn[act]
            pair = (partner > act) & (nn[partner] == act) & active[partner] & free[partner]
            a, b = act[pair], partner[pair]
            self.heights.append(nd[a].copy())
            self.pairs.append(self.orig[np.stack([a, b], axis=1)])
            self.now += 1
            self._merge(a, b)
            if self.delta > 0 and a.size:
                leaf, centre = self._absorb(a, b, act, nn, nd)
            else:
                centre = leaf = a[:0]
            parent[b] = a
            parent[leaf] = centre
            parent = parent[parent]  # every cluster points at its root again
            active[b] = False
            active[leaf] = False
            self.now += 1
            if a.size:
                self._combine(a, b, parent, active)
            if centre.size:
                # A centre's kept list and bound no longer cover its leaves' neighbours: search it again.
                grown = np.unique(centre)
                self.cand[grown] = -1
                self.bound[grown] = -np.inf

            gone = np.concatenate([retired, a, b, leaf])
            if gone.size:
                self.index.remove(gone)
            if a.size:
                self.index.add(a, self._vectors(a, True))

            # Only clusters that merged, or whose neighbour merged or left,
            # can have a different nearest neighbour now.
            touched = np.zeros(u, bool)
            touched[a] = True
            touched[b] = True
            touched[leaf] = True
            act = np.flatnonzero(active & free)
            nbr = nn[act]
            redo = touched[nbr] | ~active[nbr]
            stale[act[redo]] = True
            stale[a] = True

            merged = int(a.size + leaf.size) + (first_round_extra if not merges_per_round else 0)
            merges_per_round.append(merged)
            progress.set_value("clusters left to merge", act.size)
            if a.size == 0 and retired.size == 0 and self.frozen.any():
                break  # every member left waits on a frozen neighbour: nothing can change any more
            if self.log is not None:
                self.log(f"round {len(merges_per_round)}: searched {todo.size}, resolved without search "
                         f"{resolved.size}, merged {merged}, "
                         f"retired {retired.size}, active {act.size}, "
                         f"{'exact' if self.index.exact else 'ivf'}, "
                         f"{time.perf_counter() - self.t0:.1f}s")
        self.index = None
        self._set_aside(np.flatnonzero(parent == np.arange(u)))
        # The rounds' arrays are done with: free them before the result is joined.
        self.means32 = self.cand = self.cand_d = self.cand_exact = self.bound = self.computed = self.changed = None
        left, self._retired = self._retired, []
        ids = np.concatenate([c.ids for c in left])
        order = np.argsort(ids, kind="stable")

        def joined(field):
            parts = [getattr(c, field) for c in left]
            if parts[0] is None:
                return None
            for c in left:
                setattr(c, field, None)  # each part goes as soon as it is copied
            return np.concatenate(parts)[order]

        return _Clusters(ids[order], joined("S"), joined("cnt"), joined("W")), merges_per_round

    def _set_aside(self, rows):
        """Keep the input ids (and statistics, if asked for) of clusters that are done (retired, or left at the end)."""
        stats = self.statistics_left
        self._retired.append(_Clusters(self.orig[rows], self.S[rows] if stats else None,
                                       self.cnt[rows] if stats else None,
                                       self.W[rows] if stats and self.W is not None else None))

    def _compact(self, parent, active, stale, nn, nd):
        """Renumber the active clusters 0..m-1, in order, and drop the others' rows.

        Retired clusters are set aside with their statistics; merged-away
        ones are gone.  A kept candidate or nearest neighbour becomes the
        cluster it is part of now (as _live would read it), or -1.  Returns
        the round's arrays for the new numbering.
        """
        rows = np.arange(active.size)
        self._set_aside(np.flatnonzero(~active & (parent == rows)))
        keep = np.flatnonzero(active)
        m = keep.size
        new_id = np.full(active.size, -1, np.int64)
        new_id[keep] = np.arange(m)

        def renumbered(ids):
            return np.where(ids >= 0, new_id[parent[np.maximum(ids, 0)]], -1)

        for s in range(0, m, _CHUNK):
            cand = renumbered(self.cand[keep[s:s + _CHUNK]])
            cand[cand == np.arange(s, s + cand.shape[0])[:, None]] = -1
            self.cand[s:s + cand.shape[0]] = cand
        self.cand = self.cand[:m]
        for name in ("S", "cnt", "W", "frozen", "means32", "bound", "cand_d", "cand_exact", "computed", "changed",
                     "orig"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _keep_rows(value, keep))
        self.index.renumber(new_id, functools.partial(self._vectors, database=True))
        return np.arange(m, dtype=np.int64), np.ones(m, bool), stale[keep], renumbered(nn[keep]), nd[keep]

    def _absorb(self, a, b, act, nn, nd):
        """Grow each merged pair a (which absorbed b) into a star: (centre, leaf) of every leaf absorbed.

        A leaf is a cluster whose nearest neighbour is a or b.  Each centre
        takes its leaves nearest first, while the exact linkage of the
        grown cluster to the next leaf stays within (1 + delta) of the
        pair's linkage (and eps): no cluster is nearer to either side than
        that, since a merge never brings a cluster closer than the nearer
        of its parts.  So every merge is (1 + delta)-good (TeraHAC), and a
        dense region's growing cluster takes all its near-equal neighbours
        in one round instead of one per round.  Records the merges.
        """
        centre_of = np.full(nn.size, -1, np.int64)
        centre_of[a] = a
        centre_of[b] = a
        target = centre_of[np.maximum(nn[act], 0)]
        is_leaf = (target >= 0) & (centre_of[act] < 0) & (nn[act] >= 0)
        leaf, centre = act[is_leaf], target[is_leaf]
        if leaf.size == 0:
            return leaf, centre
        order = np.lexsort((leaf, nd[leaf], centre))
        leaf, centre = leaf[order], centre[order]
        first = np.r_[True, centre[1:] != centre[:-1]]
        start = np.flatnonzero(first)
        group = np.cumsum(first) - 1
        # Each leaf's statistics and those of its centre grown by the leaves before it.
        S_leaf = self.S[leaf]
        excl = np.cumsum(S_leaf, axis=0)
        excl -= S_leaf
        excl -= excl[start][group]
        P = excl
        P += self.S[centre]
        n_leaf = self.cnt[leaf]
        n_excl = np.cumsum(n_leaf) - n_leaf
        n_excl -= n_excl[start][group]
        N = n_excl + self.cnt[centre]
        mu_leaf = S_leaf / n_leaf[:, None]
        P /= N[:, None]  # the grown centre's mean
        if self.cos:
            link = 1.0 - np.einsum("ij,ij->i", P, mu_leaf)
        else:
            diff = P - mu_leaf
            sq = np.einsum("ij,ij->i", diff, diff)
            var_leaf = self.W[leaf] / n_leaf
            inc = self.W[leaf] + (N * n_leaf / (N + n_leaf)) * sq
            w_excl = np.cumsum(inc) - inc
            w_excl -= w_excl[start][group]
            link = sq + (self.W[centre] + w_excl) / N + var_leaf
        limit = np.minimum((1.0 + self.delta) * np.minimum(nd[centre], nd[leaf]), self.eps)
        bad = np.cumsum(link > limit)
        bad -= np.r_[0, bad][start][group]
        take = bad == 0  # stop at a centre's first leaf out of reach
        leaf, centre = leaf[take], centre[take]
        if leaf.size == 0:
            return leaf, centre
        self.heights.append(link[take])
        self.pairs.append(self.orig[np.stack([centre, leaf], axis=1)])
        grown = np.unique(centre)
        if not self.cos:
            self.W[grown] += np.bincount(np.searchsorted(grown, centre), weights=inc[take], minlength=grown.size)
        np.add.at(self.S, centre, self.S[leaf])
        self.cnt[grown] += np.bincount(np.searchsorted(grown, centre), weights=self.cnt[leaf], minlength=grown.size)
        self._set_means32(grown)
        self.changed[grown] = self.now
        return leaf, centre

    def _merge(self, a, b):
        if a.size == 0:
            return
        if not self.cos:
            na, nb = self.cnt[a], self.cnt[b]
            diff = self._mu(a) - self._mu(b)
            self.W[a] += self.W[b] + (na * nb / (na + nb)) * np.einsum("ij,ij->i", diff, diff)
        self.S[a] += self.S[b]
        self.cnt[a] += self.cnt[b]
        self._set_means32(a)
        self.changed[a] = self.now


def _keep_rows(a, keep):
    """a[keep] (keep ascending) in a's own memory, as its first rows.

    A copy of S (5 GB at 10M) next to the original raised the 10M peak by
    about 2 GB; moving rows up in blocks never reads a row already written
    (keep[i] >= i).  The rows beyond stay allocated: the peak is the first
    round's anyway.
    """
    for s in range(0, keep.size, _CHUNK):
        part = keep[s:s + _CHUNK]
        a[s:s + part.size] = a[part]
    return a[:keep.size]


def _live(q, c, parent, active):
    """Kept candidates c of clusters q as the clusters they are now part of; -1 for none, q itself or retired."""
    c = np.where(c >= 0, parent[np.maximum(c, 0)], -1)
    c[(c == q[:, None]) | ~active[np.maximum(c, 0)]] = -1
    return c


def _symmetrise(act, nn, nd, fresh):
    """Offer every found edge a -> b to b as well: b's nearest is at most that far.

    This repairs neighbours that a search missed (float32 near-ties, IVF), and
    with bit-symmetric distances it makes the smallest (distance, id) edge
    reciprocal, so a round always merges while any edge is within the
    threshold.  After a pass no edge is better than its target's own, so only
    edges from or to `fresh` clusters (a new nearest this round) can be:
    the others are left out.
    """
    src = act[np.isfinite(nd[act])]
    src = src[fresh[src] | fresh[nn[src]]]
    if src.size == 0:
        return
    dst, d = nn[src], nd[src]
    order = np.lexsort((src, d, dst))
    dst, d, src = dst[order], d[order], src[order]
    head = np.ones(dst.size, bool)
    head[1:] = dst[1:] != dst[:-1]
    dst, d, src = dst[head], d[head], src[head]
    better = (d < nd[dst]) | ((d == nd[dst]) & (src < nn[dst]))
    nn[dst[better]] = src[better]
    nd[dst[better]] = d[better]


class _FlatIndex:
    """Exact search over the active clusters' augmented vectors.

    For cosine every database row has norm 1, so the inner-product order is
    the L2 order, and FAISS's inner-product search skips the norms.
    """

    exact = True

    def __init__(self, dim, inner_product=False):
        self.index = faiss.IndexIDMap(faiss.IndexFlatIP(dim) if inner_product else faiss.IndexFlatL2(dim))

    @property
    def ntotal(self):
        return self.index.ntotal

    def add(self, ids, vecs):
        self.index.add_with_ids(vecs, ids)

    def remove(self, ids):
        self.index.remove_ids(ids)

    def renumber(self, new_id, vectors):
        """Give every row its id in `new_id` (old id -> new id), `vectors` the rows by new id.

        The rows keep their order, so FAISS breaks float32 ties as before.
        """
        ids = new_id[faiss.vector_to_array(self.index.id_map)]
        dim, metric = self.index.d, self.index.metric_type
        self.index = None  # the old rows go before the new are added
        self.index = faiss.IndexIDMap(faiss.IndexFlat(dim, metric))
        self.add(ids, vectors(ids))  # at most exact_search_max rows

    def search(self, ids, query_vectors, k):
        """(ids, FAISS scores) of each query's k nearest; -1 where there are fewer."""
        cand = np.empty((ids.size, k), np.int64)
        score = np.empty((ids.size, k), np.float32)
        for s in range(0, ids.size, _CHUNK):
            part = ids[s:s + _CHUNK]
            score[s:s + part.size], cand[s:s + part.size] = self.index.search(query_vectors(part), k)
        return cand, score


class _IvfIndex:
    """IndexIVFFlat probed per list rather than per query.

    A query is probed in the nprobe lists nearest to the centroid of the list
    that holds its own cluster.  Queries sharing a list then share their probe
    lists, so a crowded list is searched with one BLAS product against the
    union of its probe lists; FAISS's per-query scan of the same lists is
    memory-bound and was 2-3x slower on a first round over 1M points.
    """

    exact = False

    def __init__(self, train_vecs, nlist, nprobe, seed, size, inner_product=False):
        dim = train_vecs.shape[1]
        self.metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2  # see _FlatIndex
        self.quantiser = _TwoLevelQuantiser(train_vecs, nlist, seed)
        centroids = self.quantiser.centroids
        nlist = centroids.shape[0]
        # The IVF index only stores the lists: points are assigned by the
        # quantiser above and searched through search_preassigned or as blocks.
        self.flat = faiss.IndexFlatL2(dim)  # the IVF index does not own it
        self.flat.add(centroids)
        index = faiss.IndexIVFFlat(self.flat, dim, nlist, self.metric)
        assert index.is_trained  # a quantiser holding nlist centroids
        self.nprobe = min(nprobe, nlist)
        index.nprobe = self.nprobe
        probe = faiss.knn(centroids, centroids, self.nprobe)[1]
        own = np.arange(nlist)
        missing = ~(probe == own[:, None]).any(axis=1)  # only with duplicate centroids
        probe[missing, -1] = own[missing]
        self.probe = probe
        self.centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
        self.list_of = np.full(size, -1, np.int64)
        self.index = index

    @property
    def ntotal(self):
        return self.index.ntotal

    def add(self, ids, vecs):
        """Add rows; a cluster that was in the index before (it merged) goes to a list near its old one."""
        ids = np.ascontiguousarray(ids, np.int64)
        old = self.list_of[ids]
        moved = old >= 0
        lists = np.empty(ids.size, np.int64)
        if not moved.all():
            lists[~moved] = self.quantiser.assign(vecs[~moved])
        if moved.any():
            lists[moved] = self._nearest_probe_list(vecs[moved], old[moved])
        self.list_of[ids] = lists
        # add_with_ids would assign the lists again; we need them for search.
        self.index.add_core(ids.size, faiss.swig_ptr(vecs), faiss.swig_ptr(ids),
                            faiss.swig_ptr(lists))

    def remove(self, ids):
        self.index.remove_ids(ids)

    def renumber(self, new_id, vectors):
        """Give every row its id in `new_id` (old id -> new id), `vectors` the rows by new id.

        Each list keeps its rows in their order, so FAISS breaks float32 ties as before.
        """
        nlist, dim = self.index.nlist, self.index.d
        old = [self._list_view(lst)[0] for lst in range(nlist)]
        ids = new_id[np.concatenate(old)]
        lists = np.repeat(np.arange(nlist, dtype=np.int64), [part.size for part in old])
        self.index = old = None  # the old lists go before the new are filled
        index = faiss.IndexIVFFlat(self.flat, dim, nlist, self.metric)
        index.nprobe = self.nprobe
        # In blocks: at 10M all the vectors at once (1.2 GB) made the run's
        # peak, since the old lists' memory mostly stays with the process.
        # Blocks in list order append to each list in its old order.
        for s in range(0, ids.size, _ADD_BLOCK):
            part, vecs = ids[s:s + _ADD_BLOCK], vectors(ids[s:s + _ADD_BLOCK])
            index.add_core(part.size, faiss.swig_ptr(vecs), faiss.swig_ptr(part),
                           faiss.swig_ptr(lists[s:s + _ADD_BLOCK]))
        self.index = index
        self.list_of = np.full(new_id.max(initial=-1) + 1, -1, np.int64)
        self.list_of[ids] = lists

    def _nearest_probe_list(self, vecs, old):
        """The list nearest to each row among the probe lists of its old list.

        A merged cluster's mean lies between those of its parts, which are
        within the threshold of each other, so its nearest list is nearly
        always one that its old list probes (all but 145 of 83,866 at 100K,
        benchmarks/RESULTS.md): nprobe distances per row instead of nlist.
        """
        out = np.empty(old.size, np.int64)
        step = 1 << 12  # rows x nprobe x dim float32 gathered at a time
        for s in range(0, old.size, step):
            cand = self.probe[old[s:s + step]]
            cross = np.einsum("rpd,rd->rp", self.quantiser.centroids[cand], vecs[s:s + step])
            # |v - c|^2 = |v|^2 + |c|^2 - 2 v.c; |v|^2 is the same for every c of a row
            out[s:s + step] = cand[np.arange(cand.shape[0]), (self.centroid_norms[cand] - 2 * cross).argmin(axis=1)]
        return out

    def _scan(self, rows, queries, probe, k, score, cand):
        """score[rows], cand[rows]: each query's k nearest in its row of `probe` lists, on all cores.

        FAISS's per-query scan, in blocks of _SCAN_BLOCK queries, each on one
        thread (see _on_all_cores).  Every probe row is nprobe lists wide (-1
        pads), as FAISS checks against the index's nprobe.
        """
        def scan(blocks):
            for block in blocks:
                score[rows[block]], cand[rows[block]] = self.index.search_preassigned(
                    queries[block], k, probe[block], np.zeros(probe[block].shape, np.float32))

        _on_all_cores(scan, [slice(s, s + _SCAN_BLOCK) for s in range(0, rows.size, _SCAN_BLOCK)], per_task=1)

    def search_own_lists(self, ids, query_vectors, database_vectors, k, searched=None):
        """Like search, each query probing the nprobe lists nearest its own database row.

        With `searched` (a list per query), the lists that list probes are
        skipped: the query's search from that list has been through them.
        """
        cand = np.empty((ids.size, k), np.int64)
        score = np.empty((ids.size, k), np.float32)
        # Queries in list order: neighbouring queries probe mostly the same
        # lists, which then stay in cache between them.
        order = np.argsort(self.list_of[ids], kind="stable")
        for s in range(0, ids.size, _CHUNK):
            rows = order[s:s + _CHUNK]
            part = ids[rows]
            probe = np.ascontiguousarray(self.quantiser.nearest(database_vectors(part), self.nprobe, pad=True))
            if searched is not None:
                seen = (probe[:, :, None] == self.probe[searched[rows]][:, None, :]).any(axis=2)
                probe[seen] = -1
            self._scan(rows, query_vectors(part), probe, k, score, cand)
        return cand, score

    def search(self, ids, query_vectors, k):
        """(ids, FAISS scores) of each query's k nearest found; -1 where there are fewer."""
        n = ids.size
        cand = np.full((n, k), -1, np.int64)
        score = np.zeros((n, k), np.float32)
        lists = self.list_of[ids]
        order = np.argsort(lists, kind="stable")
        sorted_lists = lists[order]
        starts = np.flatnonzero(np.r_[True, sorted_lists[1:] != sorted_lists[:-1]])
        sizes = np.diff(np.r_[starts, n])
        crowded = sizes >= _CROWDED_LIST
        sparse = order[~np.repeat(crowded, sizes)]
        for s in range(0, sparse.size, _CHUNK):
            rows = sparse[s:s + _CHUNK]
            self._scan(rows, query_vectors(ids[rows]), self.probe[lists[rows]], k, score, cand)
        if crowded.any():
            group_lists = sorted_lists[starts[crowded]]
            views = {p: self._list_view(p) for p in np.unique(self.probe[group_lists]).tolist()}

            def search_lists(blocks):
                for lst, start, size in blocks:
                    rows = order[start:start + size]
                    probe = self.probe[lst].tolist()
                    db_ids = np.concatenate([views[p][0] for p in probe])
                    if db_ids.size == 0:
                        continue
                    db_vecs = np.concatenate([views[p][1] for p in probe])
                    found_score, found = faiss.knn(query_vectors(ids[rows]), db_vecs, min(k, db_ids.size),
                                                   metric=self.metric)
                    cand[rows, :found.shape[1]] = np.where(found >= 0, db_ids[found], -1)
                    score[rows, :found.shape[1]] = found_score

            blocks = list(zip(group_lists.tolist(), starts[crowded].tolist(), sizes[crowded].tolist()))
            _on_all_cores(search_lists, blocks)
        return cand, score

    def _list_view(self, lst: int):
        """(ids, vectors) of one inverted list as numpy views of FAISS's own memory.

        No copy: the index is not changed while a search runs, and an
        ArrayInvertedLists keeps its arrays where they are until it is.
        """
        invlists = self.index.invlists
        size = invlists.list_size(lst)
        dim = self.index.d
        if size == 0:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * dim * 4)
        return ids, codes.view(np.float32).reshape(size, dim)


def _on_all_cores(fn, items, per_task: int = 8):
    """fn(part) for consecutive parts of `items`, one part per thread at a time, FAISS single-threaded inside.

    A list's block search is one small BLAS product plus a top-k: FAISS's
    OpenMP threads share it at 1.3x on two cores, while whole lists on
    separate threads (FAISS releases the GIL) ran the first round's block
    searches at 100K in 0.55-0.63 s against 0.72-0.95 s (RESULTS.md).
    Each part writes its own rows, so the result does not depend on the
    threads' order.
    """
    threads = faiss.omp_get_max_threads()
    parts = [items[s:s + per_task] for s in range(0, len(items), per_task)]
    if threads < 2 or len(parts) < 2:
        fn(items)
        return

    def task(part):
        faiss.omp_set_num_threads(1)  # this thread's own setting
        fn(part)

    for _ in _thread_pool(os.getpid(), threads).map(task, parts):
        pass


@functools.lru_cache(maxsize=None)
def _thread_pool(pid: int, threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """One pool per process (a forked worker does not inherit the threads) and thread count."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="hac-faiss")


class _TwoLevelQuantiser:
    """Coarse IVF centroids that stay cheap to train and to search at any count.

    A flat quantiser costs nlist distances per assigned point, and nlist grows
    with the pool (n / _LIST_SIZE), so at 10M points assigning the points
    would cost more than searching them.  Above _FLAT_QUANTISER_MAX lists,
    a k-means of sqrt(nlist) groups is trained first and each group's sample
    gets lists of its own in proportion to its size: a point goes to the
    nearest list among its _GROUPS_SEARCHED nearest groups, about
    (1 + _GROUPS_SEARCHED) * sqrt(nlist) distances.  (Searching the nearest
    group only put a quarter of the points of a 1M pool outside their nearest
    list, and since a search probes the lists nearest to the query's own list,
    1-NN recall fell from 0.99 to 0.91.)
    """

    def __init__(self, train, nlist, seed, flat_max: int | None = None):
        nlist = max(1, min(int(nlist), train.shape[0]))
        if nlist <= (_FLAT_QUANTISER_MAX if flat_max is None else flat_max):
            self.groups = knn.train_centroids(train, nlist, seed, niter=_TRAIN_ITERATIONS)
            self.centroids, self.first = self.groups, None
            return
        self.groups = knn.train_centroids(train, int(round(math.sqrt(nlist))), seed, niter=_TRAIN_ITERATIONS)
        group = knn.probe_cells(self.groups, train, 1)[:, 0]
        parts, first = [], [0]
        for g in range(self.groups.shape[0]):
            rows = train[group == g]
            if rows.shape[0] == 0:
                part = self.groups[g:g + 1]
            else:
                part = knn.train_centroids(rows, max(1, int(round(nlist * rows.shape[0] / train.shape[0]))),
                                           seed + 1 + g, niter=_TRAIN_ITERATIONS)
            parts.append(part)
            first.append(first[-1] + part.shape[0])
        self.centroids = np.ascontiguousarray(np.concatenate(parts), np.float32)
        self.first = np.asarray(first, np.int64)

    def assign(self, vecs):
        """The list of each row."""
        return self.nearest(vecs, 1)[:, 0]

    def nearest(self, vecs, k: int, pad: bool = False):
        """(rows, k) nearest lists of each row among those it may search, nearest first.

        Ties go to the lower list.  Every group holds a list, so a row can
        always get one per group it searches: k is cut to that many, or with
        `pad` kept, a row's columns past the lists it found being -1 (which
        FAISS's search_preassigned skips).
        """
        vecs = np.ascontiguousarray(vecs, np.float32)
        if self.first is None:
            return knn.probe_cells(self.groups, vecs, k)
        groups = knn.probe_cells(self.groups, vecs, _GROUPS_SEARCHED)
        if not pad:
            k = min(k, groups.shape[1])
        best = np.full((vecs.shape[0], k), np.inf, np.float32)
        lists = np.full((vecs.shape[0], k), -1, np.int64)
        for g, pos in knn.split_by_key(groups.reshape(-1)):
            rows = pos // groups.shape[1]
            lo, hi = self.first[g], self.first[g + 1]
            d, i = faiss.knn(vecs[rows], self.centroids[lo:hi], int(min(k, hi - lo)))
            if k == 1:  # every IVF add: no sort needed
                better = d[:, 0] < best[rows, 0]
                best[rows[better], 0] = d[better, 0]
                lists[rows[better], 0] = lo + i[better, 0]
                continue
            # groups come in ascending order, so a stable sort sends ties to the lower list
            d = np.concatenate([best[rows], d], axis=1)
            i = np.concatenate([lists[rows], lo + i], axis=1)
            order = np.argsort(d, axis=1, kind="stable")[:, :k]
            best[rows] = np.take_along_axis(d, order, axis=1)
            lists[rows] = np.take_along_axis(i, order, axis=1)
        return lists


# ------------------------------------------------- threshold from a target size


@dataclasses.dataclass
class ThresholdChoice:
    """A sample's estimate of the threshold for a target mean cluster size, and where to merge up to.

    The estimate can be off by a factor of two in mean size on big pools (a
    few thousand cells are drawn from hundreds of thousands), so the full
    run merges up to `merge_threshold`, the sample's threshold for
    TARGET_OVERSHOOT times the target, and is then cut exactly at the target
    (average_linkage with target_mean_cluster_size).
    """

    distance_threshold: float      # the sample's estimate for the target
    target_mean_cluster_size: float
    sample_points: int
    sample_points_with_margin: int
    sample_cells: int
    num_cells: int
    sample_mean_cluster_size: float
    merge_threshold: float         # the sample's estimate for TARGET_OVERSHOOT x the target

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"sample eps={self.distance_threshold:.6g} for mean cluster size {self.target_mean_cluster_size:g}, "
                f"merging up to {self.merge_threshold:.6g}, from {self.sample_points_with_margin} points in "
                f"{self.sample_cells} of {self.num_cells} cells")


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
    return _cut_keeping(h, int(np.clip(round(n - n / float(target)), 0, h.size)))


def _cut_keeping(h: np.ndarray, m: int) -> float:
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


def choose_threshold(
    embeddings: np.ndarray,
    metric: str,
    target_mean_cluster_size: float,
    *,
    sample_size: int = 10_000,
    cell_size: int | None = None,
    margin_cells: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ThresholdChoice:
    """Estimate on a sample the eps whose average-linkage cut averages the target cluster size.

    The estimate only says how far to merge the pool (merge_threshold: the
    estimate for TARGET_OVERSHOOT x the target); average_linkage with
    target_mean_cluster_size then cuts the pool's own merges at the target.

    A uniform subsample of a big pool is sparser than the pool (each point
    keeps a fraction of its neighbours), so its dendrogram merges later and
    would give too large an eps (measured on a 200K pool: a uniform 20K
    sample picks an eps giving mean size 70 for a target of 10).  Instead the
    pool is cut into k-means cells of about `cell_size` (default
    sample_size / 4) points (above _FLAT_SAMPLE_CELLS_MAX cells, behind a
    two-level quantiser, so a row costs about 9 sqrt(cells) distances to
    place, not one per cell), whole cells are drawn at random until
    `sample_size` points are taken (inside a cell the density is the pool's),
    and the points of neighbouring cells that have a drawn cell among their
    `margin_cells` nearest centroids are added as a margin, so that clusters
    crossing a cell border are not cut short.  The sample's whole dendrogram
    (exact RAC, merges recorded) is then cut at the eps where the core
    points' estimated mean cluster size reaches the target.

    This is the in-memory run of the steps below (threshold_cells,
    training_rows, SampleCells, draw_cells, threshold_from_sample);
    hac_sharded.ThresholdFromTarget runs the same steps as a Beam pipeline.
    Rows are numbered 0..n-1 in the given order; the choice depends only on
    each row's number and vector and the seed.
    """
    target = check_target(target_mean_cluster_size)
    if metric not in METRICS:
        raise HacError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    _check_count("sample_size", sample_size)
    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise HacError(f"embeddings must be a 2-D array (rows x dims), got shape {X.shape}")
    n = X.shape[0]
    t0 = time.perf_counter()
    num_cells = threshold_cells(n, sample_size, cell_size)
    cells = SampleCells.train(X[training_rows(n, num_cells, seed)], metric, num_cells, margin_cells, seed)
    near = cells.assign(X)
    draw = draw_cells(np.bincount(near[:, 0], minlength=cells.num_cells), sample_size, seed)
    pos, core = draw.select(np.arange(n), near)
    choice = threshold_from_sample(X[pos], core, metric, target, seed, draw)
    if log is not None:
        log(f"threshold: {choice.describe()} ({time.perf_counter() - t0:.1f}s)")
    return choice


def check_target(target_mean_cluster_size) -> float:
    """The target mean cluster size as a float; HacError unless a finite number >= 1."""
    try:
        target = float(target_mean_cluster_size)
    except (TypeError, ValueError):
        raise HacError(f"target mean cluster size must be a number >= 1, got {target_mean_cluster_size!r}") from None
    if not math.isfinite(target) or target < 1:
        raise HacError(f"target mean cluster size must be a finite number >= 1, got {target_mean_cluster_size!r}")
    return target


def _threshold_for_core(result: HacResult, core: np.ndarray, target: float):
    """Threshold whose cut gives the core points a mean cluster size of `target`.

    The pool's number of clusters is the sum over its points of 1 / (size of
    the point's cluster), so the pool's mean cluster size is estimated as
    1 / mean over core points of 1 / cluster size.  Core points' clusters are
    (nearly) complete because the margin around them was clustered too.
    Returns (eps, estimated mean size at eps).
    """
    n = core.size
    order = np.argsort(result.heights, kind="stable")
    h = result.heights[order]
    pairs = result.pairs[order]
    if not (h > 0).any():
        return 1.0, float(n)  # all points identical: any threshold gives one cluster

    def mean_size(m):  # estimate after the m lowest merges
        graph = scipy.sparse.coo_matrix((np.ones(m), (pairs[:m, 0], pairs[:m, 1])), shape=(n, n))
        _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
        size = np.bincount(label)[label[core]]
        return 1.0 / np.mean(1.0 / size)

    lo, hi = 0, h.size  # mean_size grows with m; smallest m reaching the target
    if mean_size(hi) < target:
        return float(h[-1] * 1.5 + 1e-12), mean_size(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_size(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    eps = _cut_keeping(h, lo)
    return eps, float(mean_size(int(np.count_nonzero(h <= eps))))


TRAIN_PER_CELL = 64  # training rows per k-means cell of the threshold sample
_ASSIGN_BLOCK = 1 << 17


def threshold_cells(n: int, sample_size: int, cell_size: int | None = None) -> int:
    """Number of k-means cells the threshold sample is drawn from; 1: the whole pool is the sample."""
    if n <= sample_size:
        return 1
    return max(2, int(round(n / (cell_size or max(1, sample_size // 4)))))


def lowest_hash_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The k rows of 0..n-1 with the lowest knn.hash_ids(row, seed), ascending.

    A row's hash depends only on its number and the seed, so a pipeline that
    sees the rows in any order and batching takes the same rows.  The hashes
    are distinct (splitmix64 is a bijection), so the k lowest are one set.
    """
    rows = np.arange(n, dtype=np.int64)
    if k >= n:
        return rows
    if k <= 0:
        return rows[:0]
    return np.sort(rows[np.argpartition(knn.hash_ids(rows, seed), k - 1)[:k]])


def training_rows(n: int, num_cells: int, seed: int) -> np.ndarray:
    """Rows whose vectors train the cell centroids (bottom-k by hash; none for one cell)."""
    return lowest_hash_rows(n, TRAIN_PER_CELL * num_cells if num_cells > 1 else 0, seed)


# Above this many threshold cells they are found by a two-level quantiser:
# a flat one costs num_cells distances per pool row (40K at 100M rows).
_FLAT_SAMPLE_CELLS_MAX = 1024


@dataclasses.dataclass
class SampleCells:
    """The k-means cells of the threshold sample; small enough to ship to every worker."""

    cells: _TwoLevelQuantiser | None  # over prepared vectors; None for one cell
    offset: np.ndarray | None     # sqeuclidean: the training rows' mean, the origin of the centroids
    metric: str
    num_cells: int
    near: int                     # cells given to each row: its home cell and margin cells

    @classmethod
    def train(cls, train_x, metric: str, num_cells: int, margin_cells: int, seed: int) -> "SampleCells":
        """Cells from the raw vectors of the training rows, in row order."""
        near = max(1, min(int(margin_cells), num_cells))
        if num_cells == 1:
            return cls(None, None, metric, 1, near)
        train = _prepare(train_x, metric).astype(np.float32)
        cells = _TwoLevelQuantiser(train, num_cells, seed, flat_max=_FLAT_SAMPLE_CELLS_MAX)
        # the two-level split rounds the lists per group: the count it made is the count
        return cls(cells, np.asarray(train_x, np.float64).mean(axis=0), metric, cells.centroids.shape[0], near)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """(rows, near) nearest cells of a block of raw vectors, home cell first."""
        if self.cells is None:
            return np.zeros((x.shape[0], 1), np.int64)
        blocks = []
        for s in range(0, x.shape[0], _ASSIGN_BLOCK):
            part = x[s:s + _ASSIGN_BLOCK]
            if self.metric == "cosine":
                part = part / np.linalg.norm(part, axis=1, keepdims=True)
            else:
                part = part - self.offset
            blocks.append(self.cells.nearest(part, self.near))
        return np.concatenate(blocks) if blocks else np.zeros((0, self.near), np.int64)


@dataclasses.dataclass
class CellDraw:
    """Which rows the threshold sample takes: those near the drawn cells, or fixed rows."""

    drawn: np.ndarray | None          # bool per cell; None: every cell was too big
    fallback_rows: np.ndarray | None  # then a uniform sample: these rows (ascending)
    sample_cells: int
    num_cells: int

    def select(self, rows: np.ndarray, cells: np.ndarray):
        """(positions, ascending, of a block's rows in the sample; which of those are core).

        A row is in the sample when one of its nearest cells was drawn (the
        margin, where a drawn cell's clusters continue), core when its home
        cell was.  `rows` are the block's row numbers, `cells` SampleCells.assign's.
        """
        if self.drawn is None:
            pos = np.flatnonzero(np.isin(rows, self.fallback_rows))
            return pos, np.ones(pos.size, bool)
        pos = np.flatnonzero(self.drawn[cells].any(axis=1))
        return pos, self.drawn[cells[pos, 0]]


def draw_cells(sizes: np.ndarray, sample_size: int, seed: int) -> CellDraw:
    """Whole cells in a seeded random order until `sample_size` rows are taken.

    `sizes` are the rows per home cell.  Cells over 2 * sample_size rows are
    skipped; when every cell is (degenerate data), the sample is the
    `sample_size` rows of lowest hash instead.
    """
    sizes = np.asarray(sizes, np.int64)
    rng = np.random.default_rng([seed, 0xCE11])
    drawn = np.zeros(sizes.size, bool)
    total = 0
    for c in rng.permutation(sizes.size):
        if sizes[c] == 0 or sizes[c] > 2 * sample_size:
            continue
        drawn[c] = True
        total += sizes[c]
        if total >= sample_size:
            break
    if not drawn.any():
        return CellDraw(None, lowest_hash_rows(int(sizes.sum()), sample_size, seed), 0, sizes.size)
    return CellDraw(drawn, None, int(drawn.sum()), sizes.size)


def threshold_from_sample(sample_x: np.ndarray, core: np.ndarray, metric: str, target: float, seed: int,
                          draw: CellDraw) -> ThresholdChoice:
    """The sample's raw vectors (in row order) clustered completely, cut where its core reaches the target."""
    sample = _prepare(sample_x, metric)
    # The whole dendrogram of a sample that is small by design: exact search throughout.
    result = average_linkage(sample, merge_all_threshold(sample, metric), metric, seed=seed,
                             exact_search_max=max(EXACT_SEARCH_MAX, sample.shape[0]))
    eps, mean_size = _threshold_for_core(result, core, target)
    merge_eps, _ = _threshold_for_core(result, core, TARGET_OVERSHOOT * target)
    return ThresholdChoice(eps, target, int(core.sum()), int(core.size), draw.sample_cells, draw.num_cells,
                           mean_size, max(merge_eps, eps))

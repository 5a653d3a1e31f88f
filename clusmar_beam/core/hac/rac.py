"""Reciprocal agglomerative clustering (RAC) over cluster statistics: the rounds of merges (Rac)."""
from __future__ import annotations

import functools
import time

import numpy as np

from clusmar_beam.core import progress
from clusmar_beam.core.hac.index import (ADD_BLOCK, TRAIN_PER_LIST, FlatIndex, IvfIndex, default_nlist, on_all_cores,
                                         row_dtype)
from clusmar_beam.core.hac.clusters import Clusters
from clusmar_beam.core.hac.prepare import CHUNK

# Default neighbours asked from FAISS per query (self included).  More than the
# one we need, so that the exact float64 re-ranking can repair float32 near-ties,
# and kept: the wider the list, the more rounds a cluster's nearest is resolved
# from it without a search (docs/perf-log.md, issue 19, third session).
DEFAULT_K = 16
# The clusters' default merge approximation (`clusmar cluster --approximation`):
# a round also merges (1 + delta)-good stars, not only reciprocal nearest
# pairs (see Rac._absorb); measured against exact average linkage in
# benchmarks/bench_hac_heavy_tailed.py and bench_pool_shapes.py.
DEFAULT_DELTA = 0.04
# A merging pair grows into a star only when at least this many clusters
# point at it: that crowding is what makes RAC's rounds grow with a dense
# region, and everywhere else reciprocal pairs keep the merge order exact
# (small stars cost the bundled data sets' cuts up to 0.19 of ARI at delta 0.1).
MIN_STAR_LEAVES = 16
# A star's reach is bounded by the lowest linkage its grown cluster could have
# outside it (Rac._absorb).  Its pair's kept candidates are mostly its own
# leaves, which keeps that bound near the pair's linkage; the merged pair of a
# star with at least DEEP_STAR_LEAVES leaves is searched again, twice as deep
# as its leaves and at most STAR_SEARCH_MAX (Rac._outside_star).  Smaller
# stars gain few rounds from it for the search's cost.
DEEP_STAR_LEAVES = 64
STAR_SEARCH_MAX = 2048
# Only a deep star takes the whole slack delta; a smaller one takes this
# share of it.  Deep stars are a dense region's growing clusters, whose
# rounds the slack bounds; the many small stars gain few rounds from it, and
# on low-dimensional pools their reordered merges cost most of the ARI
# (docs/perf-log.md, issue 19, 2026-12-06, seventh session).
SMALL_STAR_SLACK = 1 / 8
# Stars form only from this round of a run on: merging exactly costs a round
# per member of a dense region, which these first rounds pay for any pool that
# finishes within them (or nearly), and the stars then bound the rounds of the
# pools that would not.  On a 40K x 12-d heavy-tailed pool stars from the
# first rounds cost up to 0.035 of ARI against fastcluster and saved no time
# (docs/perf-log.md, issue 19, fifteenth session).
STARS_FROM_ROUND = 128
# Up to this many active clusters nearest clusters are searched exactly (FAISS
# flat), above it with the IVF index, so a pool (or a sharded partition with
# its halo) of at most this many rows never meets the IVF index.  At a coarse
# cut the IVF rounds merge a few pairs that are not the nearest, and where one
# region holds much of the pool those decide how it splits.  Up to this size
# exact search costs little more than the IVF index (more at hundreds of
# dimensions), and switching to it late re-searches every active cluster once
# (docs/perf-log.md, issue 3, second session, and issues 19 and 20, eleventh
# session).
EXACT_SEARCH_MAX = 32_768
# The rounds' arrays are renumbered down to the active clusters once these
# are at most this fraction of them (and more than _COMPACT_MIN rows): a
# round's bookkeeping then costs in proportion to the clusters still merging,
# not to the pool, through the long tail of small rounds.
_COMPACT_BELOW = 0.5
_COMPACT_MIN = 1024
# Rows per block of the rounds' bookkeeping run on all cores (in_row_blocks):
# small enough that a round's few thousand stale clusters fill both cores.
ROW_BLOCK = 2048


class Rac:
    """Cluster statistics, the FAISS index over active clusters, and the rounds.

    Cluster ids are row numbers of the statistics; a merged pair keeps the
    lower id, a star its pair's.  As clusters retire the rows are renumbered
    (_compact) in order, so the lower id stays the lower; `orig` maps them back to the
    input rows, in which `pairs` are recorded.  For sqeuclidean the
    within-cluster sum of squared deviations W is kept instead of the sum of
    squared norms Q (W = Q - |S|^2/n): the pairwise update of W is stable
    where Q/n - |mu|^2 would cancel.
    """

    def __init__(self, S, cnt, metric, eps, *, exact_search_max, nlist, nprobe, seed, log, t0, k, W=None,
                 frozen=None, delta=0.0, widen_rows_max=None):
        self.k = k
        self.widen_rows_max = widen_rows_max  # see IvfIndex.choose_probing
        self.delta = float(delta)
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
        in_row_blocks(lambda rows: self._set_means32(np.arange(rows.start, rows.stop)), S.shape[0])
        self.eps = eps
        self.exact_search_max = int(exact_search_max)
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.seed = int(seed)
        self.log = log
        self.t0 = t0
        self.index = None
        self.probing = None  # how the IVF index is probed (IvfIndex.choose_probing)
        self.waiting = 0  # members left waiting on a frozen neighbour when run ends
        # Clusters retired on an IVF search's word: it may have missed a neighbour within eps (see linkage).
        self.retired_by_search = 0
        self.waiting_on = np.zeros((0, 2), np.int64)
        self.heights = []
        self.pairs = []
        self.orig = np.arange(S.shape[0], dtype=np.int64)
        self._retired = []  # Clusters set aside by _compact
        # Each cluster's last search results (cluster ids, sorted; -1 = none) and a
        # lower bound on its linkage to every cluster not in that list; see _resolve.
        u = S.shape[0]
        self.cand = np.full((u, k), -1, row_dtype(u))
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
            self.index = FlatIndex(dim, self.cos)
        else:
            nlist = self.nlist or default_nlist(ids.size)
            nlist = max(1, min(nlist, ids.size))
            rng = np.random.default_rng(self.seed)
            m = min(ids.size, TRAIN_PER_LIST * nlist)
            sample = np.sort(rng.choice(ids.size, size=m, replace=False))
            self.index = IvfIndex(self._vectors(ids[sample], True), nlist, self.nprobe,
                                   self.seed, self.S.shape[0], inner_product=self.cos)
        for s in range(0, ids.size, ADD_BLOCK):
            part = ids[s:s + ADD_BLOCK]
            self.index.add(part, self._vectors(part, True))
        if not self.index.exact:
            searched = ids[~self.frozen[ids]]  # frozen clusters are never searched from
            rng = np.random.default_rng(self.seed + 1)
            sample = np.sort(rng.choice(searched, size=min(searched.size, self.index.probe_sample_size()),
                                        replace=False))
            self.probing = self.index.choose_probing(sample, ids, functools.partial(self._vectors, database=False),
                                                     functools.partial(self._vectors, database=True),
                                                     self.widen_rows_max)
            if self.log is not None:
                self.log(f"IVF probing: {self.probing}")

    def _faiss_search(self, ids, k, own_lists=False):
        """FAISS's (candidates, float32 scores) for ids; per query where asked or where the index chose it."""
        queries = functools.partial(self._vectors, database=False)
        if own_lists or self.index.per_query:
            return self.index.search_own_lists(ids, queries, functools.partial(self._vectors, database=True), k)
        return self.index.search(ids, queries, k)

    def _search(self, ids, own_lists=False):
        """Nearest active cluster of each id: FAISS candidates, exact re-ranking.

        Ties go to the lower id.  Keeps the candidates and a lower bound on the
        linkage to every other cluster for _resolve.  With `own_lists` an IVF
        search probes the lists nearest each cluster itself rather than those
        nearest its list (see run), as every search does where the index
        chose per-query probing.
        """
        nn = np.full(ids.size, -1, np.int64)
        nd = np.full(ids.size, np.inf)
        k = min(self.k, self.index.ntotal)
        if k == 0:
            return nn, nd
        everything = self.index.ntotal <= k  # every indexed cluster was returned
        cand, score = self._faiss_search(ids, k, own_lists)

        def ranked(rows):
            q = ids[rows]
            c = cand[rows]
            c[c == q[:, None]] = -1
            order = np.argsort(c, axis=1)
            c = np.take_along_axis(c, order, axis=1)
            if self.cos:
                # FAISS's float32 inner products of unit-norm augmented rows
                # are within tol of the linkage: only the near-nearest are
                # recomputed in float64 (_nearest_of).
                dist = 1.0 - np.take_along_axis(score[rows], order, axis=1).astype(np.float64)
                none = np.zeros(c.shape, bool)  # none exact yet, none stale
                nn[rows], nd[rows], dist, exact = self._nearest_of(q, c, dist, none, none)
            else:
                # float32 L2 errors grow with the squared norms: every candidate in float64.
                nn[rows], nd[rows], dist, exact = self._nearest_of(q, c)
            self._keep(q, c, dist, exact)
            valid = c >= 0
            # Whatever FAISS did not return ranked (in float32) after its k-th
            # result, so it is at least as far as the farthest one returned,
            # up to float32 error.  An IVF search gives no such guarantee, but
            # the bound is only as approximate as the search itself.
            farthest = np.where(valid, dist, -np.inf).max(axis=1) - 2 * self.tol
            full = valid.sum(axis=1) >= k - 1
            self.bound[q] = np.inf if everything else np.where(full, farthest, -np.inf)

        in_row_blocks(ranked, ids.size)
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

        def merged(rows):
            q = ids[rows]
            new = cand[rows]  # never q itself: its own list is among those skipped
            valid = new >= 0
            c = np.concatenate([self.cand[q], new], axis=1)
            exact = np.concatenate([self.cand_exact[q], np.zeros(new.shape, bool)], axis=1)
            if self.cos:  # as in _search: FAISS's float32 values, the near-nearest redone in float64
                new_d = 1.0 - score[rows].astype(np.float64)
                need = np.zeros(c.shape, bool)
            else:
                new_d = np.full(new.shape, np.inf)
                need = np.concatenate([np.zeros(new.shape, bool), valid], axis=1)
            dist = np.concatenate([self.cand_d[q], new_d], axis=1)
            nn[rows], nd[rows], dist, exact = self._nearest_of(q, c, dist, exact, need)
            # A search that returned fewer than k found everything in its lists.
            farthest = np.where(valid, dist[:, kk:], -np.inf).max(axis=1) - 2 * self.tol
            new_bound = np.where(valid.sum(axis=1) >= k - 1, farthest, np.inf)
            # A cluster is in one list only, so new and kept candidates never repeat.
            dropped = self._keep_nearest(q, c, dist, exact)
            self.bound[q] = np.minimum(np.minimum(self.bound[q], new_bound), dropped)

        in_row_blocks(merged, ids.size)
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

        def resolve(rows):
            q = ids[rows]
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
            done[rows] = found | gone
            nn[rows] = np.where(found, near, -1)
            nd[rows] = np.where(found, near_d, np.inf)

        in_row_blocks(resolve, ids.size)
        return done, nn, nd

    def _combine(self, a, b, parent, active):
        """Candidates of merged cluster a (which absorbed b): the nearest of both lists.

        A linkage to the merged cluster is the size-weighted mean of the
        linkages to its parts (Lance-Williams), and a cluster in neither
        list is at least each part's bound from it: the union bounds
        everything else by the weighted mean of the two bounds, not only by
        the lower.  Candidates dropped to keep k lower the bound to their
        distance.
        """
        def combine(rows):
            q, other = a[rows], b[rows]
            c = np.concatenate([self.cand[q], self.cand[other]], axis=1)
            c = _live(q, c, parent, active)
            c.sort(axis=1)
            c[:, 1:][c[:, 1:] == c[:, :-1]] = -1
            _, _, dist, exact = self._nearest_of(q, c)
            dropped = self._keep_nearest(q, c, dist, exact)
            self.bound[q] = np.minimum(_weighted_bound(self.bound[q], self.bound[other], self.cnt[q] - self.cnt[other],
                                                       self.cnt[other]), dropped)

        in_row_blocks(combine, a.size)

    # --- rounds

    def run(self, first_round_extra: int, rounds_done: int = 0):
        """Merge until nothing is within eps: (the clusters left, frozen ones not among them; merges per round).

        `rounds_done`: rounds of earlier runs over the same pool, which count towards STARS_FROM_ROUND.
        """
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
        # The active unfrozen clusters, kept up to date through the round: the
        # rounds' bookkeeping works from the clusters that changed, so that a
        # round of few merges costs little however many clusters are active.
        act = np.flatnonzero(~self.frozen)
        while act.size:
            self.now = 3 * len(merges_per_round)  # searches; then merges at now + 1, new lists at now + 2
            if active.size > _COMPACT_MIN and np.count_nonzero(active) <= _COMPACT_BELOW * active.size:
                parent, active, stale, nn, nd = self._compact(parent, active, stale, nn, nd)
                fresh = np.zeros(active.size, bool)
                act = np.flatnonzero(~self.frozen)
            u = active.size
            if not self.index.exact and np.count_nonzero(active) <= self.exact_search_max:
                # Few enough left: switch to exact search and redo every
                # neighbour, repairing what the IVF index may have missed.
                self._build_index(np.flatnonzero(active))
                stale[act] = True
                self.bound[:] = -np.inf
            todo = np.flatnonzero(stale & active)
            renewed = todo  # these get a new nearest this round (searched or resolved)
            fresh[renewed] = True
            is_known = self.bound[todo] > -np.inf
            known = todo[is_known]
            if known.size:
                done, nn_k, nd_k = self._resolve(known, parent, active)
                nn[known[done]], nd[known[done]] = nn_k[done], nd_k[done]
                resolved = known[done]
                left = np.ones(todo.size, bool)
                left[np.flatnonzero(is_known)[done]] = False
                todo = todo[left]
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
                # is searched again in the lists nearest itself (docs/perf-log.md,
                # issue 3, third session: exact search's clusters at 100K and 200K).
                # One searched this round only needs the lists it missed.
                doubt = renewed[nd[renewed] > eps]
                searched = np.isin(doubt, todo, assume_unique=True)
                widen, again = doubt[searched], doubt[~searched]
                if self.index.per_query:
                    widen = widen[:0]  # their search probed the lists nearest themselves already
                if widen.size:
                    nn[widen], nd[widen] = self._widen(widen)
                if again.size:
                    nn[again], nd[again] = self._search(again, own_lists=True)
            offered = _symmetrise(act, nn, nd, fresh)
            fresh[renewed] = False

            # Beyond eps now means beyond eps forever (reducibility).  Only a
            # new nearest can be: every other cluster's stayed within eps, and
            # an offered edge only brings a nearest closer.
            retired = renewed[nd[renewed] > eps]
            active[retired] = False
            if not self.index.exact:
                self.retired_by_search += retired.size
            act = act[active[act]]

            # A pair that was reciprocal before this round merged then: a new one has a side whose nearest changed.
            a, b = _reciprocal_pairs(np.concatenate([renewed, offered]), nn, active, self.frozen)
            self.heights.append(nd[a].copy())
            self.pairs.append(self.orig[np.stack([a, b], axis=1)])
            self.now += 1
            self._merge(a, b)
            if self.delta > 0 and a.size and rounds_done + len(merges_per_round) >= STARS_FROM_ROUND:
                leaf, centre = self._absorb(a, b, act, nn, nd, parent)
            else:
                centre = leaf = a[:0]
            parent[b] = a
            parent[leaf] = centre
            parent = parent[parent]  # every cluster points at its root again
            active[b] = False
            active[leaf] = False
            self.now += 1
            # A star's kept list and bound would not cover its leaves' neighbours: it is searched again.
            grown = np.isin(a, centre)
            if grown.any():
                self.cand[a[grown]] = -1
                self.bound[a[grown]] = -np.inf
            if not grown.all():
                self._combine(a[~grown], b[~grown], parent, active)

            gone = np.concatenate([retired, a, b, leaf])
            if gone.size:
                self.index.remove(gone)
            if a.size:
                self.index.add(a, self._vectors(a, True))

            # Only clusters that merged, or whose neighbour merged or left,
            # can have a different nearest neighbour now.  A nearest that left
            # did so this round: one that left before was renewed since.
            moved = np.zeros(u, bool)
            for ids in (a, b, leaf, retired):
                moved[ids] = True
            act = act[active[act]]
            stale[act[moved[nn[act]]]] = True
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
        # Members still within eps of a frozen neighbour: a partition's merges left to a later round.
        waiting = np.flatnonzero(active & ~self.frozen)
        self.waiting = int(waiting.size)
        # Each waiting member and the cluster it waits on, as input rows (a partitioned HAC routes them together).
        self.waiting_on = self.orig[np.stack([waiting, np.where(nn[waiting] >= 0, nn[waiting], waiting)], axis=1)]
        # Frozen clusters never change: the caller has them already.
        self._set_aside(np.flatnonzero((parent == np.arange(u)) & ~self.frozen))
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

        return Clusters(ids[order], cnt=joined("cnt"), S=joined("S"), W=joined("W")), merges_per_round

    def _set_aside(self, rows):
        """Keep the input ids and statistics of clusters that are done (retired, or left at the end)."""
        self._retired.append(Clusters(self.orig[rows], cnt=self.cnt[rows], S=self.S[rows],
                                      W=self.W[rows] if self.W is not None else None))

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

        for s in range(0, m, CHUNK):
            cand = renumbered(self.cand[keep[s:s + CHUNK]])
            cand[cand == np.arange(s, s + cand.shape[0])[:, None]] = -1
            self.cand[s:s + cand.shape[0]] = cand
        self.cand = self.cand[:m]
        for name in ("S", "cnt", "W", "frozen", "means32", "bound", "cand_d", "cand_exact", "computed", "changed",
                     "orig"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, keep_rows(value, keep))
        self.index.renumber(new_id, functools.partial(self._vectors, database=True))
        return np.arange(m, dtype=np.int64), np.ones(m, bool), stale[keep], renumbered(nn[keep]), nd[keep]

    def _absorb(self, a, b, act, nn, nd, parent):
        """Grow each merged pair a (which absorbed b) into a star: (centre, leaf) of every leaf absorbed.

        A leaf is a cluster whose nearest neighbour is a or b.  Each centre
        takes its leaves nearest first while every merge is (1 + delta)-good
        (TeraHAC): the exact linkage of the grown cluster to the next leaf
        is within eps and within (1 + delta) of the lowest linkage either
        side could have to any cluster.  For the leaf that is its nearest
        linkage.  For the grown cluster it is a lower bound: never below the
        pair's linkage; the leaves left are no nearer to it than to their
        own nearest; and a cluster outside the star is no nearer than the
        size-weighted mean of its parts' bounds (_outside_bound,
        _outside_star), since an average linkage is that mean over the parts.
        A merge elsewhere in the round never brings a cluster closer than
        the nearer of its parts, so the bounds hold through the round.  A
        dense region's growing cluster so takes, in one round, every leaf
        that is about as near to it as to anything, not one leaf per round
        (bounded by its pair's linkage alone, a star took only the leaves
        as near as that pair, and the rounds grew with the pool).  Only
        pairs that at least MIN_STAR_LEAVES clusters point at grow, and only
        those that DEEP_STAR_LEAVES point at take the whole delta (the others
        SMALL_STAR_SLACK of it).  The
        grown cluster's statistics before each leaf are prefix sums over the
        leaves before it, so a star of any size costs a few array
        operations.  Records the merges.
        """
        centre_of = np.full(nn.size, -1, np.int64)
        centre_of[a] = a
        centre_of[b] = a
        target = centre_of[np.maximum(nn[act], 0)]
        is_leaf = (target >= 0) & (centre_of[act] < 0) & (nn[act] >= 0)
        leaf, centre = act[is_leaf], target[is_leaf]
        star = np.searchsorted(a, centre)  # a is ascending
        leaves = np.bincount(star, minlength=a.size)
        crowded = leaves >= MIN_STAR_LEAVES
        keep = crowded[star]
        leaf, centre, star = leaf[keep], centre[keep], star[keep]
        deep = leaves >= DEEP_STAR_LEAVES
        slack = np.where(deep, self.delta, self.delta * SMALL_STAR_SLACK)  # each pair's
        # A leaf that pointed at b can be far from the merged pair: such a merge is not good, and the
        # star would stop at it; it stays out of the star this round.
        near = self._linkage(self._mu(centre), None if self.cos else self._var(centre), leaf) <= \
            (1.0 + slack[star]) * nd[leaf]
        leaf, centre, star = leaf[near], centre[near], star[near]
        if leaf.size == 0:
            return leaf, centre
        centre_of[leaf] = centre
        pair_out = np.zeros(a.size)
        pair_out[crowded] = np.minimum(self._outside_bound(a[crowded], a[crowded], centre_of, parent),
                                       self._outside_bound(b[crowded], a[crowded], centre_of, parent))
        if deep.any():
            pair_out[deep] = np.maximum(pair_out[deep], self._outside_star(
                a[deep], centre_of, parent, int(min(STAR_SEARCH_MAX, 2 * leaves[deep].max()))))
        order = np.lexsort((leaf, nd[leaf], centre))
        leaf, centre, star = leaf[order], centre[order], star[order]
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
        # The grown cluster's lowest possible linkage outside the star: its parts' bounds, weighted by size.
        out = self._outside_bound(leaf, centre, centre_of, parent) * n_leaf
        out_excl = np.cumsum(out) - out
        out_excl -= out_excl[start][group]
        outside = (pair_out[star] * self.cnt[centre] + out_excl) / N
        limit = np.minimum((1.0 + slack[star]) *
                           np.minimum(np.maximum(nd[centre], outside), nd[leaf]), self.eps)
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

    def _outside_star(self, centres, centre_of, parent, width):
        """A lower bound, within [0, eps], on each merged pair's linkage to every cluster outside its star.

        Its kept candidates are mostly its own leaves, so their bound is near
        its nearest: the merged pair is searched `width` deep instead (the
        index still holds the round's clusters before its merges), and the
        bound is its nearest cluster found outside the star, or the farthest
        found if that is nearer.
        """
        k = min(width, self.index.ntotal)
        cand, score = self._faiss_search(centres, k)
        valid = cand >= 0
        # FAISS's float32 values, within tol of the linkages (see _vectors)
        if self.cos:
            dist = 1.0 - score.astype(np.float64)
        else:
            dist = score.astype(np.float64) / self.scale ** 2 + self._var(centres)[:, None]
        outside = valid & (centre_of[parent[np.maximum(cand, 0)]] != centres[:, None])
        nearest = np.where(outside, dist, np.inf).min(axis=1) - self.tol
        # Fewer than k found: the lists probed held no more, and an IVF search takes what it probed for all
        # there is near (the bound is only as approximate as the search, as in _search).
        farthest = np.where(valid.sum(axis=1) >= k, np.where(valid, dist, -np.inf).max(axis=1) - 2 * self.tol,
                            np.inf)
        return np.clip(np.minimum(nearest, farthest), 0.0, self.eps)

    def _outside_bound(self, rows, centre, centre_of, parent):
        """A lower bound, within [0, eps], on each row's linkage to every cluster outside its star (`centre`).

        Its kept candidates outside the star at their kept linkage (float32
        ones less tol), everything else at its bound: a candidate that
        merged since is no nearer than the nearer of its parts.
        """
        c = self.cand[rows]
        root = parent[np.maximum(c, 0)]
        outside = (c >= 0) & (centre_of[root] != centre[:, None]) & (root != rows[:, None])
        d = self.cand_d[rows] - np.where(self.cand_exact[rows], 0.0, self.tol)
        d = np.where(outside, d, np.inf).min(axis=1)
        return np.clip(np.minimum(d, self.bound[rows]), 0.0, self.eps)

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


def keep_rows(a, keep):
    """a[keep] (keep ascending) in a's own memory, as its first rows.

    A copy of S (5 GB at 10M) next to the original raised the 10M peak by
    about 2 GB; moving rows up in blocks never reads a row already written
    (keep[i] >= i).  The rows beyond stay allocated: the peak is the first
    round's anyway.
    """
    for s in range(0, keep.size, CHUNK):
        part = keep[s:s + CHUNK]
        a[s:s + part.size] = a[part]
    return a[:keep.size]


def in_row_blocks(fn, n):
    """fn(rows) for consecutive slices of range(n), on all cores.

    The rounds' bookkeeping is row by row (each row's result depends on no
    other row, so not on the blocks), and numpy releases the GIL in its
    loops: blocks on the FAISS threads use the cores that a single-threaded
    loop left idle between searches.  Each block writes only its own rows.
    """
    blocks = [slice(s, min(s + ROW_BLOCK, n)) for s in range(0, n, ROW_BLOCK)]

    def run(part):
        for rows in part:
            fn(rows)

    on_all_cores(run, blocks, per_task=1)


def _weighted_bound(bound_a, bound_b, n_a, n_b):
    """A lower bound on the linkage of the union of clusters a and b to any cluster outside both their lists.

    Such a cluster is at least bound_a from a and bound_b from b.  An
    unbounded side (-inf) leaves the union unbounded; a side whose bound is
    +inf (its list held every cluster) leaves nothing outside both lists.
    """
    with np.errstate(invalid="ignore"):
        out = (n_a * bound_a + n_b * bound_b) / (n_a + n_b)
    out[(bound_a == np.inf) | (bound_b == np.inf)] = np.inf
    return out


def _live(q, c, parent, active):
    """Kept candidates c of clusters q as the clusters they are now part of; -1 for none, q itself or retired."""
    c = np.where(c >= 0, parent[np.maximum(c, 0)], -1)
    c[(c == q[:, None]) | ~active[np.maximum(c, 0)]] = -1
    return c


def _symmetrise(act, nn, nd, fresh):
    """Offer every found edge a -> b to b as well: b's nearest is at most that far.  Returns the b that took one.

    This repairs neighbours that a search missed (float32 near-ties, IVF), and
    with bit-symmetric distances it makes the smallest (distance, id) edge
    reciprocal, so a round always merges while any edge is within the
    threshold.  After a pass no edge is better than its target's own, so only
    edges from or to `fresh` clusters (a new nearest this round) can be:
    the others are left out.
    """
    # nn is -1 only where nothing was found, and so nd is inf: dropped below
    src = act[fresh[act] | fresh[nn[act]]]
    src = src[np.isfinite(nd[src])]
    if src.size == 0:
        return src
    dst, d = nn[src], nd[src]
    # Only an edge better than its target's own can win: the best of a
    # target's edges beats it exactly when one of them does.
    better = (d < nd[dst]) | ((d == nd[dst]) & (src < nn[dst]))
    src, dst, d = src[better], dst[better], d[better]
    order = np.lexsort((src, d, dst))
    dst, d, src = dst[order], d[order], src[order]
    head = np.ones(dst.size, bool)
    head[1:] = dst[1:] != dst[:-1]
    nn[dst[head]] = src[head]
    nd[dst[head]] = d[head]
    return dst[head]


def _reciprocal_pairs(ids, nn, active, frozen):
    """(a, b), a < b, a ascending: the reciprocal nearest pairs of active unfrozen clusters with a side in `ids`.

    `ids` may repeat: each pair is returned once.
    """
    x = ids[active[ids] & ~frozen[ids]]
    y = nn[x]
    x, y = x[y >= 0], y[y >= 0]
    pair = (nn[y] == x) & active[y] & ~frozen[y]
    a, b = np.minimum(x[pair], y[pair]), np.maximum(x[pair], y[pair])
    a, first = np.unique(a, return_index=True)  # a pair with both sides in ids is found twice
    return a, b[first]

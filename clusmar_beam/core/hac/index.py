"""The FAISS side: exact and IVF indexes over the clusters' vectors, the two-level quantiser, threads."""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import faiss
import numpy as np

from clusmar_beam.core import cells
from clusmar_beam.core.hac.prepare import CHUNK

# Rows whose FAISS vectors are made and added to an index at a time (a block is 68 MB at 64-d).
ADD_BLOCK = 1 << 18
# Training sample for the IVF coarse quantiser, in points per list, and its
# k-means iterations: fewer iterations gave lists as balanced and the same
# clusters for half the training time (docs/perf-log.md, issue 3, fifth
# session: "k-means iterations").
TRAIN_PER_LIST = 32
_TRAIN_ITERATIONS = 5
# IVF lists hold at most about this many clusters on average (more lists than
# 4*sqrt(n) above 1M clusters): a search scans nprobe lists, so a bounded list
# size keeps the cost of a search independent of the pool size.
_LIST_SIZE = 250
# Up to this many lists a point's list is found among all centroids; above, it
# is found among the lists of the groups nearest it (TwoLevelQuantiser).
# Giving a million points their lists among all of several thousand centroids
# took longer than the rest of building the index (docs/perf-log.md, issue 19,
# sixteenth session).
_FLAT_QUANTISER_MAX = 1024
# Up to this many lists they are one k-means of the training sample, grouped
# afterwards; above, the groups are trained first and each group's lists from
# its own rows, which stays cheap at any count but places the lists worse
# (ARI against exact search fell by 0.007 on 300K x 16-d).  Up to this many, a
# query's per-query probe lists are also found among all of them, not only
# among its groups' (IvfIndex.probe_lists): per-query probes are chosen at low
# dimensions, where they reach past the nearest groups.
_FLAT_LAYOUT_MAX = 8192
# Groups whose lists are compared when a point is given its list: lists trained
# per group (above _FLAT_LAYOUT_MAX), and lists grouped after one k-means.  For
# the latter 8 put 4% of a 1M lognormal pool's points outside their nearest list
# (1% with 16), and the block search's extra misses turned its probing per
# query, several times slower.  For lists trained per group 16 made the adds
# slower, and what it gains there was not measured (docs/perf-log.md, issue 19,
# seventeenth session).
_GROUPS_SEARCHED = 8
_GROUPS_SEARCHED_GROUPED_AFTER = 16
# Rows a thread finds the nearest lists of at a time (TwoLevelQuantiser.nearest).
_NEAREST_BLOCK = 1 << 15
# Queries in one IVF list from which the list is searched as one block.
_CROWDED_LIST = 16
# Queries per FAISS per-query scan on one thread (see on_all_cores).
_SCAN_BLOCK = 512
# A list given more than this many times the mean share of the training rows
# is split by a k-means of its own rows, and this many times over (see
# split_crowded_lists).
_CROWDED_SHARE = 3.0
_SPLIT_PASSES = 2
# How an IVF index is probed is chosen on a sample of queries whose nearest
# neighbour is looked up exactly (IvfIndex.choose_probing): as many as cost
# about PROBE_SAMPLE_WORK distances, and no more than searching a
# PROBE_SAMPLE_SHARE of the rows (a small index, such as a sharded
# partition's, is searched only a few times over), within the bounds given;
# the share of them the per-list search must miss, and the share of those
# misses the per-query probes must recover, for the per-query probes to be
# chosen.
PROBE_SAMPLE_WORK = 1 << 29
PROBE_SAMPLE_SHARE = 0.25
PROBE_SAMPLE_MIN, PROBE_SAMPLE_MAX = 512, 4096
_PER_LIST_MISSES = 0.01
_PER_QUERY_RECOVERS = 0.6
# Where the chosen probing still misses more than this share of the sample, the lists probed double, as long
# as a search then scans at most WIDEN_ROWS_MAX rows: on small indexes (a small pool, a sharded partition) a
# wider search is cheap, and on tightly packed data (all cosines near 1) a few missed neighbours moved whole
# clusters (docs/perf-log.md, issue 19, 2026-12-06, sixth session).
_WIDEN_MISSES = 0.01
WIDEN_ROWS_MAX = 4096
# Per-query probes, chosen on low-dimensional dense regions, widen further on one worker: while they miss more
# than this share, as long as a search from every point of the pool scans at most WIDEN_WORK_MAX rows in all
# (what the default probes cost a pool of a million; see widen_rows_max).  There misses under 1% still moved
# the cut, and widening stopped them; the block search at higher dimensions kept missing as it widened, at
# several times the cost, and is left as it was (docs/perf-log.md, issue 19, fifteenth session).  The share is
# 0, so they widen while any sampled query is missed: one miss in 741 left a 200K x 16-d pool 0.961 from exact
# average linkage, and none 0.997 (sixteenth session).
_WIDEN_MISSES_PER_QUERY = 0.0
WIDEN_WORK_MAX = 1 << 33


def widen_rows_max(points: int) -> int:
    """Rows a widened search of one worker's index may scan, for a pool of `points`."""
    return max(WIDEN_ROWS_MAX, WIDEN_WORK_MAX // max(1, points))


def row_dtype(n: int):
    """The integer type for row numbers below n: 32 bits on one worker, which halves the candidate lists."""
    return np.int32 if n < 2**31 else np.int64


def default_nlist(n: int) -> int:
    """IVF lists for n clusters: 4*sqrt(n), or more to keep lists near _LIST_SIZE."""
    return max(int(round(4 * math.sqrt(n))), -(-n // _LIST_SIZE))


class FlatIndex:
    """Exact search over the active clusters' augmented vectors.

    For cosine every database row has norm 1, so the inner-product order is
    the L2 order, and FAISS's inner-product search skips the norms.
    """

    exact = True
    per_query = False

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
        for s in range(0, ids.size, CHUNK):
            part = ids[s:s + CHUNK]
            score[s:s + part.size], cand[s:s + part.size] = self.index.search(query_vectors(part), k)
        return cand, score


class IvfIndex:
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
        self.metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2  # see FlatIndex
        self.quantiser = TwoLevelQuantiser(train_vecs, nlist, seed)
        centroids = self.quantiser.centroids
        nlist = centroids.shape[0]
        # The IVF index only stores the lists: points are assigned by the
        # quantiser above and searched through search_preassigned or as blocks.
        self.flat = faiss.IndexFlatL2(dim)  # the IVF index does not own it
        self.flat.add(centroids)
        index = faiss.IndexIVFFlat(self.flat, dim, nlist, self.metric)
        assert index.is_trained  # a quantiser holding nlist centroids
        self.index = index
        self._set_nprobe(min(nprobe, nlist))
        self.centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
        self.list_of = np.full(size, -1, np.int64)
        # Whether searches probe the lists nearest each query (see choose_probing).
        self.per_query = False

    @property
    def ntotal(self):
        return self.index.ntotal

    def probe_sample_size(self) -> int:
        """How many queries choose_probing looks up exactly (see PROBE_SAMPLE_WORK)."""
        rows_probed = self.nprobe * self.ntotal / self.quantiser.centroids.shape[0]  # by one search
        work = PROBE_SAMPLE_WORK / max(1, self.ntotal)
        return int(np.clip(min(work, PROBE_SAMPLE_SHARE * rows_probed), PROBE_SAMPLE_MIN, PROBE_SAMPLE_MAX))

    def choose_probing(self, sample, all_ids, query_vectors, database_vectors, rows_max=None) -> dict:
        """Probe per query where the per-list block search misses what per-query probes find.

        The block search probes the lists nearest a query's list, the cheap
        way; a query far from its list's centre needs the lists nearest
        itself.  How often that matters depends on the data: on low-dimensional
        dense regions the per-query probes find most of what the block search
        misses, and average linkage follows exact only with them; at higher
        dimensions they find a small part of it at a large cost
        (docs/perf-log.md, issue 19, session 10).  So the `sample` queries' nearest
        other rows among `all_ids` are found exactly, and per-query probing is
        kept when, at the first nprobe, the block search misses at least
        _PER_LIST_MISSES of them and the per-query probes recover at least
        _PER_QUERY_RECOVERS of those; widening keeps that choice.
        Where the chosen way still misses more than _WIDEN_MISSES, nprobe
        doubles while a search stays within WIDEN_ROWS_MAX rows; given
        `rows_max` (one worker's widen_rows_max), per-query probes double
        while they miss more than _WIDEN_MISSES_PER_QUERY and a search stays
        within the larger of the two.
        """
        queries = query_vectors(sample)
        inner = self.metric == faiss.METRIC_INNER_PRODUCT
        best = np.full(sample.size, -np.inf if inner else np.inf, np.float32)
        for s in range(0, all_ids.size, ADD_BLOCK):
            part = all_ids[s:s + ADD_BLOCK]
            found_score, found = faiss.knn(queries, database_vectors(part), min(2, part.size), metric=self.metric)
            found_score[part[found] == sample[:, None]] = -np.inf if inner else np.inf
            best = np.maximum(best, found_score.max(axis=1)) if inner else np.minimum(best, found_score.min(axis=1))

        def misses(cand, score):
            score = np.where((cand >= 0) & (cand != sample[:, None]), score, -np.inf if inner else np.inf)
            if inner:
                return int(np.count_nonzero(score.max(axis=1) < best - 1e-6))
            return int(np.count_nonzero(score.min(axis=1) > best + 1e-6 * np.maximum(1.0, np.abs(best))))

        nlist = self.quantiser.centroids.shape[0]
        levels = []  # [nprobe, per-list misses, per-query misses] for each nprobe tried
        while True:
            per_list = misses(*self.search(sample, query_vectors, 3))
            per_query = misses(*self.search_own_lists(sample, query_vectors, database_vectors, 3))
            if not levels:  # chosen at the first probes: wider ones then miss less either way
                self.per_query = (per_list >= _PER_LIST_MISSES * sample.size
                                  and per_list - per_query >= _PER_QUERY_RECOVERS * per_list)
            levels.append([self.nprobe, per_list, per_query])
            share, limit = _WIDEN_MISSES, WIDEN_ROWS_MAX
            if self.per_query and rows_max is not None:  # one worker's per-query probes
                share, limit = _WIDEN_MISSES_PER_QUERY, max(limit, rows_max)
            wider = 2 * self.nprobe
            if ((per_query if self.per_query else per_list) <= share * sample.size
                    or wider > nlist or wider * self.ntotal / nlist > limit):
                break
            self._set_nprobe(wider)
        return {"rows": int(self.ntotal), "sample": int(sample.size), "per_list_misses": per_list,
                "per_query_misses": per_query, "per_query": bool(self.per_query), "nprobe": self.nprobe,
                "levels": levels}

    def _set_nprobe(self, nprobe: int):
        centroids = self.quantiser.centroids
        probe = faiss.knn(centroids, centroids, nprobe)[1]
        own = np.arange(centroids.shape[0])
        missing = ~(probe == own[:, None]).any(axis=1)  # only with duplicate centroids
        probe[missing, -1] = own[missing]
        self.probe, self.nprobe, self.index.nprobe = probe, nprobe, nprobe

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
        for s in range(0, ids.size, ADD_BLOCK):
            part, vecs = ids[s:s + ADD_BLOCK], vectors(ids[s:s + ADD_BLOCK])
            index.add_core(part.size, faiss.swig_ptr(vecs), faiss.swig_ptr(part),
                           faiss.swig_ptr(lists[s:s + ADD_BLOCK]))
        self.index = index
        self.list_of = np.full(new_id.max(initial=-1) + 1, -1, np.int64)
        self.list_of[ids] = lists

    def _nearest_probe_list(self, vecs, old):
        """The list nearest to each row among the probe lists of its old list.

        A merged cluster's mean lies between those of its parts, which are
        within the threshold of each other, so its nearest list is nearly
        always one that its old list probes (docs/perf-log.md, issue 3): nprobe
        distances per row instead of nlist.
        """
        out = np.empty(old.size, np.int64)
        step = 1 << 12  # rows x nprobe x dim float32 gathered at a time

        def nearest(blocks):
            for block in blocks:
                cand = self.probe[old[block]]
                cross = np.einsum("rpd,rd->rp", self.quantiser.centroids[cand], vecs[block])
                # |v - c|^2 = |v|^2 + |c|^2 - 2 v.c; |v|^2 is the same for every c of a row
                out[block] = cand[np.arange(cand.shape[0]), (self.centroid_norms[cand] - 2 * cross).argmin(axis=1)]

        on_all_cores(nearest, [slice(s, s + step) for s in range(0, old.size, step)], per_task=1)
        return out

    def probe_lists(self, vecs):
        """(rows, nprobe) lists nearest each database row, nearest first, -1 past those it may search."""
        if self.quantiser.centroids.shape[0] <= _FLAT_LAYOUT_MAX:
            return cells.probe_cells(self.quantiser.centroids, np.ascontiguousarray(vecs, np.float32), self.nprobe)
        return np.ascontiguousarray(self.quantiser.nearest(vecs, self.nprobe, pad=True))

    def _scan(self, rows, queries, probe, k, score, cand):
        """score[rows], cand[rows]: each query's k nearest in its row of `probe` lists, on all cores.

        FAISS's per-query scan, in blocks of _SCAN_BLOCK queries, each on one
        thread (see on_all_cores).  Every probe row is nprobe lists wide (-1
        pads), as FAISS checks against the index's nprobe.
        """
        def scan(blocks):
            for block in blocks:
                score[rows[block]], cand[rows[block]] = self.index.search_preassigned(
                    queries[block], k, probe[block], np.zeros(probe[block].shape, np.float32))

        on_all_cores(scan, [slice(s, s + _SCAN_BLOCK) for s in range(0, rows.size, _SCAN_BLOCK)], per_task=1)

    def search_own_lists(self, ids, query_vectors, database_vectors, k, searched=None):
        """Like search, each query probing the nprobe lists nearest its own database row.

        With `searched` (a list per query), the lists that list probes are
        skipped: the query's search from that list has been through them.
        """
        cand = np.empty((ids.size, k), row_dtype(self.list_of.size))
        score = np.empty((ids.size, k), np.float32)
        # Queries in list order: neighbouring queries probe mostly the same
        # lists, which then stay in cache between them.
        order = np.argsort(self.list_of[ids], kind="stable")
        for s in range(0, ids.size, CHUNK):
            rows = order[s:s + CHUNK]
            part = ids[rows]
            probe = self.probe_lists(database_vectors(part))
            if searched is not None:
                seen = (probe[:, :, None] == self.probe[searched[rows]][:, None, :]).any(axis=2)
                probe[seen] = -1
            self._scan(rows, query_vectors(part), probe, k, score, cand)
        return cand, score

    def search(self, ids, query_vectors, k):
        """(ids, FAISS scores) of each query's k nearest found; -1 where there are fewer."""
        n = ids.size
        cand = np.full((n, k), -1, row_dtype(self.list_of.size))
        score = np.zeros((n, k), np.float32)
        lists = self.list_of[ids]
        order = np.argsort(lists, kind="stable")
        sorted_lists = lists[order]
        starts = np.flatnonzero(np.r_[True, sorted_lists[1:] != sorted_lists[:-1]])
        sizes = np.diff(np.r_[starts, n])
        crowded = sizes >= _CROWDED_LIST
        sparse = order[~np.repeat(crowded, sizes)]
        for s in range(0, sparse.size, CHUNK):
            rows = sparse[s:s + CHUNK]
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
            on_all_cores(search_lists, blocks)
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


def on_all_cores(fn, items, per_task: int = 8):
    """fn(part) for consecutive parts of `items`, one part per thread at a time, FAISS single-threaded inside.

    A list's block search is one small BLAS product plus a top-k: FAISS's
    OpenMP threads share it poorly, while whole lists on separate threads
    (FAISS releases the GIL) keep every core busy (docs/perf-log.md, issue 3,
    sixth session).
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


def split_crowded_lists(centroids: np.ndarray, train: np.ndarray, seed: int) -> np.ndarray:
    """Centroids with every crowded list split into lists of about the mean size.

    k-means puts one centroid at the core of a dense region, and every point
    near that core is nearest to it: on heavy-tailed pools one list held tens
    of times the mean, and a list's block search costs its queries times its
    probe lists' rows.  A list holding more than _CROWDED_SHARE times the
    mean share of `train` is replaced by a k-means of its own training rows
    into lists of about the mean size (docs/perf-log.md, issue 19).
    """
    for p in range(_SPLIT_PASSES):
        if centroids.shape[0] < 2:
            return centroids
        home = cells.probe_cells(centroids, train, 1)[:, 0]
        count = np.bincount(home, minlength=centroids.shape[0])
        mean = train.shape[0] / centroids.shape[0]
        crowded = np.flatnonzero(count > _CROWDED_SHARE * mean)
        if crowded.size == 0:
            break
        parts = [np.delete(centroids, crowded, axis=0)]
        for c in crowded.tolist():
            parts.append(cells.train_centroids(train[home == c], int(math.ceil(count[c] / mean)),
                                             seed + 7919 * (p + 1) + c, niter=_TRAIN_ITERATIONS))
        centroids = np.ascontiguousarray(np.concatenate(parts), np.float32)
    return centroids


class TwoLevelQuantiser:
    """Coarse IVF centroids that stay cheap to train and to search at any count.

    A flat quantiser costs nlist distances per assigned point, and nlist grows
    with the pool (n / _LIST_SIZE), so at 10M points assigning the points
    would cost more than searching them.  Above `flat_max` lists they are
    grouped by a k-means of sqrt(nlist) groups, and a point goes to the
    nearest list among its `groups_searched` nearest groups, about
    (1 + groups_searched) * sqrt(nlist) distances.  Up to `layout_max`
    lists the groups are a k-means of the lists' centroids; above it, of the
    training sample, each group's sample then getting lists of its own in
    proportion to its size.  (Searching the nearest group only put a quarter
    of the points of a 1M pool outside their nearest list, and since a search
    probes the lists nearest to the query's own list, 1-NN recall fell from
    0.99 to 0.91.)
    """

    def __init__(self, train, nlist, seed, flat_max: int | None = None, layout_max: int | None = None):
        nlist = max(1, min(int(nlist), train.shape[0]))
        flat_max = _FLAT_QUANTISER_MAX if flat_max is None else flat_max
        self.groups_searched = _GROUPS_SEARCHED
        if nlist <= max(flat_max, _FLAT_LAYOUT_MAX if layout_max is None else layout_max):
            centroids = split_crowded_lists(cells.train_centroids(train, nlist, seed, niter=_TRAIN_ITERATIONS),
                                            train, seed)
            if centroids.shape[0] <= flat_max:
                self.groups, self.centroids, self.first = centroids, centroids, None
                return
            groups = cells.train_centroids(centroids, int(round(math.sqrt(centroids.shape[0]))), seed + 1,
                                           niter=_TRAIN_ITERATIONS)
            group = cells.probe_cells(groups, centroids, 1)[:, 0]
            sizes = np.bincount(group, minlength=groups.shape[0])
            self.groups = np.ascontiguousarray(groups[sizes > 0])
            self.centroids = np.ascontiguousarray(centroids[np.argsort(group, kind="stable")])
            self.first = np.r_[0, np.cumsum(sizes[sizes > 0])].astype(np.int64)
            self.groups_searched = _GROUPS_SEARCHED_GROUPED_AFTER
            return
        self.groups = cells.train_centroids(train, int(round(math.sqrt(nlist))), seed, niter=_TRAIN_ITERATIONS)
        group = cells.probe_cells(self.groups, train, 1)[:, 0]
        parts, first = [], [0]
        for g in range(self.groups.shape[0]):
            rows = train[group == g]
            if rows.shape[0] == 0:
                part = self.groups[g:g + 1]
            else:
                part = cells.train_centroids(rows, max(1, int(round(nlist * rows.shape[0] / train.shape[0]))),
                                           seed + 1 + g, niter=_TRAIN_ITERATIONS)
                part = split_crowded_lists(part, rows, seed + 1 + g)
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
            return cells.probe_cells(self.groups, vecs, k)
        if not pad:
            k = min(k, self.groups_searched, self.groups.shape[0])
        lists = np.full((vecs.shape[0], k), -1, np.int64)

        def blocks(parts):
            # Per group the products are small and FAISS's own threads share them poorly: whole blocks of rows
            # go to each thread instead.
            for rows in parts:
                lists[rows] = self._nearest_in_groups(vecs[rows], k)

        on_all_cores(blocks, [slice(s, s + _NEAREST_BLOCK) for s in range(0, vecs.shape[0], _NEAREST_BLOCK)],
                     per_task=1)
        return lists

    def _nearest_in_groups(self, vecs, k):
        groups = cells.probe_cells(self.groups, vecs, self.groups_searched)
        best = np.full((vecs.shape[0], k), np.inf, np.float32)
        lists = np.full((vecs.shape[0], k), -1, np.int64)
        for g, pos in cells.split_by_key(groups.reshape(-1)):
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

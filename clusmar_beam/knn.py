"""Sharded k-nearest-neighbour graph of the pool's embeddings, as Beam transforms.

The pool is split into IVF cells: coarse centroids are trained with FAISS
k-means on a deterministic sample (the rows with the lowest id hashes).  Each
point's home cell is its nearest centroid and its probes are its `nprobe`
nearest cells.  Every cell computes the exact similarities of the points that
probe it against its rows with one matrix multiply (FAISS flat search: blocked
GEMM plus a top-k heap), and each point's top-k is merged across the cells it
visited.  This is exactly an IndexIVFFlat search with the same centroids and
nprobe, but cut into independent per-cell GEMMs that run on any number of
workers.

The shuffle moves cell *groups*, not cells: nearby cells (k-means of the
centroids) form a group, a point travels to its home cell's group as a row
and once to each other group holding one of its probes as a query, and a
group merges its cells' candidates before the final per-point merge.  A
point's probes are near one another, so it crosses the shuffle 3.7 times
instead of 9 (1M x 64-d, 1,024 cells, nprobe 8; the shuffle, not the GEMMs,
dominated the run).  The neighbour lists are the same for any grouping.

Elements are columnar: a `KnnBatch` holds many points' neighbour lists.  The
centroids and the cell groups travel as .npy files loaded once per worker
process through `apache_beam.utils.shared.Shared`; only their paths are a side
input.

Ids are int64 (the cluster pipeline maps other ids to row numbers first).
Similarities: inner product of unit vectors for cosine (1 - cosine distance),
minus the squared Euclidean distance for sqeuclidean; larger is nearer.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import time

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from clusmar_beam import io as pool_io
from clusmar_beam.errors import InputError
from clusmar_beam.selection import mix64

LOG = logging.getLogger("clusmar")
METRICS = ("cosine", "sqeuclidean")
# Training points per coarse cell (FAISS warns below 39).
TRAIN_PER_CELL = 64
# Cells per group in the shuffle.  At 1M x 64-d, 1,024 cells and nprobe 8, a
# point crosses the shuffle 3.69 times with groups of 128 cells and 8 with one
# cell each (bench_knn, benchmarks/RESULTS.md); larger groups shuffle less but
# give fewer, larger elements.
CELLS_PER_GROUP = 128

# FAISS 1.15 computes exact distances without BLAS while queries x dims is
# below 128000, a crossover tuned on many-core hosts; with few threads BLAS
# wins far earlier (facebookresearch/faiss PR 5109 measured about 800 per
# thread).  On this 2-core machine HAC's blocks of ~80 queries were searched
# 2.6x faster with BLAS (benchmarks/bench_faiss_blas.py, RESULTS.md).  Set once, for the process.
faiss.cvar.distance_compute_blas_threshold = 800 * faiss.omp_get_max_threads()


@dataclasses.dataclass
class KnnBatch:
    """Neighbour lists of many points: row i of `neighbors` / `scores` belongs to ids[i].

    Missing neighbours (fewer than k other points reachable) are -1 with
    score -inf.  Rows are sorted by id; each row by decreasing score, ties by
    neighbour id.
    """

    ids: np.ndarray        # (n,) int64
    neighbors: np.ndarray  # (n, k) int64
    scores: np.ndarray     # (n, k) float32

    def __len__(self):
        return int(self.ids.size)


@dataclasses.dataclass
class EdgeBatch:
    """Undirected edges (src < dst), each once, with their similarity."""

    src: np.ndarray
    dst: np.ndarray
    scores: np.ndarray

    def __len__(self):
        return int(self.src.size)


# ------------------------------------------------------------------ helpers


def check_params(metric, **counts):
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"knn: {name} must be an integer >= 1, got {value!r}")
    if metric not in METRICS:
        raise InputError(f"knn: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def hash_ids(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of int64 ids (splitmix64), the sampling order."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(ids, np.int64).view(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))


def split_by_key(keys: np.ndarray):
    """(key, positions) for each distinct value of a 1-D int array: keys ascending,
    positions ascending within a key.  Nothing for an empty array."""
    if keys.size == 0:
        return
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    for s, e in zip(bounds[:-1], bounds[1:]):
        yield int(ordered[s]), order[s:e]


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """float32 rows ready for search: unit rows for cosine, unchanged for sqeuclidean."""
    x = np.ascontiguousarray(x, np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1)
        zero = norms == 0
        if zero.any():
            raise InputError(f"knn: {int(zero.sum())} of {len(x)} embeddings have zero norm and cannot be "
                             f"normalised for cosine distance")
        x = x / norms[:, None]
    return x


def train_centroids(sample: np.ndarray, num_cells: int, seed: int, niter: int = 20) -> np.ndarray:
    """FAISS k-means centroids of the (prepared) sample; never more cells than rows."""
    num_cells = max(1, min(int(num_cells), sample.shape[0]))
    if num_cells == 1:
        return sample.mean(axis=0, keepdims=True).astype(np.float32)
    kmeans = faiss.Kmeans(sample.shape[1], num_cells, niter=niter, seed=int(seed) & 0x7FFFFFFF,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.ascontiguousarray(kmeans.centroids, np.float32)


def group_cells(centroids: np.ndarray, cells_per_group: int, seed: int) -> np.ndarray:
    """(num_cells,) int32 group of each cell: k-means of the centroids into about
    num_cells / cells_per_group groups, so that a point's probed cells, being
    near one another, mostly share a group."""
    num_cells = centroids.shape[0]
    num_groups = -(-num_cells // int(cells_per_group))
    if num_groups >= num_cells:
        return np.arange(num_cells, dtype=np.int32)
    group_centroids = train_centroids(centroids, num_groups, seed)
    return probe_cells(group_centroids, centroids, 1)[:, 0].astype(np.int32)


def probe_cells(centroids: np.ndarray, x: np.ndarray, nprobe: int) -> np.ndarray:
    """(n, nprobe) nearest cells of each row, nearest (the home cell) first."""
    nprobe = min(nprobe, centroids.shape[0])
    return faiss.knn(x, centroids, nprobe)[1].astype(np.int64)


def search_block(queries, database, k, metric):
    """Exact top-k (scores, positions) of queries in database; larger score is nearer."""
    kk = min(k, database.shape[0])
    if metric == "cosine":
        scores, pos = faiss.knn(queries, database, kk, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        scores, pos = faiss.knn(queries, database, kk)
        scores = -scores
    return scores, pos


def _id_key(nbrs):
    """Neighbour ids as a sort key: a missing neighbour (-1) after every id."""
    return np.where(nbrs < 0, np.iinfo(np.int64).max, nbrs)


def _ordered(nbrs, scores):
    """Rows sorted by decreasing score, ties by neighbour id (missing last); only
    the rows not already in that order are sorted."""
    key = _id_key(nbrs)
    out_of_order = ((scores[:, 1:] > scores[:, :-1])
                    | ((scores[:, 1:] == scores[:, :-1]) & (key[:, 1:] < key[:, :-1]))).any(axis=1)
    if out_of_order.any():
        rows = np.flatnonzero(out_of_order)
        order = np.lexsort((key[rows], -scores[rows].astype(np.float64)), axis=1)
        nbrs[rows] = np.take_along_axis(nbrs[rows], order, axis=1)
        scores[rows] = np.take_along_axis(scores[rows], order, axis=1)
    return nbrs, scores


def _best_k(nbrs, scores, k):
    """Each row's k best candidates, by decreasing score, ties by neighbour id."""
    if nbrs.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kept = np.take_along_axis(scores, part, axis=1)
        # where the k-th score ties with a left-out one, choose by neighbour id
        kth = kept.min(axis=1, keepdims=True)
        tied = np.flatnonzero((scores == kth).sum(axis=1) > (kept == kth).sum(axis=1))
        if tied.size:
            part[tied] = np.lexsort((_id_key(nbrs[tied]), -scores[tied].astype(np.float64)), axis=1)[:, :k]
        nbrs = np.take_along_axis(nbrs, part, axis=1)
        scores = np.take_along_axis(scores, part, axis=1)
    return _ordered(nbrs, scores)


def merge_candidate_rows(cells, qids, nbrs, scores, k):
    """Per-cell (or per-group) candidate rows -> each qid's top k (KnnBatch).

    Row i holds the candidates of qids[i] found in cells[i] (nbrs[i], scores[i],
    -1 / -inf padded).  Rows are put in (qid, cell) order first so that the
    result does not depend on the order the runner delivered them in.  Each
    qid keeps the k best by decreasing score, ties by neighbour id, whatever
    way its candidates were split into rows.  Qids are merged in groups of
    the same row count, so no group pads to the widest.
    """
    order = np.lexsort((cells, qids))
    qids, nbrs = qids[order], nbrs[order]
    scores = np.where(nbrs >= 0, scores[order], -np.inf).astype(np.float32)
    uniq, start, counts = np.unique(qids, return_index=True, return_counts=True)
    width = nbrs.shape[1]
    out_n = np.full((uniq.size, k), -1, np.int64)
    out_s = np.full((uniq.size, k), -np.inf, np.float32)
    for count in np.unique(counts):
        rows = np.flatnonzero(counts == count)
        take = (start[rows][:, None] + np.arange(count)).reshape(-1)
        best_n, best_s = _best_k(nbrs[take].reshape(rows.size, count * width),
                                 scores[take].reshape(rows.size, count * width), k)
        out_n[rows, :best_n.shape[1]] = best_n
        out_s[rows, :best_s.shape[1]] = best_s
    out_s[out_n < 0] = -np.inf
    return KnnBatch(uniq.astype(np.int64), out_n, out_s)


def save_array(directory: str, name: str, array: np.ndarray) -> str:
    """Write `array` to DIR/name-<content digest>.npy through Beam's FileSystems (any runner's file system:
    local, gs://, s3://, hdfs://) and return the path.  The name is the content, so a rewrite is harmless."""
    digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
    path = FileSystems.join(directory, f"{name}-{digest}.npy")
    if not FileSystems.exists(path):
        if not FileSystems.exists(directory):
            FileSystems.mkdirs(directory)
        buffer = io.BytesIO()
        np.save(buffer, array)
        pool_io.write_bytes_atomic(path, buffer.getvalue())
    return path


def load_array(path: str) -> np.ndarray:
    """An array written by save_array, read through FileSystems."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return np.load(io.BytesIO(handle.read()))


class _Loaded:
    """Arrays held by Shared (plain ndarrays and tuples cannot be weak-referenced)."""

    def __init__(self, array):
        self.array = array


# ------------------------------------------------------------- Beam pieces


class BottomKByHash(beam.CombineFn):
    """The `size` rows with the lowest id hash: the same sample on any sharding.

    `rows_of(element)` gives an element's (int64 ids, vectors); the output is
    (hashes, ids, vectors) of the sample, or None when there were no rows.
    """

    def __init__(self, size: int, seed: int, rows_of):
        self.size, self.seed, self.rows_of = size, seed, rows_of

    def create_accumulator(self):
        return None

    def _trim(self, hashes, ids, vecs):
        order = np.lexsort((ids, hashes))[:self.size]
        return hashes[order], ids[order], vecs[order]

    def add_input(self, acc, element):
        ids, x = self.rows_of(element)
        ids = np.asarray(ids, np.int64)
        part = self._trim(hash_ids(ids, self.seed), ids, x)
        return part if acc is None else self.merge_accumulators([acc, part])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        return self._trim(*(np.concatenate([a[i] for a in accs]) for i in range(3)))

    def extract_output(self, acc):
        return acc


def _to_pairs(batch):
    """io.Batch with int64 ids and 'embedding', or an (ids, vectors) tuple -> the tuple."""
    if isinstance(batch, tuple):
        return batch
    return batch.ids, batch.columns["embedding"]


class _Route(beam.DoFn):
    """Batch -> (group, (role, ids, vectors, probes)) per cell group touched by the batch.

    A point goes to its home cell's group as a database row ("db") and to each
    other group holding one of its probed cells as a query ("q"), once per
    group however many of its cells that group holds.  `probes` lists the
    point's probed cells inside that group, -1 elsewhere.
    """

    def __init__(self, nprobe, metric, shared_handle):
        self.nprobe, self.metric, self.shared_handle = nprobe, metric, shared_handle

    def process(self, batch, paths):
        ids, x = batch
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            return
        centroids_path, groups_path = paths
        loaded = self.shared_handle.acquire(
            lambda: _Loaded((load_array(centroids_path), load_array(groups_path))), tag=f"{centroids_path}|{groups_path}")
        centroids, cell_group = loaded.array
        x = prepare_vectors(x, self.metric)
        probes = probe_cells(centroids, x, self.nprobe).astype(np.int32)
        groups = cell_group[probes]
        beam.metrics.Metrics.counter("knn", "points").inc(ids.size)
        home = groups[:, 0]
        for group, rows in split_by_key(home):
            yield group, ("db", ids[rows], x[rows], np.where(groups[rows] == group, probes[rows], -1))
        n, width = groups.shape
        rows = np.repeat(np.arange(n), width)
        other = groups.reshape(-1)
        keep = other != np.repeat(home, width)
        pairs = np.unique(other[keep].astype(np.int64) * n + rows[keep])  # each (group, row) once
        beam.metrics.Metrics.counter("knn", "query_rows").inc(int(pairs.size))
        for group, pos in split_by_key(pairs // n):
            r = pairs[pos] % n
            yield group, ("q", ids[r], x[r], np.where(groups[r] == group, probes[r], -1))


class _SearchGroup(beam.DoFn):
    """One cell group: each cell's queries against its rows (exact top-(k+1), self
    removed), then each query's top k within the group."""

    def __init__(self, k, metric, merge_shards):
        self.k, self.metric, self.merge_shards = k, metric, merge_shards

    def _search_cell(self, cell, q_ids, q_x, db_ids, db_x):
        scores, pos = search_block(q_x, db_x, self.k + 1, self.metric)
        nbrs = np.where(pos >= 0, db_ids[np.maximum(pos, 0)], -1)
        is_self = nbrs == q_ids[:, None]
        # drop self (or, when self is not among them, the last column) -> k columns
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), nbrs.shape[1] - 1)
        keep = np.ones(nbrs.shape, bool)
        keep[np.arange(nbrs.shape[0]), drop] = False
        if nbrs.shape[1] > self.k:
            nbrs = nbrs[keep].reshape(nbrs.shape[0], -1)
            scores = scores[keep].reshape(scores.shape[0], -1)
        else:
            nbrs = np.where(is_self, -1, nbrs)
        beam.metrics.Metrics.counter("knn", "cell_pairs").inc(int(q_ids.size) * int(db_ids.size))
        return np.full(q_ids.size, cell, np.int64), q_ids, nbrs, scores.astype(np.float32)

    def process(self, element):
        group, parts = element
        parts = list(parts)
        # the group's queries: its own rows ("db") and the points sent here for their probes
        q_ids, q_x, q_probes = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
        is_db = np.concatenate([np.full(p[1].size, p[0] == "db") for p in parts])
        if not is_db.any():
            return
        order = np.argsort(q_ids, kind="stable")
        q_ids, q_x, q_probes, is_db = q_ids[order], q_x[order], q_probes[order], is_db[order]
        db_rows = np.flatnonzero(is_db)
        db_ids, db_x = q_ids[db_rows], q_x[db_rows]
        rows_of_cell = dict(split_by_key(q_probes[db_rows, 0]))
        width = q_probes.shape[1]
        query_rows = np.repeat(np.arange(q_ids.size), width)
        cells = q_probes.reshape(-1).astype(np.int64)  # -1: a probe in another group
        found = []
        for cell, pos in split_by_key(cells):
            if cell < 0 or cell not in rows_of_cell:
                continue
            rows, cell_rows = query_rows[pos], rows_of_cell[cell]
            found.append(self._search_cell(cell, q_ids[rows], np.ascontiguousarray(q_x[rows]),
                                           db_ids[cell_rows], np.ascontiguousarray(db_x[cell_rows])))
        if not found:
            return
        best = merge_candidate_rows(*(np.concatenate([f[i] for f in found]) for i in range(4)), self.k)
        nbrs = _narrowed(best.neighbors)
        shard = (hash_ids(best.ids, 0x5EA) % np.uint64(self.merge_shards)).astype(np.int64)
        for s, r in split_by_key(shard):
            yield s, (group, best.ids[r], nbrs[r], best.scores[r])


def _narrowed(ids):
    """int32 when every id fits (less to shuffle), else unchanged."""
    if ids.size and ids.min() >= np.iinfo(np.int32).min and ids.max() <= np.iinfo(np.int32).max:
        return ids.astype(np.int32)
    return ids


def _merge_shard(element, k):
    _, parts = element
    parts = list(parts)
    cells = np.concatenate([np.full(p[1].size, p[0], np.int64) for p in parts])
    qids = np.concatenate([p[1] for p in parts])
    nbrs = np.concatenate([p[2] for p in parts]).astype(np.int64)
    scores = np.concatenate([p[3] for p in parts])
    out = merge_candidate_rows(cells, qids, nbrs, scores, k)
    beam.metrics.Metrics.counter("knn", "edges").inc(int((out.neighbors >= 0).sum()))
    return out


def _prepared_rows(batch, metric):
    return batch[0], prepare_vectors(batch[1], metric)


class TrainCentroids(beam.PTransform):
    """PCollection of (ids, vectors) batches -> singleton PCollection: the paths of the
    centroids .npy and of the cell groups .npy (`group_cells`)."""

    def __init__(self, num_cells, metric, temp_dir, seed=0, train_per_cell=TRAIN_PER_CELL,
                 cells_per_group=CELLS_PER_GROUP):
        super().__init__()
        self.num_cells, self.metric, self.temp_dir = num_cells, metric, temp_dir
        self.seed, self.train_per_cell, self.cells_per_group = seed, train_per_cell, cells_per_group

    def expand(self, batches):
        num_cells, seed, temp_dir, cells_per_group = self.num_cells, self.seed, self.temp_dir, self.cells_per_group

        def train(sample):
            if sample is None:
                raise InputError("knn: the pool is empty")
            _, ids, x = sample
            start = time.time()
            if ids.size < num_cells:
                LOG.info("knn: %d cells asked but only %d points; using %d cells", num_cells, ids.size, ids.size)
            centroids = train_centroids(x, num_cells, seed)
            groups = group_cells(centroids, cells_per_group, seed)
            LOG.info("knn: %d coarse centroids trained on %d points, in %d groups (%.1f s)", centroids.shape[0],
                     ids.size, np.unique(groups).size, time.time() - start)
            return save_array(temp_dir, "centroids", centroids), save_array(temp_dir, "cell-groups", groups)

        return (batches
                | "Sample" >> beam.CombineGlobally(
                    BottomKByHash(self.num_cells * self.train_per_cell, self.seed,
                                  functools.partial(_prepared_rows, metric=self.metric))).without_defaults()
                | "Train" >> beam.Map(train))


class ShardedKnn(beam.PTransform):
    """PCollection of batches (io.Batch with int64 ids and 'embedding', or (ids, vectors))
    -> PCollection of KnnBatch: each point's exact top-k among the rows of its `nprobe`
    nearest IVF cells (itself excluded).

    `temp_dir` holds the centroids and cell-group files (shared storage on a
    distributed runner).  `cells_per_group` nearby cells are searched by one
    element (fewer copies of each query in the shuffle; 1 = one cell each);
    `merge_shards` is the number of keys the per-point merge is spread over.
    The neighbour lists do not depend on either.
    """

    def __init__(self, k=10, num_cells=1024, nprobe=8, metric="cosine", temp_dir=None, seed=0, merge_shards=32,
                 cells_per_group=CELLS_PER_GROUP):
        super().__init__()
        check_params(metric, k=k, num_cells=num_cells, nprobe=nprobe, cells_per_group=cells_per_group,
                     merge_shards=merge_shards)
        if temp_dir is None:
            raise InputError("knn: temp_dir is required (where the centroids file is written)")
        self.k, self.num_cells, self.nprobe, self.metric = int(k), int(num_cells), int(nprobe), metric
        self.temp_dir, self.seed, self.merge_shards = temp_dir, seed, int(merge_shards)
        self.cells_per_group = int(cells_per_group)

    def expand(self, batches):
        pairs = batches | "ToPairs" >> beam.Map(_to_pairs)
        paths = pairs | "Centroids" >> TrainCentroids(self.num_cells, self.metric, self.temp_dir, self.seed,
                                                      cells_per_group=self.cells_per_group)
        handle = shared.Shared()
        return (pairs
                | "Route" >> beam.ParDo(_Route(self.nprobe, self.metric, handle), beam.pvalue.AsSingleton(paths))
                | "GroupCells" >> beam.GroupByKey()
                | "SearchGroups" >> beam.ParDo(_SearchGroup(self.k, self.metric, self.merge_shards))
                | "GroupPoints" >> beam.GroupByKey()
                | "MergeTopK" >> beam.Map(_merge_shard, self.k))


def _edges(batch: KnnBatch, shards: int):
    src = np.repeat(batch.ids, batch.neighbors.shape[1])
    dst = batch.neighbors.reshape(-1)
    sc = batch.scores.reshape(-1)
    keep = dst >= 0
    src, dst, sc = src[keep], dst[keep], sc[keep]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    shard = (hash_ids(lo, 0xED6E) % np.uint64(shards)).astype(np.int64)
    for s, m in split_by_key(shard):
        yield s, (lo[m], hi[m], sc[m])


def _dedupe_edges(element):
    _, parts = element
    parts = list(parts)
    lo = np.concatenate([p[0] for p in parts])
    hi = np.concatenate([p[1] for p in parts])
    sc = np.concatenate([p[2] for p in parts])
    order = np.lexsort((hi, lo))
    lo, hi, sc = lo[order], hi[order], sc[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    out = EdgeBatch(lo[first], hi[first], sc[first])
    beam.metrics.Metrics.counter("knn", "graph_edges").inc(len(out))
    return out


class SymmetricGraph(beam.PTransform):
    """PCollection of KnnBatch -> PCollection of EdgeBatch: the undirected kNN graph,
    every edge once (src < dst), sharded by src."""

    def __init__(self, shards=32):
        super().__init__()
        self.shards = int(shards)

    def expand(self, knn_batches):
        return (knn_batches
                | "Edges" >> beam.FlatMap(_edges, self.shards)
                | "GroupEdges" >> beam.GroupByKey()
                | "Dedupe" >> beam.Map(_dedupe_edges))

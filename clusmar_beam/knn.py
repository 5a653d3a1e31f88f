"""Sharded k-nearest-neighbour graph of the pool's embeddings, as Beam transforms.

The pool is split into IVF cells: coarse centroids are trained with FAISS
k-means on a deterministic sample (the rows with the lowest id hashes).  Each
point goes to its home cell (its nearest centroid) as a database row, and as a
query to its `nprobe` nearest cells.  After a GroupByKey on the cell, every
cell computes the exact similarities of its queries against its rows with one
matrix multiply (FAISS flat search: blocked GEMM plus a top-k heap), and each
point's top-k is merged across the cells it visited.  This is exactly an
IndexIVFFlat search with the same centroids and nprobe, but cut into
independent per-cell GEMMs that run on any number of workers.

Elements are columnar: a `KnnBatch` holds many points' neighbour lists.  The
centroids travel as one .npy file loaded once per worker process through
`apache_beam.utils.shared.Shared`; only its path is a side input.

Ids are int64 (the cluster pipeline maps other ids to row numbers first).
Similarities: inner product of unit vectors for cosine (1 - cosine distance),
minus the squared Euclidean distance for sqeuclidean; larger is nearer.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time

import apache_beam as beam
import faiss
import numpy as np
from apache_beam.utils import shared

from clusmar_beam.errors import InputError
from clusmar_beam.selection import mix64

LOG = logging.getLogger("clusmar")
METRICS = ("cosine", "sqeuclidean")
# Training points per coarse cell (FAISS warns below 39).
TRAIN_PER_CELL = 64
_QUERY_BLOCK = 1 << 14

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


def check_params(k, num_cells, nprobe, metric):
    for name, value in (("k", k), ("num_cells", num_cells), ("nprobe", nprobe)):
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


def top_k_rows(qids, nbrs, scores, k):
    """Merge candidate rows (qid, neighbour, score) into each qid's top k -> KnnBatch.

    A neighbour reaches a query through one cell only (its home cell), so no
    pair repeats.
    """
    every = np.unique(qids)  # points with no neighbour at all still get a row
    keep = nbrs >= 0
    qids, nbrs, scores = qids[keep], nbrs[keep], scores[keep]
    order = np.lexsort((nbrs, -scores.astype(np.float64), qids))
    qids, nbrs, scores = qids[order], nbrs[order], scores[order]
    uniq, start, counts = np.unique(qids, return_index=True, return_counts=True)
    rank = np.arange(qids.size) - np.repeat(start, counts)
    take = rank < k
    out_n = np.full((every.size, k), -1, np.int64)
    out_s = np.full((every.size, k), -np.inf, np.float32)
    row = np.searchsorted(every, np.repeat(uniq, counts)[take])
    out_n[row, rank[take]] = nbrs[take]
    out_s[row, rank[take]] = scores[take]
    return KnnBatch(every.astype(np.int64), out_n, out_s)


def merge_candidate_rows(cells, qids, nbrs, scores, k):
    """Per-cell candidate rows -> each qid's top k (KnnBatch).

    Row i holds the candidates of qids[i] found in cells[i] (nbrs[i], scores[i],
    -1 / -inf padded).  Rows are put in (qid, cell) order first so that the
    result does not depend on the order the runner delivered them in; the
    final rows are ordered by decreasing score, ties by neighbour id.
    """
    order = np.lexsort((cells, qids))
    qids, nbrs, scores = qids[order], nbrs[order], scores[order]
    uniq, start, counts = np.unique(qids, return_index=True, return_counts=True)
    kk = nbrs.shape[1]
    width = int(counts.max()) * kk if counts.size else kk
    mat_n = np.full((uniq.size, width), -1, np.int64)
    mat_s = np.full((uniq.size, width), -np.inf, np.float32)
    rank = np.arange(qids.size) - np.repeat(start, counts)
    row = np.repeat(np.arange(uniq.size), counts)
    cols = rank[:, None] * kk + np.arange(kk)
    mat_n[row[:, None], cols] = nbrs
    mat_s[row[:, None], cols] = np.where(nbrs >= 0, scores, -np.inf)
    if width > k:
        part = np.argpartition(-mat_s, k - 1, axis=1)[:, :k]
        mat_n = np.take_along_axis(mat_n, part, axis=1)
        mat_s = np.take_along_axis(mat_s, part, axis=1)
    final = np.lexsort((np.where(mat_n < 0, np.iinfo(np.int64).max, mat_n), -mat_s.astype(np.float64)), axis=1)
    mat_n = np.take_along_axis(mat_n, final, axis=1)
    mat_s = np.take_along_axis(mat_s, final, axis=1)
    if mat_n.shape[1] < k:
        pad = k - mat_n.shape[1]
        mat_n = np.pad(mat_n, ((0, 0), (0, pad)), constant_values=-1)
        mat_s = np.pad(mat_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    mat_s[mat_n < 0] = -np.inf
    return KnnBatch(uniq.astype(np.int64), mat_n, mat_s)


def save_array(directory: str, name: str, array: np.ndarray) -> str:
    """Write `array` to DIR/name-<content digest>.npy (atomically) and return the path."""
    digest = hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}-{digest}.npy")
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    return path


class _Loaded:
    """A numpy array held by Shared (plain ndarrays cannot be weak-referenced)."""

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
    """Batch -> (cell, ("db"|"q", ids, vectors)) per cell touched by the batch."""

    def __init__(self, nprobe, metric, shared_handle):
        self.nprobe, self.metric, self.shared_handle = nprobe, metric, shared_handle

    def process(self, batch, centroids_path):
        ids, x = batch
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            return
        centroids = self.shared_handle.acquire(lambda: _Loaded(np.load(centroids_path)), tag=centroids_path).array
        x = prepare_vectors(x, self.metric)
        probes = probe_cells(centroids, x, self.nprobe)
        beam.metrics.Metrics.counter("knn", "points").inc(ids.size)
        for role, cells, rows in (("db", probes[:, 0], np.arange(ids.size)),
                                  ("q", probes.reshape(-1), np.repeat(np.arange(ids.size), probes.shape[1]))):
            for cell, pos in split_by_key(cells):
                r = rows[pos]
                yield cell, (role, ids[r], x[r])


class _SearchCell(beam.DoFn):
    """All queries of one cell against its rows: exact top-(k+1), self removed."""

    def __init__(self, k, metric, merge_shards):
        self.k, self.metric, self.merge_shards = k, metric, merge_shards

    def process(self, element):
        _, parts = element
        parts = list(parts)
        db = [p for p in parts if p[0] == "db"]
        qs = [p for p in parts if p[0] == "q"]
        if not db or not qs:
            return
        db_ids = np.concatenate([p[1] for p in db])
        db_x = np.concatenate([p[2] for p in db])
        order = np.argsort(db_ids, kind="stable")
        db_ids, db_x = db_ids[order], np.ascontiguousarray(db_x[order])
        q_ids = np.concatenate([p[1] for p in qs])
        q_x = np.concatenate([p[2] for p in qs])
        order = np.argsort(q_ids, kind="stable")
        q_ids, q_x = q_ids[order], np.ascontiguousarray(q_x[order])
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
        scores = scores.astype(np.float32)
        cell = element[0]
        if self.merge_shards == 1:
            yield 0, (cell, q_ids, nbrs, scores)
            return
        shard = (hash_ids(q_ids, 0x5EA) % np.uint64(self.merge_shards)).astype(np.int64)
        for s, r in split_by_key(shard):
            yield s, (cell, q_ids[r], nbrs[r], scores[r])


def _merge_shard(element, k):
    _, parts = element
    parts = list(parts)
    cells = np.concatenate([np.full(p[1].size, p[0], np.int64) for p in parts])
    qids = np.concatenate([p[1] for p in parts])
    nbrs = np.concatenate([p[2] for p in parts])
    scores = np.concatenate([p[3] for p in parts])
    out = merge_candidate_rows(cells, qids, nbrs, scores, k)
    beam.metrics.Metrics.counter("knn", "edges").inc(int((out.neighbors >= 0).sum()))
    return out


def _prepared_rows(batch, metric):
    return batch[0], prepare_vectors(batch[1], metric)


class TrainCentroids(beam.PTransform):
    """PCollection of (ids, vectors) batches -> singleton PCollection: path of the centroids .npy."""

    def __init__(self, num_cells, metric, temp_dir, seed=0, train_per_cell=TRAIN_PER_CELL):
        super().__init__()
        self.num_cells, self.metric, self.temp_dir = num_cells, metric, temp_dir
        self.seed, self.train_per_cell = seed, train_per_cell

    def expand(self, batches):
        num_cells, seed, temp_dir = self.num_cells, self.seed, self.temp_dir

        def train(sample):
            if sample is None:
                raise InputError("knn: the pool is empty")
            _, ids, x = sample
            start = time.time()
            if ids.size < num_cells:
                LOG.info("knn: %d cells asked but only %d points; using %d cells", num_cells, ids.size, ids.size)
            centroids = train_centroids(x, num_cells, seed)
            LOG.info("knn: %d coarse centroids trained on %d points (%.1f s)", centroids.shape[0], ids.size,
                     time.time() - start)
            return save_array(temp_dir, "centroids", centroids)

        return (batches
                | "Sample" >> beam.CombineGlobally(
                    BottomKByHash(self.num_cells * self.train_per_cell, self.seed,
                                  functools.partial(_prepared_rows, metric=self.metric))).without_defaults()
                | "Train" >> beam.Map(train))


class ShardedKnn(beam.PTransform):
    """PCollection of batches (io.Batch with int64 ids and 'embedding', or (ids, vectors))
    -> PCollection of KnnBatch: each point's exact top-k among the rows of its `nprobe`
    nearest IVF cells (itself excluded).

    `temp_dir` holds the centroids file (shared storage on a distributed runner).
    `merge_shards` is the number of keys the per-point merge is spread over.
    """

    def __init__(self, k=10, num_cells=1024, nprobe=8, metric="cosine", temp_dir=None, seed=0, merge_shards=32):
        super().__init__()
        check_params(k, num_cells, nprobe, metric)
        if temp_dir is None:
            raise InputError("knn: temp_dir is required (where the centroids file is written)")
        self.k, self.num_cells, self.nprobe, self.metric = int(k), int(num_cells), int(nprobe), metric
        self.temp_dir, self.seed, self.merge_shards = temp_dir, seed, int(merge_shards)

    def expand(self, batches):
        pairs = batches | "ToPairs" >> beam.Map(_to_pairs)
        path = pairs | "Centroids" >> TrainCentroids(self.num_cells, self.metric, self.temp_dir, self.seed)
        handle = shared.Shared()
        return (pairs
                | "Route" >> beam.ParDo(_Route(self.nprobe, self.metric, handle), beam.pvalue.AsSingleton(path))
                | "GroupCells" >> beam.GroupByKey()
                | "SearchCells" >> beam.ParDo(_SearchCell(self.k, self.metric, self.merge_shards))
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

"""Sharded kNN graph (clusmar_beam.knn) against exact FAISS flat search, at small scale."""
import apache_beam as beam
import faiss
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from clusmar_beam import io, knn
from clusmar_beam.errors import InputError


def _data(n=3000, d=16, groups=40, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, d))
    x = (centers[rng.integers(0, groups, n)] + 0.4 * rng.normal(size=(n, d))).astype(np.float32)
    ids = (rng.permutation(n).astype(np.int64) * 13 + 5)
    return ids, x


def _run_knn(ids, x, tmp_path, batch=500, as_io_batch=False, **kwargs):
    """Run ShardedKnn and return {id: (neighbors, scores)}."""
    out = {}
    if as_io_batch:
        batches = [io.Batch("t", {"id": ids[s:s + batch], "embedding": x[s:s + batch]})
                   for s in range(0, len(ids), batch)]
    else:
        batches = [(ids[s:s + batch], x[s:s + batch]) for s in range(0, len(ids), batch)]
    path = tmp_path / f"knn-{len(list(tmp_path.iterdir()))}.npz"

    def save(lst):
        np.savez(path, ids=np.concatenate([b.ids for b in lst]),
                 nbrs=np.concatenate([b.neighbors for b in lst]),
                 scores=np.concatenate([b.scores for b in lst]))

    with beam.Pipeline() as p:
        _ = (p | beam.Create(batches, reshuffle=False)
             | knn.ShardedKnn(temp_dir=str(tmp_path / "tmp"), **kwargs)
             | beam.combiners.ToList() | beam.Map(save))
    saved = np.load(path)
    for i, n, s in zip(saved["ids"], saved["nbrs"], saved["scores"]):
        out[int(i)] = (n, s)
    return out


def _exact(ids, x, k, metric):
    y = knn.prepare_vectors(x, metric)
    m = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    _, nn = faiss.knn(y, y, k + 1, metric=m)
    return {int(ids[r]): ids[row[row != r][:k]] for r, row in enumerate(nn)}


def _recall(got, exact, k):
    hits = sum(len(set(got[i][0][:k].tolist()) & set(exact[i].tolist())) for i in exact)
    return hits / (k * len(exact))


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_recall_against_exact_flat_search(tmp_path, metric):
    ids, x = _data()
    got = _run_knn(ids, x, tmp_path, k=10, num_cells=16, nprobe=4, metric=metric)
    assert sorted(got) == sorted(ids.tolist())
    assert _recall(got, _exact(ids, x, 10, metric), 10) >= 0.95


def test_all_cells_probed_is_exact_and_rows_are_well_formed(tmp_path):
    ids, x = _data(n=1200)
    got = _run_knn(ids, x, tmp_path, k=8, num_cells=8, nprobe=8, metric="cosine", as_io_batch=True)
    assert _recall(got, _exact(ids, x, 8, "cosine"), 8) >= 0.999
    y = knn.prepare_vectors(x, "cosine")
    row_of = {int(i): r for r, i in enumerate(ids)}
    for i, (nbrs, scores) in list(got.items())[:200]:
        assert i not in nbrs.tolist()                       # self excluded
        assert len(set(nbrs.tolist())) == nbrs.size          # no repeats
        assert np.all(np.diff(scores) <= 0)                  # nearest first
        expect = y[[row_of[int(j)] for j in nbrs]] @ y[row_of[i]]
        np.testing.assert_allclose(scores, expect, atol=1e-5)


def test_same_graph_whatever_the_batching(tmp_path):
    ids, x = _data(n=1500)
    a = _run_knn(ids, x, tmp_path, batch=1500, k=6, num_cells=10, nprobe=3, metric="cosine")
    b = _run_knn(ids, x, tmp_path, batch=137, k=6, num_cells=10, nprobe=3, metric="cosine")
    assert a.keys() == b.keys()
    for i in a:
        assert np.array_equal(a[i][0], b[i][0])


def test_cell_groups_do_not_change_the_graph(tmp_path):
    """Grouping cells only changes how queries travel: same lists, same scores."""
    ids, x = _data(n=2000)
    x[1000:1040] = x[0]                       # exact duplicates: tied scores at the k-th place
    runs = [_run_knn(ids, x, tmp_path, k=6, num_cells=16, nprobe=5, metric="cosine", cells_per_group=g)
            for g in (1, 3, 16)]
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for i in runs[0]:
            assert np.array_equal(other[i][0], runs[0][i][0])
            assert np.array_equal(other[i][1], runs[0][i][1])
    # ids beyond int32 travel as int64
    big = [_run_knn(ids + 2**40, x, tmp_path, k=6, num_cells=16, nprobe=5, metric="cosine", cells_per_group=g)
           for g in (1, 3)]
    assert big[0].keys() == big[1].keys()
    for i in big[0]:
        assert np.array_equal(big[0][i][0], big[1][i][0]) and big[0][i][0].max() > 2**40


def test_group_cells():
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(40, 8)).astype(np.float32)
    assert knn.group_cells(centroids, 1, 0).tolist() == list(range(40))
    groups = knn.group_cells(centroids, 8, 0)
    assert groups.shape == (40,) and groups.min() >= 0 and groups.max() < 5
    assert np.array_equal(groups, knn.group_cells(centroids, 8, 0))
    assert (knn.group_cells(centroids, 100, 0) == 0).all()


def test_merge_breaks_ties_at_the_kth_place_by_id():
    """The k kept do not depend on how the candidates were split into rows."""
    nbrs = np.array([[10, 7], [3, 8]])
    scores = np.array([[0.5, 0.5], [0.5, 0.9]], np.float32)
    one = knn.merge_candidate_rows(np.array([0, 1]), np.array([1, 1]), nbrs, scores, 2)
    other = knn.merge_candidate_rows(np.array([0, 1]), np.array([1, 1]), nbrs[::-1, ::-1], scores[::-1, ::-1], 2)
    assert one.neighbors.tolist() == other.neighbors.tolist() == [[8, 3]]


def test_more_cells_than_points_and_tiny_pools(tmp_path):
    ids, x = _data(n=30)
    got = _run_knn(ids, x, tmp_path, k=5, num_cells=100, nprobe=200, metric="sqeuclidean")
    assert _recall(got, _exact(ids, x, 5, "sqeuclidean"), 5) == 1.0
    # one point: no neighbours at all
    one = _run_knn(ids[:1], x[:1], tmp_path, k=3, num_cells=4, nprobe=2, metric="cosine")
    assert one[int(ids[0])][0].tolist() == [-1, -1, -1]
    # fewer other points than k: padded with -1
    three = _run_knn(ids[:3], x[:3], tmp_path, k=5, num_cells=1, nprobe=1, metric="cosine")
    for i, (nbrs, scores) in three.items():
        assert sorted(nbrs[:2].tolist()) == sorted(set(ids[:3].tolist()) - {i}) and nbrs[2:].tolist() == [-1] * 3
        assert np.isneginf(scores[2:]).all()


def test_all_identical_points(tmp_path):
    x = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (50, 1))
    ids = np.arange(50, dtype=np.int64)
    got = _run_knn(ids, x, tmp_path, k=4, num_cells=8, nprobe=2, metric="cosine")
    for i, (nbrs, scores) in got.items():
        assert (nbrs >= 0).all() and i not in nbrs.tolist()
        np.testing.assert_allclose(scores, 1.0, atol=1e-6)


def test_symmetric_graph(tmp_path):
    ids, x = _data(n=600)
    batches = []
    got = _run_knn(ids, x, tmp_path, k=5, num_cells=4, nprobe=2, metric="cosine")
    for i, (nbrs, scores) in got.items():
        batches.append(knn.KnnBatch(np.array([i]), nbrs[None], scores[None]))
    expected = {(min(i, int(j)), max(i, int(j))) for i, (nbrs, _) in got.items() for j in nbrs if j >= 0}

    def check(edge_batches):
        src = np.concatenate([e.src for e in edge_batches])
        dst = np.concatenate([e.dst for e in edge_batches])
        pairs = list(zip(src.tolist(), dst.tolist()))
        assert len(pairs) == len(set(pairs))                 # each undirected edge once
        assert set(pairs) == expected and (src < dst).all()

    with beam.Pipeline() as p:
        edges = p | beam.Create(batches) | knn.SymmetricGraph(shards=5) | beam.combiners.ToList()
        assert_that(edges, lambda e: check(e[0]))


@pytest.mark.parametrize("kwargs,fragment", [({"k": 0}, "k must"), ({"k": -3}, "k must"),
                                             ({"num_cells": 0}, "num_cells"), ({"nprobe": 0}, "nprobe"),
                                             ({"metric": "l1"}, "metric"), ({"k": 2.5}, "k must"),
                                             ({"cells_per_group": 0}, "cells_per_group")])
def test_bad_parameters(tmp_path, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        knn.ShardedKnn(temp_dir=str(tmp_path), **kwargs)


def test_zero_norm_with_cosine_is_counted():
    x = np.ones((10, 4), np.float32)
    x[[2, 7]] = 0
    with pytest.raises(InputError, match="2 of 10 embeddings have zero norm"):
        knn.prepare_vectors(x, "cosine")
    assert knn.prepare_vectors(x, "sqeuclidean").shape == (10, 4)   # fine for sqeuclidean


def test_merge_candidate_rows_merges_orders_and_pads():
    q = np.array([5, 5, 5, 2, 2, 5])
    n = np.array([1, 2, 3, 9, -1, 4])
    s = np.array([0.5, 0.9, 0.5, 0.1, 0.0, 0.2], np.float32)
    out = knn.merge_candidate_rows(np.arange(6), q, n[:, None], s[:, None], 3)
    assert out.ids.tolist() == [2, 5]
    assert out.neighbors.tolist() == [[9, -1, -1], [2, 1, 3]]
    assert out.scores[1].tolist() == pytest.approx([0.9, 0.5, 0.5])

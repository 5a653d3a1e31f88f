"""Tests for clusmar_beam.synthetic (fast: a few seconds)."""

import pickle

import fastcluster
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import pdist

from clusmar_beam import synthetic
from clusmar_beam.synthetic import (
    BLOCK_SIZE,
    PoolPlan,
    default_num_shards,
    generate_rows,
    make_plan,
    shard_bounds,
    true_cluster_ids,
)

KEYS = ("id", "embedding", "probs", "label")


@pytest.fixture(scope="module")
def plan() -> PoolPlan:
    return make_plan(30_000, 16, 10, seed=3)


@pytest.fixture(scope="module")
def big_plan() -> PoolPlan:
    # Large enough to have sub-clusters (more clusters than stored base clusters).
    plan = make_plan(2_000_000, 32, 50, seed=5)
    assert plan.num_clusters > plan.num_base_clusters
    return plan


def assert_rows_equal(a, b):
    assert set(a) == set(b) == set(KEYS)
    for k in KEYS:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


# ---------------------------------------------------------------- determinism / sharding


def test_same_seed_same_rows(plan):
    plan2 = make_plan(30_000, 16, 10, seed=3)
    assert_rows_equal(generate_rows(plan, 100, 5_000), generate_rows(plan2, 100, 5_000))


def test_different_seed_different_rows(plan):
    other = make_plan(30_000, 16, 10, seed=4)
    a, b = generate_rows(plan, 0, 500), generate_rows(other, 0, 500)
    assert not np.allclose(a["embedding"], b["embedding"])


def test_plan_pickles_and_gives_same_rows(plan):
    clone = pickle.loads(pickle.dumps(plan))
    assert_rows_equal(generate_rows(plan, 0, 3_000), generate_rows(clone, 0, 3_000))


@pytest.mark.parametrize("fixture", ["plan", "big_plan"])
def test_shard_boundaries_do_not_matter(fixture, request):
    p = request.getfixturevalue(fixture)
    a, b, c = 1_000, 1_000 + BLOCK_SIZE + 37, 1_000 + 3 * BLOCK_SIZE - 5
    whole = generate_rows(p, a, c)
    assert_rows_equal(concat([generate_rows(p, a, b), generate_rows(p, b, c)]), whole)
    cuts = [a, a + 1, a + 2, b - 1, b + BLOCK_SIZE, c]
    parts = [generate_rows(p, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
    assert_rows_equal(concat(parts), whole)


def test_any_number_of_shards_gives_same_pool():
    p = make_plan(10_000, 8, 5, seed=11)
    ref = generate_rows(p, 0, p.num_examples)
    for num_shards in (1, 3, 7, 64):
        parts = [generate_rows(p, lo, hi) for lo, hi in shard_bounds(p.num_examples, num_shards)]
        assert_rows_equal(concat(parts), ref)


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    assert shard_bounds(3, 10) == [(0, 1), (1, 2), (2, 3)]  # no empty shards
    b = shard_bounds(1_000_003, 17)
    assert b[0][0] == 0 and b[-1][1] == 1_000_003
    assert all(x[1] == y[0] for x, y in zip(b[:-1], b[1:]))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) > 0


def test_default_num_shards():
    assert default_num_shards(1) == 1
    assert default_num_shards(100_000) == 1
    assert default_num_shards(100_001) == 2
    assert default_num_shards(10_000_000) == 100


# ---------------------------------------------------------------- content


def test_shapes_and_dtypes(plan):
    r = generate_rows(plan, 250, 1_250)
    assert set(r) == set(KEYS)
    assert r["id"].dtype == np.int64 and r["id"].shape == (1_000,)
    np.testing.assert_array_equal(r["id"], np.arange(250, 1_250))
    assert r["embedding"].dtype == np.float32 and r["embedding"].shape == (1_000, 16)
    assert r["probs"].dtype == np.float32 and r["probs"].shape == (1_000, 10)
    assert r["label"].dtype == np.int64 and r["label"].shape == (1_000,)
    assert np.isfinite(r["embedding"]).all()


def test_empty_range(plan):
    r = generate_rows(plan, 7, 7)
    assert r["id"].shape == (0,) and r["embedding"].shape == (0, 16)
    assert r["probs"].shape == (0, 10) and r["label"].shape == (0,)


def test_full_pool_and_last_block():
    p = make_plan(5_000, 4, 2, seed=0)  # last block is partial
    r = generate_rows(p, 0, 5_000)
    assert r["id"][-1] == 4_999
    assert_rows_equal(concat([generate_rows(p, 0, 4_999), generate_rows(p, 4_999, 5_000)]), r)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 300])
def test_probs_valid_and_labels_in_range(num_classes):
    p = make_plan(8_000, 8, num_classes, seed=1)
    r = generate_rows(p, 0, 8_000)
    probs, label = r["probs"], r["label"]
    assert (probs >= 0).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert label.min() >= 0 and label.max() < num_classes
    # Labels are drawn from probs: never a class with zero probability, and they mostly
    # agree with the argmax, but not always (the model is uncertain sometimes).
    assert (probs[np.arange(len(label)), label] > 0).all()
    agree = (label == probs.argmax(axis=1)).mean()
    assert 0.6 < agree < 0.97
    # Calibration: mean probability of the drawn label ~ mean of sum(p^2).
    np.testing.assert_allclose(
        probs[np.arange(len(label)), label].mean(), (probs.astype(np.float64) ** 2).sum(1).mean(),
        atol=0.02,
    )


def test_margins_spread_out(plan):
    probs = generate_rows(plan, 0, 10_000)["probs"]
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert (margin < 0.2).mean() > 0.05  # some uncertain rows
    assert (margin > 0.8).mean() > 0.2  # many confident rows


def test_labels_follow_clusters(plan):
    r = generate_rows(plan, 0, 20_000)
    cl = true_cluster_ids(plan, 0, 20_000)["cluster"]
    # Majority class of each true cluster explains most labels (~80-90%).
    agree = 0
    for k in np.unique(cl):
        counts = np.bincount(r["label"][cl == k])
        agree += counts.max()
    assert 0.75 < agree / len(cl) < 0.97


def test_near_duplicate_bursts(plan):
    r = generate_rows(plan, 0, 20_000)
    burst = true_cluster_ids(plan, 0, 20_000)["burst"]
    frac = (burst >= 0).mean()
    assert 0.1 < frac < 0.2
    # Rows of the same burst are within ~1e-3 of each other; bursts have varied sizes.
    ids, counts = np.unique(burst[burst >= 0], return_counts=True)
    assert counts.max() >= 10 * np.median(counts)
    big = ids[np.argmax(counts)]
    emb = r["embedding"][burst == big]
    assert np.abs(emb - emb[0]).max() < 0.02
    assert np.linalg.norm(emb - emb[0], axis=1).max() > 0  # not exact copies


def test_embedding_norms_near_one(plan):
    norms = np.linalg.norm(generate_rows(plan, 0, 10_000)["embedding"], axis=1)
    assert 0.9 < np.median(norms) < 1.25
    assert norms.std() > 0.02  # not unit-normalised
    assert norms.min() > 0.5 and norms.max() < 4


def test_true_cluster_sizes_heavy_tailed(big_plan):
    cl = true_cluster_ids(big_plan, 0, 200_000)["cluster"]
    sizes = np.bincount(cl)
    sizes = sizes[sizes > 0]
    assert sizes.max() > 20 * np.median(sizes)
    assert cl.max() < big_plan.num_clusters


def test_average_linkage_cluster_sizes_vary():
    p = make_plan(3_000, 32, 20, seed=2)
    x = generate_rows(p, 0, 3_000)["embedding"].astype(np.float64)
    z = fastcluster.linkage(pdist(x, "cosine"), method="average")
    for threshold in (0.1, 0.2):
        sizes = np.bincount(fcluster(z, threshold, criterion="distance"))[1:]
        assert 3 <= sizes.mean() <= 60, (threshold, sizes.mean())
        assert sizes.max() >= 30 and (sizes == 1).any()
        assert sizes.std() > sizes.mean()  # very different sizes
    # Squared Euclidean is meaningful too (norms ~1, so ~2x the cosine distance).
    z = fastcluster.linkage(pdist(x, "sqeuclidean"), method="average")
    sizes = np.bincount(fcluster(z, 0.4, criterion="distance"))[1:]
    assert 3 <= sizes.mean() <= 60 and sizes.std() > sizes.mean()


def test_plan_stays_small():
    p = make_plan(10_000_000, 64, 100, seed=0)
    assert p.num_clusters >= 400_000  # ~ num_examples / 20
    assert len(pickle.dumps(p)) < 5_000_000
    assert p.nbytes() < 5_000_000


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args",
    [
        (0, 8, 2),
        (-5, 8, 2),
        (10, 1, 2),
        (10, 8, 1),
        (10.0, 8, 2),
        (True, 8, 2),
        ("10", 8, 2),
    ],
)
def test_make_plan_bad_arguments(args):
    with pytest.raises(ValueError):
        make_plan(*args)


def test_make_plan_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_plan(10, 8, 2, seed=-1)


def test_error_messages_are_clear():
    with pytest.raises(ValueError, match="num_examples"):
        make_plan(0, 8, 2)
    with pytest.raises(ValueError, match="dim"):
        make_plan(10, 1, 2)
    with pytest.raises(ValueError, match="num_classes"):
        make_plan(10, 8, 1)


def test_generate_rows_bad_ranges(plan):
    for start, end in [(-1, 5), (5, 4), (0, plan.num_examples + 1)]:
        with pytest.raises(ValueError):
            generate_rows(plan, start, end)


def test_shard_helpers_bad_arguments():
    with pytest.raises(ValueError):
        shard_bounds(0, 3)
    with pytest.raises(ValueError):
        shard_bounds(10, 0)
    with pytest.raises(ValueError):
        default_num_shards(0)


def test_module_docstring_describes_data():
    doc = synthetic.__doc__
    assert doc and "burst" in doc.lower() and "cluster" in doc.lower()

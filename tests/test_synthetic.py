"""Tests for clusmar_beam.core.synthetic (fast: a few seconds)."""

import hashlib
import json
import pickle

import fastcluster
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import pdist

from clusmar_beam.core import synthetic
from clusmar_beam.core.synthetic import (
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


@pytest.mark.parametrize("fixture", ["plan", "big_plan", "ht_plan", "ht_big_plan"])
def test_shard_boundaries_do_not_matter(fixture, request):
    p = request.getfixturevalue(fixture)
    a, b, c = 1_000, 1_000 + BLOCK_SIZE + 37, 1_000 + 3 * BLOCK_SIZE - 5
    whole = generate_rows(p, a, c)
    assert_rows_equal(concat([generate_rows(p, a, b), generate_rows(p, b, c)]), whole)
    cuts = [a, a + 1, a + 2, b - 1, b + BLOCK_SIZE, c]
    parts = [generate_rows(p, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
    assert_rows_equal(concat(parts), whole)
    truth = true_cluster_ids(p, a, c)
    pieces = [true_cluster_ids(p, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
    for k in ("cluster", "base", "burst"):
        np.testing.assert_array_equal(np.concatenate([x[k] for x in pieces]), truth[k])


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


# ---------------------------------------------------------------- region_sizes="heavy-tailed"

HT = "heavy-tailed"


@pytest.fixture(scope="module")
def ht_plan() -> PoolPlan:
    return make_plan(30_000, 16, 10, seed=3, region_sizes=HT)


@pytest.fixture(scope="module")
def ht_big_plan() -> PoolPlan:
    plan = make_plan(2_000_000, 32, 50, seed=5, region_sizes=HT)
    assert plan.num_clusters > plan.num_base_clusters
    return plan


def base_shares(plan: PoolPlan, n: int) -> np.ndarray:
    """Share of the first n rows in each base cluster, largest first."""
    base = true_cluster_ids(plan, 0, n)["base"]
    return np.sort(np.bincount(base, minlength=plan.num_base_clusters))[::-1] / n


def test_default_region_sizes_unchanged(plan):
    # Pinned from the generator before region_sizes existed: the default must not move.
    assert plan.region_sizes == "lognormal"
    assert (plan.num_clusters, plan.num_base_clusters, plan.num_bursts) == (1500, 1500, 562)
    t = true_cluster_ids(plan, 0, 30_000)
    digest = hashlib.sha256(
        b"".join(t[k].astype("<i8").tobytes() for k in ("cluster", "base", "burst"))
    ).hexdigest()
    assert digest == "f0c26b794064baaf333c3cd64f21cd11417fc0e47fea0110a93b8a1757aa425c"
    rows = [0, 4095, 4096, 29_999]
    r = generate_rows(plan, 0, 30_000)
    np.testing.assert_allclose(
        r["embedding"][rows, :3],
        [[0.28253889, -0.02383328, -0.16105229], [0.16444369, -0.1660835, 0.25719139],
         [0.42500851, -0.00875447, -0.29350403], [-0.45803604, -0.02895211, -0.33519286]],
        rtol=1e-5, atol=1e-7,
    )
    np.testing.assert_allclose(
        r["probs"][rows, :3],
        [[0.00209184, 0.81645215, 0.00191094], [0.03469312, 0.0151137, 0.54644352],
         [0.00593898, 0.00358969, 0.00340024], [0.0034265, 0.00107173, 0.00123017]],
        rtol=1e-4, atol=1e-7,
    )
    assert r["label"][:20].tolist() == [1, 8, 5, 1, 5, 5, 6, 8, 2, 4, 5, 7, 8, 7, 6, 0, 1, 6, 8, 1]
    explicit = make_plan(30_000, 16, 10, seed=3, region_sizes="lognormal")
    assert_rows_equal(generate_rows(explicit, 0, 5_000), generate_rows(plan, 0, 5_000))
    assert base_shares(plan, 30_000)[0] < 0.04  # no base above ~3% by default


def test_heavy_tailed_same_seed_same_rows(ht_plan):
    again = make_plan(30_000, 16, 10, seed=3, region_sizes=HT)
    assert_rows_equal(generate_rows(ht_plan, 100, 5_000), generate_rows(again, 100, 5_000))
    clone = pickle.loads(pickle.dumps(ht_plan))
    assert_rows_equal(generate_rows(ht_plan, 0, 3_000), generate_rows(clone, 0, 3_000))
    lognormal = make_plan(30_000, 16, 10, seed=3)
    a, b = generate_rows(ht_plan, 0, 500), generate_rows(lognormal, 0, 500)
    assert not np.allclose(a["embedding"], b["embedding"])


def test_heavy_tailed_any_number_of_shards_gives_same_pool():
    p = make_plan(10_000, 8, 5, seed=11, region_sizes=HT)
    ref = generate_rows(p, 0, p.num_examples)
    for num_shards in (1, 3, 7, 64):
        parts = [generate_rows(p, lo, hi) for lo, hi in shard_bounds(p.num_examples, num_shards)]
        assert_rows_equal(concat(parts), ref)


@pytest.mark.parametrize("n,dim,seed", [(30_000, 16, 3), (30_000, 64, 8), (200_000, 64, 0),
                                        (200_000, 128, 9)])
def test_heavy_tailed_largest_bases(n, dim, seed):
    p = make_plan(n, dim, 10, seed=seed, region_sizes=HT)
    shares = base_shares(p, n)
    assert 0.08 <= shares[0] <= 0.25, shares[:5]
    assert shares[:3].sum() >= 0.25, shares[:5]
    assert shares[3] < shares[2] and shares[5] < 0.05  # then a few percent, then a long tail
    assert np.median(shares[shares > 0]) < 0.001
    # The big bases are flat blobs: no sub-clusters, a widely varying per-point noise scale.
    weight = np.diff(np.concatenate([[0.0], p.base_cum_weight]))
    big = np.argsort(-weight)[:3]
    assert (p.base_sub_count[big] == 1).all()
    assert (p.base_noise_sigma[big] >= 0.5).all()
    assert np.median(p.base_noise_sigma) == pytest.approx(0.25)


def test_heavy_tailed_big_base_is_diffuse(ht_plan):
    r = generate_rows(ht_plan, 0, 20_000)
    t = true_cluster_ids(ht_plan, 0, 20_000)
    big = np.bincount(t["base"]).argmax()
    rows = (t["base"] == big) & (t["burst"] < 0)
    assert rows.sum() > 1_500
    dist = np.linalg.norm(r["embedding"][rows] - ht_plan.base_centers[big], axis=1)
    lo, med, hi = np.percentile(dist, [5, 50, 95])
    assert 0.2 < med < 0.7
    assert hi / lo > 5  # exp(0.25 * z) alone would give ~2.3; here lognormal sigma 0.65


@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_heavy_tailed_probs_and_labels(num_classes):
    p = make_plan(20_000, 32, num_classes, seed=1, region_sizes=HT)
    r = generate_rows(p, 0, 20_000)
    probs, label = r["probs"], r["label"]
    assert np.isfinite(r["embedding"]).all() and np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert label.min() >= 0 and label.max() < num_classes
    assert 0.6 < (label == probs.argmax(axis=1)).mean() < 0.97
    cl = true_cluster_ids(p, 0, 20_000)["cluster"]
    agree = sum(np.bincount(label[cl == k]).max() for k in np.unique(cl)) / len(cl)
    assert 0.75 < agree < 0.97
    assert 0.1 < (true_cluster_ids(p, 0, 20_000)["burst"] >= 0).mean() < 0.2


def test_heavy_tailed_plan_stays_small():
    p = make_plan(10_000_000, 64, 100, seed=0, region_sizes=HT)
    assert p.num_clusters >= 400_000
    assert len(pickle.dumps(p)) < 5_000_000


def test_bad_region_sizes():
    with pytest.raises(ValueError, match="region_sizes"):
        make_plan(1_000, 8, 2, region_sizes="zipf")
    with pytest.raises(TypeError):
        make_plan(1_000, 8, 2, 0, "heavy-tailed")  # keyword only


def test_generate_pool_region_sizes_flag(tmp_path, capsys):
    from clusmar_beam.app import cli

    out = tmp_path / "pool"
    code = cli.main(["generate-pool", "--output", str(out), "--num-examples", "100", "--dim", "4",
                     "--region-sizes", "zipf"])
    err = capsys.readouterr().err
    assert code == 2 and "--region-sizes" in err and "zipf" in err
    assert not (out / "_SUCCESS").exists()
    assert cli.main(["generate-pool", "--output", str(out), "--num-examples", "500", "--dim", "4",
                     "--num-classes", "3", "--region-sizes", HT]) == 0
    info = json.loads((out / "pool.json").read_text())
    assert info["region_sizes"] == HT and info["num_examples"] == 500
    assert cli.main(["generate-pool", "--output", str(tmp_path / "default"), "--num-examples", "50",
                     "--dim", "4", "--num-classes", "3"]) == 0
    assert json.loads((tmp_path / "default" / "pool.json").read_text())["region_sizes"] == "lognormal"

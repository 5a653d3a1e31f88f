"""average_linkage must give the partition of exact average-linkage HAC."""
import numpy as np
import pytest
import fastcluster
from scipy.cluster.hierarchy import fcluster
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris, load_wine
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.core import cells
from clusmar_beam.core.hac import (HacError, HacResult, average_linkage, index as hac_index, rac as hac_rac, threshold as hac_threshold)


def _reference(X, metric):
    return fastcluster.linkage(np.asarray(X, np.float64), "average", metric=metric)


def _threshold(Z, quantile):
    """Midway between two consecutive distinct merge heights.

    A threshold equal to a merge height would make the answer hinge on the
    last bit of that height, which no two implementations agree on.
    """
    heights = np.unique(Z[:, 2])
    i = int(quantile * (heights.size - 1))
    return float((heights[i] + heights[i + 1]) / 2)


def _check_against_reference(X, metric, eps, Z=None, min_ari=0.99, **kwargs):
    Z = _reference(X, metric) if Z is None else Z
    ref = fcluster(Z, eps, "distance")
    got = average_linkage(X, eps, metric, **kwargs)
    _check_result_shape(got, len(X))
    ari = adjusted_rand_score(ref, got.labels)
    assert ari >= min_ari, (metric, eps, ref.max(), got.num_clusters, ari)
    return ref, got


def _check_result_shape(res, n):
    assert isinstance(res, HacResult)
    assert res.labels.dtype == np.int64 and res.labels.shape == (n,)
    assert res.num_clusters == res.labels.max() + 1
    # numbered by first appearance: each new label is one more than any before
    first = np.unique(res.labels, return_index=True)[1]
    assert np.array_equal(np.sort(first), first)
    assert res.labels[0] == 0
    assert res.merges == n - res.num_clusters == sum(res.merges_per_round)
    assert res.rounds == len(res.merges_per_round)


def _standardised(X):
    return (X - X.mean(axis=0)) / X.std(axis=0)


DATASETS = {
    "digits": lambda: load_digits().data,
    "breast_cancer": lambda: _standardised(load_breast_cancer().data),
    "wine": lambda: _standardised(load_wine().data),
    "diabetes": lambda: load_diabetes().data,  # centred and scaled as shipped
    "iris": lambda: load_iris().data,  # raw: exact duplicate rows and many ties
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_bundled_datasets_match_exact_average_linkage(name, metric):
    X = DATASETS[name]()
    Z = _reference(X, metric)
    for quantile in (0.75, 0.95):
        eps = _threshold(Z, quantile)
        ref, _ = _check_against_reference(X, metric, eps, Z=Z)
        mean_size = len(X) / ref.max()
        assert 3 <= mean_size <= 50, mean_size  # the threshold is not trivial


def _diffuse_groups_and_bursts(seed=0, d=24):
    """Large spread-out groups plus tight bursts of near and exact duplicates."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(5):  # diffuse groups
        centre = rng.normal(size=d) * 3
        parts.append(centre + rng.normal(size=(rng.integers(250, 500), d)))
    for _ in range(60):  # near-duplicate bursts
        centre = rng.normal(size=d) * 3
        scale = rng.choice([1e-5, 1e-3, 1e-2])
        parts.append(centre + scale * rng.normal(size=(rng.integers(2, 40), d)))
    X = np.concatenate(parts)
    X = np.concatenate([X, X[rng.integers(len(X), size=150)]])  # exact duplicates
    return X[rng.permutation(len(X))]


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_diffuse_groups_and_duplicate_bursts(metric):
    X = _diffuse_groups_and_bursts()
    assert 2000 <= len(X) <= 4000
    Z = _reference(X, metric)
    for quantile in (0.7, 0.97):
        _check_against_reference(X, metric, _threshold(Z, quantile), Z=Z)


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_ivf_search_path(metric):
    X = _diffuse_groups_and_bursts(seed=1)
    Z = _reference(X, metric)
    eps = _threshold(Z, 0.9)
    lines = []
    _, got = _check_against_reference(X, metric, eps, Z=Z, exact_search_max=100, log=lines.append)
    assert any(" ivf," in line for line in lines)  # the IVF index was really used
    assert got.rounds > 1



@pytest.mark.parametrize("layout_max", [8192, 8])
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_ivf_with_two_level_quantiser(metric, layout_max, monkeypatch):
    """Pools above 65,536 clusters (1,024 lists) give points their lists through a two-level
    quantiser (lists of one k-means grouped, or above _FLAT_LAYOUT_MAX lists of each group's own);
    forced here on a small pool (tiny lists, few allowed flat lists), it must still
    match exact average linkage."""
    from clusmar_beam.core import hac

    monkeypatch.setattr(hac_index, "_FLAT_QUANTISER_MAX", 8)
    monkeypatch.setattr(hac_index, "_FLAT_LAYOUT_MAX", layout_max)
    monkeypatch.setattr(hac_index, "_LIST_SIZE", 40)
    X = _diffuse_groups_and_bursts(seed=1)
    Z = _reference(X, metric)
    built = []
    real_init = hac.TwoLevelQuantiser.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(hac.TwoLevelQuantiser, "__init__", spy)
    _check_against_reference(X, metric, _threshold(Z, 0.9), Z=Z, exact_search_max=100)
    assert built and built[0].first is not None  # the two-level path ran
    assert built[0].centroids.shape[0] >= len(X) // 40 - 1  # lists of about _LIST_SIZE


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_symmetrising_edges_of_fresh_clusters_equals_a_full_pass(metric, monkeypatch):
    """Each round offers only edges from or to clusters with a new nearest, and looks only
    at those to retire; offering every edge must change nothing, in the IVF phase and the
    exact one, and every other cluster must be within eps."""

    real = hac_rac._symmetrise
    rounds = []

    def both(act, nn, nd, fresh):
        renewed = np.flatnonzero(fresh)
        nn_full, nd_full = nn.copy(), nd.copy()
        real(act, nn_full, nd_full, np.ones_like(fresh))
        offered = real(act, nn, nd, fresh)
        rounds.append(bool(fresh[act].all()))
        assert np.array_equal(nn, nn_full) and np.array_equal(nd, nd_full)
        # only a cluster with a new nearest can be beyond eps, so only those are looked at to retire
        assert (nd[np.setdiff1d(act, renewed)] <= eps).all()
        return offered

    monkeypatch.setattr(hac_rac, "_symmetrise", both)
    X = _diffuse_groups_and_bursts(seed=2)
    eps = _threshold(_reference(X, metric), 0.9)
    average_linkage(X, eps, metric, exact_search_max=100)
    assert len(rounds) > 10 and not all(rounds)  # some rounds leave clusters out


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("delta", [0.0, 0.04])
def test_pairs_found_from_the_changed_clusters_equal_a_full_pass(metric, delta, monkeypatch):
    """Each round looks for reciprocal pairs only among clusters whose nearest changed; a pass
    over every active cluster must find the same, IVF and exact, with stars (from the first
    round) and without."""

    real = hac_rac._reciprocal_pairs
    rounds = []

    def both(ids, nn, active, frozen):
        every = np.flatnonzero(active & ~frozen)
        assert np.array_equal(np.sort(every), every)
        a, b = real(ids, nn, active, frozen)
        a_full, b_full = real(every, nn, active, frozen)
        assert np.array_equal(a, a_full) and np.array_equal(b, b_full)
        rounds.append(ids.size < every.size)
        return a, b

    real_absorb = hac_rac.Rac._absorb
    leaves = []

    def absorb(self, *args):
        leaf, centre = real_absorb(self, *args)
        leaves.append(leaf.size)
        return leaf, centre

    monkeypatch.setattr(hac_rac, "_reciprocal_pairs", both)
    monkeypatch.setattr(hac_rac, "STARS_FROM_ROUND", 0)
    monkeypatch.setattr(hac_rac.Rac, "_absorb", absorb)
    X = _heavy_tailed(3000, dim=16, seed=2)
    average_linkage(X, _threshold(_reference(X, metric), 0.9), metric, exact_search_max=100, delta=delta)
    assert len(rounds) > 10 and any(rounds)
    assert (sum(leaves) > 0) == (delta > 0)  # stars grew where delta allows them


def _cluster_linkages(X, labels):
    """Cosine average linkage between every two clusters of unit-normalised X, from their means."""
    X = np.asarray(X, np.float64)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    sums = np.zeros((labels.max() + 1, X.shape[1]))
    np.add.at(sums, labels, X)
    means = sums / np.bincount(labels)[:, None]
    linkage = 1.0 - means @ means.T
    np.fill_diagonal(linkage, np.inf)
    return linkage


def test_ivf_path_leaves_no_two_clusters_within_the_threshold():
    """Exact average linkage cut at eps leaves every two clusters more than eps apart.

    On the IVF path a cluster that found nothing within eps retires for good.
    Searching only the lists around its list's centre, three clusters of this
    pool retired with a cluster still within eps (2,633 clusters against the
    2,630 of exact linkage); the search again in the lists nearest the
    cluster itself finds those neighbours."""
    from clusmar_beam.core import synthetic

    X = synthetic.generate_rows(synthetic.make_plan(20_000, 64, 100, 0), 0, 20_000)["embedding"]
    eps = 0.15
    got = average_linkage(X, eps, "cosine", exact_search_max=1000)
    assert got.merges_per_round and got.num_clusters < 2_700
    linkage = _cluster_linkages(X, got.labels)
    # 1e-9: float64 means here, cluster sums there; no two clusters are that close to eps.
    assert int((linkage <= eps - 1e-9).sum()) == 0


@pytest.mark.parametrize("layout_max", [8192, 100])
def test_two_level_quantiser_finds_the_nearest_list_of_the_groups_it_searches(layout_max, monkeypatch):
    from clusmar_beam.core import hac

    monkeypatch.setattr(hac_index, "_FLAT_QUANTISER_MAX", 100)
    monkeypatch.setattr(hac_index, "_FLAT_LAYOUT_MAX", layout_max)
    monkeypatch.setattr(hac_index, "_NEAREST_BLOCK", 1000)  # rows in blocks on both threads, as at scale
    rng = np.random.default_rng(3)
    train = rng.normal(size=(20000, 8)).astype(np.float32)
    q = hac.TwoLevelQuantiser(train, 2000, seed=0)
    assert q.first is not None and q.first[-1] == q.centroids.shape[0]
    # lists grouped after one k-means straddle the groups' borders: more groups are searched
    assert q.groups_searched == (hac_index._GROUPS_SEARCHED_GROUPED_AFTER if layout_max >= 2000
                                 else hac_index._GROUPS_SEARCHED)
    assert np.all(np.diff(q.first) > 0)  # no empty group
    assert abs(q.centroids.shape[0] - 2000) <= q.groups.shape[0]  # lists shared out by group size
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    lists = q.assign(x)
    groups = cells.probe_cells(q.groups, x, q.groups_searched)
    for i in range(0, 3000, 97):
        allowed = np.concatenate([np.arange(q.first[g], q.first[g + 1]) for g in groups[i]])
        d = ((q.centroids[allowed] - x[i]) ** 2).sum(axis=1)
        assert lists[i] == allowed[np.argmin(d)]
    # most points land in their globally nearest list
    nearest = cells.probe_cells(q.centroids, x, 1)[:, 0]
    assert (nearest == lists).mean() > 0.9
    # the threshold cells ask for a row's 3 nearest lists, nearest first
    three = q.nearest(x, 3)
    assert (three[:, 0] == lists).all()
    for i in range(0, 3000, 97):
        allowed = np.concatenate([np.arange(q.first[g], q.first[g + 1]) for g in groups[i]])
        d = ((q.centroids[allowed] - x[i]) ** 2).sum(axis=1)
        assert three[i].tolist() == allowed[np.argsort(d, kind="stable")[:3]].tolist()
    # padded: as many lists as asked, nearest first, then -1 once the searched groups run out
    many = q.nearest(x, 800, pad=True)
    assert many.shape == (3000, 800)
    padded = 0
    for i in range(0, 3000, 97):
        allowed = np.concatenate([np.arange(q.first[g], q.first[g + 1]) for g in groups[i]])
        d = ((q.centroids[allowed] - x[i]) ** 2).sum(axis=1)
        want = allowed[np.argsort(d, kind="stable")[:800]]
        assert many[i, :want.size].tolist() == want.tolist()
        assert (many[i, want.size:] == -1).all()
        padded += want.size < 800
    assert padded  # some rows' groups hold fewer than 800 lists
    assert np.array_equal(q.assign(x[:700]), lists[:700])  # a row's list does not depend on its block


def test_per_query_probes_come_from_every_list_up_to_the_flat_layouts_limit(monkeypatch):
    """A per-query search probes the lists nearest the query among all of them, not only its groups'."""
    monkeypatch.setattr(hac_index, "_FLAT_QUANTISER_MAX", 100)
    rng = np.random.default_rng(4)
    train = np.c_[rng.normal(size=(40000, 8)), np.zeros(40000)].astype(np.float32)
    index = hac_index.IvfIndex(train, 1200, 700, seed=0, size=1)
    assert index.quantiser.first is not None  # its points' lists are found through groups
    x = train[:500]
    lists = index.probe_lists(x)
    assert np.array_equal(lists, cells.probe_cells(index.quantiser.centroids, x, 700))
    monkeypatch.setattr(hac_index, "_FLAT_LAYOUT_MAX", 100)
    grouped = index.probe_lists(x)
    assert (grouped == -1).any()  # above the limit only the groups' lists, padded


def test_large_offset_does_not_lose_precision():
    X = DATASETS["breast_cancer"]()[:300] + 1e4
    Z = _reference(X, "sqeuclidean")
    _check_against_reference(X, "sqeuclidean", _threshold(Z, 0.9), Z=Z, min_ari=0.999)


def test_float32_input_and_input_untouched():
    X = load_digits().data[:500].astype(np.float32)
    before = X.copy()
    Z = _reference(X, "cosine")
    _check_against_reference(X, "cosine", _threshold(Z, 0.9), Z=Z)
    assert np.array_equal(X, before)


def test_deterministic():
    X = _diffuse_groups_and_bursts(seed=2)
    for kwargs in ({}, {"exact_search_max": 100}):
        a = average_linkage(X, 0.05, "cosine", **kwargs)
        b = average_linkage(X, 0.05, "cosine", **kwargs)
        assert np.array_equal(a.labels, b.labels)
        assert a.merges_per_round == b.merges_per_round


def test_log_reports_rounds():
    lines = []
    res = average_linkage(load_digits().data[:200], 0.1, log=lines.append)
    assert len(lines) >= res.rounds
    assert all(isinstance(line, str) for line in lines)
    assert lines[0].startswith("round 1:")


def test_single_point():
    res = average_linkage(np.array([[1.0, 2.0]]), 0.5)
    assert res.labels.tolist() == [0]
    assert res.num_clusters == 1 and res.merges == 0 and res.rounds == 0


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_all_identical_points_form_one_cluster(metric):
    X = np.tile([[0.3, -1.0, 2.0]], (50, 1))
    res = average_linkage(X, 1e-9, metric)
    assert res.labels.tolist() == [0] * 50
    assert res.num_clusters == 1 and res.merges == 49


def test_far_apart_points_stay_apart():
    X = np.eye(5) * 10
    res = average_linkage(X, 1.0, "sqeuclidean")
    assert res.labels.tolist() == [0, 1, 2, 3, 4]
    assert res.merges == 0


def test_two_points_merge_at_their_distance():
    X = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert average_linkage(X, 25.0, "sqeuclidean").num_clusters == 1
    assert average_linkage(X, 24.999, "sqeuclidean").num_clusters == 2


@pytest.mark.parametrize("threshold", [0, -0.5, float("nan"), float("inf"), "abc", None, True])
def test_bad_threshold(threshold):
    with pytest.raises(HacError, match="distance_threshold"):
        average_linkage(np.ones((3, 2)), threshold)


def test_unknown_metric():
    with pytest.raises(HacError, match="metric"):
        average_linkage(np.ones((3, 2)), 0.5, "euclidean")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_not_two_dimensional(shape):
    with pytest.raises(HacError, match="2-D"):
        average_linkage(np.ones(shape), 0.5)


def test_not_float():
    with pytest.raises(HacError, match="dtype int64 for 4 rows"):
        average_linkage(np.ones((4, 2), np.int64), 0.5)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty(shape):
    with pytest.raises(HacError, match="empty"):
        average_linkage(np.ones(shape), 0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_counted(bad):
    X = np.ones((10, 4))
    X[[2, 5, 7], 1] = bad
    X[5, 3] = bad
    with pytest.raises(HacError, match=r"NaN or inf in 3 of 10 rows \(first at row 2\)"):
        average_linkage(X, 0.5)


def test_zero_norm_rows_are_counted_for_cosine():
    X = np.ones((6, 3))
    X[[1, 4]] = 0.0
    with pytest.raises(HacError, match=r"2 of 6 embedding rows have zero norm"):
        average_linkage(X, 0.5, "cosine")
    # squared Euclidean has no trouble with them
    assert average_linkage(X, 0.5, "sqeuclidean").num_clusters == 2


def test_hac_error_is_value_error():
    assert issubclass(HacError, ValueError)


@pytest.mark.parametrize("kwargs", [{"exact_search_max": 0}, {"nprobe": 0}, {"nlist": 0}])
def test_bad_search_settings(kwargs):
    with pytest.raises(HacError):
        average_linkage(np.ones((3, 2)), 0.5, **kwargs)


def test_tiny_and_huge_scales_give_the_same_clusters():
    X = _diffuse_groups_and_bursts(seed=3)[:800]
    eps = _threshold(_reference(X, "sqeuclidean"), 0.9)
    base = average_linkage(X, eps, "sqeuclidean")
    assert 3 <= len(X) / base.num_clusters <= 50
    for factor in (1e-25, 1e25):
        scaled = average_linkage(X * factor, eps * factor**2, "sqeuclidean")
        assert adjusted_rand_score(base.labels, scaled.labels) >= 0.999


def test_float32_screening_finds_the_float64_nearest():
    """Cosine candidates ranked in float32 and refined near the smallest give the
    nearest, its linkage and the tie-break (lower id) of float64 linkages for all."""
    from clusmar_beam.core import hac

    rng = np.random.default_rng(11)
    base = rng.normal(size=(40, 16))
    X = np.repeat(base, 25, axis=0) + rng.normal(scale=1e-7, size=(1000, 16))  # bursts: float32 ties
    X[500:520] = X[480:500]  # exact duplicates: float64 ties, broken by the lower id
    S = hac.prepare(X, "cosine")
    rac = hac.Rac(S, np.ones(len(S)), "cosine", 0.5, exact_search_max=5000, nlist=None, nprobe=32, seed=0, log=None,
                  t0=0.0, k=8)
    q = np.arange(len(S))
    c = np.sort(np.concatenate([rng.integers(0, len(S), size=(len(S), 6)),
                                (q[:, None] // 25) * 25 + rng.integers(0, 25, size=(len(S), 6))], axis=1), axis=1)
    c[c == q[:, None]] = -1
    c[:, 1:][c[:, 1:] == c[:, :-1]] = -1
    valid = c >= 0
    every = np.full(c.shape, np.inf)
    rac._fill(q, np.where(valid, c, q[:, None]), every, valid)
    none = np.iinfo(np.int64).max
    best = np.where((every == every.min(axis=1, keepdims=True)) & valid, c, none).min(axis=1)
    scores = np.einsum("ij,ikj->ik", rac.means32[q], rac.means32[np.maximum(c, 0)])  # as a search returns them
    no = np.zeros(c.shape, bool)
    for kwargs in ({}, {"dist": 1.0 - scores.astype(np.float64), "exact": no, "need": no}):
        nn, nd, _, exact = rac._nearest_of(q, c, **kwargs)
        assert np.array_equal(nn, best)
        assert np.array_equal(nd, every.min(axis=1))
        assert exact.sum() < valid.sum()  # most candidates never needed float64


def test_ivf_blocked_and_per_query_search_agree(monkeypatch):
    """Crowded lists are searched as one block; both ways must find the same."""
    from clusmar_beam.core import hac

    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(3000, 9)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64)
    found = {}
    for crowded in (1, 10**9):
        monkeypatch.setattr(hac_index, "_CROWDED_LIST", crowded)
        index = hac.IvfIndex(vecs, nlist=40, nprobe=8, seed=0, size=3000)
        index.add(ids, vecs)
        found[crowded] = index.search(ids, lambda part: vecs[part], 4)[0]
    blocked, per_query = found[1], found[10**9]
    assert (blocked[:, 0] == ids).mean() > 0.99  # self first
    assert (blocked[:, 1] == per_query[:, 1]).mean() > 0.99


@pytest.mark.parametrize("crowded", [1, 10**9])
def test_ivf_search_on_threads_equals_one_thread(crowded, monkeypatch):
    """Lists (blocked) and query blocks (per query) go to threads with FAISS single-threaded
    in each: the same candidates and scores as on one thread, whatever the thread count."""
    import faiss
    from clusmar_beam.core import hac

    monkeypatch.setattr(hac_index, "_CROWDED_LIST", crowded)
    monkeypatch.setattr(hac_index, "_SCAN_BLOCK", 64)
    rng = np.random.default_rng(6)
    vecs = rng.normal(size=(3000, 9)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64)
    index = hac.IvfIndex(vecs, nlist=40, nprobe=8, seed=0, size=3000)
    index.add(ids, vecs)
    found = {}
    threads = faiss.omp_get_max_threads()
    try:
        for n in (1, 3):
            faiss.omp_set_num_threads(n)
            found[n] = (index.search(ids, lambda part: vecs[part], 4),
                        index.search_own_lists(ids, lambda part: vecs[part], lambda part: vecs[part], 4))
    finally:
        faiss.omp_set_num_threads(threads)
    for one, three in zip(found[1], found[3]):
        assert np.array_equal(one[0], three[0]) and np.array_equal(one[1], three[1])
    assert (found[1][0][0][:, 0] == ids).mean() > 0.99  # self first

def test_own_list_search_skips_only_the_lists_already_searched():
    """A retiring cluster searched this round is searched again only in its own nearest lists it missed."""
    from clusmar_beam.core import hac

    rng = np.random.default_rng(6)
    vecs = rng.normal(size=(3000, 9)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64)
    index = hac.IvfIndex(vecs, nlist=40, nprobe=8, seed=0, size=3000)
    index.add(ids, vecs)
    home = index.list_of[ids]
    found = index.search_own_lists(ids, lambda part: vecs[part], lambda part: vecs[part], 4, searched=home)[0]
    own = index.quantiser.nearest(vecs, 8, pad=True)
    agree = []
    for i in range(0, 3000, 7):
        lists = np.setdiff1d(own[i], index.probe[home[i]])
        pool = np.flatnonzero(np.isin(home, lists))
        expected = pool[np.argsort(((vecs[pool] - vecs[i]) ** 2).sum(axis=1), kind="stable")[:4]]
        got = found[i][found[i] >= 0]
        assert np.isin(got, pool).all()  # nothing from a list searched before
        agree.append(np.array_equal(got, expected))
    assert np.mean(agree) > 0.99
    assert 0 < np.mean(found[:, 0] >= 0) < 1  # some clusters had lists left to search, some none


def _dominant_region_and_isolated_tail(n, dim, seed):
    """40% of the pool in one low-rank region, 20% in floods of near-duplicates, the rest in regions of
    Pareto sizes whose spread varies tenfold, most far from every other.  The probing check samples mostly
    the dense part, while at a coarse cut a small region's nearest cluster within the threshold can lie in
    any IVF list.  (benchmarks/bench_pool_shapes.py's `dominant` shape.)"""
    rng = np.random.default_rng(seed)
    n1, n2 = int(0.4 * n), int(0.2 * n)
    n3 = n - n1 - n2
    centre = rng.normal(size=dim)
    centre /= np.linalg.norm(centre)
    basis = rng.normal(size=(8, dim)) * np.linspace(0.6, 0.05, 8)[:, None]
    dominant = centre + rng.normal(size=(n1, 8)) @ basis * 3 / np.sqrt(dim) + rng.normal(scale=0.02, size=(n1, dim))

    def pareto_sizes(total, shape, step, cap):
        sizes = np.minimum((rng.pareto(shape, size=total) + 1).astype(int) * step, cap)
        sizes = sizes[np.cumsum(sizes) <= total]
        sizes = np.append(sizes, total - sizes.sum())
        return sizes[sizes > 0]

    sizes = pareto_sizes(n2, 1.1, 3, n2 // 10)
    floods = (np.repeat(rng.normal(size=(sizes.size, dim)), sizes, axis=0)
              + rng.normal(scale=1e-3, size=(n2, dim)) * rng.choice([0, 1], size=(n2, 1), p=[0.3, 0.7]))
    sizes = pareto_sizes(n3, 1.3, 5, n3)
    spread = np.exp(rng.uniform(np.log(0.03), np.log(0.3), size=sizes.size))
    tail = (np.repeat(rng.normal(size=(sizes.size, dim)), sizes, axis=0)
            + rng.normal(size=(n3, dim)) * np.repeat(spread, sizes)[:, None])
    return np.concatenate([dominant, floods, tail]).astype(np.float32)[rng.permutation(n)]


def test_clusters_retired_on_ivf_searches_are_searched_again(monkeypatch):
    """A cluster retires for good once its search finds nothing within eps; an IVF search can miss what is
    there, and the pass over the clusters left, in an index of their own, merges what was missed."""
    from clusmar_beam.core.hac import linkage
    X = _dominant_region_and_isolated_tail(20000, 128, seed=71)
    eps = 0.76  # a coarse cut: a few hundred clusters
    exact = average_linkage(X, eps, "cosine", exact_search_max=10**9)
    ivf = 5000  # the IVF path, as a pool of more than EXACT_SEARCH_MAX rows takes it
    repaired = average_linkage(X, eps, "cosine", exact_search_max=ivf)
    monkeypatch.setattr(linkage, "MAX_REPAIRS", 0)
    once = average_linkage(X, eps, "cosine", exact_search_max=ivf)
    assert once.num_clusters > 1.03 * exact.num_clusters  # the IVF run alone leaves missed merges undone
    assert abs(repaired.num_clusters - exact.num_clusters) <= 0.02 * exact.num_clusters
    assert repaired.rounds > once.rounds, (once.num_clusters, repaired.num_clusters, exact.num_clusters)


def test_a_pool_of_at_most_exact_search_max_rows_is_searched_exactly_throughout():
    """Where the clusters are few enough for exact search to be cheap, no IVF round decides a merge: at a
    coarse cut of this shape the IVF rounds merge some pairs that are not the nearest (with exact search
    only below 5,000 clusters, ARI 0.93 here), and the split of the dominant region follows those."""
    X = _dominant_region_and_isolated_tail(10000, 128, seed=71)
    assert len(X) <= hac_rac.EXACT_SEARCH_MAX
    Z = _reference(X, "cosine")
    eps = _threshold(Z, 0.97)
    lines = []
    got = average_linkage(X, eps, "cosine", delta=hac_rac.DEFAULT_DELTA, log=lines.append)
    assert not any(" ivf," in line for line in lines)
    assert adjusted_rand_score(fcluster(Z, eps, criterion="distance"), got.labels) >= 0.99


# ------------------------------------------------- threshold from a target size

from scipy.sparse import coo_matrix  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402

from clusmar_beam.core.hac import choose_threshold, threshold_from_heights  # noqa: E402


def _blobs(n, d=16, groups=60, seed=0, spread=0.35):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, d))
    return centers[rng.integers(0, groups, n)] + spread * rng.normal(size=(n, d))


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_merge_pairs_and_heights_reproduce_every_cut(metric):
    X = _blobs(800, seed=3)
    X[100:110] = X[5]  # exact duplicates merge at height 0
    full = average_linkage(X, 1e6 if metric == "sqeuclidean" else 2.5, metric)
    assert full.num_clusters == 1 and full.heights.size == full.pairs.shape[0] == 799
    assert (full.heights[:9] == 0).all()
    for eps in np.quantile(full.heights, [0.2, 0.5, 0.8]):
        eps = float(eps) * 1.0000001
        keep = full.heights <= eps
        graph = coo_matrix((np.ones(keep.sum()), tuple(full.pairs[keep].T)), shape=(800, 800))
        _, comp = connected_components(graph, directed=False)
        assert adjusted_rand_score(comp, average_linkage(X, eps, metric).labels) == 1.0


def test_threshold_from_heights():
    h = np.array([0.0, 0.1, 0.2, 0.2, 0.4])  # 6 points
    assert threshold_from_heights(h, 6, 2) == pytest.approx(0.3)   # 3 merges: 3 clusters
    assert threshold_from_heights(h, 6, 1) == pytest.approx(0.05)  # duplicates merge anyway
    assert threshold_from_heights(h, 6, 100) > 0.4
    assert threshold_from_heights(np.zeros(4), 5, 3) > 0            # all identical


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("target", [3, 12])
def test_target_mean_size_exact_on_small_pools(metric, target):
    X = _blobs(1500, seed=1)
    choice = choose_threshold(X, metric, target, sample_size=5000)
    assert choice.sample_points == 1500 and choice.sample_cells == 1
    res = average_linkage(X, choice.distance_threshold, metric)
    assert 1500 / res.num_clusters == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("cell_size", [None, 100])
def test_target_mean_size_from_a_sample_of_cells(metric, cell_size, monkeypatch):
    """cell_size 100 makes 120 cells, above the (lowered) flat limit: the two-level cells of big pools."""

    monkeypatch.setattr(hac_threshold, "_FLAT_SAMPLE_CELLS_MAX", 30)
    X = _blobs(12000, groups=300, seed=2, spread=0.5)
    choice = choose_threshold(X, metric, 8, sample_size=2000, seed=4, cell_size=cell_size)
    assert (choice.num_cells > 30) == (cell_size is not None)
    assert choice.sample_cells > 1 and choice.sample_points < 12000
    assert choice.sample_points_with_margin > choice.sample_points
    res = average_linkage(X, choice.distance_threshold, metric)
    assert 12000 / res.num_clusters == pytest.approx(8, rel=0.2)
    again = choose_threshold(X, metric, 8, sample_size=2000, seed=4, cell_size=cell_size)
    assert again == choice                                     # deterministic


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("target", [3, 12, 40])
@pytest.mark.parametrize("first", [0.01, 0.5, 50.0])
def test_cut_at_a_target_is_exact_average_linkage_at_its_threshold(metric, target, first):
    """Merged up to a first threshold far below, near or above the target's (raised while short of
    the target), then cut: the mean size is the target and the clusters are scipy's at the cut."""
    X = _blobs(1500, seed=1)
    Z = _reference(X, metric)
    res = average_linkage(X, first, metric, target_mean_cluster_size=target)
    assert 1500 / res.num_clusters == pytest.approx(target, rel=0.02)
    assert res.merges == 1500 - res.num_clusters and res.distance_threshold <= res.merged_up_to
    assert res.merged_up_to >= first and res.heights.size >= res.merges
    assert adjusted_rand_score(fcluster(Z, res.distance_threshold, "distance"), res.labels) == 1.0


def test_cut_at_a_target_through_the_ivf_search(monkeypatch):
    """Past exact search (IVF over cluster means), raised twice: still the target and scipy's clusters."""
    from clusmar_beam.core import hac
    X = _diffuse_groups_and_bursts(seed=4)
    Z = _reference(X, "cosine")
    res = average_linkage(X, 0.01, "cosine", target_mean_cluster_size=15, exact_search_max=200)
    assert res.merged_up_to >= 0.01 * hac.TARGET_RAISE ** 2
    assert len(X) / res.num_clusters == pytest.approx(15, rel=0.02)
    assert adjusted_rand_score(fcluster(Z, res.distance_threshold, "distance"), res.labels) >= 0.99


@pytest.mark.parametrize("target", [0, 0.5, -1, float("nan"), float("inf"), "x"])
def test_bad_target(target):
    with pytest.raises(HacError, match="target mean cluster size"):
        choose_threshold(np.eye(3), "cosine", target)
    with pytest.raises(HacError, match="target mean cluster size"):
        average_linkage(np.eye(3), 0.1, "cosine", target_mean_cluster_size=target)


def test_target_on_identical_and_single_points():
    assert average_linkage(np.ones((20, 3)), choose_threshold(np.ones((20, 3)), "cosine", 5).distance_threshold,
                           "cosine").num_clusters == 1
    assert choose_threshold(np.ones((1, 3)), "sqeuclidean", 5).distance_threshold > 0
    assert average_linkage(np.ones((20, 3)), 0.1, "cosine", target_mean_cluster_size=5).num_clusters == 1
    assert average_linkage(np.ones((1, 3)), 0.1, "cosine", target_mean_cluster_size=5).num_clusters == 1


def test_target_above_the_pool_size_merges_everything():
    res = average_linkage(_blobs(200, seed=9), 0.01, "sqeuclidean", target_mean_cluster_size=1000)
    assert res.num_clusters == 1 and res.merges == 199


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_kept_candidates_give_the_same_clusters_as_searching_again(metric, monkeypatch):
    """Resolving a stale cluster from its kept candidates and their bound is exact:
    the same merges as re-searching every stale cluster, with far fewer searches."""
    from clusmar_beam.core import hac
    X = _diffuse_groups_and_bursts(seed=3)
    eps = _threshold(_reference(X, metric), 0.9)
    def searches(log_lines):
        return sum(int(line.split("searched ")[1].split(",")[0]) for line in log_lines if line.startswith("round "))

    lines = []
    kept = average_linkage(X, eps, metric, log=lines.append)

    def resolve_nothing(self, ids, parent, active):
        return np.zeros(ids.size, bool), np.full(ids.size, -1), np.full(ids.size, np.inf)

    monkeypatch.setattr(hac.Rac, "_resolve", resolve_nothing)
    lines_again = []
    again = average_linkage(X, eps, metric, log=lines_again.append)
    assert np.array_equal(kept.labels, again.labels)
    # Linkages within the float32 tolerance of the search (the near-duplicate
    # bursts) are ties in FAISS's ranking, so either way may miss a nearer
    # near-duplicate there and merge them in another order; every merge
    # above it is the same.
    centred = X - X.mean(axis=0)
    float32_ties = 2e-5 if metric == "cosine" else 2e-5 * max(1.0, float(np.einsum("ij,ij->i", centred, centred).max()))
    assert np.array_equal(np.sort(kept.heights[kept.heights > float32_ties]),
                          np.sort(again.heights[again.heights > float32_ties]))
    assert searches(lines) < 0.8 * searches(lines_again)


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("exact_search_max", [100, 5000])
def test_renumbering_as_clusters_retire_changes_no_merge(metric, exact_search_max, monkeypatch):
    """The rounds' arrays shrink to the active clusters (Rac._compact): every merge,
    its height and the survivors' statistics (a target raises the threshold from
    them) are those of rounds that keep every row."""
    X = _diffuse_groups_and_bursts(seed=2)

    def run():
        return average_linkage(X, 0.01, metric, target_mean_cluster_size=12, exact_search_max=exact_search_max)

    # Indexes filled block by block, also when renumbered.  Both runs build
    # with the same blocks: FAISS assigns lists to a block of under 20 rows
    # without BLAS, which can round a boundary row to another list.
    monkeypatch.setattr(hac_index, "ADD_BLOCK", 37)
    monkeypatch.setattr(hac_rac, "ADD_BLOCK", 37)
    monkeypatch.setattr(hac_rac, "_COMPACT_MIN", 10**9)
    whole = run()
    monkeypatch.setattr(hac_rac, "_COMPACT_MIN", 8)
    monkeypatch.setattr(hac_rac, "_COMPACT_BELOW", 0.95)
    renumbered = run()
    assert np.array_equal(whole.labels, renumbered.labels)
    assert np.array_equal(whole.pairs, renumbered.pairs)
    assert np.array_equal(whole.heights, renumbered.heights)
    assert whole.merges_per_round == renumbered.merges_per_round


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_overwritten_input_gives_the_same_clusters(metric, duplicates):
    """With overwrite_input the caller's float64 rows are the working copy (pipelines/cluster.py)."""
    X = _diffuse_groups_and_bursts(seed=4)
    if duplicates:
        X[50:90] = X[7]
        X[200:203] = X[300]
    expected = average_linkage(X, 0.05, metric, target_mean_cluster_size=8, exact_search_max=300)
    own = X.astype(np.float64)
    got = average_linkage(own, 0.05, metric, target_mean_cluster_size=8, exact_search_max=300,
                          overwrite_input=True)
    assert not np.array_equal(own, X)  # used in place
    assert np.array_equal(got.labels, expected.labels)
    assert np.array_equal(got.pairs, expected.pairs) and np.array_equal(got.heights, expected.heights)
    single = X.astype(np.float32)
    kept = single.copy()
    average_linkage(single, 0.05, metric, overwrite_input=True)
    assert np.array_equal(single, kept)  # float32 rows cannot be the working copy: left alone


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_row_blocks_on_threads_change_no_merge(metric, monkeypatch):
    """The rounds' bookkeeping runs in row blocks on the FAISS threads (rac.in_row_blocks):
    every merge and height is that of one block on one thread, whatever the blocks."""
    import faiss
    X = _heavy_tailed(4000, dim=12, seed=5)

    def run():
        return average_linkage(X, 0.3 if metric == "cosine" else 0.6, metric, exact_search_max=300, delta=0.02)

    monkeypatch.setattr(hac_rac, "ROW_BLOCK", 10**9)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = run()
    finally:
        faiss.omp_set_num_threads(threads)
    monkeypatch.setattr(hac_rac, "ROW_BLOCK", 7)
    blocks = run()
    assert one.rounds > 10 and one.num_clusters < 0.5 * X.shape[0]
    assert np.array_equal(one.labels, blocks.labels)
    assert np.array_equal(one.pairs, blocks.pairs) and np.array_equal(one.heights, blocks.heights)


def test_rows_kept_in_place_block_by_block(monkeypatch):
    from clusmar_beam.core import hac
    monkeypatch.setattr(hac_rac, "CHUNK", 3)
    rng = np.random.default_rng(7)
    a = rng.normal(size=(20, 4))
    keep = np.sort(rng.choice(20, size=11, replace=False))
    expected = a[keep].copy()
    kept = hac.keep_rows(a, keep)
    assert np.shares_memory(kept, a) and np.array_equal(kept, expected)

def test_renumbering_keeps_frozen_neighbours(monkeypatch):
    """Frozen clusters (a partition's neighbours in core.hac.sharded) survive the renumbering unmerged."""
    from clusmar_beam.core import hac
    from clusmar_beam.core.hac import sharded
    X = hac.prepare(_diffuse_groups_and_bursts(seed=3), "sqeuclidean")
    members = sharded.initial_clusters(X[::2], np.arange(0, len(X), 2))
    frozen = sharded.initial_clusters(X[1::2], np.arange(1, len(X), 2))

    def run():
        return sharded.rac_on_clusters(members, 2.0, "sqeuclidean", frozen)

    monkeypatch.setattr(hac_rac, "_COMPACT_MIN", 10**9)
    whole = run()
    monkeypatch.setattr(hac_rac, "_COMPACT_MIN", 8)
    monkeypatch.setattr(hac_rac, "_COMPACT_BELOW", 0.95)
    renumbered = run()
    assert len(whole[0]) < len(members)  # members merged, some across frozen ones
    assert np.array_equal(whole[0].ids, renumbered[0].ids)
    assert np.array_equal(whole[0].S, renumbered[0].S)
    assert np.array_equal(whole[1], renumbered[1])
    assert np.array_equal(whole[2], renumbered[2])
    assert not np.isin(renumbered[1], frozen.ids).any()


# ------------------------------------------- heavy-tailed pools and (1+delta)-good merges


def _heavy_tailed(n, dim=32, seed=0):
    from clusmar_beam.core import synthetic
    plan = synthetic.make_plan(n, dim, 10, seed, region_sizes="heavy-tailed")
    return synthetic.generate_rows(plan, 0, n)["embedding"]


@pytest.fixture(scope="module")
def heavy_tailed_pool():
    X = _heavy_tailed(6000)
    return X, {metric: _reference(X, metric) for metric in ("cosine", "sqeuclidean")}


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("quantile", [0.75, 0.95])
def test_approximate_merges_match_exact_average_linkage_on_heavy_tailed_pools(monkeypatch, heavy_tailed_pool, metric,
                                                                              quantile):
    monkeypatch.setattr(hac_rac, "STARS_FROM_ROUND", 0)  # stars from the first round (see the round budget's test)
    X, trees = heavy_tailed_pool
    eps = _threshold(trees[metric], quantile)
    _, exact = _check_against_reference(X, metric, eps, trees[metric], min_ari=0.9999, delta=0.0)
    _, approx = _check_against_reference(X, metric, eps, trees[metric], min_ari=0.99, delta=0.05)
    # At this size few stars are deep (hac_rac.DEEP_STAR_LEAVES) and the others take a small share of
    # delta: the rounds fall by about half (test_dense_region_takes_few_rounds checks one dense region's).
    assert approx.rounds < 0.6 * exact.rounds, (exact.rounds, approx.rounds)
    assert (approx.heights <= eps).all()


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_approximate_merges_at_a_target_mean_size(heavy_tailed_pool, metric):
    X, trees = heavy_tailed_pool
    got = average_linkage(X, _threshold(trees[metric], 0.5), metric, target_mean_cluster_size=10, delta=0.05)
    assert got.num_clusters == round(len(X) / 10)
    ref = fcluster(trees[metric], got.distance_threshold, "distance")
    assert adjusted_rand_score(ref, got.labels) >= 0.99


def test_dense_region_takes_few_rounds(monkeypatch):
    """One growing cluster is everyone's nearest neighbour: RAC merges one of them per round, stars all, once
    the round budget (STARS_FROM_ROUND, here lowered to fit a small pool) is spent."""
    monkeypatch.setattr(hac_rac, "STARS_FROM_ROUND", 32)
    rng = np.random.default_rng(3)
    blob = rng.standard_normal((3000, 16)) * np.exp(rng.normal(0, 0.6, size=(3000, 1))) * 0.05
    X = np.ones(16) + blob
    exact = average_linkage(X, 0.5, "cosine", delta=0.0)
    approx = average_linkage(X, 0.5, "cosine", delta=0.05)
    assert exact.num_clusters == approx.num_clusters == 1
    assert approx.rounds < exact.rounds / 2, (approx.rounds, exact.rounds)


def test_stars_wait_for_the_round_budget(monkeypatch):
    """A pool that merges within STARS_FROM_ROUND rounds is merged exactly whatever delta (past them, see
    test_dense_region_takes_few_rounds)."""
    X = _heavy_tailed(3000, dim=16, seed=2)
    exact = average_linkage(X, 0.3, "cosine", delta=0.0)
    assert exact.rounds < hac_rac.STARS_FROM_ROUND
    approx = average_linkage(X, 0.3, "cosine", delta=0.05)
    assert approx.rounds == exact.rounds and (approx.labels == exact.labels).all()
    monkeypatch.setattr(hac_rac, "STARS_FROM_ROUND", 0)
    assert average_linkage(X, 0.3, "cosine", delta=0.05).rounds < exact.rounds  # what the stars would have done


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_approximate_merges_on_bundled_datasets(name, metric):
    X = DATASETS[name]()
    Z = _reference(X, metric)
    for quantile in (0.5, 0.75, 0.9, 0.95):
        _check_against_reference(X, metric, _threshold(Z, quantile), Z, min_ari=0.99, delta=0.05)


@pytest.mark.parametrize("metric, eps", [("cosine", 0.3), ("sqeuclidean", 0.6)])
def test_every_star_merge_is_delta_good(monkeypatch, metric, eps):
    """TeraHAC's (1 + delta)-good merges, checked by brute force on the round's own clusters.

    Each leaf joins its grown cluster at an exact linkage within eps and within
    (1 + slack) of the lowest linkage either side has to any cluster of the
    round (a merge elsewhere in the round never brings a cluster closer than
    the nearer of its parts, so these are lower bounds on their best ones then),
    the slack being delta for a star that DEEP_STAR_LEAVES clusters point at
    and SMALL_STAR_SLACK of it for a smaller one.
    """
    delta = 0.2
    X = _heavy_tailed(3000, dim=16, seed=2)
    monkeypatch.setattr(hac_rac, "STARS_FROM_ROUND", 0)  # this pool merges within the round budget
    # Stars of this small pool have 16-30 leaves: with 18 making a star deep, both kinds grow.
    monkeypatch.setattr(hac_rac, "DEEP_STAR_LEAVES", 18)
    cos = metric == "cosine"
    merge, absorb = hac_rac.Rac._merge, hac_rac.Rac._absorb
    beyond_pair = {True: [], False: []}  # deep star or not -> whether each leaf joined above (1 + slack) x pair

    def snapshot(self, a, b):
        self.before_merge = (self.S.copy(), self.cnt.copy(), None if cos else self.W.copy())
        merge(self, a, b)

    def linkage(S, n, W, S_other, n_other, W_other):
        mu, mu_other = S / n, S_other / n_other[:, None]
        if cos:
            return 1.0 - mu_other @ mu
        return ((mu_other - mu) ** 2).sum(axis=1) + W / n + W_other / n_other

    def joined(S, n, W, S_leaf, n_leaf, W_leaf):
        if cos:
            return S + S_leaf, n + n_leaf, None
        gap = ((S / n - S_leaf / n_leaf) ** 2).sum()
        return S + S_leaf, n + n_leaf, W + W_leaf + n * n_leaf / (n + n_leaf) * gap

    def checking(self, a, b, act, nn, nd, parent):
        before = len(self.heights)
        leaf, centre = absorb(self, a, b, act, nn, nd, parent)
        if len(self.heights) == before:
            return leaf, centre
        S0, n0, W0 = self.before_merge
        Wr = None if cos else W0[act]
        heights = self.heights[-1]
        for c in np.unique(centre).tolist():
            partner = b[np.searchsorted(a, c)]
            mine = np.flatnonzero(centre == c)
            S, n, W = joined(S0[c], n0[c], None if cos else W0[c], S0[partner], n0[partner],
                             None if cos else W0[partner])
            pair = float(nd[c])
            inside = {c, partner}
            pointing = int(np.isin(nn[act], [c, partner]).sum()) - 2  # the pair point at each other
            deep = pointing >= hac_rac.DEEP_STAR_LEAVES
            slack = delta if deep else delta * hac_rac.SMALL_STAR_SLACK
            for j in mine.tolist():
                ell = int(leaf[j])
                others = np.array([x not in inside for x in act.tolist()])
                grown_best = linkage(S, n, W, S0[act[others]], n0[act[others]],
                                     None if cos else Wr[others]).min()
                not_self = act != ell
                leaf_best = linkage(S0[ell], n0[ell], None if cos else W0[ell], S0[act[not_self]],
                                    n0[act[not_self]], None if cos else Wr[not_self]).min()
                height = heights[j]
                assert height <= eps + 1e-12
                assert height <= (1 + slack) * min(grown_best, leaf_best) * (1 + 1e-9) + 1e-12
                beyond_pair[deep].append(height > (1 + slack) * pair)
                S, n, W = joined(S, n, W, S0[ell], n0[ell], None if cos else W0[ell])
                inside.add(ell)
        return leaf, centre

    monkeypatch.setattr(hac_rac.Rac, "_merge", snapshot)
    monkeypatch.setattr(hac_rac.Rac, "_absorb", checking)
    average_linkage(X, eps, metric, delta=delta)
    assert beyond_pair[True] and beyond_pair[False], "deep and small stars both grew"
    assert any(beyond_pair[True]), "no leaf joined beyond (1 + delta) x its pair's linkage: the bound is only the pair's"


@pytest.mark.parametrize("delta", [-0.1, float("nan"), float("inf"), "x", True])
def test_bad_delta(delta):
    with pytest.raises(HacError, match="delta"):
        average_linkage(np.eye(3), 0.5, "cosine", delta=delta)


def test_labels_from_edges_in_any_orientation():
    from clusmar_beam.core.hac import labels_from_edges
    # the same row a child of two edges (a star whose centre is not its lowest row)
    edges = np.array([[5, 1], [5, 3], [5, 0], [2, 4]])
    assert labels_from_edges(7, edges).tolist() == [0, 0, 1, 0, 1, 0, 2]
    assert labels_from_edges(3, np.zeros((0, 2))).tolist() == [0, 1, 2]


def test_crowded_lists_are_split():
    """k-means puts one list at a dense core; the split leaves no list far above the mean."""
    rng = np.random.default_rng(0)
    core = (np.ones(16) + rng.standard_normal((6000, 16)) * np.exp(rng.normal(0, 0.7, (6000, 1))) * 0.05)
    rest = rng.standard_normal((6000, 16))
    train = np.concatenate([core, rest]).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    centroids = cells.train_centroids(train, 64, 0, niter=5)
    split = hac_index.split_crowded_lists(centroids, train, 0)

    def crowding(c):
        count = np.bincount(cells.probe_cells(c, train, 1)[:, 0], minlength=c.shape[0])
        return count.max() / count.mean()

    assert crowding(centroids) > 6
    assert crowding(split) < crowding(centroids) / 2
    assert split.shape[0] > centroids.shape[0]


def _probing(X, metric, **kwargs):
    """The IVF index's probing choice for X, and the result of average linkage with it."""
    result = average_linkage(X, kwargs.pop("eps", 1e-9), metric, exact_search_max=1000, **kwargs)
    return result.probing, result


@pytest.mark.parametrize("metric, eps", [("cosine", 0.3), ("sqeuclidean", 0.6)])
def test_low_dimensional_dense_regions_are_probed_per_query(metric, eps):
    """At 12-d the lists nearest a query's list miss its neighbours; the lists nearest the query find them."""
    X = _heavy_tailed(8000, dim=12, seed=1)
    probing, got = _probing(X, metric, eps=eps, delta=0.0)
    assert probing["per_query"], probing
    assert probing["per_query_misses"] < probing["per_list_misses"] / 4, probing
    ref = fcluster(_reference(X, metric), eps, "distance")
    assert adjusted_rand_score(ref, got.labels) >= 0.999


def test_higher_dimensional_pools_keep_the_per_list_search():
    """At 64-d per-query probes recover a minority of the block search's misses: not worth their cost."""
    probing, _ = _probing(_heavy_tailed(20000, dim=64, seed=4), "cosine")
    assert not probing["per_query"], probing
    nprobe, per_list, _ = probing["levels"][0]   # at the default nprobe
    assert nprobe == 32 and per_list > 0.01 * probing["sample"], probing
    # ... which missed too many: the lists probed doubled, and the misses fell
    assert probing["nprobe"] > 32 and probing["per_list_misses"] < per_list, probing
    assert [level[0] for level in probing["levels"]] == [32 << i for i in range(len(probing["levels"]))]


def test_one_workers_per_query_probes_widen_within_the_pools_budget(monkeypatch):
    """On a low-dimensional dense region a miss share under 1% still moves the cut: one worker's per-query
    probes double past WIDEN_ROWS_MAX until they miss at most _WIDEN_MISSES_PER_QUERY of the sample, as far as
    the pool's budget (widen_rows_max) allows."""
    X = _heavy_tailed(20000, dim=16, seed=3)
    monkeypatch.setattr(hac_index, "WIDEN_ROWS_MAX", 80)   # a search at nprobe 16 would scan more
    monkeypatch.setattr(hac_index, "WIDEN_WORK_MAX", 0)
    held, _ = _probing(X, "cosine", eps=0.3, nprobe=8)
    assert held["per_query"] and held["nprobe"] == 8, held
    assert held["per_query_misses"] > 0.01 * held["sample"], held
    monkeypatch.setattr(hac_index, "WIDEN_WORK_MAX", 1 << 33)
    widened, _ = _probing(X, "cosine", eps=0.3, nprobe=8)
    assert widened["per_query"] and widened["nprobe"] > 8, widened
    assert widened["per_query_misses"] <= hac_index._WIDEN_MISSES_PER_QUERY * widened["sample"], widened
    assert [level[0] for level in widened["levels"]] == [8 << i for i in range(len(widened["levels"]))]


def test_probes_widen_only_while_a_search_stays_small(monkeypatch):
    from clusmar_beam.core.hac import index
    X = _heavy_tailed(20000, dim=64, seed=4)
    monkeypatch.setattr(index, "WIDEN_ROWS_MAX", 1000)   # a search at nprobe 64 would scan more
    probing, _ = _probing(X, "cosine")
    assert probing["nprobe"] == 32 and len(probing["levels"]) == 1, probing
    monkeypatch.setattr(index, "WIDEN_WORK_MAX", 10**9 * len(X))   # the block search does not take this budget
    probing, _ = _probing(X, "cosine")
    assert not probing["per_query"] and probing["nprobe"] == 32, probing
    monkeypatch.setattr(index, "_WIDEN_MISSES", 1.0)     # nothing missed counts as too many
    monkeypatch.setattr(index, "WIDEN_ROWS_MAX", 10**9)
    probing, _ = _probing(X, "cosine")
    assert probing["nprobe"] == 32 and len(probing["levels"]) == 1, probing

"""Sharded average-linkage HAC (clusmar_beam.transforms.sharded_hac): quality against exact average linkage,
the same answer whatever the number of shards, the Beam transforms and `clusmar cluster --hac-shards`."""
import glob
import json
import math
import os

import apache_beam as beam
import fastcluster
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.app import cli
from clusmar_beam.core import hac
from clusmar_beam.core.hac import HacError, sharded, threshold as hac_threshold
from clusmar_beam.transforms import sharded_hac, storage


def _threshold(Z, quantile):
    heights = np.unique(Z[:, 2])
    i = int(quantile * (heights.size - 1))
    return float((heights[i] + heights[i + 1]) / 2)


def _diffuse_and_bursts(n=5000, d=16, seed=0):
    """Large diffuse groups plus near-duplicate bursts, like web data."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(30, d))
    x = centers[rng.integers(0, 30, n)] + 0.6 * rng.normal(size=(n, d))
    burst = rng.choice(n, size=n // 6, replace=False)
    x[burst] = x[rng.choice(burst[:40], size=burst.size)] + 1e-3 * rng.normal(size=(burst.size, d))
    return x


DATASETS = {
    "digits": lambda: load_digits().data,
    "breast_cancer": lambda: (lambda x: (x - x.mean(0)) / x.std(0))(load_breast_cancer().data),
    "wine": lambda: (lambda x: (x - x.mean(0)) / x.std(0))(load_wine().data),
    "diabetes": lambda: load_diabetes().data,
    "diffuse_bursts": lambda: _diffuse_and_bursts(2500, seed=5),
}
# Partitions of the small sets: a few dozen points at least (their halo widens to every cell:
# test_small_partitions_see_past_two_cells).
SHARDS = {"wine": 5, "diabetes": 8}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_matches_exact_average_linkage(name, metric):
    X = DATASETS[name]()
    if metric == "cosine":
        Z = fastcluster.linkage(X / np.linalg.norm(X, axis=1, keepdims=True), "average", metric="cosine")
    else:
        Z = fastcluster.linkage(X, "average", metric="sqeuclidean")
    shards = SHARDS.get(name, 16)
    size = -(-len(X) // shards)
    for quantile in (0.5, 0.9):
        eps = _threshold(Z, quantile)
        labels, info = sharded.sharded_average_linkage(X, eps, metric, shards=shards)
        assert adjusted_rand_score(fcluster(Z, eps, "distance"), labels) >= 0.99, (name, metric, quantile)
        assert info["rounds"][0]["parts"] == -(-len(X) // size)
        assert info["waiting"] == 0   # the rounds ended with nothing left across a border


def test_small_partitions_see_past_two_cells():
    """A member whose nearest cluster lies beyond its partition's halo merges with the nearest one it sees.
    Small partitions are mostly border, so their halo widens (halo_width): on the diabetes set at its 0.95 cut,
    8 partitions kept apart to the end, two cells moved the clusters far from exact; the widened halo does not."""
    X = load_diabetes().data
    Z = fastcluster.linkage(X, "average", metric="sqeuclidean")
    eps = _threshold(Z, 0.95)
    exact = fcluster(Z, eps, "distance")
    kept_apart = {"shards": 8, "one_worker_clusters": 8, "delta": hac.DEFAULT_DELTA}
    widened, _ = sharded.sharded_average_linkage(X, eps, "sqeuclidean", **kept_apart)
    two_cells, _ = sharded.sharded_average_linkage(X, eps, "sqeuclidean", halo_rows=0, **kept_apart)
    assert adjusted_rand_score(exact, widened) >= 0.99
    assert adjusted_rand_score(exact, two_cells) < 0.9


def test_halo_width():
    plan = {"parts": 6400, "clusters": 100_000_000}  # a 100M pool's partitions keep the cells asked for
    assert sharded.halo_width(plan, 2) == 2 and sharded.halo_width(plan, 3) == 3
    assert sharded.halo_width({"parts": 64, "clusters": 1_000_000}, 2) == 2
    # smaller partitions see as many cells as make a partition with its halo about HALO_ROWS clusters ...
    assert sharded.halo_width({"parts": 8, "clusters": 40_000}, 2) == sharded.HALO_ROWS * 8 // 40_000 - 1
    # ... while the round routes at most HALO_ROUTED_MAX copies of clusters ...
    assert sharded.halo_width({"parts": 64, "clusters": 100_000}, 2) == sharded.HALO_ROUTED_MAX // 100_000 - 1
    assert sharded.halo_width({"parts": 64, "clusters": 200_000}, 2) == 2
    # ... every other cell where there are few, at most HALO_CELLS_MAX of them, and none for one partition
    assert sharded.halo_width({"parts": 4, "clusters": 20_000}, 2) == 3
    assert sharded.halo_width({"parts": 64, "clusters": 30_000}, 2) == sharded.HALO_CELLS_MAX
    assert sharded.halo_width({"parts": 64, "clusters": 30_000}, 2, halo_rows=0) == 2
    assert sharded.halo_width({"parts": 1, "clusters": 30_000}, 2) == 0


@pytest.mark.parametrize("metric,eps", [("cosine", 0.08), ("cosine", 0.3), ("sqeuclidean", 1.5),
                                        ("sqeuclidean", 6.0)])
def test_same_clusters_with_1_and_64_shards(metric, eps):
    X = _diffuse_and_bursts()
    one, _ = sharded.sharded_average_linkage(X, eps, metric, shards=1)
    many, info = sharded.sharded_average_linkage(X, eps, metric, shards=64)
    assert adjusted_rand_score(one, many) >= 0.99
    assert np.array_equal(one, hac.average_linkage(X, eps, metric).labels)   # 1 shard = single-machine RAC
    parts = [r["parts"] for r in info["rounds"]]
    assert parts[0] == 64 and parts == sorted(parts, reverse=True)  # fewer clusters, fewer partitions
    assert sum(r["merges"] for r in info["rounds"]) == len(X) - info["num_clusters"]
    assert info["rounds"][0]["merges"] > 0                                     # the partitions did real work
    assert info["waiting"] == 0


def test_rounds_follow_the_clusters_left(monkeypatch):
    """A partition holds about n / shards clusters; rounds repeat while members wait across a border, with
    only those members and the clusters they wait on; once those are few (FINISH_ON_ONE_WORKER) a repeat is
    one exact RAC on all of them."""
    X = _diffuse_and_bursts(2000, seed=4)
    exact = hac.average_linkage(X, 0.3, "cosine").labels
    monkeypatch.setattr(sharded, "FINISH_ON_ONE_WORKER", 0)   # partitions to the end
    labels, info = sharded.sharded_average_linkage(X, 0.3, "cosine", shards=16, max_rounds=30)
    size, left, waiting = -(-len(X) // 16), len(X), None
    for r in info["rounds"]:
        assert r["parts"] == -(-r["clusters"] // size)
        # the first round and a stalled repeat take every cluster; a repeat otherwise the waiting and their targets
        assert r["clusters"] == left or waiting <= r["clusters"] <= 2 * waiting
        left, waiting = r["clusters_left"], r["waiting"]
    assert len(info["rounds"]) > 2 and info["waiting"] == 0
    assert adjusted_rand_score(labels, exact) >= 0.99
    monkeypatch.undo()
    labels, info = sharded.sharded_average_linkage(X, 0.3, "cosine", shards=16)
    assert [r["parts"] for r in info["rounds"]] == [16, 1] and info["waiting"] == 0
    assert adjusted_rand_score(labels, exact) >= 0.99
    _, short = sharded.sharded_average_linkage(X, 0.3, "cosine", shards=16, max_rounds=1)
    assert len(short["rounds"]) == 1 and short["waiting"] > 0   # reported, not hidden


def test_repeats_take_the_few_while_they_converge():
    """A repeat takes the members that waited and the clusters they waited on while the waiting members at
    least halve a round; once they do not, every cluster takes part, from then on."""
    first = sharded.next_round(None, 100_000, 0, 100_000, 16, 0.3, one_worker=1000)
    assert first["parts"] == 16 and not first["repeat"] and first["clusters"] == 100_000
    second = sharded.next_round(first, 60_000, 30_000, 100_000, 16, 0.3, routed=31_000, one_worker=1000)
    assert second["repeat"] and second["clusters"] == 31_000 and second["parts"] == 5
    third = sharded.next_round(second, 50_000, 14_000, 100_000, 16, 0.3, routed=14_500, one_worker=1000)
    assert third["repeat"] and third["clusters"] == 14_500 and not third["stalled"]
    fourth = sharded.next_round(third, 45_000, 9_000, 100_000, 16, 0.3, routed=9_300, one_worker=1000)
    assert not fourth["repeat"] and fourth["clusters"] == 45_000 and fourth["stalled"] and fourth["parts"] == 8
    fifth = sharded.next_round(fourth, 44_000, 1_000, 100_000, 16, 0.3, routed=1_100, one_worker=1000)
    assert not fifth["repeat"] and fifth["clusters"] == 44_000
    # stalled partitions grow to what one worker takes: fewer borders for a threshold that reaches across many
    larger = sharded.next_round(third, 45_000, 9_000, 100_000, 16, 0.3, routed=9_300, one_worker=20_000)
    assert larger["stalled"] and larger["parts"] == 3 and larger["clusters"] == 45_000
    # few enough clusters left: all of them on one worker; none waiting: done
    last = sharded.next_round(fifth, 900, 10, 100_000, 16, 0.3, routed=20, one_worker=1000)
    assert last["parts"] == 1 and not last["repeat"] and last["clusters"] == 900
    assert sharded.next_round(last, 890, 0, 100_000, 16, 0.3, one_worker=1000)["parts"] == 0


def test_frozen_neighbours_block_merges():
    # a - b are close, c is frozen and nearer to a than b is: a must not merge with b
    X = np.array([[0.0, 0.0], [1.0, 0.0], [-0.5, 0.0]])
    members = sharded.initial_clusters(X[:2])
    frozen = sharded.initial_clusters(X[2:], np.array([2]))
    out, edges, _, _, waiting, targets = sharded.rac_on_clusters(members, 5.0, "sqeuclidean", frozen)
    assert len(out) == 2 and len(edges) == 0 and waiting == 2 and targets.tolist() == [2]
    out, edges, _, _, waiting, targets = sharded.rac_on_clusters(members, 5.0, "sqeuclidean", None)
    assert len(out) == 1 and edges.tolist() == [[0, 1]] and waiting == 0 and targets.size == 0


def test_a_partition_waits_only_on_frozen_clusters_and_routes_to_a_cluster():
    """Once the RAC has compacted its arrays (most members retired), the clusters reported as waited on are still
    frozen ones, and each waiting member is routed by the mean of a cluster (the lower-id one of it and what it
    waits on)."""
    x = hac.prepare(_diffuse_and_bursts(3000, 16, seed=0), "cosine")
    order = np.random.default_rng(0).permutation(3000)
    members = sharded.initial_clusters(x[order[:2000]], order[:2000])
    frozen_rows = np.sort(order[2000:])
    frozen = sharded.initial_clusters(x[frozen_rows], frozen_rows)
    out, edges, _, _, waiting, targets = sharded.rac_on_clusters(members, 0.05, "cosine", frozen, delta=0.02)
    assert len(edges) > 100 and waiting > 100 and targets.size > 50
    assert np.isin(targets, frozen.ids).all()
    routed = np.flatnonzero(out.routed())
    assert routed.size == waiting
    # each goes where a merged member's mean is, or a frozen cluster waited on is
    means_of = {m.tobytes(): i for i, m in enumerate(out.means().astype(np.float32))}
    frozen_of = {x[r].astype(np.float32).tobytes(): r for r in frozen_rows}
    to_member = np.array([out.route[i].tobytes() in means_of for i in routed])
    to_frozen = np.array([frozen_of.get(out.route[i].tobytes(), -1) for i in routed[~to_member]])
    assert np.isin(to_frozen, targets).all() and to_member.any() and to_frozen.size


def test_clusters_waited_on_are_marked_under_their_id_after_the_round():
    """A member of another partition waited on cluster 3, which merged into cluster 0 in its own partition:
    cluster 0 takes part in the next repeat, routed by its own mean; a route already set stays."""
    out = sharded.Clusters(np.array([0, 5, 9]), np.array([2.0, 2.0, 1.0]), np.array([[2.0, 4.0], [6.0, 0.0], [1.0, 1.0]]),
                           np.zeros(3))
    out.route = np.array([[np.nan, np.nan], [7.0, 7.0], [np.nan, np.nan]], np.float32)
    marked = sharded.mark_waited_on(out, np.array([[0, 3], [5, 7]]), np.array([3, 7]))
    assert marked.routed().tolist() == [True, True, False]
    assert marked.route[:2].tolist() == [[1.0, 2.0], [7.0, 7.0]]
    plan = {"repeat": True}
    assert sharded.taking_part(marked, plan).tolist() == [True, True, False]
    assert sharded.taking_part(marked, {"repeat": False}).all()


def _beam_result(tmp_path, X, eps, metric, shards, batch_rows, **kwargs):
    """The ShardedHac transform's summary and labels, run on DirectRunner over batches of `batch_rows`."""
    rows = np.arange(len(X))
    labels_file, summary_file = tmp_path / "labels.npz", tmp_path / "summary.json"
    with beam.Pipeline() as p:
        result = (p | beam.Create([(rows[s:s + batch_rows], X[s:s + batch_rows])
                                   for s in range(0, len(X), batch_rows)], reshuffle=False)
                  | sharded_hac.ShardedHac(eps, metric, shards=shards, **kwargs))
        _ = (result["labels"] | beam.combiners.ToList()
             | beam.Map(lambda parts: np.savez(labels_file, rows=np.concatenate([r for r, _ in parts]),
                                               labels=np.concatenate([l for _, l in parts]))))
        _ = result["summary"] | beam.Map(lambda summary: summary_file.write_text(json.dumps(summary)))
    got = np.load(labels_file)
    labels = np.full(len(X), -1)
    labels[got["rows"]] = got["labels"]
    assert np.sort(got["rows"]).tolist() == rows.tolist()   # every row exactly once
    return {**json.loads(summary_file.read_text()), "labels": labels}


def _beam_labels(tmp_path, X, eps, metric, shards, batch_rows, **kwargs):
    return _beam_result(tmp_path, X, eps, metric, shards, batch_rows, **kwargs)["labels"]


def test_beam_transform_matches_in_process_rounds(tmp_path, monkeypatch):
    X = _diffuse_and_bursts(3000, seed=2).astype(np.float32)
    labels = _beam_labels(tmp_path, X, 0.25, "cosine", shards=32, batch_rows=700)
    expected, _ = sharded.sharded_average_linkage(X, 0.25, "cosine", shards=32)
    assert np.array_equal(labels, expected)
    exact = hac.average_linkage(X, 0.25, "cosine").labels
    assert adjusted_rand_score(labels, exact) >= 0.99
    # partitions to the end: repeats take only the members that waited and the clusters they waited on
    monkeypatch.setattr(sharded, "FINISH_ON_ONE_WORKER", 0)
    result = _beam_result(tmp_path, X, 0.25, "cosine", shards=32, batch_rows=700)
    expected, info = sharded.sharded_average_linkage(X, 0.25, "cosine", shards=32)
    assert np.array_equal(result["labels"], expected)
    keys = ("clusters", "parts", "merges", "waiting")
    assert [[r[k] for k in keys] for r in result["sharded_rounds"]] == [[r[k] for k in keys] for r in info["rounds"]]
    repeats = [(r["clusters"], before["clusters_left"]) for before, r in zip(info["rounds"], info["rounds"][1:])]
    assert len(repeats) >= 2 and all(taking < left for taking, left in repeats)
    assert adjusted_rand_score(result["labels"], exact) >= 0.99


@pytest.mark.parametrize("metric,eps", [("cosine", 0.3), ("sqeuclidean", 0.6)])
def test_approximate_merges_in_partitions_on_a_heavy_tailed_pool(tmp_path, metric, eps):
    """Partitions and the last round merge (1+delta)-good stars too: close to exact, far fewer rounds."""
    from clusmar_beam.core import synthetic
    X = synthetic.generate_rows(synthetic.make_plan(6000, 24, 5, 3, region_sizes="heavy-tailed"), 0, 6000)["embedding"]
    result = _beam_result(tmp_path, X, eps, metric, shards=16, batch_rows=1500, delta=0.05)
    labels = result["labels"]
    expected, info = sharded.sharded_average_linkage(X, eps, metric, shards=16, delta=0.05)
    assert np.array_equal(labels, expected)
    # the same rounds, partitions and merges in process and as Beam transforms
    assert result["rounds"] == info["merge_rounds"]
    assert [(r["parts"], r["merges"]) for r in result["sharded_rounds"]] == [
        (r["parts"], r["merges"]) for r in info["rounds"]]
    exact = fcluster(fastcluster.linkage(np.asarray(X, np.float64), "average", metric=metric), eps, "distance")
    assert adjusted_rand_score(exact, labels) >= 0.98
    assert adjusted_rand_score(exact, hac.average_linkage(X, eps, metric, delta=0.05).labels) >= 0.99


def test_beam_transform_without_halo_and_on_one_point(tmp_path):
    X = _diffuse_and_bursts(600, seed=7).astype(np.float32)
    labels = _beam_labels(tmp_path, X, 0.25, "cosine", shards=8, batch_rows=200, halo_cells=0)
    expected, _ = sharded.sharded_average_linkage(X, 0.25, "cosine", shards=8, halo_cells=0)
    assert np.array_equal(labels, expected)
    assert _beam_labels(tmp_path, X[:1], 0.25, "cosine", shards=8, batch_rows=1).tolist() == [0]


def test_clusters_leave_the_rounds_once_nothing_is_left_to_merge(monkeypatch):
    """The round that finds nothing left to merge passes its clusters to the result; the rounds after it
    (there are always max_rounds in the graph) see none."""
    monkeypatch.setattr(sharded, "FINISH_ON_ONE_WORKER", 0)   # partitions to the end
    X = _diffuse_and_bursts(600, seed=7).astype(np.float32)
    p = beam.Pipeline()
    _ = (p | beam.Create([(np.arange(300), X[:300]), (np.arange(300, 600), X[300:])], reshuffle=False)
         | sharded_hac.ShardedHac(0.25, "cosine", shards=8, max_rounds=8))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("hac"))["counters"]}
    merging = [r for r in range(1, 9) if counters.get(f"partitions_round_{r}", 0)]
    assert merging == list(range(1, len(merging) + 1)) and len(merging) < 7
    reached = [counters.get(f"clusters_round_{r}", 0) for r in range(1, 9)]
    assert reached[0] == 600 and all(reached[:len(merging) + 1])
    assert reached[len(merging) + 1:] == [0] * (7 - len(merging))
    # a round that repeats the threshold routes only the members that waited and the clusters they waited on
    routed = [counters.get(f"routed_round_{r}", 0) for r in range(1, 9)]
    assert routed[0] == 600 and len(merging) >= 2
    assert all(0 < routed[r] < reached[r] for r in range(1, len(merging)))
    assert routed[len(merging):] == [0] * (8 - len(merging))


@pytest.mark.parametrize("kwargs", [{"shards": 0}, {"halo_cells": -1}, {"max_rounds": 0}, {"max_rounds": 1.5},
                                    {"one_worker_clusters": 0}])
def test_bad_parameters(kwargs):
    with pytest.raises(HacError):
        sharded.sharded_average_linkage(np.eye(4), 0.5, "cosine", **kwargs)
    with pytest.raises(HacError):
        sharded_hac.ShardedHac(0.5, "cosine", **kwargs)


@pytest.mark.parametrize("eps", [0, -1, float("nan")])
def test_bad_threshold(eps):
    with pytest.raises(HacError):
        sharded.sharded_average_linkage(np.eye(4), eps, "cosine")


def test_identical_and_single_points():
    labels, _ = sharded.sharded_average_linkage(np.ones((40, 3)), 0.1, "cosine", shards=8)
    assert labels.tolist() == [0] * 40
    labels, _ = sharded.sharded_average_linkage(np.ones((1, 3)), 0.1, "sqeuclidean", shards=8)
    assert labels.tolist() == [0]


def _files(directory):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(directory, "clusters-*")))}


def test_cli_hac_shards_gives_the_same_files(tmp_path):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "4000", "--dim", "16",
                     "--num-classes", "5", "--seed", "7", "--num-shards", "3"]) == 0
    pool = str(tmp_path / "pool" / "pool-*.parquet")
    for name, flags in (("one", []), ("many", ["--hac-shards", "64"]),
                        ("many2", ["--hac-shards", "64", "--direct_num_workers=2",
                                   "--direct_running_mode=multi_processing"])):
        assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / name), "--distance-threshold", "0.2",
                         "--num-shards", "2", *flags]) == 0
    assert _files(tmp_path / "one") == _files(tmp_path / "many") == _files(tmp_path / "many2")
    info = json.load(open(tmp_path / "many" / "clustering.json"))
    assert info["parameters"]["hac_shards"] == 64 and info["num_points"] == 4000


def test_cli_hac_shards_with_text_ids_and_bad_input(tmp_path, rng, capsys):
    from conftest import write_parquet
    x = rng.normal(size=(300, 4)).astype(np.float32)
    ids = np.array([f"u{i:04d}".encode() for i in rng.permutation(300)], dtype=object)
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": ids, "embedding": x})
    pool = str(tmp_path / "pool" / "*")
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "a"), "--distance-threshold", "0.3"]) == 0
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "b"), "--distance-threshold", "0.3",
                     "--hac-shards", "8"]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    for flags, fragment in ((["--hac-shards", "0"], "--hac-shards"), (["--max-rounds", "0"], "--max-rounds"),
                            (["--hac-shards", "4", "--target-mean-cluster-size", "0"], "--target-mean-cluster-size")):
        code = cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "c"), *flags]
                        + ([] if "--target-mean-cluster-size" in flags else ["--distance-threshold", "0.3"]))
        assert code == 2 and fragment in capsys.readouterr().err
    x[[4, 9]] = 0
    write_parquet(str(tmp_path / "pool2" / "p.parquet"), {"id": np.arange(300), "embedding": x})
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool2" / "*"), "--output", str(tmp_path / "z"),
                     "--distance-threshold", "0.3", "--hac-shards", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "2 of" in err and "zero norm" in err


def test_beam_transform_sqeuclidean_across_batches(tmp_path):
    X = (_diffuse_and_bursts(2000, seed=3) + 5.0).astype(np.float32)   # an offset: batches must share one origin
    labels = _beam_labels(tmp_path, X, 3.0, "sqeuclidean", shards=16, batch_rows=300)
    assert adjusted_rand_score(labels, hac.average_linkage(X, 3.0, "sqeuclidean").labels) >= 0.99


def test_beam_transform_sqeuclidean_far_from_the_origin(tmp_path):
    """Pool rows arrive uncentred; a partition's FAISS search in float32 must not see the offset."""
    rng = np.random.default_rng(12)
    centres = 3 * rng.normal(size=(40, 5))
    X = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.normal(size=(3000, 5)) + 1000.0).astype(np.float32)
    exact = fastcluster.linkage(np.asarray(X, np.float64), "average", metric="sqeuclidean")
    for quantile in (0.5, 0.9):
        eps = _threshold(exact, quantile)
        labels = _beam_labels(tmp_path, X, eps, "sqeuclidean", shards=8, batch_rows=500)
        assert adjusted_rand_score(fcluster(exact, eps, "distance"), labels) >= 0.99, quantile


def test_partitions_of_an_uncentred_pool_keep_neighbours_together(tmp_path):
    """k-means and routing work about a mean: far from the origin, float32 distances lose the pool's detail.

    (At this size the old routing passed too; a 20K pool of 40 Pareto-sized 64-d regions offset by 1,000
    waited 12,816 of 20,000 members after round 1 with it, 8 now: docs/perf-log.md, issue 20, sixth session.)"""
    rng = np.random.default_rng(3)
    X = (2 * rng.normal(size=(10, 64))[rng.integers(0, 10, 3000)] + 0.1 * rng.normal(size=(3000, 64))).astype(np.float32)
    centred = _beam_result(tmp_path, X, 2.0, "sqeuclidean", shards=8, batch_rows=500)
    far = _beam_result(tmp_path, X + np.float32(1000), 2.0, "sqeuclidean", shards=8, batch_rows=500)
    waiting = [r["sharded_rounds"][0]["waiting"] for r in (centred, far)]
    assert waiting[1] <= 2 * waiting[0] + 30, waiting
    assert adjusted_rand_score(centred["labels"], far["labels"]) >= 0.99


def _beam_choice(tmp_path, X, target, metric, batch_rows, **kwargs):
    """The ThresholdChoice of the ThresholdFromTarget transform over batches of `batch_rows`, in reverse order."""
    rows = np.arange(len(X))
    starts = list(range(0, len(X), batch_rows))[::-1]
    out = tmp_path / "choice.json"
    with beam.Pipeline() as p:
        _ = (p | beam.Create([(rows[s:s + batch_rows], X[s:s + batch_rows]) for s in starts], reshuffle=False)
             | sharded_hac.ThresholdFromTarget(target, metric, **kwargs)
             | beam.Map(lambda c: out.write_text(json.dumps(c.as_dict()))))
    return hac.ThresholdChoice(**json.loads(out.read_text()))


@pytest.mark.parametrize("metric,batch_rows,offset,flat_cells_max", [
    ("cosine", 700, 0.0, 1024), ("sqeuclidean", 450, 5.0, 1024),
    ("cosine", 700, 0.0, 8)])  # 16 cells behind a two-level quantiser, as above 1024 cells
def test_threshold_transform_matches_choose_threshold(tmp_path, metric, batch_rows, offset, flat_cells_max,
                                                      monkeypatch):
    monkeypatch.setattr(hac_threshold, "_FLAT_SAMPLE_CELLS_MAX", flat_cells_max)
    X = (_diffuse_and_bursts(4000, seed=4) + offset).astype(np.float32)
    choice = _beam_choice(tmp_path, X, 8, metric, batch_rows, sample_size=1000, seed=3)
    assert choice == hac.choose_threshold(X, metric, 8, sample_size=1000, seed=3)   # equal floats
    assert choice.sample_cells >= 2 and choice.sample_points_with_margin > choice.sample_points


def test_threshold_transform_on_a_small_pool_takes_every_row(tmp_path):
    X = _diffuse_and_bursts(300, seed=6).astype(np.float32)
    choice = _beam_choice(tmp_path, X, 5, "cosine", 64, sample_size=1000)
    assert choice == hac.choose_threshold(X, "cosine", 5, sample_size=1000)
    assert choice.sample_points == 300 and choice.num_cells == 1


def test_threshold_transform_bad_parameters():
    with pytest.raises(HacError, match="target mean cluster size"):
        sharded_hac.ThresholdFromTarget(0.5)
    with pytest.raises(HacError):
        sharded_hac.ThresholdFromTarget(5, "l1")
    with pytest.raises(HacError):
        sharded_hac.ThresholdFromTarget(5, sample_size=0)


def test_cli_target_mean_cluster_size_with_hac_shards(tmp_path):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "4000", "--dim", "16",
                     "--num-classes", "5", "--seed", "7", "--num-shards", "3"]) == 0
    pool = str(tmp_path / "pool" / "pool-*.parquet")
    infos = {}
    for name, flags in (("one", []), ("many", ["--hac-shards", "8", "--direct_num_workers=2",
                                               "--direct_running_mode=multi_processing"])):
        assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / name), "--target-mean-cluster-size",
                         "10", "--threshold-sample-size", "2000", *flags]) == 0
        infos[name] = json.load(open(tmp_path / name / "clustering.json"))
    one, many = infos["one"]["parameters"], infos["many"]["parameters"]
    assert many["hac_shards"] == 8 and many["target_mean_cluster_size"] == 10
    sample = ("distance_threshold", "merge_threshold", "sample_points_with_margin", "sample_cells")
    for key in sample:   # the same sample and the same estimates, to the bit
        assert many["threshold_choice"][key] == one["threshold_choice"][key]
    assert many["threshold_choice"]["sample_cells"] >= 2
    for info in infos.values():   # both cut where the mean size reaches the target
        assert info["mean_cluster_size"] == pytest.approx(10, rel=0.01)
        assert info["parameters"]["distance_threshold"] <= info["parameters"]["threshold_choice"]["merged_up_to"]
    assert many["distance_threshold"] == pytest.approx(one["distance_threshold"], rel=0.02)


@pytest.mark.parametrize("metric,first", [("cosine", 0.01), ("cosine", 0.6), ("sqeuclidean", 0.05),
                                          ("sqeuclidean", 40.0)])
def test_sharded_cut_at_a_target_matches_exact_average_linkage(tmp_path, metric, first):
    """Merging from a first threshold far below or above the target's, then cutting at the target:
    in process and as Beam transforms, the clusters of exact average linkage at the cut."""
    X = _diffuse_and_bursts(2500, seed=8)
    Z = fastcluster.linkage(X / np.linalg.norm(X, axis=1, keepdims=True) if metric == "cosine" else X, "average",
                            metric=metric)
    labels, info = sharded.sharded_average_linkage(X, first, metric, target_mean_cluster_size=12, shards=16)
    assert len(labels) / (labels.max() + 1) == pytest.approx(12, rel=0.01)
    assert info["merged_up_to"] >= info["distance_threshold"]
    assert adjusted_rand_score(fcluster(Z, info["distance_threshold"], "distance"), labels) >= 0.99
    result = _beam_result(tmp_path, X.astype(np.float32), first, metric, shards=16, batch_rows=600,
                          target_mean_cluster_size=12)
    assert len(X) / (result["labels"].max() + 1) == pytest.approx(12, rel=0.01)
    assert result["merged_up_to"] >= result["distance_threshold"]
    assert adjusted_rand_score(fcluster(Z, result["distance_threshold"], "distance"), result["labels"]) >= 0.99


@pytest.mark.parametrize("metric,eps,merge_eps", [("cosine", 0.1, 0.4), ("sqeuclidean", 0.5, 2.0)])
def test_partitions_merge_up_to_the_lower_threshold_and_the_last_round_past_it(tmp_path, metric, eps, merge_eps):
    X = _diffuse_and_bursts(2500, seed=9)
    labels, info = sharded.sharded_average_linkage(X, eps, metric, target_mean_cluster_size=12,
                                                       merge_threshold=merge_eps, shards=16)
    assert info["merged_up_to"] >= merge_eps > eps and len(X) / (labels.max() + 1) == pytest.approx(12, rel=0.01)
    _, at_eps = sharded.sharded_average_linkage(X, eps, metric, shards=16)
    assert info["rounds"][0]["merges"] == at_eps["rounds"][0]["merges"]   # the partitions stop at eps
    result = _beam_result(tmp_path, X, eps, metric, shards=16, batch_rows=600, target_mean_cluster_size=12,
                          merge_threshold=merge_eps)
    assert np.array_equal(result["labels"], labels)
    assert result["merged_up_to"] == info["merged_up_to"]
    # the Beam path does not centre sqeuclidean data (batches share no mean): the last bits of heights differ
    assert result["distance_threshold"] == pytest.approx(info["distance_threshold"], rel=1e-9)


def test_no_element_grows_with_the_pool(tmp_path, monkeypatch):
    """Every shuffle and side input of the sharded path, and every partition a worker merges, is bounded by
    the range, bucket, shard and partition sizes, not by the pool: at 4x the pool (with 4x the partitions)
    the largest element of each step stays within 1.5x, or tiny."""
    from clusmar_beam.transforms import cluster as cluster_transforms
    from clusmar_beam.transforms import ranks
    from clusmar_beam.pipelines import cluster
    monkeypatch.setattr(ranks, "ROWS_PER_RANGE", 1024)
    monkeypatch.setattr(sharded_hac, "ROWS_PER_BUCKET", 1024)
    monkeypatch.setattr(sharded, "SAMPLE_MAX", 512)
    monkeypatch.setattr(sharded, "FINISH_ON_ONE_WORKER", 500)   # the one-worker bound: one partition here
    monkeypatch.setattr(sharded, "HALO_ROWS", 2000)             # the widened halo's bound: 3 cells here
    monkeypatch.setattr(cluster_transforms, "ROWS_PER_CLUSTER_SHARD", 1024)
    largest = {}
    for n in (3000, 12000):
        assert cli.main(["generate-pool", "--output", str(tmp_path / f"pool{n}"), "--num-examples", str(n),
                         "--dim", "16", "--num-classes", "5", "--seed", "3", "--num-shards", str(n // 1000)]) == 0
        info = cluster.run(["--pool", str(tmp_path / f"pool{n}" / "pool-*.parquet"), "--output",
                            str(tmp_path / f"out{n}"), "--distance-threshold", "0.1", "--hac-shards", str(n // 500),
                            "--max-rounds", "20"])
        assert info["num_points"] == n and info["waiting"] == 0
        largest[n] = info["largest_element_bytes"]
    steps = {"rank_pieces", "rank_bounds", "rank_first_rows", "partition_sample", "partition_centroids",
             "partition_pieces", "partition_state", "partition_merges", "partition_out", "partition_targets",
             "follow_parents", "follow_children",
             "number_roots", "number_members", "shard_ids", "shard_labels"}
    assert steps <= set(largest[3000]) and steps <= set(largest[12000])
    assert set(largest[12000]) <= steps | {"finish_state"}   # a finishing round: at most 500 clusters here
    held_to_bounds = {"partition_pieces", "partition_state", "finish_state", "partition_out", "partition_targets"}
    for step in set(largest[3000]) & set(largest[12000]) - held_to_bounds:
        assert largest[12000][step] <= max(1.5 * largest[3000][step], 16 << 10), (step, largest)
    # What a partition gets depends on how k-means cuts the pool (cells up to about twice the mean) and on
    # whether its clusters are still points (float32) or statistics: these are held to their bounds, with
    # a cluster's statistics 8 d + 24 bytes (its routing point stays where it was routed).  A piece: a
    # range's rows or a partition's clusters; a partition: its members and three halo cells' worth of frozen
    # neighbours (HALO_ROWS); the last round: FINISH_ON_ONE_WORKER clusters.
    cluster_bytes, partition = 8 * 16 + 24, 2 * 500
    assert largest[12000]["partition_pieces"] <= max(1024, partition) * cluster_bytes
    assert largest[12000]["partition_state"] <= 4 * partition * cluster_bytes
    assert largest[12000].get("finish_state", 0) <= 500 * cluster_bytes
    # a partition's merged clusters with their merge edges; the ids its members waited on in one other partition
    assert largest[12000]["partition_out"] <= partition * (cluster_bytes + 16)
    assert largest[12000]["partition_targets"] <= 2 * partition * 8
    assert max(largest[12000].values()) <= 1 << 20   # a small cap at this size


def test_hac_shards_auto(tmp_path, rng, capsys):
    """auto: one worker while the one-worker HAC's modelled peak (points and dimension, from the Parquet footers)
    fits AUTO_ONE_WORKER_BYTES, else a partition per AUTO_EMBEDDING_BYTES_PER_SHARD of float32 embeddings."""
    from conftest import write_parquet, write_tfrecord
    from clusmar_beam.pipelines import cluster
    from clusmar_beam.transforms import memory
    mib = 1 << 20
    most_at_64d = max(n for n in range(4_000_000, 4_200_000, 64)
                      if memory.one_worker_hac_bytes(n, 64) <= cluster.AUTO_ONE_WORKER_BYTES)
    assert cluster.auto_shards(most_at_64d, 64) == 1
    over = most_at_64d + 64
    assert memory.one_worker_hac_bytes(over, 64) > cluster.AUTO_ONE_WORKER_BYTES
    assert cluster.auto_shards(over, 64) == math.ceil(over * 64 * 4 / cluster.AUTO_EMBEDDING_BYTES_PER_SHARD)
    # At 64-d the choice stays near the embeddings' 1 GiB that it was before the model counted points.
    assert 0.9 * (1 << 30) <= most_at_64d * 64 * 4 <= 1 << 30
    # 10M x 16-d is 640 MB of embeddings, which the embedding-bytes rule kept on one worker; the model says
    # its per-point state does not fit, so it is sharded.
    assert 10_000_000 * 16 * 4 < 1 << 30
    assert memory.one_worker_hac_bytes(10_000_000, 16) > cluster.AUTO_ONE_WORKER_BYTES
    assert cluster.auto_shards(10_000_000, 16) == math.ceil(10_000_000 * 16 * 4 / (64 * mib)) == 10
    assert cluster.auto_shards(100 * 64 * mib // (64 * 4), 64) == 100
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(2000), "embedding": x})
    pool = str(tmp_path / "pool" / "*")
    rows, size, width = storage.footprint([str(tmp_path / "pool" / "p.parquet")], "parquet", "embedding")
    assert rows == 2000 and width == 8 and 2000 * 8 * 4 <= size < 2000 * 8 * 4 * 1.5
    tfrecord = write_tfrecord(str(tmp_path / "tf" / "p.tfrecord"), {"id": np.arange(20), "embedding": x[:20]})
    rows, size, width = storage.footprint([tfrecord], "tfrecord", "embedding")
    assert rows is None and width == 8 and size == os.path.getsize(tfrecord) >= 20 * 8 * 4
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "a"), "--distance-threshold", "0.3",
                     "--hac-shards", "auto"]) == 0
    params = json.load(open(tmp_path / "a" / "clustering.json"))["parameters"]
    assert params["hac_shards"] == 1 and params["hac_shards_flag"] == "auto"
    with pytest.raises(SystemExit) as exit_info:   # argparse's usage error, as for any malformed flag
        cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "b"), "--distance-threshold", "0.3",
                  "--hac-shards", "many"])
    assert exit_info.value.code == 2 and "--hac-shards" in capsys.readouterr().err

"""`clusmar cluster` end to end against exact average linkage (fastcluster) on the same data and cut."""
import glob
import json
import os

import fastcluster
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import adjusted_rand_score

from clusmar_beam.app import cli
from clusmar_beam.core import hac
from clusmar_beam.core.hac.rac import STARS_FROM_ROUND
from conftest import random_probs, read_manifest, write_parquet, write_tfrecord


def _read_clusters(directory):
    table = pq.read_table(sorted(glob.glob(os.path.join(directory, "clusters-*.parquet"))))
    return dict(zip(table.column("id").to_pylist(), table.column("cluster_id").to_pylist()))


def _exact(embeddings, metric, eps):
    x = embeddings.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        z = fastcluster.linkage(x, method="average", metric="cosine")
    else:
        z = fastcluster.linkage(x, method="average", metric="sqeuclidean")
    return fcluster(z, eps, "distance")


@pytest.mark.parametrize("metric,eps", [("cosine", 0.12), ("cosine", 0.25), ("sqeuclidean", 0.3),
                                        ("sqeuclidean", 0.6)])
def test_generated_pool_matches_exact_average_linkage(tmp_path, metric, eps):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "4000", "--dim", "16",
                     "--num-classes", "5", "--seed", "7", "--num-shards", "3"]) == 0
    assert cli.main(["cluster", "--pool", str(tmp_path / "pool" / "pool-*.parquet"), "--output",
                     str(tmp_path / "c"), "--distance-threshold", str(eps), "--metric", metric]) == 0
    table = pq.read_table(sorted(glob.glob(str(tmp_path / "pool" / "pool-*.parquet"))), columns=["id", "embedding"])
    ids = np.array(table.column("id").to_pylist())
    embeddings = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    clusters = _read_clusters(tmp_path / "c")
    assert sorted(clusters) == sorted(ids.tolist())            # one row per pool example
    ours = np.array([clusters[i] for i in ids.tolist()])
    exact = _exact(embeddings, metric, eps)
    assert adjusted_rand_score(exact, ours) >= 0.99
    info = json.load(open(tmp_path / "c" / "clustering.json"))
    assert info["num_points"] == 4000 and info["num_clusters"] == len(set(ours.tolist()))
    assert 1 < info["num_clusters"] < 4000
    assert sum(info["cluster_size_histogram"].values()) == info["num_clusters"]
    assert info["parameters"]["metric"] == metric and info["parameters"]["distance_threshold"] == eps
    # the embeddings reached the HAC as temporary files; none is left behind
    assert sorted(os.listdir(tmp_path / "c")) == ["clustering.json", "clusters-00000-of-00001.parquet"]


@pytest.mark.parametrize("metric,eps", [("cosine", 0.3), ("sqeuclidean", 0.6)])
def test_heavy_tailed_pool_reports_rounds_share_and_warns(tmp_path, caplog, metric, eps):
    """A pool whose dense regions hold 10-20% each: approximate merges close to exact, few rounds, a warning."""
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "5000", "--dim", "24",
                     "--num-classes", "5", "--seed", "11", "--region-sizes", "heavy-tailed"]) == 0
    pool = str(tmp_path / "pool" / "pool-*.parquet")
    runs = {}
    for delta in ("0", "0.05"):
        out = tmp_path / f"c{delta}"
        assert cli.main(["cluster", "--pool", pool, "--output", str(out), "--distance-threshold", str(eps),
                         "--metric", metric, "--approximation", delta]) == 0
        runs[delta] = (json.load(open(out / "clustering.json")), _read_clusters(out))
    table = pq.read_table(sorted(glob.glob(pool)), columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    exact = _exact(np.array(table.column("embedding").to_pylist(), dtype=np.float32), metric, eps)
    for delta, (info, clusters) in runs.items():
        ours = [clusters[i] for i in ids]
        assert adjusted_rand_score(exact, ours) >= (1.0 if delta == "0" else 0.99), delta
        assert info["parameters"]["approximation"] == float(delta)
        sizes = np.bincount(ours)
        assert info["largest_cluster_share"] == pytest.approx(sizes.max() / len(ids))
        assert info["largest_cluster_share"] > 0.05 and "--warn-largest-share" in info["warnings"][0]
    # stars form from round rac.STARS_FROM_ROUND on; few of this pool's are deep (rac.DEEP_STAR_LEAVES), the others
    # take delta/8: about half the rounds past it
    exact_rounds, approx_rounds = runs["0"][0]["rounds"], runs["0.05"][0]["rounds"]
    assert exact_rounds > STARS_FROM_ROUND
    assert approx_rounds - STARS_FROM_ROUND < 0.6 * (exact_rounds - STARS_FROM_ROUND), (exact_rounds, approx_rounds)
    assert runs["0"][0]["ivf_probing"] is None  # few enough points for exact search throughout
    assert "the largest cluster holds" in caplog.text
    # the threshold sample and the cut at a target merge by the same rule
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "t"), "--metric", metric,
                     "--target-mean-cluster-size", "10", "--threshold-sample-size", "1500"]) == 0
    info = json.load(open(tmp_path / "t" / "clustering.json"))
    assert info["mean_cluster_size"] == pytest.approx(10, rel=0.01)
    assert info["parameters"]["approximation"] == hac.DEFAULT_DELTA == 0.04


def test_tfrecord_pool_with_text_ids(tmp_path, rng):
    centers = rng.normal(size=(30, 8))
    labels = rng.integers(0, 30, 900)
    embeddings = (centers[labels] + 0.05 * rng.normal(size=(900, 8))).astype(np.float32)
    ids = [f"url-{i:04d}".encode() for i in rng.permutation(900)]
    write_tfrecord(str(tmp_path / "pool" / "a.tfrecord"), {"id": ids[:500], "embedding": embeddings[:500]})
    write_tfrecord(str(tmp_path / "pool" / "b.tfrecord"), {"id": ids[500:], "embedding": embeddings[500:]})
    assert cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*.tfrecord"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.1"]) == 0
    clusters = _read_clusters(tmp_path / "c")
    assert set(clusters) == {i.decode() for i in ids} or set(clusters) == set(ids)
    ours = np.array([clusters.get(i, clusters.get(i.decode())) for i in ids])
    assert adjusted_rand_score(_exact(embeddings, "cosine", 0.1), ours) >= 0.99


def test_partitions_too_small_for_their_halo_are_warned_about():
    from clusmar_beam.pipelines import cluster
    assert cluster._partition_warnings(1200, 4, 2) == []            # 300 points a partition see all 4 cells
    assert cluster._partition_warnings(1_000_000, 64, 2) == []
    (warned,) = cluster._partition_warnings(1200, 64, 2)            # 19 points a partition, 15 cells seen
    assert "partitions of about 19 points" in warned and "304 points in all" in warned


@pytest.mark.parametrize("shards", ["1", "4"])
def test_empty_part_files_are_skipped(tmp_path, rng, shards):
    """Writers leave part files without rows; they hold no list width, and nothing else."""
    centers = rng.normal(size=(20, 12))
    embeddings = (centers[rng.integers(0, 20, 1200)] + 0.3 * rng.normal(size=(1200, 12))).astype(np.float32)
    columns = {"id": rng.permutation(1200).astype(np.int64), "probs": random_probs(rng, 1200, 3),
               "embedding": embeddings}
    for pool, parts in (("full", [(0, 700), (700, 1200)]), ("gaps", [(0, 0), (0, 700), (700, 700), (700, 1200)])):
        for i, (start, stop) in enumerate(parts):
            write_parquet(str(tmp_path / pool / f"part-{i}.parquet"), {k: v[start:stop] for k, v in columns.items()})
        assert cli.main(["cluster", "--pool", str(tmp_path / pool / "*"), "--output", str(tmp_path / f"c-{pool}"),
                         "--distance-threshold", "0.1", "--hac-shards", shards]) == 0
        assert cli.main(["select", "--pool", str(tmp_path / pool / "*"), "--clusters", str(tmp_path / f"c-{pool}"),
                         "--output", str(tmp_path / f"m-{pool}"), "--batch-size", "50"]) == 0
    assert _read_clusters(tmp_path / "c-gaps") == _read_clusters(tmp_path / "c-full")
    assert read_manifest(tmp_path / "m-gaps") == read_manifest(tmp_path / "m-full")
    # partitions of 300 points see every other cell (core.hac.sharded.halo_width): nothing to warn about
    assert not [w for w in json.load(open(tmp_path / "c-full" / "clustering.json"))["warnings"] if "partitions" in w]
    assert adjusted_rand_score(_exact(embeddings, "cosine", 0.1),
                               [_read_clusters(tmp_path / "c-full")[i] for i in columns["id"]]) >= 0.99


def test_refuses_to_overwrite_completed_clusters(tmp_path, rng, capsys):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "300", "--dim", "4",
                     "--num-classes", "3"]) == 0
    args = ["cluster", "--pool", str(tmp_path / "pool" / "pool-*"), "--output", str(tmp_path / "c"),
            "--distance-threshold", "0.2"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("flags,fragment", [(["--distance-threshold", "0"], "--distance-threshold"),
                                            (["--distance-threshold", "nan"], "--distance-threshold"),
                                            (["--distance-threshold", "0.1", "--metric", "l1"], "--metric"),
                                            (["--distance-threshold", "0.1", "--knn", "0"], "--knn")])
def test_bad_parameters(tmp_path, capsys, flags, fragment):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "50", "--dim", "4",
                     "--num-classes", "3"]) == 0
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "pool-*"), "--output", str(tmp_path / "c"),
                     *flags])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c" / "clustering.json")


def test_zero_norm_embeddings_with_cosine(tmp_path, rng, capsys):
    from conftest import write_parquet
    embeddings = rng.normal(size=(40, 4)).astype(np.float32)
    embeddings[[3, 8, 9]] = 0
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(40), "embedding": embeddings})
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "3" in err and "zero norm" in err
    assert not os.path.exists(tmp_path / "c" / "clustering.json")


def _pool(tmp_path, n=4000, dim=16, seed=7):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", str(n), "--dim", str(dim),
                     "--num-classes", "5", "--seed", str(seed), "--num-shards", "2"]) == 0
    return str(tmp_path / "pool" / "pool-*.parquet")


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_target_mean_cluster_size(tmp_path, metric):
    pool = _pool(tmp_path)
    # exact merges (--approximation 0): a cut of them is the clustering at its threshold, checked below
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "c"), "--target-mean-cluster-size", "10",
                     "--metric", metric, "--threshold-sample-size", "2000", "--approximation", "0"]) == 0
    info = json.load(open(tmp_path / "c" / "clustering.json"))
    params = info["parameters"]
    assert params["target_mean_cluster_size"] == 10
    choice = params["threshold_choice"]
    assert choice["sample_cells"] >= 2 and choice["sample_points"] < 4000
    # merged up to (at least) the sample's threshold for twice the target, then cut at the target
    assert choice["merge_threshold"] > choice["distance_threshold"] > 0
    assert 0 < params["distance_threshold"] <= choice["merged_up_to"] and choice["merged_up_to"] >= choice["merge_threshold"]
    assert info["mean_cluster_size"] == pytest.approx(10, rel=0.01)
    clusters = _read_clusters(tmp_path / "c")
    assert len(set(clusters.values())) == info["num_clusters"]
    # the cut is the clustering at the threshold it reports
    again = tmp_path / "again"
    assert cli.main(["cluster", "--pool", pool, "--output", str(again), "--metric", metric,
                     "--distance-threshold", repr(params["distance_threshold"]), "--approximation", "0"]) == 0
    assert _read_clusters(again) == clusters


@pytest.mark.parametrize("flags,fragment", [
    ([], "exactly one of"),
    (["--distance-threshold", "0.1", "--target-mean-cluster-size", "10"], "exactly one of"),
    (["--target-mean-cluster-size", "0"], "--target-mean-cluster-size"),
    (["--target-mean-cluster-size", "nan"], "--target-mean-cluster-size"),
    (["--distance-threshold", "-1"], "--distance-threshold"),
    (["--target-mean-cluster-size", "5", "--threshold-sample-size", "0"], "--threshold-sample-size"),
    (["--distance-threshold", "0.1", "--knn", "-2"], "--knn"),
    (["--distance-threshold", "0.1", "--approximation", "-0.1"], "--approximation"),
    (["--distance-threshold", "0.1", "--approximation", "nan"], "--approximation"),
    (["--distance-threshold", "0.1", "--warn-largest-share", "0"], "--warn-largest-share"),
    (["--distance-threshold", "0.1", "--hac-shards", "4", "--hac-one-worker-clusters", "0"],
     "--hac-one-worker-clusters")])
def test_bad_target_parameters(tmp_path, capsys, flags, fragment):
    pool = _pool(tmp_path, n=50, dim=4)
    code = cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "c"), *flags])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c" / "clustering.json")


@pytest.mark.parametrize("threshold", [["--distance-threshold", "0.1"], ["--target-mean-cluster-size", "4"]])
@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_all_identical_pool_is_one_cluster(tmp_path, threshold, metric):
    from conftest import write_parquet
    embeddings = np.tile(np.array([[0.5, -1.0, 2.0, 0.0]], np.float32), (60, 1))
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(60), "embedding": embeddings})
    assert cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--metric", metric, *threshold]) == 0
    assert set(_read_clusters(tmp_path / "c").values()) == {0}
    info = json.load(open(tmp_path / "c" / "clustering.json"))
    assert info["num_clusters"] == 1 and info["num_points"] == 60


@pytest.mark.parametrize("threshold", [["--distance-threshold", "0.1"], ["--target-mean-cluster-size", "4"]])
def test_one_example_pool(tmp_path, threshold):
    from conftest import write_parquet
    write_parquet(str(tmp_path / "pool" / "p.parquet"),
                  {"id": np.array([42]), "embedding": np.array([[1.0, 2.0]], np.float32)})
    assert cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     *threshold]) == 0
    assert _read_clusters(tmp_path / "c") == {42: 0}
    assert json.load(open(tmp_path / "c" / "clustering.json"))["num_clusters"] == 1


def test_zero_norm_embeddings_with_cosine_and_a_target(tmp_path, rng, capsys):
    from conftest import write_parquet
    embeddings = rng.normal(size=(40, 4)).astype(np.float32)
    embeddings[[1, 2]] = 0
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(40), "embedding": embeddings})
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--target-mean-cluster-size", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "2 of 40" in err and "zero norm" in err


def test_low_dimensional_pool_reports_per_query_probing(tmp_path):
    """On 12-d dense regions the IVF index probes per query, says so, and stays with exact average linkage."""
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "8000", "--dim", "12",
                     "--num-classes", "5", "--seed", "1", "--region-sizes", "heavy-tailed"]) == 0
    pool = str(tmp_path / "pool" / "pool-*.parquet")
    assert cli.main(["cluster", "--pool", pool, "--output", str(tmp_path / "c"), "--distance-threshold", "0.3",
                     "--exact-search-max", "1000", "--approximation", "0"]) == 0
    info = json.load(open(tmp_path / "c" / "clustering.json"))
    assert info["ivf_probing"]["per_query"] is True
    assert info["ivf_probing"]["per_query_misses"] < info["ivf_probing"]["per_list_misses"]
    table = pq.read_table(sorted(glob.glob(pool)), columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    exact = _exact(np.array(table.column("embedding").to_pylist(), dtype=np.float32), "cosine", 0.3)
    clusters = _read_clusters(tmp_path / "c")
    assert adjusted_rand_score(exact, [clusters[i] for i in ids]) >= 0.999

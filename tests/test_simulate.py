"""`clusmar simulate`: the same picks as `clusmar select`, curves that add up, clear errors."""
import json
import os
import types

import numpy as np
import pytest

from clusmar_beam.app import cli
from clusmar_beam.app.simulate import Simulation, _margins
from clusmar_beam.app.simulation.data import Labelled
from clusmar_beam.core.kcenter import k_center_greedy
from conftest import read_manifest, write_parquet
from test_select_pipeline import _pool, _select


def _simulation(ids, k_t, classes=6):
    n = len(ids)
    pool = Labelled(ids, np.zeros((n, 2), np.float32), np.arange(n) % classes,
                    "int64" if ids.dtype != object else "binary", "pool")
    return Simulation(types.SimpleNamespace(batch_size=k_t), pool, pool, classes)


@pytest.mark.parametrize("strategy,id_kind", [("cluster-margin", "int"), ("cluster-margin", "bytes"),
                                              ("margin", "int"), ("random", "bytes")])
def test_simulate_picks_are_clusmar_selects_manifest(tmp_path, rng, strategy, id_kind):
    ids, probs, cluster_ids = _pool(tmp_path, rng, id_kind=id_kind)
    labeled = rng.random(len(ids)) < 0.2
    write_parquet(str(tmp_path / "labeled" / "l.parquet"), {"id": ids[labeled]})
    assert _select(tmp_path, "--batch-size", "150", "--candidate-multiplier", "4", "--seed", "11", "--round", "3",
                   "--strategy", strategy, "--labeled", str(tmp_path / "labeled" / "*.parquet")) == 0
    manifest = [r["id"] for r in read_manifest(tmp_path / "out")]

    sim = _simulation(ids, 150)
    rows, diagnostics = sim.select(strategy, _margins(probs), labeled, cluster_ids.astype(np.int64), 4.0, None,
                                   11, 3)
    assert [i.item() if hasattr(i, "item") else i for i in ids[rows]] == manifest
    written = json.load(open(tmp_path / "out" / "manifest.json"))["diagnostics"]
    for key in ("candidates", "candidate_clusters", "round_robin_passes_completed", "picks_from_singleton_clusters",
                "picks_by_cluster_size", "pick_margin_quantiles", "k_m_share_of_unlabeled"):
        assert diagnostics[key] == pytest.approx(written[key]), key


def _digits(tmp_path, out, *flags):
    return cli.main(["simulate", "--digits", "--output", str(tmp_path / out), "--rounds", "3", "--batch-size", "60",
                     "--seed-labels", "40", "--repetitions", "2", "--candidate-multipliers", "1.5,10",
                     "--target-cluster-sizes", "4", *flags])


def _without_seconds(runs):
    return [{**run, "rounds": [{k: v for k, v in r.items() if k != "seconds"} for r in run["rounds"]]}
            for run in runs]


def test_simulate_digits_end_to_end(tmp_path):
    assert _digits(tmp_path, "a") == 0
    result = json.load(open(tmp_path / "a" / "simulation.json"))
    assert os.path.exists(tmp_path / "a" / "_SUCCESS")
    assert result["format"] == "clusmar-simulation" and result["data"]["num_classes"] == 10
    assert result["data"]["pool_count"] + result["data"]["test_count"] == 1797
    runs = result["runs"]
    # margin, random, k-center once per repetition; cluster-margin once per setting and repetition
    assert len(runs) == 2 * 3 + 2 * 2
    assert {r["setting"] for r in runs if r["strategy"] == "cluster-margin"} == {s["name"] for s in result["settings"]}
    for run in runs:
        labels = [r["labels"] for r in run["rounds"]]
        assert labels == [40, 100, 160, 220]       # every round reveals k_t new labels, none twice
        assert all(0 < r["accuracy"] <= 1 for r in run["rounds"])
        assert all(sum(r["pick_class_counts"]) == 60 for r in run["rounds"][1:])
    for rep in range(2):   # every strategy starts from the same seed set and seed model
        assert len({run["rounds"][0]["accuracy"] for run in runs if run["repetition"] == rep}) == 1
    assert len(result["savings"]) == 2 * 3
    assert all(row["reached"] <= row["repetitions"] == 2 for row in result["savings"])
    assert len(result["clusterings"]) == 1 and result["clusterings"][0]["num_points"] == result["data"]["pool_count"]
    # k_m = 10 x 60 covers far more than a quarter of the ~1,400 unlabeled digits: warned
    assert any("k_m 10x" in w and "more than 25%" in w for w in result["warnings"])
    assert _digits(tmp_path, "b") == 0
    again = json.load(open(tmp_path / "b" / "simulation.json"))
    assert _without_seconds(again["runs"]) == _without_seconds(runs)


def test_simulate_refuses_to_overwrite_and_bad_flags(tmp_path, capsys):
    assert _digits(tmp_path, "a", "--strategies", "margin", "--repetitions", "1") == 0
    assert _digits(tmp_path, "a", "--strategies", "margin") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _digits(tmp_path, "c", "--embedding", "model") == 2
    assert "--model mlp" in capsys.readouterr().err
    assert _digits(tmp_path, "c", "--strategies", "margin,badge") == 2
    assert "badge" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c" / "simulation.json")


def _labelled_pool(tmp_path, rng, n, name, offset=0):
    centers = rng.normal(size=(5, 12)) * 3
    labels = rng.integers(0, 5, n)
    x = centers[labels] + rng.normal(size=(n, 12))
    write_parquet(str(tmp_path / name / "part-0.parquet"),
                  {"id": np.arange(offset, offset + n, dtype=np.int64), "embedding": x, "label": labels})
    return str(tmp_path / name / "*.parquet")


def test_simulate_parquet_pool_with_test_set_and_mlp_reembedding(tmp_path, rng):
    pool = _labelled_pool(tmp_path, rng, 800, "pool")
    test = _labelled_pool(tmp_path, rng, 300, "test", offset=10_000)
    assert cli.main(["simulate", "--pool", pool, "--test", test, "--output", str(tmp_path / "out"), "--model", "mlp",
                     "--embedding", "model", "--epochs", "2", "--rounds", "1", "--batch-size", "50",
                     "--repetitions", "2", "--strategies", "cluster-margin,margin",
                     "--distance-thresholds", "0.2"]) == 0
    result = json.load(open(tmp_path / "out" / "simulation.json"))
    assert result["data"]["test_count"] == 300 and result["data"]["pool_count"] == 800
    # the seed model re-embeds the pool, so each repetition clusters its own embeddings
    assert sorted(c["repetition"] for c in result["clusterings"]) == [0, 1]
    assert all(run["rounds"][-1]["labels"] == 100 for run in result["runs"])


def test_simulate_bad_pools_name_the_file(tmp_path, rng, capsys):
    write_parquet(str(tmp_path / "nolabel" / "p.parquet"), {"id": np.arange(10), "embedding": rng.normal(size=(10, 3))})
    assert cli.main(["simulate", "--pool", str(tmp_path / "nolabel" / "*.parquet"), "--output", str(tmp_path / "o"),
                     "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "p.parquet" in err and "'label'" in err
    x = rng.normal(size=(10, 3))
    x[3, 1] = np.nan
    write_parquet(str(tmp_path / "nan" / "p.parquet"), {"id": np.arange(10), "embedding": x, "label": np.arange(10) % 2})
    assert cli.main(["simulate", "--pool", str(tmp_path / "nan" / "*.parquet"), "--output", str(tmp_path / "o"),
                     "--batch-size", "2"]) == 2
    assert "1 row with NaN" in capsys.readouterr().err
    pool = _labelled_pool(tmp_path, rng, 100, "pool")
    test = _labelled_pool(tmp_path, rng, 50, "test", offset=90)
    assert cli.main(["simulate", "--pool", pool, "--test", test, "--output", str(tmp_path / "o"),
                     "--batch-size", "2"]) == 2
    assert "10 test ids are also in the pool" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_k_center_greedy_matches_a_plain_loop(rng):
    points = rng.normal(size=(300, 5)).astype(np.float32)
    centers = rng.normal(size=(7, 5)).astype(np.float32)
    taken = k_center_greedy(points, centers, 25)
    chosen = list(centers.astype(np.float64))
    expected = []
    for _ in range(25):
        dist = [min(float(np.sum((p.astype(np.float64) - c) ** 2)) for c in chosen) for p in points]
        best = int(np.argmax(dist))
        expected.append(best)
        chosen.append(points[best].astype(np.float64))
    assert taken.tolist() == expected
    assert len(set(k_center_greedy(points, centers[:0], 300).tolist())) == 300


def test_savings_per_repetition_and_on_mean_curves():
    from clusmar_beam.app.simulation.outcome import savings

    def run(strategy, setting, rep, accuracy):
        return {"strategy": strategy, "setting": setting, "repetition": rep,
                "rounds": [{"labels": 100 * (i + 1), "accuracy": a} for i, a in enumerate(accuracy)]}
    runs = [run("margin", None, 0, [0.5, 0.6, 0.7]), run("margin", None, 1, [0.5, 0.6, 0.8]),
            run("cluster-margin", "s", 0, [0.5, 0.7, 0.75]),    # reaches 0.7 at 200 labels: saves 1/3
            run("cluster-margin", "s", 1, [0.5, 0.7, 0.75])]    # never reaches 0.8
    (row,) = savings(runs, "cluster-margin", ["margin"])
    assert row["reached"] == 1 and row["repetitions"] == 2
    assert row["savings_mean"] == pytest.approx(1 / 3) and row["labels_strategy_mean"] == pytest.approx(200)
    # mean curves: margin ends at 0.75, cluster-margin reaches 0.75 only at 300 labels: no saving
    assert row["savings_of_mean_curves"] == pytest.approx(0.0)
    assert row["final_accuracy_delta_mean"] == pytest.approx(0.0)


def test_a_baseline_that_plateaus_is_measured_where_it_first_got_there():
    from clusmar_beam.app.simulation.outcome import savings
    rounds = lambda accuracy: [{"labels": 100 * (i + 1), "accuracy": a} for i, a in enumerate(accuracy)]
    runs = [{"strategy": "margin", "setting": None, "repetition": 0, "rounds": rounds([0.5, 0.9, 0.9, 0.9])},
            {"strategy": "cluster-margin", "setting": "s", "repetition": 0, "rounds": rounds([0.5, 0.9, 0.9, 0.9])}]
    (row,) = savings(runs, "cluster-margin", ["margin"])
    assert row["labels_baseline"] == 200
    assert row["savings_mean"] == pytest.approx(0.0) and row["savings_of_mean_curves"] == pytest.approx(0.0)

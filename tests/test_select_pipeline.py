"""`clusmar select` end to end: manifests read back with TF and checked against the reference rule."""
import glob
import json
import os

import numpy as np
import pytest

from clusmar_beam.app import cli
from reference import margins_from_probs
from conftest import random_probs, read_manifest, write_parquet, write_tfrecord
from reference import reference_select


def _pool(tmp_path, rng, n=3000, classes=6, shards=3, clusters=120, id_kind="int"):
    ids = rng.permutation(n * 5)[:n].astype(np.int64)
    if id_kind == "bytes":
        ids = np.array([f"img-{i:07d}".encode() for i in ids], dtype=object)
    probs = random_probs(rng, n, classes, ties_every=50)
    cluster_ids = (rng.zipf(1.5, n) + rng.integers(0, clusters, n)) % clusters
    for i, part in enumerate(np.array_split(np.arange(n), shards)):
        write_parquet(str(tmp_path / "pool" / f"part-{i}.parquet"), {"id": ids[part], "probs": probs[part]})
    write_parquet(str(tmp_path / "clusters" / "clusters-00000-of-00001.parquet"),
                  {"id": ids, "cluster_id": cluster_ids.astype(np.int64)})
    return ids, probs, cluster_ids


def _select(tmp_path, *flags, out="out"):
    return cli.main(["select", "--pool", str(tmp_path / "pool" / "*.parquet"), "--clusters", str(tmp_path / "clusters"),
                     "--output", str(tmp_path / out), *flags])


def _expected(ids, probs, cluster_ids, labeled, k_t, k_m, seed, round_index, strategy="cluster-margin"):
    key = lambda i: i.item() if hasattr(i, "item") else i
    margins = dict(zip(map(key, ids), margins_from_probs(probs).tolist()))
    clusters = dict(zip(map(key, ids), cluster_ids.tolist()))
    return reference_select([key(i) for i in ids], margins, clusters, [key(i) for i in labeled],
                            k_t, k_m, seed, round_index, strategy)


@pytest.mark.parametrize("strategy", ["cluster-margin", "margin", "random"])
def test_manifest_matches_reference(tmp_path, rng, strategy):
    ids, probs, cluster_ids = _pool(tmp_path, rng)
    labeled = ids[rng.random(len(ids)) < 0.2]
    write_parquet(str(tmp_path / "labeled" / "l.parquet"), {"id": labeled})
    assert _select(tmp_path, "--batch-size", "150", "--candidate-multiplier", "4", "--seed", "11", "--round", "3",
                   "--strategy", strategy, "--labeled", str(tmp_path / "labeled" / "*.parquet")) == 0
    rows = read_manifest(tmp_path / "out")
    expected = _expected(ids, probs, cluster_ids, labeled, 150, 600, 11, 3, strategy)
    assert [r["id"] for r in rows] == expected
    assert [r["rank"] for r in rows] == list(range(150))
    assert {r["round"] for r in rows} == {3}
    assert not set(r["id"] for r in rows) & set(labeled.tolist())
    m = dict(zip(ids.tolist(), margins_from_probs(probs).tolist()))
    assert all(abs(r["margin"] - m[r["id"]]) < 1e-6 for r in rows)
    summary = json.load(open(tmp_path / "out" / "manifest.json"))
    assert summary["selected"] == 150 and summary["pool_count"] == len(ids)
    assert summary["unlabeled_count"] == len(ids) - len(labeled)
    assert summary["strategy"] == strategy and summary["seed"] == 11 and summary["round"] == 3
    assert os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_candidates_capped_at_unlabeled_pool_and_batch_larger_than_candidates(tmp_path, rng):
    ids, probs, cluster_ids = _pool(tmp_path, rng, n=400, shards=2, clusters=30)
    labeled = ids[:100]
    write_parquet(str(tmp_path / "labeled" / "l.parquet"), {"id": labeled})
    # k_m = 10 x 350 = 3500 > 300 unlabeled: every unlabeled example is a candidate, all get selected.
    assert _select(tmp_path, "--batch-size", "350", "--labeled", str(tmp_path / "labeled" / "l.parquet")) == 0
    rows = read_manifest(tmp_path / "out")
    assert [r["id"] for r in rows] == _expected(ids, probs, cluster_ids, labeled, 350, 3500, 0, 0)
    assert len(rows) == 300
    summary = json.load(open(tmp_path / "out" / "manifest.json"))
    assert summary["k_m"] == 300 and summary["selected"] == 300


def test_tfrecord_pool_with_text_ids_and_margin_column(tmp_path, rng):
    n = 500
    ids = np.array([f"doc/{i:05d}".encode() for i in rng.permutation(n)], dtype=object)
    margins = np.round(rng.random(n), 2).astype(np.float32)
    cluster_ids = rng.integers(0, 40, n)
    write_tfrecord(str(tmp_path / "pool" / "pool-0.tfrecord"), {"id": list(ids), "margin": margins})
    write_parquet(str(tmp_path / "clusters" / "clusters-00000-of-00001.parquet"),
                  {"id": list(ids), "cluster_id": cluster_ids})
    code = cli.main(["select", "--pool", str(tmp_path / "pool" / "*.tfrecord"), "--clusters",
                     str(tmp_path / "clusters"), "--output", str(tmp_path / "out"), "--batch-size", "60",
                     "--candidates", "200"])
    assert code == 0
    rows = read_manifest(tmp_path / "out")
    expected = reference_select(list(ids), dict(zip(ids, margins.astype(np.float64))),
                                dict(zip(ids, cluster_ids.tolist())), [], 60, 200, 0, 0)
    assert [r["id"] for r in rows] == expected


def test_completed_output_is_not_overwritten_without_flag(tmp_path, rng, capsys):
    _pool(tmp_path, rng, n=300, shards=1, clusters=20)
    assert _select(tmp_path, "--batch-size", "10") == 0
    before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out" / "*"))}
    assert _select(tmp_path, "--batch-size", "20") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert before == {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "out" / "*"))}
    assert _select(tmp_path, "--batch-size", "20", "--overwrite") == 0
    assert len(read_manifest(tmp_path / "out")) == 20


def test_manifest_is_sharded_by_rank(tmp_path, rng):
    _pool(tmp_path, rng, n=600, shards=2, clusters=50)
    assert _select(tmp_path, "--batch-size", "100", "--num-shards", "3") == 0
    files = sorted(glob.glob(str(tmp_path / "out" / "manifest-*.tfrecord")))
    assert [os.path.basename(f) for f in files] == [f"manifest-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert [r["rank"] for r in read_manifest(tmp_path / "out")] == list(range(100))

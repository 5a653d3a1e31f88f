"""`clusmar round` / `clusmar status`: rounds in a row with simulated labeling, resume after
injected faults, idempotent re-runs, the lock, config and round-number errors."""
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from clusmar_beam.app import cli, rounds
from reference import margins_from_probs
from conftest import read_manifest, write_parquet, write_tfrecord
from reference import reference_select

K_T = 100


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from clusmar_beam.pipelines import generate_pool
    root = tmp_path_factory.mktemp("rounds-pool")
    generate_pool.run(["--output", str(root / "pool"), "--num-examples", "2500", "--dim", "16",
                       "--num-classes", "5", "--seed", "7"])
    table = pq.read_table(str(root / "pool" / "pool-00000-of-00001.parquet"))
    ids = table.column("id").to_numpy()
    probs = np.stack(table.column("probs").to_numpy(zero_copy_only=False)).astype(np.float32)
    labels = table.column("label").to_numpy()
    return {"glob": str(root / "pool" / "*.parquet"), "ids": ids, "probs": probs,
            "label_of": dict(zip(ids.tolist(), labels.tolist()))}


def _config(tmp_path, pool, name="round.yaml", **overrides):
    cfg = {"pool": pool["glob"], "workdir": str(tmp_path / "wd"), "batch_size": K_T, "candidate_multiplier": 4,
           "target_mean_cluster_size": 5, "seed": 3, **overrides}
    path = tmp_path / name
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return str(path)


def _label(pool, workdir, round_index, fraction=1.0):
    """The labelers return labels for (a fraction of) the round's manifest."""
    rows = read_manifest(os.path.join(workdir, "rounds", f"round-{round_index:04d}", "manifest"))
    ids = np.array([r["id"] for r in rows[:int(len(rows) * fraction)]], dtype=np.int64)
    write_parquet(os.path.join(workdir, "labels", f"labels-round-{round_index}.parquet"),
                  {"id": ids, "label": np.array([pool["label_of"][i] for i in ids.tolist()], dtype=np.int64)})
    return ids


def _manifest_ids(workdir, round_index):
    return [r["id"] for r in read_manifest(os.path.join(workdir, "rounds", f"round-{round_index:04d}", "manifest"))]


def _state(workdir):
    return json.load(open(os.path.join(workdir, "state.json")))


def test_three_rounds_with_labeling(tmp_path, pool, capsys, caplog):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config, "--round", "1"]) == 0
    labeled = set(_label(pool, wd, 1).tolist())
    # the labelers also return ids that are not in the pool: warned about with the count, ignored
    write_parquet(os.path.join(wd, "labels", "stray.parquet"), {"id": np.array([10**12, 10**12 + 1]),
                                                               "label": np.array([0, 1])})
    with caplog.at_level(logging.WARNING, logger="clusmar"):
        assert cli.main(["round", "--config", config]) == 0          # no --round: the next one
    assert "2 labeled/sent ids are not in the pool" in caplog.text
    # round 2's labels come back only half: the other half must still not be selected again
    labeled |= set(_label(pool, wd, 2, fraction=0.5).tolist())
    assert cli.main(["round", "--config", config, "--round", "3"]) == 0

    manifests = {r: _manifest_ids(wd, r) for r in (1, 2, 3)}
    everything = sum(manifests.values(), [])
    assert all(len(m) == K_T for m in manifests.values())
    assert len(everything) == len(set(everything)), "an id was selected twice"
    assert {row["round"] for row in read_manifest(os.path.join(wd, "rounds", "round-0003", "manifest"))} == {3}

    # round 3 follows the paper's rule over the pool minus everything labeled or sent out before
    clusters = pq.read_table(os.path.join(wd, "clusters", "clusters-00000-of-00001.parquet")).to_pydict()
    cluster_of = dict(zip(clusters["id"], clusters["cluster_id"]))
    margins = dict(zip(pool["ids"].tolist(), margins_from_probs(pool["probs"]).tolist()))
    expected = reference_select(pool["ids"].tolist(), margins, cluster_of, manifests[1] + manifests[2],
                                K_T, 4 * K_T, 3, 3)
    assert manifests[3] == expected

    state = _state(wd)
    assert state["version"] == rounds.STATE_VERSION
    assert [state["rounds"][r]["status"] for r in ("1", "2", "3")] == ["completed"] * 3
    r3 = state["rounds"]["3"]
    assert r3["selected"] == K_T and r3["manifest"].endswith("rounds/round-0003/manifest")
    assert r3["stages"]["cluster"]["reused_from_round"] == 1           # clustered once
    assert r3["stages"]["exclude"]["labeled"] == len(labeled) + 2
    assert r3["stages"]["exclude"]["sent_earlier"] == 2 * K_T
    assert all("elapsed_s" in s for s in r3["stages"].values())
    manifest_json = json.load(open(os.path.join(wd, "rounds", "round-0003", "manifest", "manifest.json")))
    assert r3["stages"]["select"]["diagnostics"]["candidate_clusters"] == \
        manifest_json["diagnostics"]["candidate_clusters"] == len({cluster_of[i] for i in expected_candidates(
            pool, margins, manifests[1] + manifests[2])})
    assert r3["stages"]["select"]["warnings"] == manifest_json["warnings"]
    assert not os.path.exists(os.path.join(wd, "lock.json"))

    # idempotent: a completed round does nothing and says where its manifest is
    manifest_file = os.path.join(wd, "rounds", "round-0003", "manifest", "manifest-00000-of-00001.tfrecord")
    before = os.stat(manifest_file).st_mtime_ns
    capsys.readouterr()
    assert cli.main(["round", "--config", config, "--round", "3"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and os.path.join(wd, "rounds", "round-0003", "manifest") in out
    assert os.stat(manifest_file).st_mtime_ns == before

    # --force re-runs the latest round: same inputs, same manifest
    assert cli.main(["round", "--config", config, "--round", "3", "--force"]) == 0
    assert _manifest_ids(wd, 3) == manifests[3] and _state(wd)["rounds"]["3"]["status"] == "completed"

    # round numbers that skip ahead or go back
    state_before = open(os.path.join(wd, "state.json")).read()
    assert cli.main(["round", "--config", config, "--round", "5"]) == 2
    assert "skips ahead: the next round is 4" in capsys.readouterr().err
    assert cli.main(["round", "--config", config, "--round", "2", "--force"]) == 2
    assert "goes back" in capsys.readouterr().err
    assert cli.main(["round", "--config", config, "--round", "0"]) == 2
    assert open(os.path.join(wd, "state.json")).read() == state_before

    # the status table
    assert cli.main(["status", "--workdir", wd]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["round", "status", "model", "pool", "labeled", "selected"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3"]
    assert table[3].split()[1] == "completed" and table[3].split()[5] == str(K_T)


def expected_candidates(pool, margins, excluded):
    """The k_m = 4 k_t lowest margins of the unlabeled pool (ties by the seeded hash, as the contract says)."""
    from clusmar_beam.core.hashing import tiebreak_hash
    unlabeled = [i for i in pool["ids"].tolist() if i not in set(excluded)]
    tie = dict(zip(unlabeled, tiebreak_hash(np.array(unlabeled), 3).tolist()))
    return sorted(unlabeled, key=lambda i: (margins[i], tie[i], i))[:4 * K_T]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("stage,when", [("cluster", "after"), ("select", "before"), ("select", "after")])
def test_fault_inside_a_stage_then_resume(tmp_path, pool, monkeypatch, stage, when):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    calls = []

    def hook(name, moment):
        calls.append((name, moment))
        if (name, moment) == (stage, when):
            raise Boom(f"killed in {stage} ({when})")

    monkeypatch.setattr(rounds, "FAULT_HOOK", hook)
    with pytest.raises(Boom):
        rounds.run_round(config, 1)
    state = _state(wd)
    assert state["rounds"]["1"]["status"] == "running"
    assert state["rounds"]["1"]["stages"].get(stage, {}).get("status") != "done"
    assert not os.path.exists(os.path.join(wd, "lock.json"))        # released on failure

    monkeypatch.setattr(rounds, "FAULT_HOOK", lambda *a: calls.append(("resume",) + a))
    info = rounds.run_round(config)                                  # resumes round 1
    assert info["round"] == 1 and info["status"] == "completed" and info["attempts"] == 2
    resumed = [c[1] for c in calls if c[0] == "resume" and c[2] == "before"]
    done_before = {"cluster": ["score"], "select": ["score", "cluster", "exclude"]}[stage]
    assert not set(resumed) & set(done_before)                      # finished stages are not run again
    ids = _manifest_ids(wd, 1)
    assert len(ids) == K_T == len(set(ids))
    # the same selection as an uninterrupted round
    clean = tmp_path / "clean"
    monkeypatch.setattr(rounds, "FAULT_HOOK", None)
    rounds.run_round(_config(clean.parent, pool, name="clean.yaml", workdir=str(clean)), 1)
    assert _manifest_ids(str(clean), 1) == ids


def test_changed_settings_of_unfinished_round(tmp_path, pool, monkeypatch, capsys):
    wd = str(tmp_path / "wd")
    monkeypatch.setenv("CLUSMAR_FAIL_STAGE", "exclude")
    with pytest.raises(RuntimeError, match="injected failure"):
        rounds.run_round(_config(tmp_path, pool), 1)
    monkeypatch.delenv("CLUSMAR_FAIL_STAGE")
    changed = _config(tmp_path, pool, batch_size=50)
    assert cli.main(["round", "--config", changed]) == 2
    assert "round 1 was started with different settings (batch_size)" in capsys.readouterr().err
    info = rounds.run_round(changed, force=True)
    assert info["selected"] == 50 and len(_manifest_ids(wd, 1)) == 50


def test_lock_refusal_stale_and_break(tmp_path, pool, capsys):
    config = _config(tmp_path, pool, strategy="margin")
    wd = tmp_path / "wd"
    wd.mkdir()
    lock = wd / "lock.json"
    lock.write_text(json.dumps({"host": "other-host", "pid": 4242, "started_at": "2026-01-01T00:00:00Z",
                                "round": 1, "token": "x"}))
    assert cli.main(["round", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "locked by another run" in err and "other-host" in err and "4242" in err and "--break-lock" in err
    assert not (wd / "state.json").exists() and json.loads(lock.read_text())["host"] == "other-host"
    # a lock of this host whose process is gone is stale and taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started_at": "x", "round": 1,
                                "token": "y"}))
    assert cli.main(["round", "--config", config, "--round", "1"]) == 0
    assert not lock.exists()
    # a live holder on this host: refused, then broken with --break-lock
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "x", "round": 2,
                                "token": "z"}))
    assert cli.main(["round", "--config", config]) == 2
    assert "locked by another run" in capsys.readouterr().err
    assert cli.main(["round", "--config", config, "--break-lock"]) == 0
    assert not lock.exists()
    a, b = _manifest_ids(str(wd), 1), _manifest_ids(str(wd), 2)
    assert len(set(a) | set(b)) == 2 * K_T


def test_resend_after(tmp_path, pool):
    config = _config(tmp_path, pool, strategy="margin", resend_after=1)
    wd = str(tmp_path / "wd")
    rounds.run_round(config)
    rounds.run_round(config)
    labeled = _label(pool, wd, 1, fraction=0.3)
    info = rounds.run_round(config)                    # round 3: round 1's unlabeled ids may go out again
    assert info["stages"]["exclude"]["resendable"] == K_T - len(labeled)
    r1, r2, r3 = (set(_manifest_ids(wd, r)) for r in (1, 2, 3))
    assert not r3 & r2 and not r3 & set(labeled.tolist()) and not r1 & r2
    assert r3 & (r1 - set(labeled.tolist()))         # margin picks the lowest margins again


@pytest.mark.parametrize("content,message", [
    ("pool: P\nworkdir: W\nbatch_size: 10\nbatchsize: 3\n", "unknown key(s): batchsize"),
    ("pool: P\nworkdir: W\n", "missing required key 'batch_size'"),
    ("pool: P\nworkdir: W\nbatch_size: ten\n", "key 'batch_size' must be int"),
    ("pool: P\nworkdir: W\nbatch_size: 10\ncandidates: 40\ncandidate_multiplier: 4\ndistance_threshold: 0.1\n",
     "not both"),
    ("pool: P\nworkdir: W\nbatch_size: 10\n", "exactly one of distance_threshold and target_mean_cluster_size"),
    ("pool: P\nworkdir: W\nbatch_size: 10\nstrategy: best\n", "strategy 'best'"),
    ("pool: /nonexistent/*.parquet\nworkdir: W\nbatch_size: 10\nstrategy: margin\n", "no files match"),
    ("pool: P\nworkdir: W\nbatch_size: 10\nstrategy: margin\nmodel: /nonexistent/model.keras\n", "does not exist"),
    ("pool: P\nworkdir: W\nbatch_size: 10\nstrategy: margin\nembedding_model: /nonexistent/e.keras\n",
     "embedding_model '/nonexistent/e.keras' does not exist"),
    ("pool: P\nworkdir: W\nbatch_size: 10\nstrategy: margin\nembedding_model: .\n", "embedding_model needs model"),
    ("pool: P\nworkdir: W\nbatch_size: 10\nstrategy: margin\n"
     "beam_options: {direct_num_workers: 2, direct_running_mode: multi_threading}\n",
     "beam_options/beam_args: --direct_running_mode multi_threading"),
    ("[1, 2", "cannot parse"),
])
def test_config_errors(tmp_path, pool, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content.replace("P", pool["glob"]).replace("W", str(tmp_path / "wd")))
    assert cli.main(["round", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "wd" / "state.json").exists()


def test_missing_config_and_incompatible_state(tmp_path, pool, capsys):
    assert cli.main(["round", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = _config(tmp_path, pool, strategy="margin")
    wd = tmp_path / "wd"
    wd.mkdir()
    old = json.dumps({"format": rounds.STATE_FORMAT, "version": 99, "rounds": {}})
    (wd / "state.json").write_text(old)
    assert cli.main(["round", "--config", config]) == 2
    assert "incompatible clusmar version" in capsys.readouterr().err
    assert (wd / "state.json").read_text() == old and not (wd / "rounds").exists()
    assert not (wd / "lock.json").exists()
    assert cli.main(["status", "--workdir", str(wd)]) == 2


def test_rounds_with_a_model(tmp_path, pool):
    """With a model: scored every round (embeddings only when clustering), clustered once, and
    clustered again when the embedding model changes."""
    import keras
    dim = 6
    rng = np.random.default_rng(5)
    n = 1200
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    write_parquet(str(tmp_path / "raw" / "raw-0.parquet"),
                  {"id": ids, "features": rng.normal(size=(n, dim)).astype(np.float32)})
    for seed, name in ((1, "m1.keras"), (2, "m2.keras")):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((dim,), name="features")
        emb = keras.layers.Dense(8, activation="tanh", name="embedding")(inputs)
        keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probs")(emb)).save(tmp_path / name)
    wd = str(tmp_path / "wd")
    raw = {"glob": str(tmp_path / "raw" / "*.parquet")}
    base = dict(batch_size=50, distance_threshold=0.05, target_mean_cluster_size=None, candidate_multiplier=4)
    one = _config(tmp_path, raw, name="m1.yaml", model=str(tmp_path / "m1.keras"), **base)
    info1 = rounds.run_round(one)
    assert info1["stages"]["score"]["with_embeddings"] and info1["stages"]["cluster"]["num_points"] == n
    info2 = rounds.run_round(one)
    assert not info2["stages"]["score"]["with_embeddings"]
    assert info2["stages"]["cluster"]["reused_from_round"] == 1
    scoring = json.load(open(os.path.join(wd, "rounds", "round-0002", "scores", "scoring.json")))
    assert not scoring["with_embeddings"]
    two = _config(tmp_path, raw, name="m2.yaml", model=str(tmp_path / "m2.keras"), **base)
    info3 = rounds.run_round(two)
    assert info3["stages"]["score"]["with_embeddings"] and "num_clusters" in info3["stages"]["cluster"]
    assert _state(wd)["clustering"]["round"] == 3
    chosen = sum((_manifest_ids(wd, r) for r in (1, 2, 3)), [])
    assert len(chosen) == 150 == len(set(chosen))


def test_embedding_layer_in_score_args_over_rounds(tmp_path):
    """score_args choosing the embedding layer: round 1 clusters with it; round 2 scores without
    embeddings, so the choice is dropped there rather than refused."""
    import glob
    import keras
    dim, n = 6, 600
    rng = np.random.default_rng(8)
    write_parquet(str(tmp_path / "raw" / "raw-0.parquet"),
                  {"id": np.arange(n, dtype=np.int64), "features": rng.normal(size=(n, dim)).astype(np.float32)})
    keras.utils.set_random_seed(4)
    inputs = keras.Input((dim,), name="features")
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(
        keras.layers.Dense(8, activation="tanh", name="penultimate")(inputs))
    keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probs")(hidden)).save(tmp_path / "m.keras")
    wd = str(tmp_path / "wd")
    config = _config(tmp_path, {"glob": str(tmp_path / "raw" / "*.parquet")}, model=str(tmp_path / "m.keras"),
                     score_args=["--embedding-layer", "penultimate"], batch_size=30, candidate_multiplier=4,
                     distance_threshold=0.05, target_mean_cluster_size=None)
    info1 = rounds.run_round(config)
    assert info1["stages"]["score"]["with_embeddings"] and info1["stages"]["cluster"]["num_points"] == n
    first = pq.read_table(sorted(glob.glob(os.path.join(wd, "rounds", "round-0001", "scores", "*.parquet"))))
    assert len(first.column("embedding")[0].as_py()) == 8            # the chosen layer, not the default (5)
    info2 = rounds.run_round(config)
    assert info2["status"] == "completed" and not info2["stages"]["score"]["with_embeddings"]
    assert info2["stages"]["cluster"]["reused_from_round"] == 1
    assert not set(_manifest_ids(wd, 1)) & set(_manifest_ids(wd, 2))


def test_killed_process_then_resume(tmp_path, pool):
    """A real `clusmar round` process killed with SIGKILL mid-round; the next run takes over its
    stale lock and finishes the round."""
    import signal
    import time
    config = _config(tmp_path, pool)
    wd = tmp_path / "wd"
    env = {**os.environ, "CLUSMAR_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clusmar_beam.app.cli", "round", "--config", config, "--round", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        state = json.loads((wd / "state.json").read_text()) if (wd / "state.json").exists() else {}
        if state.get("rounds", {}).get("1", {}).get("stages", {}).get("cluster", {}).get("status") == "done":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (wd / "lock.json").exists()                  # the dead run's lock is left behind
    status = rounds.format_status(str(wd))
    assert "stopped in select (score/cluster/exclude done)" in status and "no longer running" in status
    info = rounds.run_round(config, 1)
    assert info["status"] == "completed" and info["stages"]["cluster"]["status"] == "done"
    assert len(set(_manifest_ids(str(wd), 1))) == K_T
    assert not (wd / "lock.json").exists()


def test_recluster_survives_a_crash(tmp_path, pool, monkeypatch, capsys):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    rounds.run_round(config)
    monkeypatch.setenv("CLUSMAR_FAIL_STAGE", "cluster:before")
    with pytest.raises(RuntimeError):
        rounds.run_round(config, recluster=True)
    monkeypatch.delenv("CLUSMAR_FAIL_STAGE")
    assert cli.main(["status", "--workdir", wd]) == 0
    assert "failed in cluster (score done)" in capsys.readouterr().out
    info = rounds.run_round(config)                 # resumed without the flag: still re-clusters
    assert info["round"] == 2 and "num_clusters" in info["stages"]["cluster"]
    assert _state(wd)["clustering"]["round"] == 2
    assert not set(_manifest_ids(wd, 1)) & set(_manifest_ids(wd, 2))


def test_id_files_round_trip_string_ids(tmp_path):
    from clusmar_beam.transforms import storage as io
    ids = np.array([b"img-3", b"img-1", b"img-2", b"img-1"], dtype=object)
    write_parquet(str(tmp_path / "labels" / "a.parquet"), {"id": pa_strings(ids), "label": np.arange(4)})
    got = rounds.read_ids(str(tmp_path / "labels" / "*"), "labels", "string")
    assert got.tolist() == [b"img-1", b"img-2", b"img-3"]
    rounds.write_ids(str(tmp_path / "ex.parquet"), got, "string")
    assert pq.read_table(str(tmp_path / "ex.parquet")).column("id").to_pylist() == ["img-1", "img-2", "img-3"]
    io.write_tfrecords(str(tmp_path / "m.tfrecord"), io.batch_to_examples({"id": ids, "rank": np.arange(4)}))
    assert rounds._tfrecord_ids([str(tmp_path / "m.tfrecord")], "bytes").tolist() == ids.tolist()
    with pytest.raises(Exception, match="pool's ids are integers"):
        rounds.read_ids(str(tmp_path / "labels" / "*"), "labels", "int64")
    assert len(rounds.read_ids(str(tmp_path / "none" / "*"), "labels", "int64", missing_ok=True)) == 0


def pa_strings(ids):
    import pyarrow as pa
    return pa.array([i.decode() for i in ids], type=pa.string())


def test_grown_pool_is_clustered_again(tmp_path, pool):
    import shutil
    src = os.path.dirname(pool["glob"])
    shutil.copytree(src, tmp_path / "pool")
    config = _config(tmp_path, {"glob": str(tmp_path / "pool" / "*.parquet")}, strategy="cluster-margin")
    rounds.run_round(config)
    extra = np.arange(10**9, 10**9 + 200, dtype=np.int64)
    rng = np.random.default_rng(1)
    write_parquet(str(tmp_path / "pool" / "pool-extra.parquet"),
                  {"id": extra, "embedding": rng.normal(size=(200, 16)).astype(np.float32),
                   "probs": rng.dirichlet(np.ones(5), 200).astype(np.float32), "label": np.zeros(200, np.int64)})
    info = rounds.run_round(config)
    assert info["stages"]["cluster"]["num_points"] == 2700
    assert info["stages"]["select"]["pool_count"] == 2700


def test_json_config(tmp_path, pool, capsys):
    path = tmp_path / "round.json"
    path.write_text(json.dumps({"pool": pool["glob"], "workdir": "wd", "batch_size": 10, "strategy": "random",
                                "beam_options": {"direct_num_workers": 1}}))
    cfg = rounds.load_config(str(path))
    assert cfg["workdir"] == str(tmp_path / "wd") and cfg["labels"] == str(tmp_path / "wd" / "labels" / "*")
    assert rounds.beam_flags(cfg) == ["--direct_num_workers=1"]
    path.write_text(json.dumps({"pool": pool["glob"], "workdir": "wd", "batch_size": 10, "k_t": 5}))
    assert cli.main(["round", "--config", str(path)]) == 2
    assert "unknown key(s): k_t" in capsys.readouterr().err


def test_fixed_embedding_model_clusters_once(tmp_path):
    """`model` changes every round, `embedding_model` stays: the pool is scored by each
    round's model without embeddings and clustered once, from the embedding model's scores."""
    import keras
    dim, n = 6, 900
    rng = np.random.default_rng(6)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    write_parquet(str(tmp_path / "raw" / "raw-0.parquet"),
                  {"id": ids, "features": rng.normal(size=(n, dim)).astype(np.float32)})
    for seed in (0, 1, 2, 3):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((dim,), name="features")
        emb = keras.layers.Dense(8, activation="tanh", name="embedding")(inputs)
        keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="probs")(emb)).save(
            tmp_path / f"m{seed}.keras")
    wd = str(tmp_path / "wd")
    raw = {"glob": str(tmp_path / "raw" / "*.parquet")}
    base = dict(batch_size=40, distance_threshold=0.05, target_mean_cluster_size=None, candidate_multiplier=4,
                embedding_model=str(tmp_path / "m0.keras"))
    for r, model in ((1, "m1.keras"), (2, "m2.keras"), (3, "m3.keras")):
        info = rounds.run_round(_config(tmp_path, raw, name=f"r{r}.yaml", model=str(tmp_path / model), **base))
        assert info["round"] == r and not info["stages"]["score"]["with_embeddings"]
        if r == 1:
            assert info["stages"]["cluster"]["num_points"] == n
        else:
            assert info["stages"]["cluster"]["reused_from_round"] == 1
    assert _state(wd)["clustering"]["model"] == str(tmp_path / "m0.keras")
    assert os.path.exists(os.path.join(wd, "embeddings", "_SUCCESS"))
    import glob
    scores = pq.read_table(sorted(glob.glob(os.path.join(wd, "rounds", "round-0003", "scores", "scores-*.parquet"))))
    scores = scores.to_pydict()
    assert "embedding" not in scores and len(scores["id"]) == n
    chosen = sum((_manifest_ids(wd, r) for r in (1, 2, 3)), [])
    assert len(chosen) == 120 == len(set(chosen))


def test_live_progress_shows_counts_on_a_terminal(tmp_path, pool, monkeypatch):
    """The live line of a stage shows rows read by the stage's pipeline as it runs."""
    import io as stdio
    import time as stdtime
    from clusmar_beam.transforms import storage as cio
    from clusmar_beam.core import progress
    import apache_beam as beam

    class Terminal(stdio.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("CLUSMAR_NO_PROGRESS", raising=False)
    ticker = rounds._Ticker("[round 1] select")
    with beam.Pipeline() as p:
        _ = p | cio.ReadTable(pool["glob"], required=["id", "probs"])
    assert progress.snapshot()["rows read"] == len(pool["ids"])
    for _ in range(100):           # wait for at least one redraw after the read
        if "rows read 2,500" in terminal.getvalue():
            break
        stdtime.sleep(0.1)
    ticker.stop()
    assert "[round 1] select: " in terminal.getvalue() and "rows read 2,500" in terminal.getvalue()


def test_round_and_status_take_only_their_own_flags(tmp_path, pool, capsys):
    config = _config(tmp_path, pool)
    assert cli.main(["round", "--config", config, "--pool", pool["glob"]]) == 2
    assert "unknown flag(s): --pool" in capsys.readouterr().err
    assert cli.main(["status", "--workdir", str(tmp_path / "wd"), "--output", "x"]) == 2
    assert "unknown flag(s): --output" in capsys.readouterr().err
    assert not (tmp_path / "wd" / "state.json").exists()


def _sent_ids(wd, rounds_):
    return [i for r in rounds_ for i in _manifest_ids(wd, r)]


def test_state_lost_mid_replace_recovers_from_the_previous_one_without_resending(tmp_path, pool, caplog):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config]) == 0
    _label(pool, wd, 1)
    assert cli.main(["round", "--config", config]) == 0
    manifest_2 = open(os.path.join(wd, "rounds", "round-0002", "manifest", "manifest-00000-of-00001.tfrecord"),
                      "rb").read()
    # a kill between the delete and the rename of state.json: only state.previous.json is left
    os.remove(os.path.join(wd, "state.json"))
    assert json.load(open(os.path.join(wd, "state.previous.json")))["rounds"]["2"]["status"] == "running"
    # the scheduler asks for the next round: round 2's selection is recorded done, so it is round 3
    assert rounds.next_round(wd) == 3
    with caplog.at_level(logging.WARNING, logger="clusmar"):
        assert cli.main(["round", "--config", config, "--round", "2"]) == 0   # recorded complete, nothing re-run
    assert "recovering from" in caplog.text and "recorded now" in caplog.text
    assert open(os.path.join(wd, "rounds", "round-0002", "manifest", "manifest-00000-of-00001.tfrecord"),
                "rb").read() == manifest_2
    assert _state(wd)["rounds"]["2"]["status"] == "completed"
    assert cli.main(["round", "--config", config]) == 0        # round 3, not round 1 again
    sent = _sent_ids(wd, (1, 2, 3))
    assert len(sent) == 3 * K_T == len(set(sent))


def test_sent_manifests_without_any_state_are_refused(tmp_path, pool, capsys):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config]) == 0
    for name in ("state.json", "state.previous.json"):
        if os.path.exists(os.path.join(wd, name)):
            os.remove(os.path.join(wd, name))
    assert cli.main(["round", "--config", config]) == 2
    assert "refusing to start over at round 1" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(wd, "state.json"))
    assert not os.path.exists(os.path.join(wd, "rounds", "round-0002"))


@pytest.mark.parametrize("damaged", ["labels-parquet", "labels-tfrecord", "manifest"])
def test_unreadable_labels_or_manifest_stop_the_round_with_the_state_unchanged(tmp_path, pool, capsys, damaged):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config]) == 0
    labeled = _label(pool, wd, 1, fraction=0.5)
    manifest = os.path.join(wd, "rounds", "round-0001", "manifest", "manifest-00000-of-00001.tfrecord")
    if damaged == "labels-parquet":
        bad = os.path.join(wd, "labels", "late.parquet")
        good = open(os.path.join(wd, "labels", "labels-round-1.parquet"), "rb").read()
        open(bad, "wb").write(good[: len(good) // 2])                      # a truncated upload
    elif damaged == "labels-tfrecord":      # the labels come back as TFRecord instead
        os.remove(os.path.join(wd, "labels", "labels-round-1.parquet"))
        bad = os.path.join(wd, "labels", "labels-round-1.tfrecord")
        write_tfrecord(bad, {"id": labeled, "label": np.zeros(len(labeled), dtype=np.int64)})
        data = bytearray(open(bad, "rb").read())
        data[len(data) // 2] ^= 0xFF                                        # a flipped byte: the CRC fails
        open(bad, "wb").write(bytes(data))
    else:
        bad = manifest
        data = bytearray(open(bad, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(bad, "wb").write(bytes(data))
    before = {name: open(os.path.join(wd, name), "rb").read() for name in ("state.json", "state.previous.json")
              if os.path.exists(os.path.join(wd, name))}
    capsys.readouterr()
    assert cli.main(["round", "--config", config]) == 2
    err = capsys.readouterr().err
    assert bad in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    after = {name: open(os.path.join(wd, name), "rb").read() for name in before}
    assert after == before
    assert not os.path.exists(os.path.join(wd, "rounds", "round-0002"))
    if damaged != "manifest":          # the file is fixed: the round runs, sending nothing twice
        os.remove(bad)
        if damaged == "labels-tfrecord":
            write_tfrecord(bad, {"id": labeled, "label": np.zeros(len(labeled), dtype=np.int64)})
        assert cli.main(["round", "--config", config]) == 0
        sent = _sent_ids(wd, (1, 2))
        assert len(sent) == len(set(sent)) == 2 * K_T


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(tmp_path, pool):
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config]) == 0
    manifest = os.path.join(wd, "rounds", "round-0001", "manifest")
    kept = sorted(os.listdir(manifest))
    leftovers = [os.path.join(manifest, ".tmp-0123456789ab", "manifest-00000-of-00001.tfrecord"),
                 os.path.join(wd, "clusters", ".tmp-ba9876543210", "clusters-00000-of-00001.parquet"),
                 os.path.join(wd, "state.json.tmp-feedface"), os.path.join(manifest, "manifest.json.tmp-c0ffee")]
    for path in leftovers:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(b"partial")
    assert cli.main(["round", "--config", config]) == 0
    assert not any(os.path.exists(p) for p in leftovers)
    assert not os.path.exists(os.path.join(manifest, ".tmp-0123456789ab"))
    assert sorted(os.listdir(manifest)) == kept
    assert _state(wd)["rounds"]["2"]["status"] == "completed"


_HOLD_LOCK = """
import os, sys, time
from clusmar_beam.app.rounds.lock import LockHeld, acquire_lock
try:
    acquire_lock(sys.argv[1], 1, False)
except LockHeld:
    print("refused", flush=True)
    sys.exit(0)
print("acquired", flush=True)
for _ in range(6000):     # hold the lock until the test says so (or a minute at most)
    if os.path.exists(sys.argv[2]):
        break
    time.sleep(0.01)
"""


def test_two_recoveries_of_a_stale_lock_cannot_both_take_it(tmp_path, pool, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (wd / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started_at": "x",
                                              "round": 1, "token": "stale"}))
    release = tmp_path / "release"
    runs = [subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(wd), str(release)], stdout=subprocess.PIPE,
                             text=True) for _ in range(4)]
    outcomes = sorted(p.stdout.readline().strip() for p in runs)   # each answers while the winner holds on
    release.write_text("")
    for p in runs:
        p.wait(timeout=120)
    assert outcomes == ["acquired", "refused", "refused", "refused"]
    # a killed holder leaves lock.json behind, but not the OS lock: the next run takes over
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(wd), str(tmp_path / "never")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "acquired"
    config = _config(tmp_path, pool, strategy="margin")
    assert cli.main(["round", "--config", config, "--break-lock"]) == 2     # a live run's lock is not broken
    assert "running process" in capsys.readouterr().err
    holder.kill()
    holder.wait()
    assert (wd / "lock.json").exists()
    assert cli.main(["round", "--config", config]) == 0
    assert not (wd / "lock.json").exists()


def test_status_next_round_is_what_a_scheduler_runs(tmp_path, pool, capsys, monkeypatch):
    config = _config(tmp_path, pool, strategy="margin")
    wd = str(tmp_path / "wd")
    capsys.readouterr()
    assert cli.main(["status", "--workdir", wd, "--next-round"]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert cli.main(["round", "--config", config, "--round", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["status", "--workdir", wd, "--next-round"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    monkeypatch.setattr(rounds, "FAULT_HOOK", lambda stage, when: (_ for _ in ()).throw(Boom("x"))
                        if (stage, when) == ("select", "before") else None)
    with pytest.raises(Boom):
        cli.main(["round", "--config", config, "--round", "2"])
    capsys.readouterr()
    assert cli.main(["status", "--workdir", wd, "--next-round"]) == 0
    assert capsys.readouterr().out.strip() == "2"                 # the unfinished round, again


def test_skip_unreadable_labels_when_asked(tmp_path, pool, capsys):
    """A truncated labels file stops the round; with --skip-unreadable-labels it is left out with a warning
    that state.json records, and its ids are still excluded as sent."""
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    assert cli.main(["round", "--config", config]) == 0
    _label(pool, wd, 1)
    bad = os.path.join(wd, "labels", "labels-round-1.parquet")
    good = open(bad, "rb").read()
    open(bad, "wb").write(good[: len(good) // 3])
    assert cli.main(["round", "--config", config]) == 2
    capsys.readouterr()
    assert cli.main(["round", "--config", config, "--skip-unreadable-labels"]) == 0
    out = capsys.readouterr().out
    assert f"labels file skipped as unreadable: {bad}" in out
    exclude = _state(wd)["rounds"]["2"]["stages"]["exclude"]
    assert exclude["labeled"] == 0 and exclude["sent_earlier"] == K_T
    assert [s["file"] for s in exclude["skipped_labels"]] == [bad]
    sent = _sent_ids(wd, (1, 2))
    assert len(sent) == len(set(sent)) == 2 * K_T


def test_dry_run_reads_everything_and_writes_nothing(tmp_path, pool, capsys):
    config = _config(tmp_path, pool)
    wd = tmp_path / "wd"
    assert cli.main(["round", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and "cluster  run" in out and "0 labeled ids, 0 sent" in out and "lock: free" in out
    assert not wd.exists()
    assert cli.main(["round", "--config", config]) == 0
    _label(pool, str(wd), 1, fraction=0.5)
    listing = sorted((p, p.stat().st_mtime_ns) for p in wd.rglob("*"))
    capsys.readouterr()
    assert cli.main(["round", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "round 2" in out and "reuse the clusters of round 1" in out
    assert f"{K_T // 2} labeled ids, {K_T} sent in earlier manifests" in out
    assert sorted((p, p.stat().st_mtime_ns) for p in wd.rglob("*")) == listing
    manifest = wd / "rounds" / "round-0001" / "manifest" / "manifest-00000-of-00001.tfrecord"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.write_bytes(bytes(data))
    assert cli.main(["round", "--config", config, "--dry-run"]) == 2
    assert str(manifest) in capsys.readouterr().err


def test_detach_returns_while_the_round_runs_and_status_shows_it(tmp_path, pool):
    import time
    config = _config(tmp_path, pool)
    wd = str(tmp_path / "wd")
    log = str(tmp_path / "logs" / "round.log")
    started = subprocess.run([sys.executable, "-m", "clusmar_beam.app.cli", "round", "--config", config, "--detach",
                              "--log-file", log], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    assert "running in the background" in started.stdout
    status = rounds.format_status(wd)          # the run holds the lock until its last save
    assert "a run holds the work directory" in status and log in status
    deadline = time.time() + 600
    while time.time() < deadline and os.path.exists(os.path.join(wd, "lock.json")):
        time.sleep(0.5)
    assert _state(wd)["rounds"]["1"]["status"] == "completed"
    assert "round 1 complete: 100 selected" in open(log).read()
    assert len(set(_manifest_ids(wd, 1))) == K_T
    again = subprocess.run([sys.executable, "-m", "clusmar_beam.app.cli", "round", "--config", config, "--round",
                            "1", "--detach", "--log-file", log], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_a_lock_left_on_another_host_is_taken_over_once_its_lease_runs_out(tmp_path, pool, capsys, caplog):
    """A killed pod's lock names a host that never comes back; the holder's renewals tell it apart."""
    import time
    from clusmar_beam.app.rounds import lock
    config = _config(tmp_path, pool, strategy="margin")
    wd = tmp_path / "wd"
    wd.mkdir()
    holder = {"host": "pod-gone-1234", "pid": 7, "started_at": "x", "round": 1, "token": "t"}
    (wd / "lock.json").write_text(json.dumps({**holder, "renewed_at": time.time() - 60}))
    assert cli.main(["round", "--config", config]) == 2                      # renewed a minute ago: held
    assert "locked by another run (host pod-gone-1234" in capsys.readouterr().err
    (wd / "lock.json").write_text(json.dumps({**holder, "renewed_at": time.time() - lock.LEASE_SECONDS - 5}))
    assert lock.read_holder(str(wd))["alive"] is False
    with caplog.at_level(logging.WARNING, logger="clusmar"):
        assert cli.main(["round", "--config", config]) == 0
    assert "has not renewed it for" in caplog.text
    assert not (wd / "lock.json").exists() and _state(str(wd))["rounds"]["1"]["status"] == "completed"


def test_the_holder_renews_its_lock_while_it_runs(tmp_path):
    import time
    from clusmar_beam.app.rounds import lock
    wd = tmp_path / "wd"
    wd.mkdir()
    mine = lock.acquire_lock(str(wd), 1, False)
    first = json.loads((wd / "lock.json").read_text())["renewed_at"]
    mine["lease"].stop()
    lease = lock._Lease(str(wd / "lock.json"), mine, None, every=0.05)
    deadline, seen = time.time() + 30, first
    while time.time() < deadline and seen == first:
        seen = lock.read_holder(str(wd)).get("renewed_at", first)   # {} for the instant lock.json is replaced
        time.sleep(0.05)
    assert seen > first
    mine["lease"] = lease
    lock.release_lock(str(wd), mine)
    assert not (wd / "lock.json").exists() and not lease.thread.is_alive()


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path, pool):
    """A container restarted in the same pod has the same host name, and its new process may get the dead
    holder's pid (here: our own); the process's start time tells them apart."""
    import time
    from clusmar_beam.app.rounds import lock
    config = _config(tmp_path, pool, strategy="margin")
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": "x",
                                              "round": 1, "token": "t", "renewed_at": time.time(),
                                              "process_start": "another-boot:12345"}))
    assert lock.read_holder(str(wd))["alive"] is False
    assert cli.main(["round", "--config", config]) == 0
    assert _state(str(wd))["rounds"]["1"]["status"] == "completed"

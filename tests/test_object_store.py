"""Rounds with everything on an object store other than GCS: pool, model, labels and work directory on
s3://, through Beam's S3 file system against a local S3-compatible server (moto's, over HTTP).

TensorFlow reads neither s3:// models nor s3:// TFRecords by itself; the pipelines read both through
Beam's FileSystems, and must give the same manifests as the same rounds on local files.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_manifest, write_tfrecord

BUCKET = "clusmar"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3   # the [test] extra has them
    from moto.server import ThreadedMotoServer
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"client": client, "env": env}
    server.stop()


def _upload(client, local_root, prefix):
    for folder, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(folder, name)
            client.upload_file(path, BUCKET, f"{prefix}/{os.path.relpath(path, local_root)}")


def _download(client, prefix, local_root):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            target = os.path.join(local_root, os.path.relpath(item["Key"], prefix))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            client.download_file(BUCKET, item["Key"], target)


def _clusmar(env, *argv):
    run = subprocess.run([sys.executable, "-m", "clusmar_beam.app.cli", *argv], capture_output=True, text=True,
                         env={**os.environ, **env, "CLUSMAR_NO_PROGRESS": "1"}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _config(path, pool, model, workdir):
    path.write_text(f"pool: {pool}\nmodel: {model}\nworkdir: {workdir}\nbatch_size: 40\ncandidate_multiplier: 4\n"
                    "target_mean_cluster_size: 5\nseed: 3\n")


def test_rounds_on_s3_give_the_local_manifests(tmp_path, s3):
    import keras
    rng = np.random.default_rng(21)
    n, dim = 900, 6
    ids = rng.permutation(100 * n)[:n].astype(np.int64)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    for part in range(2):
        write_tfrecord(str(tmp_path / "raw" / f"raw-{part}.tfrecord"),
                       {"id": ids[part::2], "features": features[part::2]})
    keras.utils.set_random_seed(4)
    inputs = keras.Input((dim,), name="features")
    embedding = keras.layers.Dense(8, activation="tanh", name="embedding")(inputs)
    probs = keras.layers.Dense(4, activation="softmax", name="probs")(embedding)
    keras.Model(inputs, {"embedding": embedding, "probs": probs}).export(str(tmp_path / "model"), verbose=False)
    client = s3["client"]
    _upload(client, tmp_path / "raw", "raw")
    _upload(client, tmp_path / "model", "model")
    _config(tmp_path / "local.yaml", tmp_path / "raw" / "*.tfrecord", tmp_path / "model", tmp_path / "wd")
    _config(tmp_path / "s3.yaml", f"s3://{BUCKET}/raw/*.tfrecord", f"s3://{BUCKET}/model", f"s3://{BUCKET}/al")
    client.upload_file(str(tmp_path / "s3.yaml"), BUCKET, "al/round.yaml")

    for round_index in (1, 2):
        _clusmar({}, "round", "--config", str(tmp_path / "local.yaml"))
        _clusmar(s3["env"], "round", "--config", f"s3://{BUCKET}/al/round.yaml")
        manifest = f"rounds/round-{round_index:04d}/manifest"
        local = read_manifest(str(tmp_path / "wd" / manifest))
        _download(client, f"al/{manifest}", str(tmp_path / "from-s3" / manifest))
        remote = read_manifest(str(tmp_path / "from-s3" / manifest))
        assert len(local) == 40 and remote == local
        # the labelers answer the round's manifest with a TFRecord of labels, in both work directories
        labeled = np.array([row["id"] for row in local], dtype=np.int64)
        labels = str(tmp_path / "labels" / f"round-{round_index}.tfrecord")
        write_tfrecord(labels, {"id": labeled, "label": labeled % 4})
        os.makedirs(tmp_path / "wd" / "labels", exist_ok=True)
        os.link(labels, tmp_path / "wd" / "labels" / f"round-{round_index}.tfrecord")
        client.upload_file(labels, BUCKET, f"al/labels/round-{round_index}.tfrecord")
    status = _clusmar(s3["env"], "status", "--workdir", f"s3://{BUCKET}/al", "--next-round")
    assert status.stdout.strip() == "3"
    _download(client, "al/rounds/round-0002/exclude", str(tmp_path / "exclude"))
    import pyarrow.parquet as pq
    excluded = pq.read_table(str(tmp_path / "exclude" / "exclude-00000-of-00001.parquet")).column("id").to_numpy()
    assert len(excluded) == 40   # round 1's labels (and its manifest): nothing sent twice


def test_the_lock_on_s3_is_taken_by_one_of_two_runs(s3, monkeypatch):
    """Conditional writes: a free lock is created by one run only; a stale lock is taken over by one of two
    recoveries that judged it stale at the same time; a live holder is refused."""
    import json
    from clusmar_beam.app.rounds import conditional
    from clusmar_beam.app.rounds.lock import LockHeld, acquire_lock, release_lock
    from apache_beam.options.pipeline_options import PipelineOptions
    from clusmar_beam.pipelines.options import use_file_systems_with
    for name, value in s3["env"].items():
        monkeypatch.setenv(name, value)
    use_file_systems_with(PipelineOptions([]))   # what every clusmar command does first
    workdir = f"s3://{BUCKET}/lock-test"
    path = f"{workdir}/lock.json"
    assert conditional.version(path) is None
    assert conditional.put_if(path, b"first", None) and not conditional.put_if(path, b"second", None)
    stale = conditional.version(path)
    assert conditional.put_if(path, b"recovery A", stale)      # both judged the same holder stale ...
    assert not conditional.put_if(path, b"recovery B", stale)  # ... only the first replaces it
    assert s3["client"].get_object(Bucket=BUCKET, Key="lock-test/lock.json")["Body"].read() == b"recovery A"
    s3["client"].delete_object(Bucket=BUCKET, Key="lock-test/lock.json")

    mine = acquire_lock(workdir, 1, False)
    with pytest.raises(LockHeld):            # a live holder on this host
        acquire_lock(workdir, 1, False)
    release_lock(workdir, mine)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3["client"].put_object(Bucket=BUCKET, Key="lock-test/lock.json", Body=json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started_at": "x", "round": 1, "token": "stale"}))
    taken = acquire_lock(workdir, 2, False)  # the holder's process is gone: taken over
    holder = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="lock-test/lock.json")["Body"].read())
    assert holder["token"] == taken["token"] and holder["round"] == 2
    release_lock(workdir, taken)
    assert conditional.version(path) is None

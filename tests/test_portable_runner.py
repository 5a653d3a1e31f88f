"""The cluster pipeline through Beam's PortableRunner with an EXTERNAL worker pool, as Flink runs Python.

The SDK workers are separate processes started by `worker_pool_main`, so what reaches
them is what a Flink or Dataflow worker gets: pickled DoFns, coders, files through
FileSystems.  Their output must be the DirectRunner's, byte for byte.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from clusmar_beam.app import cli


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_pool():
    """A worker_pool_main on a free port; it starts each SDK worker with the `python` on PATH."""
    port = _free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"worker_pool_main exited with {proc.returncode}")
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("worker_pool_main did not open its port")
        yield f"localhost:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the pool and the SDK workers it started
        proc.wait(timeout=60)


def _portable(endpoint):
    return ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
            f"--environment_config={endpoint}"]


def _files(directory):
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(directory, "clusters-*.parquet")))}


@pytest.mark.parametrize("extra", [[], ["--hac-shards", "3"], ["--hac-shards", "8", "--hac-one-worker-clusters", "60"]],
                         ids=["one-worker", "sharded", "sharded-repeats"])
def test_cluster_on_external_workers_matches_direct_runner(tmp_path, worker_pool, extra):
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "3000", "--dim", "12",
                     "--num-classes", "5", "--seed", "21", "--region-sizes", "heavy-tailed",
                     "--num-shards", "3"]) == 0
    args = ["cluster", "--pool", str(tmp_path / "pool" / "pool-*.parquet"), "--distance-threshold", "0.3", *extra]
    assert cli.main([*args, "--output", str(tmp_path / "direct")]) == 0
    assert cli.main([*args, "--output", str(tmp_path / "portable"), *_portable(worker_pool)]) == 0
    direct, portable = _files(tmp_path / "direct"), _files(tmp_path / "portable")
    assert direct and portable == direct
    if "--hac-one-worker-clusters" in extra:  # partitioned repeats took only the members that waited and their targets
        rounds = json.load(open(tmp_path / "portable" / "clustering.json"))["sharded_rounds"]
        left = 3000 - np.cumsum([r["merges"] for r in rounds])
        assert any(r["clusters"] < before for r, before in zip(rounds[1:], left))
        assert any(r["parts"] > 1 for r in rounds[1:])


def test_select_on_external_workers_matches_direct_runner(tmp_path, worker_pool):
    """The manifest and its diagnostics (the pick cluster sizes travel as a side input) are the DirectRunner's."""
    import json
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "3000", "--dim", "12",
                     "--num-classes", "5", "--seed", "22", "--num-shards", "3"]) == 0
    pool = str(tmp_path / "pool" / "pool-*.parquet")
    assert cli.main(["cluster", "--pool", pool, "--target-mean-cluster-size", "6",
                     "--output", str(tmp_path / "clusters")]) == 0
    args = ["select", "--pool", pool, "--clusters", str(tmp_path / "clusters"), "--batch-size", "200",
            "--candidate-multiplier", "3", "--round", "2"]
    assert cli.main([*args, "--output", str(tmp_path / "direct")]) == 0
    assert cli.main([*args, "--output", str(tmp_path / "portable"), *_portable(worker_pool)]) == 0
    manifests = [{os.path.basename(p): open(p, "rb").read()
                  for p in sorted(glob.glob(os.path.join(tmp_path / where, "manifest-*.tfrecord")))}
                 for where in ("direct", "portable")]
    assert manifests[0] and manifests[0] == manifests[1]
    summaries = [json.load(open(tmp_path / where / "manifest.json")) for where in ("direct", "portable")]
    assert summaries[0]["diagnostics"]["picks_by_cluster_size"]
    assert summaries[0]["diagnostics"] == summaries[1]["diagnostics"]
    assert summaries[0]["warnings"] == summaries[1]["warnings"]


def test_round_on_external_workers_matches_direct_runner(tmp_path, worker_pool):
    """A whole `clusmar round` (cluster once, exclude, select) through the EXTERNAL worker pool."""
    assert cli.main(["generate-pool", "--output", str(tmp_path / "pool"), "--num-examples", "2000", "--dim", "8",
                     "--num-classes", "4", "--seed", "23", "--num-shards", "2"]) == 0
    manifests = {}
    for where, beam_args in (("direct", []), ("portable", _portable(worker_pool))):
        config = tmp_path / f"{where}.yaml"
        config.write_text(f"pool: {tmp_path / 'pool' / 'pool-*.parquet'}\nworkdir: {tmp_path / where}\n"
                          f"batch_size: 100\ncandidate_multiplier: 2\ntarget_mean_cluster_size: 8\nseed: 4\n"
                          f"beam_args: {beam_args!r}\n")
        assert cli.main(["round", "--config", str(config), "--round", "1"]) == 0
        manifest = tmp_path / where / "rounds" / "round-0001" / "manifest"
        manifests[where] = {os.path.basename(p): open(p, "rb").read()
                            for p in sorted(glob.glob(os.path.join(manifest, "manifest-*.tfrecord")))}
        manifests[where]["clusters"] = _files(tmp_path / where / "clusters")
    assert manifests["direct"] and manifests["portable"] == manifests["direct"]

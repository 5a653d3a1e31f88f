"""The deploy files parse, and every flag, module, path and version they name exists here.

Docker, gcloud, Airflow and Kubernetes are not on this machine; these checks keep the
files from rotting silently as the code changes.
"""
import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import apache_beam
import numpy as np
import pytest
import yaml

from clusmar_beam.app import cli
from conftest import read_manifest, write_parquet

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _launch_stage():
    spec = importlib.util.spec_from_file_location("launch_stage", DEPLOY / "dataflow" / "launch_stage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags_of(subcommand):
    return {o for a in _launch_stage().own_parser(subcommand)._actions for o in a.option_strings}


def _clusmar_commands(text):
    """Every `clusmar SUBCOMMAND --flag ...` in a shell command line (including inside $(...))."""
    found = []
    for chunk in re.split(r"\$\(|\)|&&|;", text):
        words = shlex.split(chunk.replace('"', " ").replace("'", " "))
        for i, word in enumerate(words):
            if word == "clusmar" and i + 2 < len(words) and words[i + 2].startswith("--"):   # a command, not prose
                flags = [w.split("=")[0] for w in words[i + 2:] if w.startswith("--")]
                found.append((words[i + 1], flags))
    return found


def _check_commands(text, at_least):
    commands = _clusmar_commands(text)
    assert {name for name, _ in commands} >= set(at_least)
    beam_flags = {"--runner", "--job_endpoint", "--artifact_endpoint", "--environment_type",
                  "--environment_config", "--project", "--region", "--temp_location"}
    for name, flags in commands:
        assert name in cli.SUBCOMMANDS, name
        unknown = [f for f in flags if f not in _flags_of(name) and f not in beam_flags]
        assert not unknown, (name, unknown)


def test_sdk_image_is_beams_at_the_pinned_version_with_this_package():
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    version = re.search(r"ARG BEAM_VERSION=(\S+)", text).group(1)
    assert version == apache_beam.__version__
    pin = re.search(r'BEAM_PIN = ">=([\d.]+),<([\d.]+)"', (ROOT / "setup.py").read_text())
    assert pin.group(1) == version
    python = re.search(r"apache/beam_python(\d+\.\d+)_sdk:\$\{BEAM_VERSION\}", text).group(1)
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert "pip check" in text
    extras = set(re.findall(r"'\[(\w+)\]'", text))
    setup = {}
    exec(compile((ROOT / "setup.py").read_text().replace("setuptools.setup(", "dict("), "setup.py", "exec"), setup)
    assert extras and extras <= set(setup["EXTRAS"]), extras
    launcher = (DEPLOY / "dataflow" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+) \S+$", launcher, flags=re.M):
        assert (ROOT / source).exists(), source


def test_flex_template_parameters_are_clusmar_flags():
    meta = json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())
    stage = next(p for p in meta["parameters"] if p["name"] == "stage")
    stages = re.fullmatch(r"\^\((.+)\)\$", stage["regexes"][0]).group(1).split("|")
    assert set(stages) <= set(cli.SUBCOMMANDS) and "round" in stages and "select" in stages
    flags = set().union(*(_flags_of(s) for s in stages))
    for parameter in meta["parameters"]:
        if parameter["name"] != "stage":
            assert "--" + parameter["name"].replace("_", "-") in flags, parameter["name"]
        for regex in parameter.get("regexes", []):
            re.compile(regex)


def test_the_template_program_runs_a_stage(tmp_path, rng):
    launch = _launch_stage()
    assert launch.clusmar_argv(["--stage=select", "--batch_size=10", "--overwrite=true",
                                "--runner=DirectRunner", "--candidate_multiplier=2"]) == \
        ["select", "--batch-size=10", "--overwrite", "--runner=DirectRunner", "--candidate-multiplier=2"]
    assert launch.clusmar_argv(["--stage=round", "--config=gs://b/round.yaml", "--force=false", "--round=3"]) == \
        ["round", "--config=gs://b/round.yaml", "--round=3"]
    with pytest.raises(SystemExit):
        launch.clusmar_argv(["--stage=bogus"])
    ids = np.arange(500)
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": ids, "margin": rng.random(500).astype(np.float32)})
    argv = launch.clusmar_argv(["--stage=select", f"--pool={tmp_path / 'pool' / '*.parquet'}", "--batch_size=25",
                                "--strategy=margin", f"--output={tmp_path / 'manifest'}", "--runner=DirectRunner"])
    assert cli.main(argv) == 0
    assert len(read_manifest(tmp_path / "manifest")) == 25


def test_flink_compose_pairs_a_worker_pool_with_the_taskmanager_at_matching_versions():
    from apache_beam.options.pipeline_options import FlinkRunnerOptions
    text = (DEPLOY / "flink" / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    job_server = re.fullmatch(r"apache/beam_flink([\d.]+)_job_server:(\S+)", services["job-server"]["image"])
    assert job_server.group(2) == apache_beam.__version__
    flink = re.match(r"flink:(\d+\.\d+)", services["jobmanager"]["image"]).group(1)
    assert job_server.group(1) == flink and flink in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert services["taskmanager"]["image"] == services["jobmanager"]["image"]
    assert services["worker-pool"]["network_mode"] == "service:taskmanager"
    assert "--worker_pool" in services["worker-pool"]["command"]
    _check_commands(text.replace("#", " "), ["cluster"])
    assert "--environment_config localhost:50000" in text


def test_schedules_run_the_next_round_with_flags_that_exist():
    dag = (DEPLOY / "schedule" / "clusmar_round_dag.py").read_text()
    tree = ast.parse(dag)
    command = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "ROUND_COMMAND" for t in node.targets))
    _check_commands(ast.literal_eval(command), ["round", "status"])
    cron = yaml.safe_load((DEPLOY / "schedule" / "cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    _check_commands(" ".join(container["args"]), ["round", "status"])


def test_deploy_scripts_are_valid_shell():
    for script in sorted(DEPLOY.rglob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


DATAFLOW_DRY_RUN = ["--runner=DataflowRunner", "--dry_run=True", "--project=clusmar-test", "--region=us-central1",
                    "--temp_location=gs://clusmar-test-bucket/tmp"]


def test_every_pipeline_builds_a_dataflow_job_offline_and_writes_nothing(tmp_path, rng):
    import keras
    inputs = keras.Input((4,), name="features")
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.Dense(5, name="embedding")(inputs))).save(tmp_path / "model.keras")
    x = rng.normal(size=(300, 4)).astype(np.float32)
    probs = rng.dirichlet(np.ones(3), 300).astype(np.float32)
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(300), "features": x, "embedding": x,
                                                          "probs": probs})
    write_parquet(str(tmp_path / "clusters" / "clusters-00000-of-00001.parquet"),
                  {"id": np.arange(300), "cluster_id": np.arange(300) % 7})
    pool = str(tmp_path / "pool" / "*.parquet")
    commands = {
        "generate-pool": ["generate-pool", "--num-examples", "1000", "--dim", "4", "--num-classes", "3"],
        "score": ["score", "--pool", pool, "--model", str(tmp_path / "model.keras"), "--embedding-layer", "embedding"],
        "cluster": ["cluster", "--pool", pool, "--target-mean-cluster-size", "5"],
        "cluster-sharded": ["cluster", "--pool", pool, "--distance-threshold", "0.3", "--hac-shards", "3"],
        "select": ["select", "--pool", pool, "--clusters", str(tmp_path / "clusters"), "--batch-size", "20"],
    }
    for name, argv in commands.items():
        out = tmp_path / f"out-{name}"
        assert cli.main([*argv, "--output", str(out), *DATAFLOW_DRY_RUN]) == 0, name
        assert not out.exists(), name


def _min_ram_by_step(pipeline):
    """{step name: min_ram bytes} of the steps whose environment carries a min_ram hint."""
    from apache_beam.portability import common_urns
    proto = pipeline.to_runner_api()
    urn = common_urns.resource_hints.MIN_RAM_BYTES.urn
    hinted = {}
    for transform in proto.components.transforms.values():
        hints = proto.components.environments[transform.environment_id].resource_hints if transform.environment_id \
            else {}
        if urn in hints and not transform.subtransforms:
            hinted[transform.unique_name] = int(hints[urn])
    return hinted


# Peak RSS (bytes) of hac.average_linkage at 1M points, the process included, the larger of the heavy-tailed and
# lognormal pools (benchmarks/RESULTS.md, "One-worker HAC memory by dimension"), by dimension.
MEASURED_ONE_WORKER_HAC_PEAKS_AT_1M = {8: 816_463_872, 16: 992_481_280, 32: 1_350_991_872, 64: 1_998_290_944,
                                       128: 3_558_625_280}


def test_the_one_worker_hac_is_modelled_per_point_and_dimension():
    """The HAC's per-cluster state does not shrink with the dimension: a 16-d pool needs more per embedding
    byte than a 64-d one.  The model covers the measured peaks, and its per-point part is no looser than 25%."""
    from clusmar_beam.transforms import memory
    n = 10_000_000

    def per_embedding_byte(dim):
        return (memory.one_worker_hac_bytes(n, dim) - memory.WORKER_BASE_BYTES) / (n * dim * 4)
    assert per_embedding_byte(8) > per_embedding_byte(16) > per_embedding_byte(64) > per_embedding_byte(128)
    assert memory.one_worker_hac_bytes(n, 64) > memory.one_worker_hac_bytes(n, 16)
    assert memory.one_worker_hac_bytes(0, 64) == memory.WORKER_BASE_BYTES
    for dim, peak in MEASURED_ONE_WORKER_HAC_PEAKS_AT_1M.items():
        modelled = memory.one_worker_hac_bytes(1_000_000, dim)
        assert peak < modelled and modelled - memory.WORKER_BASE_BYTES < 1.25 * peak, dim


def test_the_steps_that_hold_more_than_a_batch_ask_for_memory(tmp_path, rng, monkeypatch):
    """The one-worker HAC and the k_m candidates carry min_ram hints from the memory model; nothing else does."""
    from clusmar_beam.pipelines import cluster, select
    from clusmar_beam.pipelines.options import make_pipeline, parse_options
    from clusmar_beam.transforms import memory
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(2000), "embedding": x,
                                                          "margin": rng.random(2000).astype(np.float32)})
    pool = str(tmp_path / "pool" / "*.parquet")
    argv = ["--pool", pool, "--distance-threshold", "0.3", "--output", str(tmp_path / "c"), *DATAFLOW_DRY_RUN]
    options, opts = parse_options(cluster.ClusterOptions, argv)
    pipeline = make_pipeline(options)
    modelled, one_worker_hac_bytes = [], memory.one_worker_hac_bytes
    monkeypatch.setattr(memory, "one_worker_hac_bytes", lambda *shape: modelled.append(shape) or
                        one_worker_hac_bytes(*shape))
    cluster.build(pipeline, opts)
    assert modelled == [(2000, 16)]   # the points and dimension, from the Parquet footer
    hinted = _min_ram_by_step(pipeline)
    want = int(np.ceil(one_worker_hac_bytes(2000, 16) / memory.GiB)) * memory.GiB
    assert set(hinted) == {"Cluster/Cluster"} and hinted["Cluster/Cluster"] == want
    assert want >= memory.WORKER_BASE_BYTES

    options, opts = parse_options(select.SelectOptions, [
        "--pool", pool, "--strategy", "margin", "--batch-size", "50", "--output", str(tmp_path / "m"),
        *DATAFLOW_DRY_RUN])
    pipeline = make_pipeline(options)
    select.build(pipeline, opts)
    hinted = _min_ram_by_step(pipeline)
    assert {step.split("/")[0] + "/" + step.split("/")[1] for step in hinted} == {"Candidates/KeepLowest", "Order/FlatMap(order)"}
    assert set(hinted.values()) == {memory.GiB * int(np.ceil(memory.candidates_bytes(50) / memory.GiB))}
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()

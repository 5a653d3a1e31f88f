"""Same inputs and seed -> byte-identical outputs with one worker and with two worker processes."""
import glob
import json
import os

from clusmar_beam.app import cli
from clusmar_beam.pipelines import options

MULTI = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _files(directory, pattern):
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(directory, pattern)))}


def test_generate_cluster_select_identical_across_worker_counts(tmp_path):
    outputs = {}
    for name, flags in (("one", ["--direct_num_workers=1"]), ("two", MULTI)):
        root = tmp_path / name
        assert cli.main(["generate-pool", "--output", str(root / "pool"), "--num-examples", "6000", "--dim", "16",
                         "--num-classes", "5", "--seed", "3", "--num-shards", "4", *flags]) == 0
        pool = str(root / "pool" / "pool-*.parquet")
        assert cli.main(["cluster", "--pool", pool, "--output", str(root / "clusters"),
                         "--distance-threshold", "0.2", "--num-shards", "2",
                         "--exact-search-max", "1000", *flags]) == 0  # through the IVF index's threads too
        assert cli.main(["select", "--pool", pool, "--clusters", str(root / "clusters"), "--batch-size", "500",
                         "--seed", "9", "--round", "1", "--output", str(root / "manifest"), "--num-shards", "2",
                         *flags]) == 0
        outputs[name] = (_files(root / "pool", "pool-*"), _files(root / "clusters", "clusters-*"),
                         _files(root / "manifest", "manifest-*"))
        summary = json.load(open(root / "manifest" / "manifest.json"))
        outputs[name] += ({k: v for k, v in summary.items() if k not in ("pool", "clusters")},)
    for one, two in zip(outputs["one"], outputs["two"]):
        assert one.keys() == two.keys() and one
        assert one == two


def test_sharded_cluster_and_select_identical_with_worker_threads(tmp_path, monkeypatch):
    """Bundles run concurrently in threads of one process (as an SDK harness runs them on Dataflow or Flink):
    the DoFns share nothing that one bundle's thread could change under another's.  The CLI refuses this
    FnApiRunner mode (Beam 2.77 drops elements of large shuffles in it, options.check_direct_mode); at this
    size it keeps them, so the refusal is lifted here."""
    monkeypatch.setattr(options, "check_direct_mode", lambda _: None)
    threads = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    pool = tmp_path / "pool"
    assert cli.main(["generate-pool", "--output", str(pool), "--num-examples", "8000", "--dim", "16",
                     "--num-classes", "5", "--seed", "4", "--num-shards", "4",
                     "--region-sizes", "heavy-tailed"]) == 0
    outputs = {}
    for name, flags in (("one", ["--direct_num_workers=1"]), ("threads", threads)):
        root = tmp_path / name
        assert cli.main(["cluster", "--pool", str(pool / "pool-*.parquet"), "--output", str(root / "clusters"),
                         "--target-mean-cluster-size", "6", "--hac-shards", "6", "--num-shards", "3", *flags]) == 0
        assert cli.main(["select", "--pool", str(pool / "pool-*.parquet"), "--clusters", str(root / "clusters"),
                         "--batch-size", "700", "--seed", "9", "--round", "1", "--output", str(root / "manifest"),
                         "--num-shards", "2", *flags]) == 0
        outputs[name] = (_files(root / "clusters", "clusters-*"), _files(root / "manifest", "manifest-*"),
                         json.load(open(root / "clusters" / "clustering.json")))
    for one, threaded in zip(outputs["one"], outputs["threads"]):
        assert one.keys() == threaded.keys() and one
        assert one == threaded

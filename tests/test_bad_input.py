"""Each bad input: one clear message (file, column, count), exit status 2, nothing that looks complete."""
import os

import numpy as np
import pytest

from clusmar_beam.app import cli
from clusmar_beam.core.errors import MARKER, InputError, input_error_message
from conftest import random_probs, write_parquet, write_tfrecord


def _good_pool(tmp_path, rng, n=200, name="pool-0.parquet", **overrides):
    columns = {"id": np.arange(n, dtype=np.int64), "probs": random_probs(rng, n, 4),
               "embedding": rng.normal(size=(n, 8)).astype(np.float32)}
    columns.update(overrides)
    return write_parquet(str(tmp_path / "pool" / name), columns)


def _clusters(tmp_path, ids):
    write_parquet(str(tmp_path / "clusters" / "clusters-00000-of-00001.parquet"),
                  {"id": np.asarray(ids), "cluster_id": np.arange(len(ids)) % 7})


def _run_select(tmp_path, *extra, pool=None):
    return cli.main(["select", "--pool", pool or str(tmp_path / "pool" / "*"), "--clusters",
                     str(tmp_path / "clusters"), "--output", str(tmp_path / "out"), "--batch-size", "10", *extra])


def _assert_failed_cleanly(code, capsys, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("clusmar")]
    assert len(lines) == 1, err
    assert MARKER.strip() not in lines[0] and "[while running" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _nothing_written(directory):
    """A run that failed leaves no output directory it made (these tests' outputs are new)."""
    assert not os.path.exists(directory), os.listdir(directory)


def test_no_files_match(tmp_path, capsys):
    code = _run_select(tmp_path, pool=str(tmp_path / "nothing-*.parquet"))
    _assert_failed_cleanly(code, capsys, "no files match", "nothing-*.parquet")
    _nothing_written(tmp_path / "out")


def test_truncated_parquet_file(tmp_path, rng, capsys):
    """A file cut short (a killed writer, a partial copy): named, for select and for cluster."""
    _good_pool(tmp_path, rng)
    path = _good_pool(tmp_path, rng, name="pool-1.parquet", id=np.arange(200, 400, dtype=np.int64))
    _clusters(tmp_path, np.arange(400))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "pool-1.parquet", "not a readable Parquet file")
    _nothing_written(tmp_path / "out")
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.3"])
    _assert_failed_cleanly(code, capsys, "pool-1.parquet", "not a readable Parquet file")
    _nothing_written(tmp_path / "c")


@pytest.mark.parametrize("column", ["id", "probs"])
def test_missing_column(tmp_path, rng, capsys, column):
    path = _good_pool(tmp_path, rng)
    _clusters(tmp_path, np.arange(200))
    import pyarrow.parquet as pq
    table = pq.read_table(path).drop_columns([column])
    pq.write_table(table, path)
    code = _run_select(tmp_path)
    _assert_failed_cleanly(code, capsys, "pool-0.parquet", f"'{column}'", "missing column")
    _nothing_written(tmp_path / "out")


def test_missing_embedding_for_cluster(tmp_path, rng, capsys):
    path = _good_pool(tmp_path, rng)
    import pyarrow.parquet as pq
    pq.write_table(pq.read_table(path).drop_columns(["embedding"]), path)
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "pool-0.parquet", "'embedding'")
    _nothing_written(tmp_path / "c")
    assert not os.path.exists(tmp_path / "c" / "clustering.json")


def test_embeddings_of_mixed_length_in_one_file(tmp_path, rng, capsys):
    embeddings = [rng.normal(size=8).astype(np.float32) for _ in range(50)]
    embeddings[3] = embeddings[3][:5]
    embeddings[9] = embeddings[9][:5]
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(tmp_path / "pool")
    pq.write_table(pa.table({"id": np.arange(50), "embedding": pa.array(embeddings, type=pa.list_(pa.float32()))}),
                   str(tmp_path / "pool" / "p.parquet"))
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "p.parquet", "'embedding'", "2 of 50 rows")
    _nothing_written(tmp_path / "c")


def test_embeddings_of_different_length_across_files(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng, n=50, name="a.parquet")
    _good_pool(tmp_path, rng, n=50, name="b.parquet", id=np.arange(50, 100),
               embedding=rng.normal(size=(50, 6)).astype(np.float32))
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "'embedding'", "a.parquet", "b.parquet")
    _nothing_written(tmp_path / "c")


@pytest.mark.parametrize("shards", ["1", "3"])
def test_ids_of_different_types_across_files(tmp_path, rng, capsys, shards):
    """Text ids in one file and integers in another cannot be ordered together: one line naming both files."""
    _good_pool(tmp_path, rng, n=50, name="a.parquet")
    _good_pool(tmp_path, rng, n=50, name="b.parquet", id=np.array([f"page-{i}" for i in range(50)], dtype=object))
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5", "--hac-shards", shards])
    _assert_failed_cleanly(code, capsys, "'id'", "different types", "a.parquet", "b.parquet")
    _nothing_written(tmp_path / "c")


@pytest.mark.parametrize("clusters_ids", ["int", "text"])
def test_select_with_ids_of_different_types(tmp_path, rng, capsys, clusters_ids):
    """Integer and text ids in the pool's files, the clusters of either type: one line naming a file of each type
    (the first in name order: the clusters' file and the pool's file of the other type)."""
    _good_pool(tmp_path, rng, n=50, name="a.parquet")
    _good_pool(tmp_path, rng, n=50, name="b.parquet", id=np.array([f"page-{i}" for i in range(50)], dtype=object))
    _clusters(tmp_path, np.arange(50) if clusters_ids == "int" else np.array([f"page-{i}" for i in range(50)],
                                                                                 dtype=object))
    line = _assert_failed_cleanly(_run_select(tmp_path), capsys, "--pool, --clusters", "'id'", "different types")
    assert "clusters-00000-of-00001.parquet" in line, line
    assert ("a.parquet" if clusters_ids == "text" else "b.parquet") in line, line
    _nothing_written(tmp_path / "out")


def test_direct_runner_threads_refused(tmp_path, rng, capsys):
    """Beam 2.77's FnApiRunner drops elements of large shuffles with bundles on several threads
    (benchmarks/check_direct_threads.py): refused before anything runs, pointing at the mode that works."""
    _good_pool(tmp_path, rng)
    _clusters(tmp_path, np.arange(200))
    _assert_failed_cleanly(_run_select(tmp_path, "--direct_num_workers=2", "--direct_running_mode=multi_threading"),
                           capsys, "multi_threading", "--direct_num_workers 2", "multi_processing")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_probabilities(tmp_path, rng, capsys, value):
    probs = random_probs(rng, 200, 4)
    probs[[5, 17, 60]] = value
    _good_pool(tmp_path, rng, probs=probs)
    _clusters(tmp_path, np.arange(200))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "pool-0.parquet", "'probs'", "3 rows", "NaN or infinite")
    _nothing_written(tmp_path / "out")


def test_non_finite_embeddings(tmp_path, rng, capsys):
    embedding = rng.normal(size=(200, 8)).astype(np.float32)
    embedding[[1, 2], 3] = np.nan
    _good_pool(tmp_path, rng, embedding=embedding)
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "pool-0.parquet", "'embedding'", "2 rows")
    _nothing_written(tmp_path / "c")


def test_negative_probabilities(tmp_path, rng, capsys):
    probs = random_probs(rng, 200, 4)
    probs[7] = [-0.1, 0.6, 0.3, 0.2]
    _good_pool(tmp_path, rng, probs=probs)
    _clusters(tmp_path, np.arange(200))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "pool-0.parquet", "'probs'", "1 row with negative")
    _nothing_written(tmp_path / "out")


def test_probabilities_not_summing_to_one(tmp_path, rng, capsys):
    probs = random_probs(rng, 200, 4)
    probs[:4] *= 2
    _good_pool(tmp_path, rng, probs=probs)
    _clusters(tmp_path, np.arange(200))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "pool-0.parquet", "'probs'", "4 rows", "sum to 1")
    _nothing_written(tmp_path / "out")


def test_duplicate_ids_across_files(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng, n=100, name="a.parquet")
    _good_pool(tmp_path, rng, n=100, name="b.parquet", id=np.arange(95, 195))
    _clusters(tmp_path, np.arange(195))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "'id'", "5 duplicated ids")
    _nothing_written(tmp_path / "out")


def test_duplicate_ids_for_cluster(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng, n=100, name="a.parquet")
    _good_pool(tmp_path, rng, n=100, name="b.parquet", id=np.arange(98, 198))
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "'id'", "2 duplicated ids")
    _nothing_written(tmp_path / "c")


def test_empty_pool(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng, n=0)
    _clusters(tmp_path, np.arange(0))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "empty")
    _nothing_written(tmp_path / "out")


def test_empty_tfrecord_pool(tmp_path, capsys):
    os.makedirs(tmp_path / "pool")
    open(tmp_path / "pool" / "p.tfrecord", "wb").close()
    code = cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.5"])
    _assert_failed_cleanly(code, capsys, "p.tfrecord")
    _nothing_written(tmp_path / "c")


@pytest.mark.parametrize("size", ["0", "-5"])
def test_batch_size_not_positive(tmp_path, rng, capsys, size):
    _good_pool(tmp_path, rng)
    _clusters(tmp_path, np.arange(200))
    code = cli.main(["select", "--pool", str(tmp_path / "pool" / "*"), "--clusters", str(tmp_path / "clusters"),
                     "--output", str(tmp_path / "out"), "--batch-size", size])
    _assert_failed_cleanly(code, capsys, "--batch-size", size)
    _nothing_written(tmp_path / "out")


def test_clusters_do_not_cover_pool(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng)
    _clusters(tmp_path, np.arange(13, 200))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "--clusters", "do not cover", "13 pool ids")
    _nothing_written(tmp_path / "out")


def test_tfrecord_feature_missing(tmp_path, rng, capsys):
    write_tfrecord(str(tmp_path / "pool" / "p.tfrecord"), {"id": np.arange(20), "label": np.arange(20)})
    _clusters(tmp_path, np.arange(20))
    _assert_failed_cleanly(_run_select(tmp_path), capsys, "p.tfrecord", "'probs'")
    _nothing_written(tmp_path / "out")


def test_unknown_flag(tmp_path, rng, capsys):
    _good_pool(tmp_path, rng)
    _clusters(tmp_path, np.arange(200))
    _assert_failed_cleanly(_run_select(tmp_path, "--batch_sise", "3"), capsys, "unknown flag", "--batch_sise")


def test_an_error_raised_in_a_pipeline_keeps_one_marker():
    """Beam re-raises a DoFn's exception as its own type with the step appended: the message names it once."""
    import apache_beam as beam

    def fail(value):
        raise InputError(f"pool-3.parquet: column 'embedding' has 1 row with NaN or infinite values ({value})")

    with pytest.raises(Exception) as raised:
        with beam.Pipeline("DirectRunner") as p:
            _ = p | beam.Create([7]) | "Check" >> beam.Map(fail)
    text = "".join(str(e) for e in (raised.value, raised.value.__cause__, raised.value.__context__) if e)
    assert MARKER in text
    assert MARKER + MARKER.strip() not in text and text.count(MARKER) == text.count(MARKER + "pool-3"), text
    assert input_error_message(raised.value) == ("pool-3.parquet: column 'embedding' has 1 row with NaN or infinite "
                                                 "values (7)")

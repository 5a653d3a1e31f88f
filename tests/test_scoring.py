"""`clusmar score` against the model's own predictions, on models and pools made here (no downloads).

A small Keras classifier is trained in a few seconds on generated blobs and saved as
.keras, as a Keras-exported SavedModel and as a tf.saved_model.save SavedModel with a
custom signature; pools are written as Parquet and TFRecord.
"""
import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clusmar_beam.app import cli
from clusmar_beam.transforms import storage
from clusmar_beam.core.batch import check_finite, concat_batches
from clusmar_beam.core import margins
from clusmar_beam.transforms import scoring
from reference import margins_from_probs
from conftest import write_parquet, write_tfrecord
from clusmar_beam.pipelines import score

DIM, CLASSES, EMB = 12, 3, 8
N = 600
TOL = 1e-5


# ---------------------------------------------------------------- assets made in the tests

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import keras
    import tensorflow as tf
    root = tmp_path_factory.mktemp("assets")
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=2.0, size=(CLASSES, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, N)
    x = (centres[labels] + rng.normal(size=(N, DIM))).astype(np.float32)

    inputs = keras.Input((DIM,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    emb = keras.layers.Dense(EMB, activation="tanh", name="embedding")(hidden)
    probs = keras.layers.Dense(CLASSES, activation="softmax", name="probs")(emb)
    model = keras.Model(inputs, probs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, labels, epochs=4, batch_size=64, verbose=0)
    model.save(root / "model.keras")

    # the same network with a linear last layer: logits
    logits_out = keras.layers.Dense(CLASSES, name="logits")(emb)
    logits_model = keras.Model(inputs, logits_out)
    logits_model.get_layer("logits").set_weights(model.get_layer("probs").get_weights())
    logits_model.save(root / "logits.keras")

    # multi-label: four independent sigmoids on the same embedding
    sig = keras.layers.Dense(4, activation="sigmoid", name="tags")(emb)
    multi = keras.Model(inputs, sig)
    multi.get_layer("tags").set_weights([rng.normal(size=(EMB, 4)).astype(np.float32),
                                         np.array([0.0, 0.5, -0.5, 0.1], dtype=np.float32)])
    multi.save(root / "multi.keras")

    # SavedModel 1: Keras export of a two-output model (outputs 'embedding' and 'probs')
    keras.Model(inputs, {"embedding": emb, "probs": probs}).export(str(root / "exported"), verbose=False)

    # SavedModel 2: tf.saved_model.save with a custom signature and custom names
    class Module(tf.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        @tf.function(input_signature=[tf.TensorSpec((None, DIM), tf.float32, name="x")])
        def scores(self, x):
            e, p = self.net(x)
            return {"penultimate": e, "class_probs": p}

    two = keras.Model(inputs, [emb, probs])
    module = Module(two)
    tf.saved_model.save(module, str(root / "custom"), signatures={"scores": module.scores})

    # SavedModel 3: probabilities that turn NaN where features[0] < -100
    class NanModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(rng.normal(size=(DIM, CLASSES)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec((None, DIM), tf.float32, name="features")])
        def serve(self, features):
            root = tf.sqrt(features[:, :1] + 100.0)
            return {"embedding": features, "probs": tf.nn.softmax(features @ self.w) * root / root}

    nan_module = NanModule()
    tf.saved_model.save(nan_module, str(root / "nan_model"), signatures={"serving_default": nan_module.serve})

    ids = rng.permutation(10 * N)[:N].astype(np.int64)
    halves = np.array_split(np.arange(N), 2)
    for i, part in enumerate(halves):
        write_parquet(str(root / "pool" / f"pool-{i}.parquet"),
                      {"id": ids[part], "features": x[part], "label": labels[part]})
        write_tfrecord(str(root / "tfpool" / f"pool-{i}.tfrecord"),
                       {"id": ids[part], "features": x[part], "label": labels[part]})

    sub = keras.Model(inputs, emb)
    return {"root": root, "x": x, "ids": ids, "labels": labels,
            "probs": model.predict(x, verbose=0), "emb": sub.predict(x, verbose=0),
            "logits": logits_model.predict(x, verbose=0), "multi": multi.predict(x, verbose=0)}


def _run(out, pool, model, *flags):
    return score.run(["--pool", str(pool), "--model", str(model), "--output", str(out), *flags])


def _read(out):
    """All scores rows, sorted by id: (ids, {column: numpy array})."""
    files = sorted(glob.glob(os.path.join(out, "scores-*-of-*.parquet")))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    ids = table.column("id").to_numpy(zero_copy_only=False)
    order = np.argsort(ids)
    columns = {}
    for name in table.column_names:
        if name == "id":
            continue
        col = table.column(name)
        if pa.types.is_list(col.type):
            columns[name] = np.stack(col.to_numpy(zero_copy_only=False))[order]
        else:
            columns[name] = col.to_numpy()[order]
    return ids[order], columns, table.schema


def _expected(assets, key):
    order = np.argsort(assets["ids"])
    return assets["ids"][order], assets[key][order]


# ---------------------------------------------------------------- agreement with predict

def test_keras_scores_equal_predict_on_parquet(assets, tmp_path):
    info = _run(tmp_path / "out", assets["root"] / "pool" / "*.parquet", assets["root"] / "model.keras",
                "--batch-size", "128", "--rows-per-shard", "250")
    ids, cols, schema = _read(tmp_path / "out")
    want_ids, want_probs = _expected(assets, "probs")
    _, want_emb = _expected(assets, "emb")
    assert np.array_equal(ids, want_ids)
    assert np.abs(cols["embedding"] - want_emb).max() <= TOL
    assert np.abs(cols["probs"] - want_probs).max() <= TOL
    assert np.abs(cols["margin"] - margins_from_probs(want_probs)).max() <= TOL
    # contract: id as in the pool, float32 lists, float32 margin; summary and marker last
    assert schema.names == ["id", "embedding", "probs", "margin"]
    assert schema.field("id").type == pa.int64() and schema.field("margin").type == pa.float32()
    assert schema.field("embedding").type.value_type == pa.float32()
    assert os.path.exists(tmp_path / "out" / "_SUCCESS")
    summary = json.load(open(tmp_path / "out" / "scoring.json"))
    assert summary["num_examples"] == N and summary["embedding_dim"] == EMB and summary["num_classes"] == CLASSES
    assert summary["files"] == sorted(os.path.basename(f) for f in glob.glob(str(tmp_path / "out" / "scores-*")))
    assert len(summary["files"]) >= 2            # --rows-per-shard 250 over 600 rows
    assert summary["inputs"] == {"features": ["features"]}
    metrics = info["metrics"]
    assert metrics["examples_scored"] == N and metrics["batches"] >= 2 * 3
    assert metrics["batch_latency_us"]["count"] == metrics["batches"]
    assert metrics["model_load_ms"]["count"] >= 1
    # RunInference's own metrics, in the same namespace: one pool batch per inference call
    assert metrics["num_inferences"] >= 3 and metrics["inference_request_batch_size"]["max"] == 1
    assert not glob.glob(str(tmp_path / "out" / ".tmp-*"))


def test_tfrecord_pool_gives_the_same_scores_as_parquet(assets, tmp_path):
    _run(tmp_path / "pq", assets["root"] / "pool" / "*.parquet", assets["root"] / "model.keras")
    _run(tmp_path / "tf", assets["root"] / "tfpool" / "*.tfrecord", assets["root"] / "model.keras", "--batch-size", "50")
    ids_a, a, _ = _read(tmp_path / "pq")
    ids_b, b, _ = _read(tmp_path / "tf")
    assert np.array_equal(ids_a, ids_b)
    for name in ("embedding", "probs", "margin"):
        assert np.abs(a[name] - b[name]).max() <= TOL, name
    _, want_probs = _expected(assets, "probs")
    assert np.abs(b["probs"] - want_probs).max() <= TOL


def test_keras_exported_savedmodel_equals_predict(assets, tmp_path):
    _run(tmp_path / "out", assets["root"] / "pool" / "*.parquet", assets["root"] / "exported")
    ids, cols, _ = _read(tmp_path / "out")
    _, want_probs = _expected(assets, "probs")
    _, want_emb = _expected(assets, "emb")
    assert np.abs(cols["embedding"] - want_emb).max() <= TOL
    assert np.abs(cols["probs"] - want_probs).max() <= TOL
    assert np.abs(cols["margin"] - margins_from_probs(want_probs)).max() <= TOL
    summary = json.load(open(tmp_path / "out" / "scoring.json"))
    assert summary["model_kind"] == "savedmodel" and summary["signature"] == "serving_default"


def test_savedmodel_with_named_signature_outputs_and_inputs(assets, tmp_path):
    _run(tmp_path / "out", assets["root"] / "tfpool" / "*.tfrecord", assets["root"] / "custom",
         "--signature", "scores", "--embedding-output", "penultimate", "--probs-output", "class_probs",
         "--inputs", "x=features")
    _, cols, _ = _read(tmp_path / "out")
    _, want_probs = _expected(assets, "probs")
    _, want_emb = _expected(assets, "emb")
    assert np.abs(cols["embedding"] - want_emb).max() <= TOL
    assert np.abs(cols["margin"] - margins_from_probs(want_probs)).max() <= TOL


def test_logits_and_probabilities_give_the_same_margins(assets, tmp_path):
    _run(tmp_path / "p", assets["root"] / "pool" / "*.parquet", assets["root"] / "model.keras")
    _run(tmp_path / "l", assets["root"] / "pool" / "*.parquet", assets["root"] / "logits.keras", "--outputs", "logits")
    _, p, _ = _read(tmp_path / "p")
    _, lg, _ = _read(tmp_path / "l")
    assert np.abs(p["margin"] - lg["margin"]).max() <= TOL
    assert np.abs(p["probs"] - lg["probs"]).max() <= TOL
    assert np.abs(p["embedding"] - lg["embedding"]).max() <= TOL


def test_multi_label_rule_on_a_hand_built_case():
    probs = np.array([[0.9, 0.2, 0.6],     # |2p-1| = .8 .6 .2  -> .2
                      [0.5, 0.99, 0.01],   # 0 .98 .98          -> 0
                      [1.0, 0.0, 0.95]],   # 1 1 .9             -> .9
                     dtype=np.float32)
    assert np.allclose(margins.margins(probs, multi_label=True), [0.2, 0.0, 0.9], atol=1e-6)
    assert np.allclose(margins.margins(probs, multi_label=True, classes=(0, 1)), [0.6, 0.0, 1.0], atol=1e-6)
    # logits through the sigmoid give the same margins
    logits = np.log(np.clip(probs, 1e-7, 1 - 1e-7) / (1 - np.clip(probs, 1e-7, 1 - 1e-7)))
    assert np.allclose(margins.margins(margins.to_probabilities(logits, "logits", True, "test"), True),
                       [0.2, 0.0, 0.9], atol=1e-5)


def test_multi_label_model_through_the_pipeline(assets, tmp_path):
    _run(tmp_path / "all", assets["root"] / "pool" / "*.parquet", assets["root"] / "multi.keras", "--multi-label")
    _run(tmp_path / "sub", assets["root"] / "pool" / "*.parquet", assets["root"] / "multi.keras", "--multi-label",
         "--classes", "1,3", "--no-embeddings")
    _, want = _expected(assets, "multi")
    _, every, _ = _read(tmp_path / "all")
    _, subset, schema = _read(tmp_path / "sub")
    assert np.abs(every["margin"] - np.abs(2 * want - 1).min(axis=1)).max() <= TOL
    assert np.abs(subset["margin"] - np.abs(2 * want[:, [1, 3]] - 1).min(axis=1)).max() <= TOL
    assert np.abs(subset["probs"] - want).max() <= TOL
    assert schema.names == ["id", "probs", "margin"]
    summary = json.load(open(tmp_path / "sub" / "scoring.json"))
    assert summary["multi_label"] and summary["classes"] == [1, 3] and not summary["with_embeddings"]


def test_top2_margins_equal_selection_margins(rng):
    probs = rng.dirichlet(np.ones(7) * 0.3, size=2000).astype(np.float32)
    probs[::50] = probs[0]
    probs[1, :2] = [0.4, 0.4]                     # a tie at the top
    assert np.array_equal(margins.top2_margins(probs), margins_from_probs(probs))


def test_scalar_feature_columns_and_string_ids(assets, tmp_path):
    """One scalar column per input position (f00..f11) is concatenated in pool order; string ids stay strings."""
    x, ids = assets["x"], assets["ids"]
    columns = {"id": np.array([f"row-{i}" for i in ids], dtype=object)}
    columns.update({f"f{j:02d}": x[:, j] for j in range(DIM)})
    table = pa.table({"id": pa.array(columns["id"].tolist(), type=pa.string()),
                      **{k: pa.array(v) for k, v in columns.items() if k != "id"}})
    os.makedirs(tmp_path / "pool")
    pq.write_table(table, tmp_path / "pool" / "p.parquet")
    _run(tmp_path / "out", tmp_path / "pool" / "*.parquet", assets["root"] / "model.keras")
    table = pq.read_table(tmp_path / "out" / "scores-00000-of-00001.parquet")
    assert table.schema.field("id").type == pa.string()
    got = dict(zip(table.column("id").to_pylist(), table.column("margin").to_numpy()))
    want = dict(zip(columns["id"].tolist(), margins_from_probs(assets["probs"])))
    assert max(abs(got[k] - want[k]) for k in want) <= TOL


def test_scores_feed_cluster_and_select(assets, tmp_path):
    _run(tmp_path / "scores", assets["root"] / "pool" / "*.parquet", assets["root"] / "model.keras",
         "--rows-per-shard", "200")
    glob_ = str(tmp_path / "scores" / "scores-*.parquet")
    # what `cluster` and `select` read
    assert storage.ReadTable(glob_, required=["id", "embedding"]).columns == ["id", "embedding"]
    assert storage.ReadTable(glob_, required=["id"], optional=["margin", "probs"]).columns == ["id", "margin", "probs"]
    assert cli.main(["select", "--pool", glob_, "--strategy", "margin", "--batch-size", "25",
                     "--output", str(tmp_path / "manifest")]) == 0
    from conftest import read_manifest
    chosen = [r["id"] for r in read_manifest(tmp_path / "manifest")]
    ids, cols, _ = _read(tmp_path / "scores")
    lowest = set(ids[np.argsort(cols["margin"], kind="stable")[:25]].tolist())
    assert set(chosen) == lowest
    # `cluster` reads id + embedding through the same reader: the matrices come back as written
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that
    reader = storage.ReadTable(glob_, required=["id", "embedding"])

    def check(batches):
        batch = concat_batches(batches)
        check_finite(batch, ("embedding",))
        order = np.argsort(batch.ids)
        assert np.array_equal(batch.ids[order], ids)
        assert batch.columns["embedding"].dtype == np.float32
        assert np.array_equal(batch.columns["embedding"][order], cols["embedding"])

    with TestPipeline() as p:
        assert_that(p | reader, check)


# ---------------------------------------------------------------- bad input

def _fails(capsys, out, argv, *fragments):
    code = cli.main(["score", "--output", str(out), *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("clusmar score: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not glob.glob(os.path.join(out, "scores-*")) and not glob.glob(os.path.join(out, ".tmp-*"))
    return lines[0]


def test_model_path_does_not_exist(assets, tmp_path, capsys):
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model", tmp_path / "nope.keras"],
           "nope.keras", "no such file")


def test_embedding_layer_does_not_exist(assets, tmp_path, capsys):
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model",
                                      assets["root"] / "model.keras", "--embedding-layer", "penult"],
           "'penult'", "no such layer", "hidden", "embedding", "probs")


def test_signature_and_output_that_do_not_exist(assets, tmp_path, capsys):
    base = ["--pool", assets["root"] / "pool" / "*", "--model", assets["root"] / "custom"]
    _fails(capsys, tmp_path / "out", base + ["--signature", "serve_me"], "'serve_me'", "signatures: scores")
    _fails(capsys, tmp_path / "out", base + ["--signature", "scores", "--embedding-output", "emb"],
           "'emb'", "class_probs", "penultimate")
    _fails(capsys, tmp_path / "out", base + ["--signature", "scores", "--probs-output", "class_probs"],
           "no output named 'embedding'", "--no-embeddings", "penultimate")


def test_missing_model_feature(assets, tmp_path, capsys):
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(5), "label": np.arange(5)})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "pool" / "*", "--model", assets["root"] / "model.keras"],
           "p.parquet", "'features'", "columns: id")
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model", assets["root"] / "model.keras",
                                      "--inputs", "features=pixels"], "missing column 'pixels'", "pool-0.parquet")


def test_feature_of_wrong_width_or_type(assets, tmp_path, capsys):
    x = assets["x"]
    write_parquet(str(tmp_path / "narrow" / "p.parquet"), {"id": np.arange(N), "features": x[:, :10]})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "narrow" / "*", "--model", assets["root"] / "model.keras"],
           "narrow/p.parquet", "'features'", "10 values per row", "needs 12")
    write_parquet(str(tmp_path / "text" / "p.parquet"), {"id": np.arange(3), "features": ["a", "b", "c"]})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "text" / "*", "--model", assets["root"] / "model.keras"],
           "text/p.parquet", "'features'", "type string", "float")
    # rows of different widths inside one file: found by the reader on the workers
    ragged = pa.array([list(r) for r in x[:40]] + [list(x[40, :11])], type=pa.list_(pa.float32()))
    os.makedirs(tmp_path / "ragged")
    pq.write_table(pa.table({"id": np.arange(41), "features": ragged}), tmp_path / "ragged" / "p.parquet")
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "ragged" / "*", "--model", assets["root"] / "model.keras"],
           "ragged/p.parquet", "'features'", "different lengths")


def test_output_that_is_not_a_probability_vector(assets, tmp_path, capsys):
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model",
                                      assets["root"] / "logits.keras"],
           "logits.keras", "not a probability vector", "--outputs logits")
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model",
                                      assets["root"] / "model.keras", "--multi-label", "--classes", "5"],
           "--classes", "class 5", "3 classes")
    _fails(capsys, tmp_path / "out", ["--pool", assets["root"] / "pool" / "*", "--model",
                                      assets["root"] / "model.keras", "--classes", "1"], "--multi-label")


def test_nan_outputs_found_on_the_workers(assets, tmp_path, capsys):
    """A model that returns NaN for one row far from the first: caught while scoring, not by the driver's preview."""
    x = assets["x"].copy()
    x[437, 0] = -1000.0            # finite input; the model below takes sqrt(x0 + 100) of it
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(N) + 1000, "features": x})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "pool" / "*", "--model", assets["root"] / "nan_model",
                                      "--batch-size", "64"],
           "p.parquet", "nan_model", "'probs'", "NaN or infinite", "1 of", "id 1437")


def test_nan_features(assets, tmp_path, capsys):
    x = assets["x"].copy()
    x[437, 3] = np.nan
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(N) + 1000, "features": x})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "pool" / "*", "--model", assets["root"] / "model.keras"],
           "p.parquet", "column 'features'", "NaN or infinite", "1 of", "id 1437")


def test_bad_flags(assets, tmp_path, capsys):
    base = ["--pool", assets["root"] / "pool" / "*", "--model", assets["root"] / "model.keras"]
    _fails(capsys, tmp_path / "out", base + ["--outputs", "odds"], "--outputs 'odds'")
    _fails(capsys, tmp_path / "out", base + ["--batch-size", "0"], "--batch-size")
    _fails(capsys, tmp_path / "out", base + ["--inputs", "pixels=features"], "'pixels' is not an input")


def test_empty_pool(assets, tmp_path, capsys):
    write_parquet(str(tmp_path / "pool" / "p.parquet"),
                  {"id": np.zeros(0, dtype=np.int64), "features": np.zeros((0, DIM), dtype=np.float32)})
    _fails(capsys, tmp_path / "out", ["--pool", tmp_path / "pool" / "*", "--model", assets["root"] / "model.keras"],
           "the pool is empty")


def test_overwrite_replaces_every_earlier_shard(assets, tmp_path):
    pool, model = assets["root"] / "pool" / "*.parquet", assets["root"] / "model.keras"
    _run(tmp_path / "out", pool, model, "--rows-per-shard", "100")
    assert len(glob.glob(str(tmp_path / "out" / "scores-*"))) == 6
    with pytest.raises(Exception, match="already holds a completed run"):
        _run(tmp_path / "out", pool, model)
    _run(tmp_path / "out", pool, model, "--overwrite", "--no-embeddings")
    assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", "scores-00000-of-00001.parquet", "scoring.json"]
    ids, cols, _ = _read(tmp_path / "out")
    assert len(ids) == N and set(cols) == {"probs", "margin"}


# ---------------------------------------------------------------- errors that are not the input's fault

class _FailingScorer(scoring.Scorer):
    """A scorer whose model call raises `error`: what a real graph raises, without needing it to happen."""

    def __init__(self, error):
        super().__init__(scoring.ModelConfig("failing.keras"))
        self.inputs = [scoring.InputSpec("features", "float32", (DIM,))]
        self.probs_name = "probs"

        def fail(*xs):
            raise error
        self._fn = fail


def _one_batch(assets, rows=40):
    from clusmar_beam.core.batch import Batch
    return Batch("pool-0.parquet", {"id": assets["ids"][:rows], "features": assets["x"][:rows]})


def _feeds():
    return [scoring.Feed(scoring.InputSpec("features", "float32", (DIM,)), ("features",))]


def test_only_input_errors_of_the_model_call_are_bad_input(assets):
    import tensorflow as tf
    from clusmar_beam.core.errors import InputError
    batch = _one_batch(assets)
    rejected = tf.errors.InvalidArgumentError(None, None, "Matrix size-incompatible: In[0]: [40,10]")
    with pytest.raises(InputError, match="pool-0.parquet.*failing.keras.*Matrix size-incompatible"):
        scoring.score_batch(_FailingScorer(rejected), batch, _feeds(), 16)
    for error in (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"),
                  tf.errors.InternalError(None, None, "cuDNN launch failure"), MemoryError("no room")):
        with pytest.raises(type(error)) as raised:
            scoring.score_batch(_FailingScorer(error), batch, _feeds(), 16)
        assert not isinstance(raised.value, InputError) and raised.value is error
        # the same through RunInference's handler
        handler = scoring.ScorerModelHandler(scoring.ModelConfig("failing.keras"), _feeds(), 16)
        with pytest.raises(type(error)):
            handler.run_inference([batch], _FailingScorer(error))


def test_out_of_memory_on_the_workers_is_a_traceback_not_bad_input(assets, tmp_path, monkeypatch, capsys):
    """The driver's preview passes; the model then runs out of memory inside RunInference: not exit code 2."""
    import tensorflow as tf
    from clusmar_beam.core.errors import input_error_message
    real_call = scoring.Scorer.__call__

    def call(self, feeds):
        if len(feeds[0]) > score.PREVIEW_ROWS:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[600,16]")
        return real_call(self, feeds)

    monkeypatch.setattr(scoring.Scorer, "__call__", call)
    with pytest.raises(Exception) as raised:
        cli.main(["score", "--output", str(tmp_path / "out"), "--pool", str(assets["root"] / "pool" / "*.parquet"),
                  "--model", str(assets["root"] / "model.keras")])
    assert input_error_message(raised.value) is None
    chain, exc = [], raised.value
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, tf.errors.ResourceExhaustedError) or "ResourceExhaustedError" in str(e) or
               "OOM when allocating" in str(e) for e in chain), chain
    assert "error: " not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")

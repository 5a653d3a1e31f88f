"""Shared helpers: small pools written as real Parquet / TFRecord files, manifests read back with TF."""
import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_parquet(path, columns: dict):
    """columns: name -> numpy array (2-D arrays become list<float32> columns)."""
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values) if not isinstance(values, list) else values
        if isinstance(values, np.ndarray) and values.ndim == 2:
            arrays[name] = pa.array(list(values.astype(np.float32)), type=pa.list_(pa.float32()))
        else:
            arrays[name] = pa.array(values)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def write_tfrecord(path, columns: dict):
    import tensorflow as tf
    n = len(next(iter(columns.values())))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for row in range(n):
            feature = {}
            for name, values in columns.items():
                value = values[row]
                if isinstance(value, bytes):
                    feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
                elif np.ndim(value) == 1:
                    feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=list(value)))
                elif isinstance(value, (float, np.floating)):
                    feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                else:
                    feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path


def read_manifest(directory):
    """All manifest rows, read with tf.data.TFRecordDataset, in rank order."""
    import tensorflow as tf
    files = sorted(glob.glob(os.path.join(directory, "manifest-*-of-*.tfrecord")))
    rows = []
    for record in tf.data.TFRecordDataset(files):
        example = tf.train.Example.FromString(record.numpy())
        f = example.features.feature
        ident = f["id"].int64_list.value[0] if f["id"].HasField("int64_list") else f["id"].bytes_list.value[0]
        rows.append({"id": ident, "rank": f["rank"].int64_list.value[0], "round": f["round"].int64_list.value[0],
                     "margin": f["margin"].float_list.value[0], "cluster_id": f["cluster_id"].int64_list.value[0]})
    return rows


def random_probs(rng, n, classes, ties_every=0):
    probs = rng.dirichlet(np.ones(classes) * 0.5, size=n).astype(np.float32)
    if ties_every:
        probs[::ties_every] = probs[0]       # identical rows -> identical margins
    return probs


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

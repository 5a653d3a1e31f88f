"""Reading a manifest's ids: Beam's FileSystems with Beam's TFRecord framing (what clusmar does, so any
file system Beam has works) against tf.data.TFRecordDataset (TensorFlow's own file systems), same file.

    .venv/bin/python benchmarks/bench_tfrecord_read.py --rows 1000000
"""
import argparse
import os
import tempfile
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import tensorflow as tf
    from clusmar_beam.transforms import storage
    ids = np.arange(args.rows, dtype=np.int64) * 7
    spec = {"id": tf.io.FixedLenFeature([], tf.int64)}
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "manifest-00000-of-00001.tfrecord")
        storage.write_tfrecords(path, (tf.train.Example(features=tf.train.Features(feature={
            "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(i)]))})).SerializeToString()
            for i in ids))
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = np.concatenate([batch["id"] for batch in storage.read_tfrecord_features(path, spec)])
            beam_seconds = time.perf_counter() - start
            start = time.perf_counter()
            theirs = np.concatenate([tf.io.parse_example(records, spec)["id"].numpy()
                                     for records in tf.data.TFRecordDataset(path).batch(65536)])
            tf_seconds = time.perf_counter() - start
            same = np.array_equal(ours, ids) and np.array_equal(theirs, ids)
            print(f"{args.rows:,} ids: FileSystems + Beam framing {beam_seconds:.2f} s, "
                  f"tf.data {tf_seconds:.2f} s, same ids {same}")


if __name__ == "__main__":
    main()

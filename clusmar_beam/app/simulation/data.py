"""A fully labelled pool for simulation: ids, features and labels, read through Beam's file systems."""
from __future__ import annotations

import dataclasses

import numpy as np

from clusmar_beam.core.batch import find_duplicates
from clusmar_beam.core.errors import InputError, rows_text
from clusmar_beam.core.hashing import seeded_hash
from clusmar_beam.transforms import storage

TEST_SALT = 0x7E57  # the held-out split depends on the ids alone, so every repetition tests on the same rows


@dataclasses.dataclass
class Labelled:
    ids: np.ndarray
    features: np.ndarray      # float32 (n, d): the model's inputs, and what is clustered
    labels: np.ndarray        # int64
    id_type: str
    source: str

    def __len__(self):
        return len(self.ids)

    def take(self, rows) -> "Labelled":
        return Labelled(self.ids[rows], self.features[rows], self.labels[rows], self.id_type, self.source)


def read_parquet(pattern: str, flag: str, feature_columns: list[str]) -> Labelled:
    """Every file of the glob, checked: columns present, features finite, labels >= 0, ids unique."""
    files = storage.match_files(pattern, flag)
    if storage.detect_format(files, flag) != "parquet":
        raise InputError(f"{flag} {pattern!r}: simulate reads Parquet files (with id, label and features)")
    parts = []
    for path in files:
        storage.check_schema(path, storage.parquet_schema(path), ["id", "label"] + feature_columns)
        batch = storage.table_to_batch(storage.read_parquet_table(path, ["id", "label"] + feature_columns), path)
        columns = []
        for name in feature_columns:
            values = np.asarray(batch.columns[name], dtype=np.float32)
            columns.append(values if values.ndim == 2 else values[:, None])
        features = np.concatenate(columns, axis=1) if columns else np.zeros((len(batch), 0), np.float32)
        bad = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
        if bad:
            raise InputError(f"{path}: columns {', '.join(feature_columns)}: {rows_text(bad)} with NaN or infinite "
                             "values")
        labels = np.asarray(batch.columns["label"])
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{path}: column 'label' has type {labels.dtype}; expected integer class labels")
        negative = int(np.count_nonzero(labels < 0))
        if negative:
            raise InputError(f"{path}: column 'label' has {negative} negative labels; expected classes 0..C-1")
        parts.append(Labelled(batch.ids, features, labels.astype(np.int64), batch.id_type, path))
    widths = {p.features.shape[1] for p in parts}
    if len(widths) > 1:
        raise InputError(f"{flag} {pattern!r}: files have different feature widths {sorted(widths)}")
    data = Labelled(np.concatenate([p.ids for p in parts]), np.concatenate([p.features for p in parts]),
                    np.concatenate([p.labels for p in parts]), parts[0].id_type, pattern)
    count, examples = find_duplicates(data.ids)
    if count:
        raise InputError(f"{flag} {pattern!r}: column 'id' has {count} duplicated ids (e.g. {examples})")
    order = np.argsort(data.ids, kind="stable")   # a fixed row order: the same picks however files are split
    return data.take(order)


def digits() -> Labelled:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes); nothing is downloaded."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return Labelled(np.arange(len(bunch.target), dtype=np.int64), (bunch.data / 16.0).astype(np.float32),
                    bunch.target.astype(np.int64), "int64", "scikit-learn digits")


def held_out(data: Labelled, fraction: float) -> tuple[Labelled, Labelled]:
    """(pool, test): a fraction of the rows chosen by a hash of the id."""
    cut = np.uint64(min(int(fraction * 2.0 ** 64), 2 ** 64 - 1))
    test = seeded_hash(data.ids, TEST_SALT) < cut
    return data.take(np.flatnonzero(~test)), data.take(np.flatnonzero(test))


def check_disjoint(pool: Labelled, test: Labelled, test_flag: str) -> None:
    if pool.id_type != test.id_type:
        raise InputError(f"{test_flag}: ids are {test.id_type}, the pool's are {pool.id_type}")
    shared = np.intersect1d(pool.ids, test.ids) if pool.id_type == "int64" else \
        sorted(set(pool.ids.tolist()) & set(test.ids.tolist()))
    if len(shared):
        raise InputError(f"{test_flag}: {len(shared)} test ids are also in the pool (e.g. {list(shared[:3])}); "
                         "a test set must be held out")

"""The rows of lowest hash as a combiner: a sample that is the same on any sharding and batching."""
from __future__ import annotations

import apache_beam as beam
import numpy as np


class BottomKByHash(beam.CombineFn):
    """The `size` rows whose keys have the lowest `hash_of(keys)` (ties by key).

    `rows_of(element)` gives an element's (keys, *columns); the output is
    (hashes, keys, *columns) of the sample in hash order, or None when there
    were no rows.  Only `size` rows are ever held, whatever the input.
    """

    def __init__(self, size: int, hash_of, rows_of):
        self.size, self.hash_of, self.rows_of = size, hash_of, rows_of

    def create_accumulator(self):
        return None

    def _trim(self, hashes, keys, *columns):
        order = np.lexsort((keys, hashes))[:self.size]
        return (hashes[order], keys[order], *(c[order] for c in columns))

    def add_input(self, acc, element):
        keys, *columns = self.rows_of(element)
        if not len(keys):
            return acc
        part = self._trim(self.hash_of(keys), keys, *columns)
        return part if acc is None else self.merge_accumulators([acc, part])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        return self._trim(*(np.concatenate([a[i] for a in accs]) for i in range(len(accs[0]))))

    def extract_output(self, acc):
        return acc

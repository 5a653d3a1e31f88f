"""Beam coders of the project's big columnar elements (core.batch.Batch, Arrow tables).

Registered when clusmar_beam.transforms is imported, so every pipeline that
uses a transform of this package codes its batches the same way.
"""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from clusmar_beam.core.batch import Batch


class SizedPickleCoder(beam.coders.Coder):
    """Pickles elements (protocol 5), but estimates their size from their buffers.

    Beam's runners estimate the size of the first elements of every PCollection by
    encoding them; for a pool batch of tens of megabytes that is a full pickle per
    element and PCollection, thrown away. This coder answers from nbytes.
    """

    def encode(self, value):
        import pickle
        return pickle.dumps(value, protocol=5)

    def decode(self, encoded):
        import pickle
        return pickle.loads(encoded)

    def is_deterministic(self):
        return False

    def _create_impl(self):
        from apache_beam.coders import coder_impl
        return coder_impl.CallbackCoderImpl(self.encode, self.decode, self.estimate_size)

    def estimate_size(self, value) -> int:
        raise NotImplementedError


class BatchCoder(SizedPickleCoder):
    def estimate_size(self, value) -> int:
        return sum(v.nbytes if v.dtype != object else 16 * len(v) for v in value.columns.values()) + 64

    def to_type_hint(self):
        return Batch


class ArrowTableCoder(SizedPickleCoder):
    def estimate_size(self, value) -> int:
        return value.nbytes + 64

    def to_type_hint(self):
        return pa.Table


beam.coders.registry.register_coder(Batch, BatchCoder)
beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


def declare_batch_types(batches, pool_format: str) -> None:
    """Type the reader's big elements (Batch, and Parquet's (file, Arrow table) pairs) so they get the coders above."""
    from apache_beam import typehints
    batches.element_type = Batch
    producer = batches.producer
    if pool_format == "parquet" and producer is not None:
        for upstream in producer.main_inputs.values():
            upstream.element_type = typehints.Tuple[str, pa.Table]

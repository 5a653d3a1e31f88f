"""Bytes of the elements a pipeline moves, as Beam Distributions.

A runner moves one element in one message (gRPC caps it at 2 GiB) and holds a
side input whole in every worker, so the cluster pipeline records the size of
what it sends into every shuffle and side input.  The size counted is that of
the arrays and strings an element holds (what pickling costs), not Python's
object overhead.
"""
from __future__ import annotations

import dataclasses
import typing

import apache_beam as beam
import numpy as np

NAMESPACE = "element_bytes"


def element_bytes(value) -> int:
    """Payload bytes of an element: numpy arrays, strings and numbers inside tuples, lists, dicts, dataclasses."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return int(sum(element_bytes(v) for v in value.ravel()))
        return int(value.nbytes)
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(element_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(element_bytes(k) + element_bytes(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(element_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if hasattr(value, "__dict__"):
        return sum(element_bytes(v) for v in vars(value).values())
    return 8


class _Measure(beam.DoFn):
    def __init__(self, step: str):
        self.step = step

    def setup(self):
        self.sizes = beam.metrics.Metrics.distribution(NAMESPACE, self.step)

    def process(self, element):
        self.sizes.update(element_bytes(element))
        yield element


def measured(step: str) -> beam.ParDo:
    """A pass-through step that records each element's bytes under `step` (put it just before a
    shuffle or a side input)."""
    return beam.ParDo(_Measure(step)).with_output_types(typing.Any)


def largest(result) -> dict:
    """{step: largest element's bytes} from a finished pipeline's metrics."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except NotImplementedError:  # a runner that reports no metrics to the launcher
        return {}
    sizes = {}
    for item in query["distributions"]:
        value = item.committed if item.committed is not None else item.attempted
        if value is not None and value.count:
            sizes[item.key.metric.name] = max(sizes.get(item.key.metric.name, 0), int(value.max))
    return sizes

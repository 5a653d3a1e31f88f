"""Beam transforms over core: PTransforms, DoFns and CombineFns, and Beam's file systems.

Importing any of them registers the coders of the columnar elements (coders.py).
"""
from clusmar_beam.transforms import coders  # noqa: F401  (registers the coders)

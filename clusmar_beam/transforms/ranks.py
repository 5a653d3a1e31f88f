"""Row numbers in sorted id order, computed where the ids are.

The clustering numbers a pool's rows in id order (ties in the HAC go to the
lower row, so the order must not depend on how the pool was read), but no
worker may hold every id of a 100M-example pool.  The ids are cut into ranges
at quantiles of a sample of them (the ids of lowest seeded hash, the same on
any sharding); each range is counted, then sorted where it lands, and its rows
start after the counts of the ranges below it.  Elements are bounded by the
range size, and the only side inputs are the range boundaries and counts.
"""
from __future__ import annotations

import math

import apache_beam as beam
import numpy as np

from clusmar_beam.core import hashing
from clusmar_beam.core.batch import Batch, concat_batches, find_duplicates
from clusmar_beam.transforms import element_sizes
from clusmar_beam.transforms.samples import BottomKByHash

SAMPLE_SIZE = 1 << 16    # ids sampled to place the range boundaries
ROWS_PER_RANGE = 1 << 17  # rows a range aims at (an element: its ids and any other columns)
_SAMPLE_SALT = 0x72616E6B  # 'rank'


def _sample_hash(ids):
    return hashing.seeded_hash(ids, _SAMPLE_SALT)


def _sorted_ids(sample):
    return None if sample is None else np.sort(sample[1])


def range_bounds(sample, n: int, rows_per_range: int = ROWS_PER_RANGE):
    """Ids that cut the pool into about n / rows_per_range ranges of similar size (sorted, distinct)."""
    parts = max(1, math.ceil(n / rows_per_range))
    if sample is None or parts == 1 or not len(sample):
        return np.zeros(0, sample.dtype if sample is not None else np.int64)
    sample = np.unique(sample)
    return np.unique(sample[(np.arange(1, parts) * len(sample)) // parts])


class _SplitByRange(beam.DoFn):
    def process(self, batch: Batch, bounds):
        if not len(batch):
            return
        ranges = np.searchsorted(bounds, batch.ids, side="right")
        order = np.argsort(ranges, kind="stable")
        cuts = np.flatnonzero(np.r_[True, ranges[order][1:] != ranges[order][:-1], True])
        for s, e in zip(cuts[:-1], cuts[1:]):
            yield int(ranges[order[s]]), batch.take(order[s:e])


def _first_rows(counts) -> dict:
    """{range: its first row}: the rows of all lower ranges come first."""
    first, start = {}, 0
    for key, count in sorted(counts):
        first[key] = start
        start += count
    return first


class _RankRange(beam.DoFn):
    DUPLICATES = "duplicates"

    def process(self, element, first_rows):
        key, pieces = element
        batch = concat_batches(list(pieces))
        order = np.argsort(batch.ids, kind="stable")
        batch = batch.take(order)
        count, examples = find_duplicates(batch.ids)
        if count:
            yield beam.pvalue.TaggedOutput(self.DUPLICATES, (count, examples))
        yield batch.with_columns(row=first_rows[key] + np.arange(len(batch), dtype=np.int64))


def _sum_duplicates(found):
    found = list(found)
    return sum(c for c, _ in found), [x for _, e in found for x in e][:3]


class RankIds(beam.PTransform):
    """Batch batches with an `id` column -> {"ranked": the same rows regrouped by id range, sorted,
    with a `row` column (0..n-1 in id order; duplicates get consecutive rows), "count": singleton n,
    "duplicates": singleton (ids occurring more than once, a few examples)}.
    """

    def __init__(self, rows_per_range: int | None = None, sample_size: int | None = None):
        super().__init__()
        self.rows_per_range = rows_per_range or ROWS_PER_RANGE
        self.sample_size = sample_size or SAMPLE_SIZE

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        count = batches | "Count" >> beam.Map(len) | "Sum" >> beam.CombineGlobally(sum)
        bounds = (batches
                  | "Sample" >> beam.CombineGlobally(BottomKByHash(self.sample_size, _sample_hash,
                                                                 lambda batch: (batch.ids,)))
                  | "SortSample" >> beam.Map(_sorted_ids)
                  | "Bounds" >> beam.Map(range_bounds, side(count), self.rows_per_range)
                  | "MeasureBounds" >> element_sizes.measured("rank_bounds"))
        pieces = (batches
                  | "SplitByRange" >> beam.ParDo(_SplitByRange(), side(bounds))
                  | "MeasurePieces" >> element_sizes.measured("rank_pieces"))
        first_rows = (pieces
                      | "PieceCounts" >> beam.Map(lambda kv: (kv[0], len(kv[1])))
                      | "RangeCounts" >> beam.CombinePerKey(sum)
                      | "AllCounts" >> beam.combiners.ToList()
                      | "FirstRows" >> beam.Map(_first_rows)
                      | "MeasureFirstRows" >> element_sizes.measured("rank_first_rows"))
        ranked = (pieces
                  | "GroupRange" >> beam.GroupByKey()
                  | "RankRange" >> beam.ParDo(_RankRange(), side(first_rows))
                  .with_outputs(_RankRange.DUPLICATES, main="ranked"))
        duplicates = (ranked[_RankRange.DUPLICATES]
                      | "AllDuplicates" >> beam.combiners.ToList()
                      | "SumDuplicates" >> beam.Map(_sum_duplicates))
        return {"ranked": ranked.ranked, "count": count, "duplicates": duplicates}

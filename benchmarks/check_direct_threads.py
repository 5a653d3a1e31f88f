"""Does the FnApiRunner keep every element of a large shuffle when bundles run in threads?

Usage:
  .venv/bin/python benchmarks/check_direct_threads.py [--sources 64] [--keys 64] [--rows 1000]
      [--workers 2] [--mode multi_threading|multi_processing|in_memory]

Plain Beam, no clusmar code: `sources` elements each emit one (key, array of `rows` x 64 float32) piece per
key, a GroupByKey gathers them, and a second GroupByKey regroups what the first one's groups emit, as the
sharded rounds do.  Prints how many groups arrived whole and every group that lost a piece.  clusmar
refuses `--direct_running_mode multi_threading` with several workers because this check fails with
Beam 2.77 at 1,000 rows (256 KB pieces); run it again on a newer Beam before lifting that.
"""
from __future__ import annotations

import argparse

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import fn_runner


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=64)
    ap.add_argument("--keys", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", default="multi_threading")
    args = ap.parse_args(argv)
    sources, keys, rows = args.sources, args.keys, args.rows

    def pieces(source):
        rng = np.random.default_rng(source)
        for key in range(keys):
            yield key, (source, rng.normal(size=(rows, 64)).astype(np.float32))

    def first_group(element):
        key, values = element
        got = sorted(source for source, _ in values)
        if got != list(range(sources)):
            return f"first shuffle, key {key}: {len(got)} of {sources} pieces"
        return "whole"

    def regroup(element):
        key, values = element
        for source, array in values:
            yield source, (key, float(array.sum()))

    def second_group(element):
        source, values = element
        got = len(list(values))
        return "whole" if got == keys else f"second shuffle, source {source}: {got} of {keys} pieces"

    options = PipelineOptions(direct_num_workers=args.workers, direct_running_mode=args.mode)
    with beam.Pipeline(runner=fn_runner.FnApiRunner(), options=options) as p:
        grouped = (p | beam.Create(list(range(sources))) | beam.Reshuffle() | beam.FlatMap(pieces)
                   | "First" >> beam.GroupByKey())
        checked = (grouped | "CheckFirst" >> beam.Map(first_group),
                   grouped | "Regroup" >> beam.FlatMap(regroup) | "Second" >> beam.GroupByKey()
                   | "CheckSecond" >> beam.Map(second_group))
        _ = (checked | beam.Flatten() | beam.combiners.Count.PerElement()
             | beam.Map(lambda outcome: print(f"{outcome[1]:6d}  {outcome[0]}")))


if __name__ == "__main__":
    main()

"""`clusmar generate-pool`: a synthetic, web-like pool written shard by shard.

Each shard is generated independently from (seed, id range), so the pool is the
same whatever the runner or number of workers.
"""
from __future__ import annotations

import logging
import sys
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa

from clusmar_beam import io, runner, synthetic
from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")


class GeneratePoolOptions(runner.OutputOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--num-examples", dest="num_examples", type=int, help="rows in the pool")
        parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
        parser.add_argument("--num-classes", dest="num_classes", type=int, default=10, help="classes of probs")
        parser.add_argument("--format", dest="file_format", default="parquet", help="parquet | tfrecord")
        parser.add_argument("--num-shards", dest="num_shards", type=int, help="files (default ~1 per 100K rows)")
        parser.add_argument("--region-sizes", dest="region_sizes", default="lognormal",
                            help="lognormal (no cluster above ~3%% of the pool) | heavy-tailed (a few "
                                 "diffuse dense regions hold 10-20%% of the pool each)")


def _to_table(rows: dict) -> pa.Table:
    def matrix(values):
        n, width = values.shape
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), width)
    return pa.table({"id": pa.array(rows["id"], type=pa.int64()),
                     "embedding": matrix(rows["embedding"]).cast(pa.list_(pa.float32())),
                     "probs": matrix(rows["probs"]).cast(pa.list_(pa.float32())),
                     "label": pa.array(rows["label"], type=pa.int64())})


def run(argv=None) -> dict:
    options, opts = runner.parse_options(GeneratePoolOptions, argv)
    output_dir = runner.require(opts.output, "--output")
    n = runner.require(opts.num_examples, "--num-examples")
    if opts.file_format not in ("parquet", "tfrecord"):
        raise InputError(f"--format {opts.file_format!r}: choose parquet or tfrecord")
    if opts.region_sizes not in synthetic.REGION_SIZES:
        raise InputError(f"--region-sizes {opts.region_sizes!r}: choose "
                         + " or ".join(synthetic.REGION_SIZES))
    try:
        plan = synthetic.make_plan(n, opts.dim, opts.num_classes, opts.seed, region_sizes=opts.region_sizes)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    num_shards = opts.num_shards or synthetic.default_num_shards(n)
    if num_shards <= 0 or num_shards > n:
        raise InputError(f"--num-shards must be between 1 and --num-examples ({n}); got {num_shards}")
    bounds = synthetic.shard_bounds(n, num_shards)
    file_format = opts.file_format
    suffix = ".parquet" if file_format == "parquet" else ".tfrecord"
    output = io.OutputDir(output_dir, "pool", "pool.json", io.SUCCESS, opts.overwrite)

    def write(path, index):
        start, end = bounds[index]
        rows = synthetic.generate_rows(plan, start, end)
        if file_format == "parquet":
            io.write_parquet(path, _to_table(rows))
        else:
            io.write_tfrecords(path, io.batch_to_examples(rows))

    def summary(names, _):
        return {"num_examples": n, "dim": opts.dim, "num_classes": opts.num_classes, "seed": opts.seed,
                "region_sizes": opts.region_sizes, "format": file_format, "files": names}

    start = time.time()
    pipeline = runner.make_pipeline(options)
    _ = (pipeline
         | "Shards" >> beam.Create([(i, num_shards, i) for i in range(num_shards)])
         | "Write" >> io.WriteShards(output, suffix, write, summary))
    try:
        runner.run_pipeline(pipeline, "generate-pool")
    finally:
        output.remove_temp()
    LOG.info("generate-pool: %d examples (dim %d, %d classes) in %d %s files in %.1f s -> %s",
             n, opts.dim, opts.num_classes, num_shards, file_format, time.time() - start, output.path)
    return io.read_json(output.join("pool.json"))


if __name__ == "__main__":
    from clusmar_beam.cli import main
    sys.exit(main(["generate-pool"] + sys.argv[1:]))

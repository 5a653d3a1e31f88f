"""`clusmar generate-pool`: a synthetic, web-like pool written shard by shard.

Each shard is generated independently from (seed, id range), so the pool is the
same whatever the runner or number of workers.
"""
from __future__ import annotations

import functools
import logging

import apache_beam as beam
import pyarrow as pa

from clusmar_beam.core import synthetic
from clusmar_beam.core.errors import InputError
from clusmar_beam.pipelines.options import OutputOptions, build_and_run, require
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")


class GeneratePoolOptions(OutputOptions):
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


@functools.lru_cache(maxsize=1)
def _plan(n: int, dim: int, num_classes: int, seed: int, region_sizes: str) -> synthetic.PoolPlan:
    """The pool's plan, made again in each worker from its five parameters: the plan itself grows with the
    pool (megabytes at 100M rows), and pickled into the write step it would inflate the job graph."""
    return synthetic.make_plan(n, dim, num_classes, seed, region_sizes=region_sizes)


def build(pipeline: beam.Pipeline, opts: GeneratePoolOptions) -> storage.OutputDir:
    """The pool's shards written in parallel, pool.json and _SUCCESS last; returns the output directory."""
    output_dir = require(opts.output, "--output")
    n = require(opts.num_examples, "--num-examples")
    if opts.file_format not in ("parquet", "tfrecord"):
        raise InputError(f"--format {opts.file_format!r}: choose parquet or tfrecord")
    if opts.region_sizes not in synthetic.REGION_SIZES:
        raise InputError(f"--region-sizes {opts.region_sizes!r}: choose "
                         + " or ".join(synthetic.REGION_SIZES))
    spec = (n, opts.dim, opts.num_classes, opts.seed, opts.region_sizes)
    try:
        _plan(*spec)   # checks the parameters on the driver
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    num_shards = opts.num_shards or synthetic.default_num_shards(n)
    if num_shards <= 0 or num_shards > n:
        raise InputError(f"--num-shards must be between 1 and --num-examples ({n}); got {num_shards}")
    bounds = synthetic.shard_bounds(n, num_shards)
    file_format = opts.file_format
    suffix = ".parquet" if file_format == "parquet" else ".tfrecord"
    output = storage.OutputDir(output_dir, "pool", "pool.json", storage.SUCCESS, opts.overwrite)

    def write(path, index):
        start, end = bounds[index]
        rows = synthetic.generate_rows(_plan(*spec), start, end)
        if file_format == "parquet":
            storage.write_parquet(path, _to_table(rows))
        else:
            storage.write_tfrecords(path, storage.batch_to_examples(rows))

    def summary(names, _):
        return {"num_examples": n, "dim": opts.dim, "num_classes": opts.num_classes, "seed": opts.seed,
                "region_sizes": opts.region_sizes, "format": file_format, "files": names}

    _ = (pipeline
         | "Shards" >> beam.Create([(i, num_shards, i) for i in range(num_shards)])
         | "Write" >> storage.WriteShards(output, suffix, write, summary))
    return output


def run(argv: list[str] | GeneratePoolOptions | None = None) -> dict:
    """Run the pipeline from its flags (a list), or from typed values (a GeneratePoolOptions); returns the summary."""
    summary, _, seconds, output = build_and_run(GeneratePoolOptions, argv, build, "generate-pool", "pool.json")
    if summary.get("dry_run"):
        return summary
    LOG.info("generate-pool: %d examples (dim %d, %d classes) in %d %s files in %.1f s -> %s",
             summary["num_examples"], summary["dim"], summary["num_classes"], len(summary["files"]),
             summary["format"], seconds, output)
    return summary

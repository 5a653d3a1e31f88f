"""Size of the job graph `clusmar generate-pool` submits, by pool size.

Dataflow refuses a job whose graph (the pipeline proto) exceeds its request limit
(about 10 MB), so nothing in the graph may grow with the pool. Builds the pipeline
only: nothing runs and nothing is written.

    .venv/bin/python benchmarks/bench_job_graph.py --sizes 1000000 100000000 --dim 128
"""
import argparse
import tempfile

from clusmar_beam.pipelines import generate_pool
from clusmar_beam.pipelines.options import make_pipeline, parse_options


def graph_bytes(num_examples: int, dim: int) -> int:
    with tempfile.TemporaryDirectory() as root:
        options, opts = parse_options(generate_pool.GeneratePoolOptions, [
            "--num-examples", str(num_examples), "--dim", str(dim), "--output", f"{root}/pool"])
        pipeline = make_pipeline(options)
        generate_pool.build(pipeline, opts)
        return len(pipeline.to_runner_api().SerializeToString())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 100_000_000])
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    for n in args.sizes:
        print(f"generate-pool {n:>12,} x {args.dim}-d: job graph {graph_bytes(n, args.dim):>12,} bytes")


if __name__ == "__main__":
    main()

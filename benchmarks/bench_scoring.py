"""Benchmark: `clusmar score` on DirectRunner against a plain loop, side by side in one run.

Scores N examples (default 1M) of a 256-wide float feature column with a 3-layer
MLP (256 -> hidden 256 -> embedding 128 -> 100-way softmax), saved as .keras.

- plain loop: one process, no Beam: read the same Parquet row groups, call the
  same `Scorer` (scoring.load_scorer) on the same --batch-size batches, compute
  the same margins and write the same scores files (scoring.score_batch /
  scores_table / write_scores). It reports its model-call time separately.
- pipeline: `clusmar_beam.pipelines.score.run(...)` on the DirectRunner (FnApiRunner), scoring
  through RunInference (scoring.ScorerModelHandler, one pool batch per element), timed
  from the call to its return: driver checks, model loads, pipeline, output
  finalisation and _SUCCESS included.

Order: loop, pipeline, loop (the faster loop is the baseline). Throughput ratio =
pipeline rows/s / loop rows/s; the target is >= 0.8 (Beam overhead <= 25%).

    .venv/bin/python benchmarks/bench_scoring.py [--num-examples 1000000] [--workdir DIR]
        [--batch-size 4096] [Beam flags such as --direct_num_workers 2]
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from clusmar_beam.transforms import scoring, storage  # noqa: E402


def make_pool(directory: str, n: int, dim: int, classes: int, rows_per_file: int, row_group: int, seed: int):
    """Gaussian-mixture features (one centre per class) in Parquet files; reused when already there."""
    stamp = os.path.join(directory, "_POOL.json")
    params = {"n": n, "dim": dim, "classes": classes, "rows_per_file": rows_per_file, "row_group": row_group,
              "seed": seed}
    if os.path.exists(stamp) and json.load(open(stamp)) == params:
        return
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    for index, start in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - start)
        labels = rng.integers(0, classes, m)
        x = centres[labels] + rng.normal(scale=1.5, size=(m, dim)).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(start, start + m, dtype=np.int64)),
                          "features": scoring.float_lists(x), "label": pa.array(labels, type=pa.int64())})
        pq.write_table(table, os.path.join(directory, f"pool-{index:05d}.parquet"), row_group_size=row_group)
    json.dump(params, open(stamp, "w"))


def make_model(path: str, dim: int, hidden: int, emb: int, classes: int, seed: int):
    """The 3-layer MLP, trained for one short epoch on a fresh sample so its outputs are not uniform."""
    import keras
    if os.path.exists(path):
        return
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((dim,), name="features")
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    e = keras.layers.Dense(emb, activation="relu", name="embedding")(h)
    out = keras.layers.Dense(classes, activation="softmax", name="probs")(e)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, 20_000)
    x = centres[labels] + rng.normal(scale=1.5, size=(len(labels), dim)).astype(np.float32)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, labels, batch_size=256, epochs=1, verbose=0)
    model.save(path)


def plain_loop(pool_dir: str, model_path: str, out_dir: str, batch_size: int) -> dict:
    """The same work as the pipeline, in one process, without Beam."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    start = time.perf_counter()
    config = scoring.ModelConfig(model_path)
    scorer = scoring.load_scorer(config)
    files = sorted(glob.glob(os.path.join(pool_dir, "pool-*.parquet")))
    schema = storage.parquet_schema(files[0])
    feeds = scoring.plan_feeds(scorer.inputs, schema, {}, files[0], model_path)
    columns = ["id", *[c for f in feeds for c in f.columns]]
    read = model = write = 0.0
    rows = 0

    class Timed:                         # the scorer, timing its calls
        def __init__(self, inner):
            self.inner, self.seconds = inner, 0.0
            self.config, self.embedding_name, self.probs_name = inner.config, inner.embedding_name, inner.probs_name

        def __call__(self, feeds_):
            began = time.perf_counter()
            out = self.inner(feeds_)
            self.seconds += time.perf_counter() - began
            return out

    timed = Timed(scorer)
    for index, path in enumerate(files):
        parquet = pq.ParquetFile(path)
        results = []
        for group in range(parquet.num_row_groups):
            began = time.perf_counter()
            batch = storage.table_to_batch(parquet.read_row_group(group, columns=columns), path)
            read += time.perf_counter() - began
            results.append(scoring.score_batch(timed, batch, feeds, batch_size))
            rows += len(batch)
        began = time.perf_counter()
        scoring.write_scores(os.path.join(out_dir, f"scores-{index:05d}-of-{len(files):05d}.parquet"),
                             scoring.scores_table(results))
        write += time.perf_counter() - began
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "model_load_s": scorer.load_seconds,
            "read_s": read, "model_calls_s": timed.seconds, "write_s": write,
            "model_only_rows_per_s": rows / timed.seconds}


def pipeline(pool_dir: str, model_path: str, out_dir: str, batch_size: int, beam_flags: list) -> dict:
    from clusmar_beam.pipelines import score
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    info = score.run(["--pool", os.path.join(pool_dir, "pool-*.parquet"), "--model", model_path,
                      "--output", out_dir, "--batch-size", str(batch_size), *beam_flags])
    seconds = time.perf_counter() - start
    metrics = info["metrics"]
    latency = metrics.get("batch_latency_us", {})
    return {"rows": info["num_examples"], "seconds": seconds, "rows_per_s": info["num_examples"] / seconds,
            "files": len(info["files"]), "batches": metrics.get("batches"),
            "model_calls_s": latency.get("mean", 0) * latency.get("count", 0) / 1e6,
            "batch_latency_ms_mean": latency.get("mean", 0) / 1e3, "model_load_ms": metrics.get("model_load_ms")}


def same_scores(a_dir: str, b_dir: str) -> float:
    """Max |margin difference| between the two outputs, matched by id (they must hold the same ids)."""
    def load(directory):
        table = pa.concat_tables(pq.read_table(f, columns=["id", "margin"])
                                 for f in sorted(glob.glob(os.path.join(directory, "scores-*.parquet"))))
        ids, margin = table.column("id").to_numpy(), table.column("margin").to_numpy()
        order = np.argsort(ids)
        return ids[order], margin[order]
    ids_a, m_a = load(a_dir)
    ids_b, m_b = load(b_dir)
    assert np.array_equal(ids_a, ids_b), "the loop and the pipeline scored different ids"
    return float(np.abs(m_a - m_b).max())


def _seconds(value) -> str:
    return "n/a (not timed apart)" if value is None else f"{value:.2f}"


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import apache_beam
    import tensorflow as tf
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GB RAM, Python {platform.python_version()}, "
            f"apache-beam {apache_beam.__version__}, tensorflow {tf.__version__}, load average at start "
            f"{' '.join(open('/proc/loadavg').read().split()[:3])}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rows-per-file", type=int, default=100_000)   # like generate-pool
    parser.add_argument("--row-group", type=int, default=65_536)
    parser.add_argument("--workdir", default="/tmp/clusmar-bench-scoring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the pool and outputs")
    args, beam_flags = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clusmar").setLevel(logging.INFO)

    header = machine()
    pool_dir = os.path.join(args.workdir, "pool")
    model_path = os.path.join(args.workdir, "mlp.keras")
    began = time.perf_counter()
    make_pool(pool_dir, args.num_examples, args.dim, args.num_classes, args.rows_per_file, args.row_group, args.seed)
    make_model(model_path, args.dim, args.hidden, args.embedding_dim, args.num_classes, args.seed)
    print(f"setup (pool + model): {time.perf_counter() - began:.1f} s", flush=True)

    # Each run starts with the previous run's files on disk (os.sync, untimed): otherwise a run pays for
    # the write-back of the one before, and deleting a run's output frees the next one from it.
    runs = []
    os.sync()
    runs.append(("loop", plain_loop(pool_dir, model_path, os.path.join(args.workdir, "loop"), args.batch_size)))
    print("loop 1:", json.dumps(runs[-1]), flush=True)
    os.sync()
    runs.append(("pipeline", pipeline(pool_dir, model_path, os.path.join(args.workdir, "pipeline"),
                                      args.batch_size, beam_flags)))
    print("pipeline:", json.dumps(runs[-1], default=str), flush=True)
    shutil.rmtree(os.path.join(args.workdir, "loop"), ignore_errors=True)
    os.sync()
    runs.append(("loop", plain_loop(pool_dir, model_path, os.path.join(args.workdir, "loop"), args.batch_size)))
    print("loop 2:", json.dumps(runs[-1]), flush=True)
    diff = same_scores(os.path.join(args.workdir, "loop"), os.path.join(args.workdir, "pipeline"))

    loops = [r for name, r in runs if name == "loop"]
    best_loop = max(loops, key=lambda r: r["rows_per_s"])
    pipe = runs[1][1]
    ratio = pipe["rows_per_s"] / best_loop["rows_per_s"]
    model_only = max(r["model_only_rows_per_s"] for r in loops)
    command = "benchmarks/bench_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"command: `.venv/bin/python {command.strip()}`",
        f"machine: {header}",
        f"workload: {args.num_examples:,} rows x {args.dim} float32 features in "
        f"{len(glob.glob(os.path.join(pool_dir, 'pool-*.parquet')))} Parquet files; MLP {args.dim}-{args.hidden}-"
        f"{args.embedding_dim}-{args.num_classes} (.keras), batch size {args.batch_size}; writes id, embedding, "
        f"probs, margin",
        "",
        "| run | seconds | rows/s | model calls (s) | read (s) | write (s) |",
        "|---|---|---|---|---|---|",
    ]
    for index, (name, r) in enumerate(runs):
        label = "pipeline (DirectRunner" + (", " + " ".join(beam_flags) if beam_flags else "") + ")" \
            if name == "pipeline" else f"plain loop #{1 + (index > 0)}"
        lines.append(f"| {label} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | {r['model_calls_s']:.2f} | "
                     f"{_seconds(r.get('read_s'))} | {_seconds(r.get('write_s'))} |")
    lines += [
        "",
        f"pipeline / best plain loop throughput: **{ratio:.2f}** (target >= 0.80; Beam overhead "
        f"{(1 / ratio - 1) * 100:+.0f}% time)",
        f"model calls alone (no I/O, no margins): {model_only:,.0f} rows/s; pipeline end to end is "
        f"{pipe['rows_per_s'] / model_only:.2f} of that",
        f"max |margin(loop) - margin(pipeline)| over all ids: {diff:.2g}",
    ]
    print("\n".join(lines))
    if not args.keep:
        for name in ("loop", "pipeline"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)


if __name__ == "__main__":
    main()

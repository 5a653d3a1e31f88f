"""Data and helpers shared by the benchmark scripts (import as `data`: each script's folder is on sys.path).

- `synthetic_embeddings`: the first n rows of the synthetic pool (`clusmar_beam.core.synthetic`,
  the generator behind `clusmar generate-pool`), in memory, for the in-process HAC benchmarks;
- `generate_pool`: a pool on disk through `clusmar generate-pool`, kept and reused once complete;
- `load_embeddings`: a Parquet pool's embeddings in id order, as `clusmar cluster` orders them;
- `cluster_labels`: a `clusmar cluster` output's (ids, cluster ids) in id order;
- `flood_embeddings`: a pool of Pareto-sized Gaussian regions and a near-duplicate flood, in memory;
- `exact_average_linkage`: fastcluster's exact average linkage, the reference every HAC figure is read against;
- `with_noise`: embeddings with Gaussian noise added, to see how far an exact clustering moves by itself;
- `timed_command`: a command under /usr/bin/time -v: wall seconds and peak RSS.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

from clusmar_beam.core import synthetic

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PY = sys.executable
CLI = [PY, "-m", "clusmar_beam.app.cli"]


def synthetic_embeddings(n: int, dim: int = 64, num_classes: int = 100, seed: int = 0,
                         region_sizes: str = "lognormal") -> np.ndarray:
    """float32 embeddings of rows 0..n-1 of `synthetic.make_plan(n, dim, num_classes, seed, region_sizes=...)`:
    the rows `clusmar generate-pool --num-examples n` writes with the same flags."""
    plan = synthetic.make_plan(n, dim, num_classes, seed, region_sizes=region_sizes)
    return synthetic.generate_rows(plan, 0, n)["embedding"].astype(np.float32, copy=False)


def generate_pool(directory: str, n: int, dim: int = 64, num_classes: int = 100, seed: int = 0,
                  region_sizes: str = "lognormal", time_file: str | None = None):
    """`clusmar generate-pool` into `directory` unless it holds a completed pool (`_SUCCESS`).

    Returns the pool's file glob and, when it was generated, (wall seconds, peak RSS GiB), else None.
    """
    timing = None
    if not os.path.exists(os.path.join(directory, "_SUCCESS")):
        cmd = [*CLI, "generate-pool", "--output", directory, "--num-examples", str(n), "--dim", str(dim),
               "--num-classes", str(num_classes), "--seed", str(seed), "--region-sizes", region_sizes,
               "--overwrite"]
        timing = timed_command(cmd, time_file)
    return os.path.join(directory, "pool-*.parquet"), timing


def load_embeddings(pool_glob: str) -> np.ndarray:
    """float32 embeddings of every file matching `pool_glob`, rows in id order."""
    table = pq.read_table(sorted(glob.glob(pool_glob)), columns=["id", "embedding"])
    column = table.column("embedding").combine_chunks()
    embeddings = column.values.to_numpy().reshape(len(column), -1).astype(np.float32)
    return embeddings[np.argsort(table.column("id").to_numpy(), kind="stable")]


def cluster_labels(directory: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cluster ids) of a `clusmar cluster` output directory, in id order."""
    table = pq.read_table(sorted(glob.glob(os.path.join(directory, "clusters-*.parquet"))))
    ids = table.column("id").to_numpy(zero_copy_only=False)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.asarray(table.column("cluster_id").to_numpy())[order]


def timed_command(cmd: list[str], time_file: str | None = None, cwd: str = ROOT) -> tuple[float, float]:
    """Run `cmd` under /usr/bin/time -v (from the repository root): (wall seconds, peak RSS in GiB).

    The time report is kept in `time_file` when given."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tmp:
        path = time_file or tmp.name
        subprocess.run(["/usr/bin/time", "-v", "-o", path, *cmd], check=True, cwd=cwd)
        with open(path) as f:
            lines = f.read().splitlines()
    wall = next(line for line in lines if "Elapsed (wall" in line).split()[-1]
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    rss_kib = int(next(line for line in lines if "Maximum resident" in line).split()[-1])
    return round(seconds, 1), round(rss_kib / 1048576, 2)


def flood_embeddings(n: int, dim: int = 20, seed: int = 0, regions: int = 200, flood_share: float = 0.1,
                     flood_sources: int = 50) -> np.ndarray:
    """float32 embeddings of a pool unlike the synthetic generator's: `regions` Gaussian regions of
    Pareto-distributed sizes, each point with its own noise scale, and a near-duplicate flood —
    `flood_share` of the pool are copies of `flood_sources` points with a tiny jitter (a scraped
    page repeated, one image re-encoded)."""
    rng = np.random.default_rng(seed)
    flood = int(round(n * flood_share))
    weights = rng.pareto(1.1, regions) + 1.0
    sizes = rng.multinomial(n - flood, weights / weights.sum())
    centres = rng.standard_normal((regions, dim)) * 2.0
    region = np.repeat(np.arange(regions), sizes)
    scale = rng.lognormal(-1.0, 0.5, len(region))[:, None]
    points = centres[region] + rng.standard_normal((len(region), dim)) * scale
    sources = points[rng.choice(len(points), flood_sources, replace=False)]
    copies = sources[rng.integers(0, flood_sources, flood)] + rng.standard_normal((flood, dim)) * 1e-3
    X = np.concatenate([points, copies]).astype(np.float32)
    return X[rng.permutation(n)]


def with_noise(X: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """float64 `X` plus Gaussian noise of `scale` x mean |x|: the exact clustering of it against that of
    `X` is how far an exact cut moves on its own, the scale an approximate cut's ARI reads against."""
    rng = np.random.default_rng(seed)
    return X.astype(np.float64) + rng.standard_normal(X.shape) * (scale * float(np.abs(X).mean()))


def exact_average_linkage(X: np.ndarray, metric: str) -> np.ndarray:
    """fastcluster's exact average linkage of `X` in float64 (a scipy linkage matrix; n^2 / 2 distances in
    memory, so about 50K rows fit in 24 GB)."""
    import fastcluster
    return fastcluster.linkage(np.asarray(X, np.float64), method="average", metric=metric)

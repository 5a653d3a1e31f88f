"""HAC speed of an earlier commit against the checkout, side by side in one process.

Usage:
  .venv/bin/python benchmarks/bench_hac_versions.py --old REF [--old-faiss-blas] [--n 100000] [--eps 0.15] [--repeat 3]

The HAC of the `--old` commit (read with `git show`: `clusmar_beam/hac.py`, or the
`clusmar_beam/hac/` package of later commits) is loaded as a second module beside the
checkout's; both cluster the first n rows of the synthetic pool (as
`bench_hac_speed.py` takes them, cosine), alternating, `--repeat` times each, so a noisy
host slows both alike. Both run with the FAISS BLAS threshold that `clusmar_beam.knn`
sets; `--old-faiss-blas` runs the old commit with FAISS's default instead, as commits
before d379e19 (which added the setting) ran. Prints each time, the medians, and the ARI between the two
label sets (1.0: the same clusters).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import faiss

FAISS_DEFAULT_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # before clusmar_beam.knn sets it

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_hac_speed import pool  # noqa: E402
from clusmar_beam import hac  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

OURS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold


def load_old(ref: str):
    root = os.path.join(os.path.dirname(__file__), "..")

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout

    package = git("ls-tree", "--name-only", ref, "clusmar_beam/hac/").split()
    if package:
        # The package: its modules import each other as clusmar_beam.hac.*, which would be the checkout's.
        directory = os.path.join(tempfile.mkdtemp(), "hac_old")
        os.mkdir(directory)
        for name in package:
            if name.endswith(".py"):
                with open(os.path.join(directory, os.path.basename(name)), "w") as f:
                    f.write(git("show", f"{ref}:{name}").replace("clusmar_beam.hac.", "hac_old."))
        path = os.path.join(directory, "__init__.py")
        spec = importlib.util.spec_from_file_location("hac_old", path, submodule_search_locations=[directory])
    else:
        path = os.path.join(tempfile.mkdtemp(), "hac_old.py")
        with open(path, "w") as f:
            f.write(git("show", f"{ref}:clusmar_beam/hac.py"))
        spec = importlib.util.spec_from_file_location("hac_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hac_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="git commit whose HAC is compared")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--old-faiss-blas", action="store_true", help="old commit with FAISS's default BLAS threshold")
    args = ap.parse_args(argv)
    old_threshold = FAISS_DEFAULT_BLAS_THRESHOLD if args.old_faiss_blas else OURS_BLAS_THRESHOLD
    versions = {args.old: (load_old(args.old), old_threshold), "checkout": (hac, OURS_BLAS_THRESHOLD)}
    X = pool(args.n)
    for module, threshold in versions.values():   # warm-up: library loading, thread pools
        faiss.cvar.distance_compute_blas_threshold = threshold
        module.average_linkage(pool(1000), args.eps, "cosine")
    times = {name: [] for name in versions}
    labels = {}
    for _ in range(args.repeat):
        for name, (module, threshold) in versions.items():
            faiss.cvar.distance_compute_blas_threshold = threshold
            start = time.perf_counter()
            result = module.average_linkage(X, args.eps, "cosine")
            times[name].append(time.perf_counter() - start)
            labels[name] = result.labels
            print(f"{name}: {times[name][-1]:.2f} s, {result.num_clusters} clusters", flush=True)
    faiss.cvar.distance_compute_blas_threshold = OURS_BLAS_THRESHOLD
    old, new = (statistics.median(times[name]) for name in versions)
    print(f"median {args.old} {old:.2f} s, checkout {new:.2f} s: {old / new:.2f}x; "
          f"ARI {adjusted_rand_score(labels[args.old], labels['checkout']):.5f}")


if __name__ == "__main__":
    main()

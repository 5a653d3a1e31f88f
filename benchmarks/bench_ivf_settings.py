"""Quality of IVF settings where the IVF phase is forced far down, against fastcluster.

Usage:
  .venv/bin/python benchmarks/bench_ivf_settings.py [--seeds 8] CONFIG [CONFIG ...]

Each CONFIG is "default" (4*sqrt(n) lists, nprobe 32, hac's k-means iterations) or a
comma-separated list of `root=R` (R*sqrt(n) lists), `nprobe=P`, `iterations=I` (k-means
iterations of the lists). Data: the unit tests' diffuse groups with near-duplicate bursts
(`tests/test_hac.py::_diffuse_groups_and_bursts`, about 3,200 rows, 24-d) for seeds 1..N,
cut at the tests' 90% height quantile, with `exact_search_max=100`: the IVF index serves
until 100 clusters are left, so few large clusters lie in many small lists. Prints the ARI
against fastcluster's exact average linkage per metric, seed and configuration.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from scipy.cluster.hierarchy import fcluster
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from clusmar_beam import hac  # noqa: E402
from test_hac import _diffuse_groups_and_bursts, _reference, _threshold  # noqa: E402

DEFAULT_ITERATIONS = hac._TRAIN_ITERATIONS


def settings(config: str, n: int) -> tuple[dict, int]:
    """(keywords for hac.average_linkage, k-means iterations) of a CONFIG."""
    values = {} if config == "default" else dict(setting.split("=") for setting in config.split(","))
    keywords = {}
    if "root" in values:
        keywords["nlist"] = int(round(float(values["root"]) * math.sqrt(n)))
    if "nprobe" in values:
        keywords["nprobe"] = int(values["nprobe"])
    return keywords, int(values.get("iterations", DEFAULT_ITERATIONS))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("configs", nargs="+")
    args = ap.parse_args(argv)
    print("metric seed rows " + " ".join(args.configs))
    for metric in ("sqeuclidean", "cosine"):
        for seed in range(1, args.seeds + 1):
            X = _diffuse_groups_and_bursts(seed=seed)
            Z = _reference(X, metric)
            eps = _threshold(Z, 0.9)
            ref = fcluster(Z, eps, "distance")
            aris = []
            for config in args.configs:
                keywords, hac._TRAIN_ITERATIONS = settings(config, len(X))
                labels = hac.average_linkage(X, eps, metric, exact_search_max=100, **keywords).labels
                aris.append(adjusted_rand_score(ref, labels))
            hac._TRAIN_ITERATIONS = DEFAULT_ITERATIONS
            print(metric, seed, len(X), " ".join(f"{a:.4f}" for a in aris), flush=True)


if __name__ == "__main__":
    main()

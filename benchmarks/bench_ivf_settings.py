"""Quality of IVF settings where the IVF phase is forced far down, against fastcluster.

Usage:
  .venv/bin/python benchmarks/bench_ivf_settings.py [--seeds 8] CONFIG [CONFIG ...]

Each CONFIG is "default" (4*sqrt(n) lists, nprobe 32) or `bench_hac_params.py`'s
comma-separated settings (`nprobe=16`, `train_iterations=5`, ...), plus `root=R`: R*sqrt(n)
lists. Data: the unit tests' diffuse groups with near-duplicate bursts
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
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from bench_hac_params import parse, set_constants  # noqa: E402
from clusmar_beam import hac  # noqa: E402
from test_hac import _diffuse_groups_and_bursts, _reference, _threshold  # noqa: E402


def settings(config: str, n: int) -> tuple[dict, dict]:
    """(keywords for hac.average_linkage, module constants) of a CONFIG for n rows."""
    root = [s for s in config.split(",") if s.startswith("root=")]
    rest = ",".join(s for s in config.split(",") if not s.startswith("root=")) or "default"
    keywords, constants = parse(rest)
    if root:
        keywords["nlist"] = int(round(float(root[0].split("=")[1]) * math.sqrt(n)))
    return keywords, constants


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
                keywords, constants = settings(config, len(X))
                set_constants(constants)
                labels = hac.average_linkage(X, eps, metric, exact_search_max=100, **keywords).labels
                aris.append(adjusted_rand_score(ref, labels))
            set_constants({})
            print(metric, seed, len(X), " ".join(f"{a:.4f}" for a in aris), flush=True)


if __name__ == "__main__":
    main()

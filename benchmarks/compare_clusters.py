"""Agreement of two `clusmar cluster` outputs over the same pool: ARI and cluster counts.

Usage:
  .venv/bin/python benchmarks/compare_clusters.py DIR_A DIR_B [DIR_C ...]

Every directory after the first is compared with the first (rows matched by id). Prints one
JSON line per comparison.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import adjusted_rand_score

from data import cluster_labels


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("first")
    ap.add_argument("others", nargs="+")
    args = ap.parse_args(argv)
    ids, first = cluster_labels(args.first)
    for other in args.others:
        other_ids, labels = cluster_labels(other)
        if not np.array_equal(ids, other_ids):
            raise SystemExit(f"{other}: not the same ids as {args.first}")
        print(json.dumps({"a": args.first, "b": other, "clusters_a": int(np.unique(first).size),
                          "clusters_b": int(np.unique(labels).size),
                          "ari": round(float(adjusted_rand_score(first, labels)), 5)}), flush=True)


if __name__ == "__main__":
    main()

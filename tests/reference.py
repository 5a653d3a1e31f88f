"""A deliberately plain, loop-by-loop reading of the paper's selection rule.

Independent of clusmar_beam.core.selection's vectorised code: tests compare the two.
Hashes are the only shared piece (they are part of the contract: seeded hash of
the id for margin ties, of (seed, round, id) for the pick inside a cluster).
"""
import numpy as np

from clusmar_beam.core.hashing import pick_hash, tiebreak_hash


def reference_select(ids, margins, cluster_of, labeled, k_t, k_m, seed, round_index, strategy="cluster-margin"):
    ids = list(ids)
    unlabeled = [i for i in ids if i not in set(labeled)]
    arr = np.array(unlabeled, dtype=object if unlabeled and isinstance(unlabeled[0], bytes) else np.int64)
    tie = dict(zip(unlabeled, tiebreak_hash(arr, seed).tolist())) if unlabeled else {}
    pick = dict(zip(unlabeled, pick_hash(arr, seed, round_index).tolist())) if unlabeled else {}
    by_margin = sorted(unlabeled, key=lambda i: (margins[i], tie[i], i))
    if strategy == "margin":
        return by_margin[:k_t]
    if strategy == "random":
        return sorted(unlabeled, key=lambda i: (pick[i], i))[:k_t]
    candidates = by_margin[:k_m]
    groups = {}
    for i in candidates:
        groups.setdefault(cluster_of[i], []).append(i)
    for members in groups.values():
        members.sort(key=lambda i: (pick[i], i))        # a seeded random order inside the group
    order = sorted(groups, key=lambda c: (len(groups[c]), c))   # smallest group first
    chosen, depth = [], 0
    while len(chosen) < k_t and any(len(groups[c]) > depth for c in order):
        for c in order:
            if len(groups[c]) > depth and len(chosen) < k_t:
                chosen.append(groups[c][depth])
        depth += 1
    return chosen


def margins_from_probs(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability, computed in float64 by sorting each row: the plain definition."""
    top2 = np.partition(probs.astype(np.float64), -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]

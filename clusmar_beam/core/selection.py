"""Cluster-Margin's selection order (Citovsky et al. 2021, Algorithm 1) and its baselines, on one batch.

cluster-margin: the candidates (the k_m unlabeled examples of lowest margin)
are grouped by cluster, the groups ordered by their size among the candidates
(smallest first, then cluster id), and one example is taken per group per
pass, round-robin, until k_t are chosen.  The pick inside a group is a seeded
hash of (seed, round, id); ties in margin are broken by a seeded hash of
(seed, id) and then the id.  Both are functions of the ids alone, so the
result does not depend on how rows are spread over files, bundles or workers.
"""
from __future__ import annotations

import numpy as np

from clusmar_beam.core.batch import Batch
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.hashing import pick_hash, tiebreak_hash

STRATEGIES = ("cluster-margin", "margin", "random")
NO_CLUSTER = -1


def lowest(primary: np.ndarray, secondary: np.ndarray, ids: np.ndarray, k: int, ordered: bool = True) -> np.ndarray:
    """Indices of the k rows smallest by (primary, secondary, id): in that order, or (ordered=False) in
    row order, which is all a set of candidates needs and spares sorting them."""
    n = len(primary)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        index = np.arange(n)
        if not ordered:
            return index
    else:
        # Everything strictly below the k-th primary value is in; ties at it are settled by (secondary, id).
        cut = np.partition(primary, k - 1)[k - 1]
        if not ordered:
            below, tied = np.flatnonzero(primary < cut), np.flatnonzero(primary == cut)
            settled = tied[_order(primary[tied], secondary[tied], ids[tied])[:k - len(below)]]
            return np.sort(np.concatenate([below, settled]))
        index = np.flatnonzero(primary <= cut)
    return index[_order(primary[index], secondary[index], ids[index])[:k]]


def _order(primary, secondary, ids) -> np.ndarray:
    if ids.dtype != object:
        return np.lexsort((ids, secondary, primary))
    return np.asarray(sorted(range(len(ids)), key=lambda i: (primary[i], secondary[i], ids[i])), dtype=np.int64)


def round_robin_order(cluster_ids: np.ndarray, picks: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Cluster-Margin's order over candidates: indices of rows in selection order.

    Pass p takes the p-th pick of every group that still has one; within a pass,
    groups go by (size among candidates, cluster id); inside a group the picks go
    by (seeded hash, id). Exhausted groups simply have no row in later passes.
    """
    n = len(cluster_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    by_pick = np.argsort(picks, kind="stable")
    sorted_picks = picks[by_pick]
    if np.any(sorted_picks[1:] == sorted_picks[:-1]):     # a tie of 64-bit hashes: settle it by the id
        by_pick = np.lexsort((_rank(ids), picks))
    within = by_pick[np.argsort(cluster_ids[by_pick], kind="stable")]   # by cluster, then pick order
    sorted_clusters = cluster_ids[within]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]])
    sizes = np.diff(np.r_[starts, n])
    pass_index = np.arange(n) - np.repeat(starts, sizes)
    groups = len(starts)
    group_rank = np.empty(groups, dtype=np.int64)
    group_rank[np.lexsort((sorted_clusters[starts], sizes))] = np.arange(groups)   # smallest group first
    # One key per row, unique because a group has one row per pass: (pass, group's rank).
    key = pass_index * groups + np.repeat(group_rank, sizes)
    return within[np.argsort(key)]


def _rank(ids: np.ndarray) -> np.ndarray:
    """Integer ranks of ids (so object ids can sit in a lexsort)."""
    if ids.dtype != object:
        return ids
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    return ranks


def order_candidates(candidates: Batch, strategy: str, k_t: int) -> Batch:
    """The first k_t candidates in selection order, with their `rank`."""
    n = len(candidates)
    c = candidates.columns
    if strategy == "cluster-margin":
        order = round_robin_order(c["cluster_id"], c["pick"], candidates.ids)
    elif strategy == "margin":
        order = lowest(c["margin"], c["tiebreak"], candidates.ids, n)
    elif strategy == "random":
        order = lowest(c["pick"].astype(np.float64), c["pick"], candidates.ids, n)
    else:
        raise InputError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    chosen = candidates.take(order[:k_t])
    return chosen.with_columns(rank=np.arange(len(chosen), dtype=np.int64))


def lowest_for(batch: Batch, strategy: str, keep: int) -> np.ndarray:
    """Positions (in row order) of the `keep` rows a strategy keeps: lowest margin, or lowest pick hash for
    random. A set: order_candidates puts them in selection order."""
    c = batch.columns
    if strategy == "random":
        return lowest(c["pick"].astype(np.float64), c["pick"], batch.ids, keep, ordered=False)
    return lowest(c["margin"], c["tiebreak"], batch.ids, keep, ordered=False)


def scored_rows(source: str, ids: np.ndarray, margin: np.ndarray, cluster_ids: np.ndarray, seed: int,
                round_index: int, id_type: str) -> Batch:
    """Unlabeled rows with everything the order needs: margin, cluster, tie-break and pick hashes."""
    return Batch(source, {
        "id": ids,
        "margin": margin,
        "cluster_id": cluster_ids,
        "tiebreak": tiebreak_hash(ids, seed),
        "pick": pick_hash(ids, seed, round_index),
    }, id_type)


def candidates_to_keep(strategy: str, k_t: int, k_m: int) -> int:
    """Rows the order needs: k_m for cluster-margin, k_t for the others."""
    return k_m if strategy == "cluster-margin" else k_t


def select_in_memory(rows: Batch, strategy: str, k_t: int, k_m: int) -> tuple[Batch, Batch]:
    """(candidates, chosen) of one in-memory pool: the same two steps `clusmar select` runs across workers."""
    candidates = rows.take(lowest_for(rows, strategy, candidates_to_keep(strategy, k_t, k_m)))
    return candidates, order_candidates(candidates, strategy, k_t)

"""What one selection did, in numbers a person can check against the picks.

Cluster-Margin only pays off when its round-robin reaches past the first pass
and its candidates are uncertain. Two settings defeat it silently: a k_m that
covers much of the unlabeled pool (the candidates are barely uncertain), and
more candidate clusters than k_t (the batch ends inside the first pass, so only
the smallest clusters, often singletons, are sampled). Both are measured here
and warned about, for `clusmar select` and `clusmar simulate` alike.
"""
from __future__ import annotations

import numpy as np

from clusmar_beam.core.batch import Batch
from clusmar_beam.core.hac.sizes import size_histogram, size_counts
from clusmar_beam.core.selection import NO_CLUSTER

MARGIN_BIN_EDGES = np.linspace(0.0, 1.0, 41)
WARN_CANDIDATE_SHARE = 0.25
QUANTILES = (("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9),
             ("max", 1.0))


def margin_histogram(margins: np.ndarray) -> np.ndarray:
    """Counts over MARGIN_BIN_EDGES; values outside [0, 1] land in the end bins, so counts add up to the rows."""
    clipped = np.clip(np.asarray(margins, dtype=np.float64), 0.0, 1.0)
    return np.histogram(clipped, bins=MARGIN_BIN_EDGES)[0].astype(np.int64)


def margin_quantiles(margins: np.ndarray) -> dict | None:
    margins = np.asarray(margins, dtype=np.float64)
    if margins.size == 0:
        return None
    values = np.quantile(margins, [q for _, q in QUANTILES])
    return {**{name: float(v) for (name, _), v in zip(QUANTILES, values)}, "mean": float(margins.mean())}


def passes_completed(group_sizes: np.ndarray, selected: int) -> int:
    """Whole round-robin passes in the first `selected` picks, given each candidate group's size:
    pass p takes one row from every group with more than p rows."""
    if group_sizes.size == 0:
        return 0
    groups_with_more_than = np.cumsum(np.bincount(group_sizes)[::-1])[::-1][1:]   # index p: groups of size > p
    return int(np.searchsorted(np.cumsum(groups_with_more_than), selected, side="right"))


def selection_diagnostics(candidates: Batch | None, chosen: Batch | None, strategy: str, k_t: int,
                          unlabeled: int, pool_margin_histogram=None,
                          pick_cluster_sizes: np.ndarray | None = None) -> tuple[dict, list[str]]:
    """(diagnostics, warnings) of one selection.

    `candidates` are the rows the order ran over (the k_m lowest margins for
    cluster-margin), `chosen` the first k_t of them with `rank`;
    `pick_cluster_sizes` is, per chosen row, its cluster's size in the whole
    clustering (None when there are no clusters).
    """
    n_candidates = 0 if candidates is None else len(candidates)
    n_chosen = 0 if chosen is None else len(chosen)
    empty = np.zeros(0)
    cand_margin = candidates.columns["margin"] if n_candidates else empty
    pick_margin = chosen.columns["margin"] if n_chosen else empty
    clustered = n_candidates and bool(np.any(candidates.columns["cluster_id"] != NO_CLUSTER))
    out = {
        "candidates": n_candidates,
        "k_m_share_of_unlabeled": n_candidates / unlabeled if strategy == "cluster-margin" and unlabeled else None,
        "candidate_clusters": None, "candidate_clusters_per_k_t": None,
        "round_robin_passes_completed": None, "ended_inside_first_pass": None,
        "picks_from_single_candidate_clusters": None,
        "picks_from_singleton_clusters": None, "picks_by_cluster_size": None,
        "pick_margin_quantiles": margin_quantiles(pick_margin),
        "lowest_k_t_margin_quantiles": (margin_quantiles(np.sort(cand_margin)[:k_t])
                                        if strategy != "random" else None),
        "margin_histograms": {
            "edges": [float(e) for e in MARGIN_BIN_EDGES],
            "pool": [int(c) for c in pool_margin_histogram] if pool_margin_histogram is not None else None,
            "candidates": margin_histogram(cand_margin).tolist(),
            "picks": margin_histogram(pick_margin).tolist(),
        },
    }
    if clustered:
        cand_clusters, cand_counts = np.unique(candidates.columns["cluster_id"], return_counts=True)
        out["candidate_clusters"] = int(len(cand_clusters))
        out["candidate_clusters_per_k_t"] = len(cand_clusters) / k_t
        if n_chosen:
            count_of_pick = cand_counts[np.searchsorted(cand_clusters, chosen.columns["cluster_id"])]
            out["picks_from_single_candidate_clusters"] = float(np.mean(count_of_pick == 1))
    if clustered and strategy == "cluster-margin":
        completed = passes_completed(cand_counts, n_chosen)
        out["round_robin_passes_completed"] = completed
        out["ended_inside_first_pass"] = bool(n_chosen and completed == 0)
    if pick_cluster_sizes is not None:
        add_pick_cluster_sizes(out, pick_cluster_sizes)
    return out, _warnings(out, strategy, k_t)


def add_pick_cluster_sizes(diagnostics: dict, pick_cluster_sizes) -> dict:
    """Fill in what needs each pick's cluster size in the whole clustering (known after the order, in a pipeline)."""
    if pick_cluster_sizes is not None and len(pick_cluster_sizes):
        sizes = np.asarray(pick_cluster_sizes, dtype=np.int64)
        diagnostics["picks_from_singleton_clusters"] = float(np.mean(sizes == 1))
        diagnostics["picks_by_cluster_size"] = size_histogram(size_counts(sizes))["histogram"]
    return diagnostics


def _warnings(d: dict, strategy: str, k_t: int) -> list[str]:
    if strategy != "cluster-margin":
        return []
    warnings = []
    share = d["k_m_share_of_unlabeled"]
    if share is not None and share > WARN_CANDIDATE_SHARE:
        warnings.append(
            f"k_m is {share:.0%} of the unlabeled pool (more than {WARN_CANDIDATE_SHARE:.0%}): many candidates are "
            "not uncertain, so the batch mixes in confident examples; lower --candidate-multiplier (or --candidates)")
    if d["ended_inside_first_pass"]:
        singles = d["picks_from_single_candidate_clusters"]
        warnings.append(
            f"the batch ended inside the first round-robin pass: {d['candidate_clusters']} candidate clusters for "
            f"k_t = {k_t}, so only the smallest clusters were sampled"
            + (f" ({singles:.0%} of the picks are alone in their cluster among the candidates)"
               if singles is not None else "")
            + "; lower k_m, or cluster coarser (a larger distance threshold or target cluster size)")
    return warnings


def describe(d: dict) -> str:
    """One log line of the diagnostics."""
    parts = [f"{d['candidates']} candidates"]
    if d.get("k_m_share_of_unlabeled") is not None:
        parts.append(f"k_m {d['k_m_share_of_unlabeled']:.1%} of the unlabeled pool")
    if d.get("candidate_clusters") is not None:
        parts.append(f"{d['candidate_clusters']} candidate clusters ({d['candidate_clusters_per_k_t']:.2f} x k_t)")
    if d.get("round_robin_passes_completed") is not None:
        parts.append(f"{d['round_robin_passes_completed']} round-robin passes completed")
    if d.get("picks_from_singleton_clusters") is not None:
        parts.append(f"{d['picks_from_singleton_clusters']:.1%} of picks from singleton clusters")
    picks, lowest = d.get("pick_margin_quantiles"), d.get("lowest_k_t_margin_quantiles")
    if picks:
        parts.append(f"pick margin median {picks['p50']:.3g}"
                     + (f" (the k_t lowest margins: {lowest['p50']:.3g})" if lowest else ""))
    return ", ".join(parts)

"""Selection diagnostics against a plain analysis of the manifest, and the warnings they raise."""
import collections
import json

import numpy as np
import pytest

from clusmar_beam.core.hashing import pick_hash, tiebreak_hash
from conftest import read_manifest, write_parquet
from reference import margins_from_probs
from test_select_pipeline import _pool, _select


def _plain_analysis(ids, margins, cluster_of, k_t, k_m, seed, round_index):
    """Loop-by-loop: candidates, their groups, the passes the round-robin completed before k_t picks."""
    tie = dict(zip(ids, tiebreak_hash(np.array(ids), seed).tolist()))
    pick = dict(zip(ids, pick_hash(np.array(ids), seed, round_index).tolist()))
    candidates = sorted(ids, key=lambda i: (margins[i], tie[i], i))[:k_m]
    groups = collections.defaultdict(list)
    for i in candidates:
        groups[cluster_of[i]].append(i)
    taken, passes, depth = 0, 0, 0
    while taken < k_t and any(len(g) > depth for g in groups.values()):
        in_pass = sum(1 for g in groups.values() if len(g) > depth)
        if taken + in_pass <= k_t:
            passes += 1
        taken += min(in_pass, k_t - taken)
        depth += 1
    return candidates, groups, passes


@pytest.mark.parametrize("multiplier,k_t", [(4, 150), (1.5, 400), (10, 20)])
def test_manifest_diagnostics_match_a_plain_analysis(tmp_path, rng, multiplier, k_t):
    ids, probs, cluster_ids = _pool(tmp_path, rng, clusters=60)
    assert _select(tmp_path, "--batch-size", str(k_t), "--candidate-multiplier", str(multiplier), "--seed", "5",
                   "--round", "2") == 0
    rows = read_manifest(tmp_path / "out")
    summary = json.load(open(tmp_path / "out" / "manifest.json"))
    d = summary["diagnostics"]
    id_list = ids.tolist()
    margins = dict(zip(id_list, margins_from_probs(probs).tolist()))
    cluster_of = dict(zip(id_list, cluster_ids.tolist()))
    k_m = int(np.ceil(multiplier * k_t))
    candidates, groups, passes = _plain_analysis(id_list, margins, cluster_of, k_t, k_m, 5, 2)
    assert d["candidates"] == len(candidates) == k_m
    assert d["k_m_share_of_unlabeled"] == pytest.approx(k_m / len(ids))
    assert d["candidate_clusters"] == len(groups)
    assert d["candidate_clusters_per_k_t"] == pytest.approx(len(groups) / k_t)
    assert d["round_robin_passes_completed"] == passes
    assert d["ended_inside_first_pass"] == (len(groups) > k_t)
    pool_sizes = collections.Counter(cluster_ids.tolist())
    picks = [r["id"] for r in rows]
    assert d["picks_from_singleton_clusters"] == pytest.approx(
        sum(pool_sizes[cluster_of[i]] == 1 for i in picks) / len(picks))
    assert d["picks_from_single_candidate_clusters"] == pytest.approx(
        sum(len(groups[cluster_of[i]]) == 1 for i in picks) / len(picks))
    assert sum(d["picks_by_cluster_size"].values()) == len(picks)
    pick_margins = sorted(margins[i] for i in picks)
    assert d["pick_margin_quantiles"]["min"] == pytest.approx(pick_margins[0])
    assert d["pick_margin_quantiles"]["max"] == pytest.approx(pick_margins[-1])
    assert d["pick_margin_quantiles"]["p50"] == pytest.approx(np.median(pick_margins))
    lowest = sorted(margins.values())[:k_t]
    assert d["lowest_k_t_margin_quantiles"]["mean"] == pytest.approx(np.mean(lowest))
    h = d["margin_histograms"]
    assert sum(h["pool"]) == len(ids) and sum(h["candidates"]) == k_m and sum(h["picks"]) == k_t
    first_pass_warned = any("inside the first round-robin pass" in w for w in summary["warnings"])
    assert first_pass_warned == (len(groups) > k_t)
    assert any("of the unlabeled pool" in w for w in summary["warnings"]) == (k_m / len(ids) > 0.25)


def test_margin_strategy_reports_no_passes_and_labeled_rows_leave_the_pool_histogram(tmp_path, rng):
    ids, _, _ = _pool(tmp_path, rng)
    labeled = ids[:500]
    write_parquet(str(tmp_path / "labeled" / "l.parquet"), {"id": labeled})
    assert _select(tmp_path, "--batch-size", "100", "--strategy", "margin",
                   "--labeled", str(tmp_path / "labeled" / "*.parquet")) == 0
    summary = json.load(open(tmp_path / "out" / "manifest.json"))
    d = summary["diagnostics"]
    assert d["round_robin_passes_completed"] is None and d["k_m_share_of_unlabeled"] is None
    assert sum(d["margin_histograms"]["pool"]) == len(ids) - 500
    assert summary["warnings"] == []


def test_clustering_json_reports_singleton_and_largest_shares(tmp_path, rng):
    from clusmar_beam.app import cli
    import pyarrow.parquet as pq
    x = np.concatenate([rng.normal(size=(300, 8)) * 0.05 + rng.normal(size=(1, 8)), rng.normal(size=(200, 8))])
    write_parquet(str(tmp_path / "pool" / "p.parquet"), {"id": np.arange(500), "embedding": x})
    assert cli.main(["cluster", "--pool", str(tmp_path / "pool" / "*.parquet"), "--output", str(tmp_path / "c"),
                     "--distance-threshold", "0.05"]) == 0
    info = json.load(open(tmp_path / "c" / "clustering.json"))
    labels = pq.read_table(str(tmp_path / "c" / "clusters-00000-of-00001.parquet")).column("cluster_id").to_numpy()
    sizes = np.bincount(labels)
    assert info["singleton_share_of_points"] == pytest.approx(np.count_nonzero(sizes == 1) / 500)
    assert info["singleton_share_of_clusters"] == pytest.approx(np.count_nonzero(sizes == 1) / len(sizes))
    assert info["largest_cluster_share"] == pytest.approx(sizes.max() / 500)

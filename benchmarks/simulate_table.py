"""Markdown tables of `clusmar simulate` outputs (the tables behind benchmarks/RESULTS.md's simulate summary).

Usage: python benchmarks/simulate_table.py DIR [DIR ...]   (each DIR holds a simulation.json)
Savings are recomputed from the runs, so every table uses the same definitions.
"""
import json
import os
import sys

import numpy as np

from clusmar_beam.app.simulation.outcome import savings


def _pct(x):
    return "not reached" if x is None else f"{x * 100:+.1f}%"


def table(path):
    sim = json.load(open(os.path.join(path, "simulation.json")))
    p, d = sim["parameters"], sim["data"]
    print(f"\n#### {path}: {d['pool']} ({d['pool_count']:,} pool, {d['test_count']:,} test, {d['num_classes']} "
          f"classes), model {p['model']}, clustered {p['embedding']}, k_t {p['batch_size']:,}, seed labels "
          f"{p['seed_labels']:,}, {p['rounds']} rounds, {p['repetitions']} repetitions; "
          f"{sim['timing']['total_seconds']:.0f} s; selection share of a round: "
          + ", ".join(f"{k} {v:.1%}" for k, v in sim["timing"]["selection_share"].items()))
    baselines = [b for b in ("margin", "random", "k-center") if b in p["strategies"]]
    rows = savings(sim["runs"], "cluster-margin", baselines)
    diag = {}
    for run in sim["runs"]:
        if run["strategy"] == "cluster-margin":
            for r in run["rounds"][1:]:
                diag.setdefault(run["setting"], []).append(r["diagnostics"])
    final = {}
    for run in sim["runs"]:
        final.setdefault((run["strategy"], run["setting"]), []).append(run["rounds"][-1]["accuracy"])
    print("\n| setting | " + " | ".join(f"vs {b}: per rep (reached) / mean curves / final Δ" for b in baselines)
          + " | k_m share | cand. clusters / k_t | passes | picks from singletons |")
    print("|---" * (len(baselines) + 5) + "|")
    for setting in [s["name"] for s in sim["settings"]]:
        cells = []
        for b in baselines:
            row = next(r for r in rows if r["setting"] == setting and r["baseline"] == b)
            per_rep = "not reached" if row["savings_mean"] is None else \
                f"{row['savings_mean'] * 100:+.1f} ± {row['savings_std'] * 100:.1f}%"
            cells.append(f"{per_rep} ({row['reached']}/{row['repetitions']}) / {_pct(row['savings_of_mean_curves'])}"
                         f" / {row['final_accuracy_delta_mean'] * 100:+.1f} pp")
        ds = diag.get(setting, [])
        mean = lambda key: np.mean([x[key] for x in ds if x and x.get(key) is not None])
        cells += [f"{mean('k_m_share_of_unlabeled'):.0%}", f"{mean('candidate_clusters_per_k_t'):.2f}",
                  f"{mean('round_robin_passes_completed'):.1f}", f"{mean('picks_from_singleton_clusters'):.0%}"]
        print(f"| {setting} | " + " | ".join(cells) + " |")
    print("\nfinal accuracy (mean ± std): " + "; ".join(
        f"{s}{' ' + st if st else ''} {np.mean(v):.3f} ± {np.std(v):.3f}"
        for (s, st), v in final.items() if s != "cluster-margin" or len(sim["settings"]) <= 4))


if __name__ == "__main__":
    for directory in sys.argv[1:]:
        table(directory)

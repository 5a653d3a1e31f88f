"""Learning curves averaged over repetitions, and the labels a strategy saves against a baseline.

Savings follow the paper's reading: the labels a strategy needs to reach a
baseline's final accuracy (linear between rounds), against the labels the
baseline itself first reached it with (its final budget unless it plateaued);
computed per repetition, then mean and std over the repetitions where it was
reached (biased upward when some never got there: `reached` says how
many did), and once on the curves averaged over repetitions
(`savings_of_mean_curves`, without that bias). Never reaching the target is
reported as such; the final accuracy difference shows how far short it fell.
"""
from __future__ import annotations

import numpy as np


def curves_summary(runs: list[dict]) -> list[dict]:
    """Per (strategy, setting): labels and accuracy mean/std by round, over repetitions."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["strategy"], run["setting"]), []).append(run)
    out = []
    for (strategy, setting), members in groups.items():
        length = min(len(m["rounds"]) for m in members)
        acc = np.array([[r["accuracy"] for r in m["rounds"][:length]] for m in members])
        labels = np.array([[r["labels"] for r in m["rounds"][:length]] for m in members])
        out.append({"strategy": strategy, "setting": setting, "repetitions": len(members),
                    "labels": labels.mean(axis=0).round().astype(int).tolist(),
                    "accuracy_mean": acc.mean(axis=0).tolist(), "accuracy_std": acc.std(axis=0).tolist()})
    return out


def labels_to_reach(labels, accuracy, target: float) -> float | None:
    """The first label count at which the curve reaches `target`, linear between rounds; None if never."""
    for i, a in enumerate(accuracy):
        if a >= target:
            if i == 0:
                return float(labels[0])
            l0, l1, a0 = labels[i - 1], labels[i], accuracy[i - 1]
            return float(l0 + (l1 - l0) * (target - a0) / (a - a0))
    return None


def savings(runs: list[dict], strategy: str, baselines) -> list[dict]:
    """Per setting of `strategy` and per baseline: labels needed for the baseline's final accuracy."""
    by_key = {(r["strategy"], r["setting"], r["repetition"]): r for r in runs}
    settings = sorted({r["setting"] for r in runs if r["strategy"] == strategy}, key=str)
    out = []
    for setting in settings:
        for baseline in baselines:
            reps = sorted(rep for (s, st, rep) in by_key if s == strategy and st == setting
                          and (baseline, None, rep) in by_key)
            if not reps:
                continue
            needed, saved, targets, base_labels, final_delta = [], [], [], [], []
            mine_mean = _mean_curve([by_key[(strategy, setting, rep)]["rounds"] for rep in reps])
            theirs_mean = _mean_curve([by_key[(baseline, None, rep)]["rounds"] for rep in reps])
            reach_of_means = labels_to_reach(*mine_mean, theirs_mean[1][-1])
            for rep in reps:
                mine = by_key[(strategy, setting, rep)]["rounds"]
                theirs = by_key[(baseline, None, rep)]["rounds"]
                target = theirs[-1]["accuracy"]
                # the baseline's own first reach of its final accuracy: a plateau does not count as savings
                base = labels_to_reach([r["labels"] for r in theirs], [r["accuracy"] for r in theirs], target)
                targets.append(target)
                base_labels.append(base)
                final_delta.append(mine[-1]["accuracy"] - target)
                reach = labels_to_reach([r["labels"] for r in mine], [r["accuracy"] for r in mine], target)
                if reach is not None:
                    needed.append(reach)
                    saved.append(1.0 - reach / base)
            out.append({
                "setting": setting, "strategy": strategy, "baseline": baseline,
                "target_accuracy": float(np.mean(targets)), "labels_baseline": int(round(np.mean(base_labels))),
                "labels_strategy_mean": float(np.mean(needed)) if needed else None,
                "labels_strategy_std": float(np.std(needed)) if needed else None,
                "savings_mean": float(np.mean(saved)) if saved else None,
                "savings_std": float(np.std(saved)) if saved else None,
                "savings_of_mean_curves": (1.0 - reach_of_means / labels_to_reach(*theirs_mean, theirs_mean[1][-1])
                                           if reach_of_means is not None else None),
                "final_accuracy_delta_mean": float(np.mean(final_delta)),
                "final_accuracy_delta_std": float(np.std(final_delta)),
                "reached": len(saved), "repetitions": len(reps)})
    return out


def _mean_curve(runs_rounds) -> tuple[np.ndarray, np.ndarray]:
    """(labels, accuracy) averaged over repetitions, as long as the shortest run."""
    length = min(len(r) for r in runs_rounds)
    labels = np.mean([[x["labels"] for x in r[:length]] for r in runs_rounds], axis=0)
    accuracy = np.mean([[x["accuracy"] for x in r[:length]] for r in runs_rounds], axis=0)
    return labels, accuracy

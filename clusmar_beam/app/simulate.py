"""`clusmar simulate`: replay active learning on a fully labelled pool, strategies side by side.

Before spending a labeling budget, see whether Cluster-Margin saves labels on
this data: from one random seed set, each strategy runs R rounds; a round
trains the model on the labels revealed so far, scores the pool, selects k_t
ids (cluster-margin through the very code of `clusmar select`), and reveals
their labels. Test accuracy after every round gives the learning curves;
repetitions redraw the seed set. Sweeps over k_m multipliers and clustering
thresholds (or target cluster sizes) run in one go; the pool is clustered once
per clustering setting (and repetition, when the model re-embeds it).

Strategies: cluster-margin, margin, random, k-center (greedy core-set over the
unlabeled pool; no labels of the pool needed).

Output: DIR/simulation.json (curves, savings against each baseline, selection
diagnostics per round, timings) and DIR/_SUCCESS, written last.
`clusmar report --input DIR` renders it.
"""
from __future__ import annotations

import logging
import math
import sys
import time

import numpy as np
from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app.simulation import data as sim_data
from clusmar_beam.app.simulation import outcome
from clusmar_beam.app.simulation.models import MODELS, Standardize, make_model
from clusmar_beam.core import hac
from clusmar_beam.core.diagnostics import WARN_CANDIDATE_SHARE, describe, margin_histogram, selection_diagnostics
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.hashing import seeded_hash
from clusmar_beam.core.kcenter import k_center_greedy
from clusmar_beam.core.margins import top2_margins
from clusmar_beam.core.selection import NO_CLUSTER, STRATEGIES, scored_rows, select_in_memory
from clusmar_beam.pipelines.options import SubcommandOptions, parse_options, require
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")
SIMULATION_FORMAT = "clusmar-simulation"
SIMULATION_VERSION = 1
ALL_STRATEGIES = STRATEGIES + ("k-center",)
SEED_SALT = 0x5EED


def _floats(text):
    return [float(x) for x in str(text).split(",") if x.strip()]


class SimulateOptions(SubcommandOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--pool", help="Parquet glob with id, label and the feature columns")
        parser.add_argument("--digits", action="store_true", help="use scikit-learn's bundled digits instead of --pool")
        parser.add_argument("--test", help="Parquet glob of a labelled test set (default: a held-out split)")
        parser.add_argument("--test-fraction", dest="test_fraction", type=float, default=0.2,
                            help="share of the pool held out for testing when --test is not given (by id hash)")
        parser.add_argument("--features", default="embedding",
                            help="comma-separated feature columns (numeric lists or scalars); default embedding")
        parser.add_argument("--output", help="directory for simulation.json")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing simulation")
        parser.add_argument("--rounds", type=int, default=6, help="selection rounds per run")
        parser.add_argument("--batch-size", dest="batch_size", type=int, help="k_t: labels bought per round")
        parser.add_argument("--seed-labels", dest="seed_labels", type=int,
                            help="random labels before the first round (default: k_t)")
        parser.add_argument("--strategies", default="cluster-margin,margin,random,k-center",
                            help=f"comma-separated, from {', '.join(ALL_STRATEGIES)}")
        parser.add_argument("--repetitions", type=int, default=3, help="runs with different seed sets")
        parser.add_argument("--seed", type=int, default=0, help="repetition r uses seed + r")
        parser.add_argument("--candidate-multipliers", dest="candidate_multipliers", type=_floats, default=[10.0],
                            help="k_m = multiplier x k_t, comma-separated list to sweep (default 10)")
        parser.add_argument("--distance-thresholds", dest="distance_thresholds", type=_floats,
                            help="clustering thresholds eps to sweep (comma-separated)")
        parser.add_argument("--target-cluster-sizes", dest="target_cluster_sizes", type=_floats,
                            help="or target mean cluster sizes to sweep (default 10)")
        parser.add_argument("--metric", default="cosine", help="cosine | sqeuclidean (clustering and k-center)")
        parser.add_argument("--model", default="logistic", help="logistic | mlp (Keras, retrained every round)")
        parser.add_argument("--embedding", default="features",
                            help="what is clustered: features, or model (the seed model's penultimate layer, "
                                 "--model mlp; clustered once per repetition, as the paper does)")
        parser.add_argument("--epochs", type=int, default=20, help="--model mlp: training epochs")


def _check(opts) -> None:
    if bool(opts.pool) == bool(opts.digits):
        raise InputError("give exactly one of --pool GLOB and --digits")
    require(opts.output, "--output")
    k_t = require(opts.batch_size, "--batch-size")
    for flag, value, low in (("--batch-size", k_t, 1), ("--rounds", opts.rounds, 1),
                             ("--repetitions", opts.repetitions, 1), ("--epochs", opts.epochs, 1)):
        if value < low:
            raise InputError(f"{flag} must be at least {low} (got {value})")
    if opts.seed_labels is not None and opts.seed_labels < 2:
        raise InputError(f"--seed-labels must be at least 2 (got {opts.seed_labels})")
    if not 0 < opts.test_fraction < 1:
        raise InputError(f"--test-fraction must be in (0, 1) (got {opts.test_fraction})")
    unknown = [s for s in opts.strategies if s not in ALL_STRATEGIES]
    if unknown or not opts.strategies:
        raise InputError(f"--strategies {','.join(opts.strategies)!r}: choose from {', '.join(ALL_STRATEGIES)}")
    if opts.model not in MODELS:
        raise InputError(f"--model {opts.model!r}: choose {' or '.join(MODELS)}")
    if opts.embedding not in ("features", "model"):
        raise InputError(f"--embedding {opts.embedding!r}: choose features or model")
    if opts.embedding == "model" and opts.model != "mlp":
        raise InputError("--embedding model needs --model mlp (logistic regression has no embedding layer)")
    if opts.metric not in hac.METRICS:
        raise InputError(f"--metric {opts.metric!r}: choose {' or '.join(hac.METRICS)}")
    if not opts.candidate_multipliers or any(not (m >= 1 and math.isfinite(m)) for m in opts.candidate_multipliers):
        raise InputError(f"--candidate-multipliers must be numbers >= 1 (got {opts.candidate_multipliers})")
    if opts.distance_thresholds and opts.target_cluster_sizes:
        raise InputError("give --distance-thresholds or --target-cluster-sizes, not both")
    if opts.distance_thresholds is not None and (not opts.distance_thresholds or any(
            not (t > 0 and math.isfinite(t)) for t in opts.distance_thresholds)):
        raise InputError(f"--distance-thresholds must be positive numbers (got {opts.distance_thresholds})")
    if opts.target_cluster_sizes is not None and (not opts.target_cluster_sizes or any(
            not (t >= 1 and math.isfinite(t)) for t in opts.target_cluster_sizes)):
        raise InputError(f"--target-cluster-sizes must be numbers >= 1 (got {opts.target_cluster_sizes})")


def _clusterings(opts) -> list[dict]:
    if opts.distance_thresholds:
        return [{"name": f"ε {t:g}", "distance_threshold": t, "target_mean_cluster_size": None}
                for t in opts.distance_thresholds]
    return [{"name": f"target size {t:g}", "distance_threshold": None, "target_mean_cluster_size": t}
            for t in (opts.target_cluster_sizes or [10.0])]


def _load(opts):
    features = [c.strip() for c in opts.features.split(",") if c.strip()]
    data = sim_data.digits() if opts.digits else sim_data.read_parquet(opts.pool, "--pool", features)
    if opts.test:
        test = sim_data.read_parquet(opts.test, "--test", features)
        if test.features.shape[1] != data.features.shape[1]:
            raise InputError(f"--test {opts.test!r}: {test.features.shape[1]} features, the pool has "
                             f"{data.features.shape[1]}")
        sim_data.check_disjoint(data, test, "--test")
        return data, test, opts.test
    pool, test = sim_data.held_out(data, opts.test_fraction)
    return pool, test, f"held out {opts.test_fraction:g} of the pool by id hash"


class Simulation:
    """One repetition's shared pieces: pool, test set, seed set, clusterings; then one run per strategy."""

    def __init__(self, opts, pool, test, num_classes: int):
        self.opts, self.pool, self.test, self.num_classes = opts, pool, test, num_classes
        self.scale = Standardize(pool.features)
        self.x_pool, self.x_test = self.scale(pool.features), self.scale(test.features)

    def seed_set(self, seed: int) -> np.ndarray:
        count = min(self.opts.seed_labels or self.opts.batch_size, len(self.pool))
        return np.argsort(seeded_hash(self.pool.ids, seed, SEED_SALT), kind="stable")[:count]

    def train(self, labeled: np.ndarray, seed: int):
        start = time.time()
        y = self.pool.labels[labeled]
        if len(np.unique(y)) < 2:
            raise InputError(f"the seed set has {len(y)} labels of one class; raise --seed-labels")
        model = make_model(self.opts.model, self.num_classes, seed, self.opts.epochs).fit(self.x_pool[labeled], y)
        return model, time.time() - start

    def evaluate(self, model) -> float:
        return float(np.mean(model.predict_proba(self.x_test).argmax(axis=1) == self.test.labels))

    def cluster(self, embedding: np.ndarray, clustering: dict, seed: int) -> tuple[np.ndarray, dict]:
        start = time.time()
        try:
            result, _ = hac.flat_clusters(embedding, self.opts.metric, clustering["distance_threshold"],
                                          clustering["target_mean_cluster_size"], seed=seed)
        except hac.HacError as exc:
            raise InputError(f"clustering {self.pool.source!r}: {exc}") from exc
        sizes = np.bincount(result.labels)
        n = len(result.labels)
        return result.labels.astype(np.int64), {
            "clustering": clustering["name"], "distance_threshold": float(result.distance_threshold),
            "num_points": n, "num_clusters": int(len(sizes)),
            "singleton_share_of_points": float(np.count_nonzero(sizes == 1) / max(n, 1)),
            "largest_cluster_share": float(sizes.max() / max(n, 1)), "seconds": time.time() - start}

    def select(self, strategy: str, margins: np.ndarray, labeled_mask: np.ndarray, clusters, k_m_multiplier,
               embedding, seed: int, round_index: int):
        """(rows picked, diagnostics or None); cluster-margin, margin and random run `clusmar select`'s code."""
        k_t = self.opts.batch_size
        unlabeled = np.flatnonzero(~labeled_mask)
        if strategy == "k-center":
            picks = k_center_greedy(embedding[unlabeled], embedding[labeled_mask], k_t)
            return unlabeled[picks], None
        cluster_ids = clusters[unlabeled] if clusters is not None else np.full(len(unlabeled), NO_CLUSTER)
        rows = scored_rows("simulate", self.pool.ids[unlabeled], margins[unlabeled], cluster_ids, seed,
                           round_index, self.pool.id_type).with_columns(row=unlabeled)
        k_m = int(math.ceil(k_m_multiplier * k_t))
        candidates, chosen = select_in_memory(rows, strategy, k_t, k_m)
        pick_sizes = np.bincount(clusters)[chosen.columns["cluster_id"]] if clusters is not None else None
        diagnostics, _ = selection_diagnostics(candidates, chosen, strategy, k_t, len(unlabeled),
                                               margin_histogram(margins[unlabeled]), pick_sizes)
        return chosen.columns["row"], diagnostics


def _margins(probs: np.ndarray) -> np.ndarray:
    return top2_margins(probs.astype(np.float32))


def simulate(opts) -> dict:
    started = time.time()
    pool, test, test_source = _load(opts)
    if not len(test) or len(pool) < 2:
        raise InputError(f"{pool.source}: {len(pool)} pool rows and {len(test)} test rows; both are needed")
    num_classes = int(max(pool.labels.max(), test.labels.max())) + 1
    sim = Simulation(opts, pool, test, num_classes)
    clusterings = _clusterings(opts)
    settings = [{"name": f"k_m {m:g}x · {c['name']}", "candidate_multiplier": m, "clustering": c["name"],
                 "distance_threshold": c["distance_threshold"],
                 "target_mean_cluster_size": c["target_mean_cluster_size"]}
                for m in opts.candidate_multipliers for c in clusterings]
    runs, clustering_rows, warnings = [], [], []
    feature_embedding = pool.features if opts.metric == "sqeuclidean" else _unit(pool.features)
    feature_clusters = {}
    for rep in range(opts.repetitions):
        seed = opts.seed + rep
        seed_rows = sim.seed_set(seed)
        model0, train0 = sim.train(seed_rows, seed)
        acc0 = sim.evaluate(model0)
        start = time.time()
        margins0 = _margins(model0.predict_proba(sim.x_pool))
        score0 = time.time() - start
        if opts.embedding == "model":
            embedding = model0.embed(sim.x_pool)
            embedding = embedding if opts.metric == "sqeuclidean" else _unit(embedding)
        else:
            embedding = feature_embedding
        clusters_of = {}
        if "cluster-margin" in opts.strategies:
            for clustering in clusterings:
                key = clustering["name"]
                if opts.embedding == "features" and key in feature_clusters:
                    clusters_of[key] = feature_clusters[key][0]
                    continue
                labels, info = sim.cluster(embedding, clustering, opts.seed)
                clusters_of[key] = labels
                if opts.embedding == "features":
                    feature_clusters[key] = (labels, info)
                clustering_rows.append({"repetition": rep if opts.embedding == "model" else None, **info})
                LOG.info("simulate: %s: %d clusters, %.0f%% of points alone, largest %.1f%% (%.1f s)", key,
                         info["num_clusters"], 100 * info["singleton_share_of_points"],
                         100 * info["largest_cluster_share"], info["seconds"])
        plan = [(s, None) for s in opts.strategies if s != "cluster-margin"]
        plan += [("cluster-margin", setting) for setting in settings if "cluster-margin" in opts.strategies]
        for strategy, setting in plan:
            labeled = np.zeros(len(pool), dtype=bool)
            labeled[seed_rows] = True
            rounds = [{"round": 0, "labels": int(labeled.sum()), "accuracy": acc0,
                       "seconds": {"train": train0, "score": score0, "select": 0.0}, "diagnostics": None,
                       "pick_class_counts": None}]
            margins, clusters = margins0, None
            multiplier = opts.candidate_multipliers[0]
            if setting is not None:
                clusters, multiplier = clusters_of[setting["clustering"]], setting["candidate_multiplier"]
            for round_index in range(1, opts.rounds + 1):
                if labeled.all():
                    warnings.append(f"{strategy}: the pool ran out of unlabeled rows after round {round_index - 1}")
                    break
                start = time.time()
                picks, diagnostics = sim.select(strategy, margins, labeled, clusters, multiplier, embedding, seed,
                                                round_index)
                select_seconds = time.time() - start
                labeled[picks] = True
                model, train_seconds = sim.train(np.flatnonzero(labeled), seed)
                accuracy = sim.evaluate(model)
                start = time.time()
                margins = _margins(model.predict_proba(sim.x_pool)) if round_index < opts.rounds else margins
                score_seconds = time.time() - start
                rounds.append({"round": round_index, "labels": int(labeled.sum()), "accuracy": accuracy,
                               "seconds": {"train": train_seconds, "score": score_seconds, "select": select_seconds},
                               "diagnostics": diagnostics,
                               "pick_class_counts": np.bincount(pool.labels[picks], minlength=num_classes).tolist()})
                if diagnostics and round_index == 1:
                    LOG.info("simulate: %s %s rep %d round 1: %s", strategy, setting["name"] if setting else "",
                             rep, describe(diagnostics))
            LOG.info("simulate: rep %d %-14s %-28s accuracy %s", rep, strategy, setting["name"] if setting else "",
                     " ".join(f"{r['accuracy']:.3f}" for r in rounds))
            runs.append({"strategy": strategy, "setting": setting["name"] if setting else None, "repetition": rep,
                         "rounds": rounds})
    baselines = [s for s in ("margin", "random", "k-center") if s in opts.strategies]
    warnings += _selection_warnings(runs)
    return {
        "format": SIMULATION_FORMAT, "version": SIMULATION_VERSION,
        "parameters": {"rounds": opts.rounds, "batch_size": opts.batch_size,
                       "seed_labels": opts.seed_labels or opts.batch_size, "strategies": opts.strategies,
                       "repetitions": opts.repetitions, "seed": opts.seed, "model": opts.model,
                       "embedding": opts.embedding, "epochs": opts.epochs if opts.model == "mlp" else None,
                       "metric": opts.metric, "candidate_multipliers": opts.candidate_multipliers,
                       "distance_thresholds": opts.distance_thresholds,
                       "target_cluster_sizes": None if opts.distance_thresholds else
                       (opts.target_cluster_sizes or [10.0]), "features": opts.features},
        "data": {"pool": "scikit-learn digits" if opts.digits else opts.pool, "pool_count": len(pool),
                 "test_count": len(test), "test_source": test_source, "num_classes": num_classes,
                 "features_dim": int(pool.features.shape[1])},
        "settings": [{k: v for k, v in s.items() if k != "clustering"} for s in settings],
        "runs": runs,
        "clusterings": clustering_rows,
        "summary": outcome.curves_summary(runs),
        "savings": outcome.savings(runs, "cluster-margin", baselines) if "cluster-margin" in opts.strategies else [],
        "timing": {"total_seconds": time.time() - started, "selection_share": _selection_share(runs)},
        "warnings": warnings,
    }


def _selection_warnings(runs) -> list[str]:
    """Each kind of selection warning once per strategy and setting, with how many rounds it hit."""
    hits: dict[tuple, list[int]] = {}
    for run in runs:
        for r in run["rounds"]:
            d = r["diagnostics"]
            if not d:
                continue
            for kind in ("k_m share", "first pass"):
                hit = (d["k_m_share_of_unlabeled"] or 0) > WARN_CANDIDATE_SHARE if kind == "k_m share" \
                    else bool(d["ended_inside_first_pass"])
                counts = hits.setdefault((run["strategy"], run["setting"], kind), [0, 0])
                counts[0] += hit
                counts[1] += 1
    out = []
    for (strategy, setting, kind), (hit, total) in hits.items():
        if not hit:
            continue
        what = (f"k_m was more than {WARN_CANDIDATE_SHARE:.0%} of the unlabeled pool" if kind == "k_m share" else
                "the batch ended inside the first round-robin pass (only the smallest candidate clusters sampled)")
        out.append(f"{strategy} ({setting}): {what} in {hit} of {total} rounds; see the diagnostics")
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _selection_share(runs) -> dict:
    """Per strategy: the share of a round (train + score + select, round 0 excluded) spent selecting."""
    totals = {}
    for run in runs:
        for r in run["rounds"][1:]:
            s = r["seconds"]
            t = totals.setdefault(run["strategy"], [0.0, 0.0])
            t[0] += s["select"]
            t[1] += s["train"] + s["score"] + s["select"]
    return {k: (v[0] / v[1] if v[1] else None) for k, v in totals.items()}


def run(argv=None) -> dict:
    _, opts = parse_options(SimulateOptions, argv)
    opts.strategies = [s.strip() for s in str(opts.strategies).split(",") if s.strip()]
    _check(opts)
    output = opts.output.rstrip("/")
    result_path = FileSystems.join(output, "simulation.json")
    if FileSystems.exists(result_path) and not opts.overwrite:
        raise InputError(f"--output {output!r}: a simulation is already there (simulation.json); "
                         "pass --overwrite to replace it")
    success = FileSystems.join(output, storage.SUCCESS)
    if FileSystems.exists(success):
        FileSystems.delete([success])
    result = simulate(opts)
    storage.write_json_atomic(result_path, result)
    storage.write_success(output, "simulation.json")
    for warning in result["warnings"]:
        LOG.warning("simulate: %s", warning)
    for row in result["savings"]:
        of_means = "not reached" if row["savings_of_mean_curves"] is None else f"{row['savings_of_mean_curves']:+.1%}"
        per_rep = ("not reached" if row["savings_mean"] is None else
                   f"{row['savings_mean']:+.1%} ± {row['savings_std']:.1%}")
        LOG.info("simulate: %s vs %s (%s): labels saved %s on the mean curves, per repetition %s (%d of %d "
                 "reached), final accuracy %+.4f", row["strategy"], row["baseline"], row["setting"], of_means,
                 per_rep, row["reached"], row["repetitions"], row["final_accuracy_delta_mean"])
    LOG.info("simulate: %d runs in %.1f s -> %s", len(result["runs"]), result["timing"]["total_seconds"], output)
    return result


if __name__ == "__main__":
    from clusmar_beam.app.cli import main
    sys.exit(main(["simulate"] + sys.argv[1:]))

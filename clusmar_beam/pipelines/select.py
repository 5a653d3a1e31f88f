"""`clusmar select`: pick the next batch for labeling and write the manifest.

pool (id + probs or margin) ─┐
clusters (id, cluster_id) ───┼─ bucket by id ─ join ─ k lowest ─ order ─ shards ─ manifest
labeled (id) ────────────────┘
"""
from __future__ import annotations

import logging
import math

import apache_beam as beam
import numpy as np

from clusmar_beam.core import selection as core_selection
from clusmar_beam.core.batch import Batch, check_finite, check_probabilities
from clusmar_beam.core.diagnostics import add_pick_cluster_sizes, describe, selection_diagnostics
from clusmar_beam.core.errors import InputError
from clusmar_beam.core.margins import top2_margins
from clusmar_beam.pipelines.options import CommonOptions, build_and_run, require
from clusmar_beam.transforms import memory, selection, storage

LOG = logging.getLogger("clusmar")
ROWS_PER_MANIFEST_SHARD = 100_000


class SelectOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--clusters", help="directory (or glob) of clusters-*.parquet from `clusmar cluster`")
        parser.add_argument("--batch-size", dest="batch_size", type=int, help="k_t: examples to select")
        parser.add_argument("--candidates", type=int, help="k_m: lowest-margin candidates (default 10 x k_t)")
        parser.add_argument("--candidate-multiplier", dest="candidate_multiplier", type=float,
                            help="k_m = multiplier x k_t (default 10)")
        parser.add_argument("--labeled", help="glob of files with the ids already labeled (excluded)")
        parser.add_argument("--strategy", default="cluster-margin", help="cluster-margin | margin | random")
        parser.add_argument("--round", dest="round_index", type=int, default=0, help="active-learning round")
        parser.add_argument("--num-shards", dest="num_shards", type=int,
                            help=f"manifest files (default: one per {ROWS_PER_MANIFEST_SHARD} rows)")
        parser.add_argument("--num-buckets", dest="num_buckets", type=int, default=32,
                            help="id buckets of the distributed join")


def _with_margins(batch: Batch) -> Batch:
    check_finite(batch, ("probs", "margin"))
    if "margin" in batch.columns:
        return Batch(batch.source, {"id": batch.ids, "margin": batch.columns["margin"].astype(np.float64)},
                        batch.id_type)
    check_probabilities(batch)
    return Batch(batch.source, {"id": batch.ids, "margin": top2_margins(batch.columns["probs"])},
                    batch.id_type)


def _clusters_glob(path: str) -> str:
    return path if any(ch in path for ch in "*?[") else path.rstrip("/") + "/clusters-*.parquet"


def _shards(chosen: Batch | None, num_shards: int | None, round_index: int):
    """Contiguous rank ranges, one per manifest file."""
    n = 0 if chosen is None else len(chosen)
    count = num_shards or max(1, math.ceil(n / ROWS_PER_MANIFEST_SHARD))
    bounds = np.linspace(0, n, count + 1).astype(np.int64)
    for index in range(count):
        part = chosen.take(slice(bounds[index], bounds[index + 1])) if n else None
        yield index, count, (part, round_index)


def _write_manifest_shard(path: str, payload) -> None:
    part, round_index = payload
    records = []
    if part is not None and len(part):
        c = part.columns
        records = storage.batch_to_examples({
            "id": c["id"],
            "rank": c["rank"],
            "round": np.full(len(part), round_index, dtype=np.int64),
            "margin": c["margin"].astype(np.float32)[:, None],
            "cluster_id": c["cluster_id"],
        })
    storage.write_tfrecords(path, records)


def build(pipeline, opts: SelectOptions):
    """Add the select stages to `pipeline`; returns the (summary-bearing) final PCollection."""
    pool_glob = require(opts.pool, "--pool")
    k_t = require(opts.batch_size, "--batch-size")
    output_dir = require(opts.output, "--output")
    if k_t <= 0:
        raise InputError(f"--batch-size must be positive (got {k_t})")
    if opts.strategy not in core_selection.STRATEGIES:
        raise InputError(f"--strategy {opts.strategy!r}: choose one of {', '.join(core_selection.STRATEGIES)}")
    if opts.candidates is not None and opts.candidate_multiplier is not None:
        raise InputError("give --candidates or --candidate-multiplier, not both")
    if opts.candidates is not None:
        k_m = opts.candidates
    else:
        multiplier = 10.0 if opts.candidate_multiplier is None else opts.candidate_multiplier
        if not multiplier >= 1:
            raise InputError(f"--candidate-multiplier must be at least 1 (got {multiplier})")
        k_m = int(math.ceil(multiplier * k_t))
    if k_m < k_t:
        raise InputError(f"--candidates ({k_m}) must be at least --batch-size ({k_t})")
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num-shards must be positive (got {opts.num_shards})")
    if opts.num_buckets <= 0:
        raise InputError(f"--num-buckets must be positive (got {opts.num_buckets})")
    if opts.strategy == "cluster-margin" and not opts.clusters:
        raise InputError("--clusters is required with --strategy cluster-margin")

    pool_reader = storage.ReadTable(pool_glob, required=["id"], optional=["margin", "probs"], flag="--pool")
    if not {"margin", "probs"} & set(pool_reader.columns):
        raise InputError(f"{pool_reader.files[0]}: missing column 'probs' (or 'margin'); "
                         f"columns: {', '.join(sorted(pool_reader.schema))}")
    if "margin" in pool_reader.columns and "probs" in pool_reader.columns:
        pool_reader.columns.remove("probs")   # a given margin is the pool's own word; no need to read probs
    cluster_reader = (storage.ReadTable(_clusters_glob(opts.clusters), required=["id", "cluster_id"], flag="--clusters")
                      if opts.clusters else None)
    labeled_reader = storage.ReadTable(opts.labeled, required=["id"], flag="--labeled") if opts.labeled else None
    output = storage.OutputDir(output_dir, "manifest", "manifest.json", storage.SUCCESS, opts.overwrite)

    keep = core_selection.candidates_to_keep(opts.strategy, k_t, k_m)
    pool = pipeline | pool_reader | "Margins" >> beam.Map(_with_margins)
    inputs = {"pool": pool}
    if cluster_reader:
        inputs["clusters"] = pipeline | cluster_reader
    if labeled_reader:
        inputs["labeled"] = pipeline | labeled_reader
    # Ids are sorted and joined across every input: one type across all their files, checked before the join.
    flags = ", ".join(flag for flag, name in (("--pool", "pool"), ("--clusters", "clusters"), ("--labeled", "labeled"))
                      if name in inputs)
    id_type = (tuple(inputs.values()) | "AllInputs" >> beam.Flatten() | "IdType" >> storage.OneIdType(flags))
    inputs = {name: batches | f"{name.capitalize()}AfterIdCheck" >> beam.Map(
                  lambda batch, _: batch, beam.pvalue.AsSingleton(id_type)).with_output_types(Batch)
              for name, batches in inputs.items()}
    candidates, stats = inputs | "Candidates" >> selection.SelectCandidates(
        opts.strategy, keep, opts.seed, opts.round_index, opts.num_buckets, opts.clusters and "--clusters")

    strategy, round_index, num_shards = opts.strategy, opts.round_index, opts.num_shards

    def order(candidates, stats):
        """The chosen rows, and (tagged) the diagnostics: computed here, so the candidates are read once."""
        selection.raise_on_problems(stats, f"--pool {pool_glob!r}", f"--clusters {opts.clusters!r}")
        if not stats.get("pool"):
            raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows in {len(pool_reader.files)} files)")
        chosen = core_selection.order_candidates(candidates, strategy, k_t) if candidates is not None else None
        yield chosen
        yield beam.pvalue.TaggedOutput("diagnostics", selection_diagnostics(
            candidates, chosen, strategy, k_t, stats["unlabeled"], stats.get("histogram:unlabeled_margins")))

    def summary(names, extra):
        chosen, stats, (diagnostics, warnings) = extra
        n = 0 if chosen is None else len(chosen)
        return {
            "round": round_index, "strategy": strategy, "seed": opts.seed,
            "k_t": k_t, "k_m": min(k_m, stats["unlabeled"]) if strategy == "cluster-margin" else None,
            "k_m_requested": k_m if strategy == "cluster-margin" else None,
            "pool": pool_glob, "clusters": opts.clusters, "labeled": opts.labeled,
            "pool_count": stats["pool"], "labeled_in_pool": stats["labeled_in_pool"],
            "labeled_not_in_pool": stats["labeled_not_in_pool"], "unlabeled_count": stats["unlabeled"],
            "selected": n,
            "clusters_selected": (int(len(np.unique(chosen.columns["cluster_id"]))) if n else 0)
                                 if opts.clusters else None,
            "diagnostics": diagnostics, "warnings": warnings,
            "files": names,
        }

    ordered = candidates | "Order" >> memory.with_min_ram(
        beam.FlatMap(order, beam.pvalue.AsSingleton(stats)), memory.candidates_bytes(keep)).with_outputs(
        "diagnostics", main="chosen")
    chosen, diagnostics = ordered.chosen, ordered.diagnostics
    if cluster_reader:
        pick_sizes = inputs["clusters"] | "PickClusterSizes" >> selection.PickClusterSizes(chosen)
        diagnostics = diagnostics | "AddPickClusterSizes" >> beam.Map(
            lambda found, sizes: (add_pick_cluster_sizes(found[0], sizes), found[1]),
            beam.pvalue.AsSingleton(pick_sizes))
    both = chosen | "WithStats" >> beam.Map(lambda c, s, d: (c, s, d), beam.pvalue.AsSingleton(stats),
                                            beam.pvalue.AsSingleton(diagnostics))
    _ = (chosen
         | "Shards" >> beam.FlatMap(_shards, num_shards, round_index)
         | "Write" >> storage.WriteShards(output, ".tfrecord", _write_manifest_shard, summary, both))
    return output


def run(argv: list[str] | SelectOptions | None = None) -> dict:
    """Run the pipeline from its flags (a list), or from typed values (a SelectOptions); returns the summary."""
    summary, _, seconds, output = build_and_run(SelectOptions, argv, build, "select", "manifest.json")
    if summary.get("dry_run"):
        return summary
    LOG.info("select: %d selected of %d unlabeled (pool %d) in %.1f s -> %s", summary["selected"],
             summary["unlabeled_count"], summary["pool_count"], seconds, output)
    LOG.info("select: %s", describe(summary["diagnostics"]))
    for warning in summary["warnings"]:
        LOG.warning("select: %s", warning)
    return summary

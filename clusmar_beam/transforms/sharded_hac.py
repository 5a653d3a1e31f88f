"""The sharded average-linkage HAC (core.hac.sharded) as Beam transforms: one partition per element.

`ShardedHac` runs the rounds of core.hac.sharded with each partition's
clusters grouped by key, the merges followed back to the points by joins keyed
by row range, and the cut at a target found from summed histograms; nothing
one worker holds grows with the pool.  `ThresholdFromTarget` picks eps for a
target mean cluster size inside the pipeline, by the same steps as
core.hac.choose_threshold.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing

import apache_beam as beam
import numpy as np

from clusmar_beam.core import hac, hashing
from clusmar_beam.core.batch import Batch
from clusmar_beam.core.cells import split_by_key
from clusmar_beam.core.hac.sharded import (DEFAULT_MAX_ROUNDS, Clusters,
                                           check_shard_params, halo_rows, halo_width, images, mark_waited_on,
                                           merge_partition,
                                           next_round, partition_centroids, partition_sample_size, route,
                                           taking_part)
from clusmar_beam.core.hac.sizes import add_size_counts, size_counts, size_histogram
from clusmar_beam.transforms import element_sizes, ranks
from clusmar_beam.transforms.samples import BottomKByHash


def _to_clusters(batch, metric):
    """(row ids, embeddings) batch -> initial Clusters: the raw float32 rows, prepared where they merge
    (for sqeuclidean without hac.prepare's centring on a mean: batches must share one origin)."""
    rows, x = batch
    beam.metrics.Metrics.counter("hac", "points").inc(len(rows))
    hac.prepare(x, metric)  # validates (zero norms, NaN)
    n = len(rows)
    x = np.asarray(x)
    raw = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)  # as given: rounding would change it
    return Clusters(np.asarray(rows, np.int64), np.ones(n), raw, np.zeros(n), raw_metric=metric)


def _ids_and_means(clusters: Clusters):
    return clusters.ids, clusters.means().astype(np.float32)  # as _partition_centroids trains on them


def _train(sample, plan, seed):
    """Centroids for the round's partitions from the bottom-k sample, in id order (as
    `_partition_centroids` takes them); None for one partition or none."""
    if sample is None or plan["parts"] < 2:
        return None
    _, ids, means = sample
    return partition_centroids(means[np.argsort(ids)], plan["parts"], seed)


def _counts(clusters: Clusters):
    """(clusters, those with a route of their own): what a round's plan counts."""
    return np.array([len(clusters), np.count_nonzero(clusters.routed())], np.int64)


def _sum_arrays(parts):
    return sum(parts, np.zeros(2, np.int64))


class _TakePart(beam.DoFn):
    """A round's clusters -> those it takes (main), those a round that repeats its threshold leaves alone
    (IDLE: they go on to the next round) and, once nothing is left to merge, all of them (FINISHED)."""
    IDLE, FINISHED = "idle", "finished"

    def __init__(self, round_index):
        self.round_index = round_index

    def process(self, clusters, plan):
        if not len(clusters):
            return
        beam.metrics.Metrics.counter("hac", f"clusters_round_{self.round_index + 1}").inc(len(clusters))
        if plan["parts"] == 0:
            yield beam.pvalue.TaggedOutput(self.FINISHED, clusters)
            return
        taking = taking_part(clusters, plan)
        if taking.all():
            yield clusters
            return
        if taking.any():
            yield clusters.take(np.flatnonzero(taking))
        yield beam.pvalue.TaggedOutput(self.IDLE, dataclasses.replace(clusters.take(np.flatnonzero(~taking)),
                                                                      route=None))


class _RouteClusters(beam.DoFn):
    """Clusters taking part -> (cell, ("m", members, None)) and (cell, ("f", frozen neighbours, their home
    cells)) pieces: a partition tells the home of a cluster its members waited on."""

    def __init__(self, halo_cells, halo_rows, round_index):
        self.halo_cells, self.halo_rows, self.round_index = halo_cells, halo_rows, round_index

    def process(self, clusters, centroids, plan):
        beam.metrics.Metrics.counter("hac", f"routed_round_{self.round_index + 1}").inc(len(clusters))
        if centroids is None:  # one partition
            yield 0, ("m", dataclasses.replace(clusters, route=None), None)
            return
        home, halo = route(clusters, centroids, halo_width(plan, self.halo_cells, self.halo_rows))
        clusters = dataclasses.replace(clusters, route=None)  # a route only serves this routing: it travels no further
        for c, rows in split_by_key(home):
            yield c, ("m", clusters.take(rows), None)
        for c, rows in halo_rows(halo).items():
            yield c, ("f", clusters.take(rows), home[rows])


# Declared, so that Beam does not infer it from the bytecode of everything `process` calls (seconds per round).
@beam.typehints.with_output_types(typing.Any)
class _LocalRac(beam.DoFn):
    """A partition's pieces -> (cell, ("out", merged clusters, merge edges)), and (home cell, ("t", ids)) for
    the frozen clusters its members waited on (MERGES and STATS: the round's merges and statistics)."""
    MERGES, STATS, TARGETS = "merges", "stats", "targets"

    def __init__(self, metric, seed, round_index, delta, target):
        self.metric, self.seed, self.round_index, self.delta, self.target = metric, seed, round_index, delta, target

    def process(self, element, plan, n):
        cell, parts = element
        mem, fro, homes = [], [], []
        for kind, clusters, home in parts:
            if kind == "m":
                mem.append(clusters)
            else:
                fro.append(clusters)
                homes.append(home)
        if not mem:
            return
        members = Clusters.concat(mem)  # rac_on_clusters puts them in id order: delivery order does not matter
        del mem
        frozen = Clusters.concat(fro) if fro else None
        del fro
        if frozen is not None:
            order = np.argsort(frozen.ids, kind="stable")
            frozen, homes = frozen.take(order), np.concatenate(homes)[order]
        out, edges, heights, rounds, waiting, reached, targets = merge_partition(
            members, frozen, plan, self.metric, self.seed, self.delta, n, self.target)
        beam.metrics.Metrics.counter("hac", f"merges_round_{self.round_index + 1}").inc(len(edges))
        beam.metrics.Metrics.counter("hac", f"partitions_round_{self.round_index + 1}").inc(1)
        beam.metrics.Metrics.distribution("hac", "partition_members").update(len(members))
        beam.metrics.Metrics.distribution("hac", "partition_frozen").update(len(frozen) if frozen else 0)
        # A worker's state for the partition: the statistics it merges (the RAC's own arrays are a few times
        # that).  A finishing round's one partition is bounded by FINISH_ON_ONE_WORKER, not the partition size.
        state = "finish_state" if plan["parts"] == 1 else "partition_state"
        beam.metrics.Metrics.distribution(element_sizes.NAMESPACE, state).update(
            element_sizes.element_bytes(members) + (element_sizes.element_bytes(frozen) if frozen else 0))
        for start in range(0, len(out), ROWS_PER_BUCKET):  # pieces of a bucket's size: a partition can be large
            yield cell, ("out", out.take(slice(start, start + ROWS_PER_BUCKET)), edges)
        if targets.size:
            for home, pos in split_by_key(homes[np.searchsorted(frozen.ids, targets)]):
                yield beam.pvalue.TaggedOutput(self.TARGETS, (home, ("t", targets[pos], None)))
        if len(edges):
            absorbed = np.setdiff1d(edges.reshape(-1), out.ids)
            yield beam.pvalue.TaggedOutput(self.MERGES, (absorbed, edges, heights))
        yield beam.pvalue.TaggedOutput(self.STATS, {"merges": len(edges), "rounds": rounds, "waiting": waiting,
                                                    "partitions": 1, "reached": reached})


def _mark_waited_on(element):
    """A partition's merged clusters (in pieces, each with the partition's edges) and the ids waited on in it
    -> the pieces, marked (core.hac.sharded.mark_waited_on)."""
    _, parts = element
    pieces, targets = [], []
    for kind, value, edges in parts:
        if kind == "out":
            pieces.append((value, edges))
        else:
            targets.append(value)
    targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    for out, edges in pieces:
        yield mark_waited_on(out, edges, targets)


def _add_stats(parts):
    total = {"merges": 0, "rounds": 0, "waiting": 0, "partitions": 0, "reached": -np.inf}
    for p in parts:
        for key in ("merges", "waiting", "partitions"):
            total[key] += p[key]
        total["rounds"] = max(total["rounds"], p["rounds"])  # partitions merge side by side
        total["reached"] = max(total["reached"], p["reached"])
    return total


ROWS_PER_BUCKET = 1 << 17  # rows per bucket of the joins that follow merges back to the points


def _buckets(n: int) -> int:
    return max(1, math.ceil(n / ROWS_PER_BUCKET))


def _bucket_of(rows: np.ndarray, n: int) -> np.ndarray:
    """Row-range bucket of rows 0..n-1 (a join's key: rows are spread evenly)."""
    return (rows.astype(np.int64) * _buckets(n)) // max(n, 1)


def _split_by_bucket(keys: np.ndarray, n: int, *columns):
    """(bucket, (keys, columns...)) pieces of rows keyed by `keys`."""
    for b, pos in split_by_key(_bucket_of(keys, n)):
        yield b, (keys[pos], *(c[pos] for c in columns))


def _children(merges, cut, n):
    """A partition's merges -> (bucket of image, (image, absorbed)) pieces: each absorbed cluster and the
    cluster it is part of after the cut (the bucket of the image is where its own cluster is found)."""
    absorbed, edges, heights = merges
    to = images(absorbed, edges, heights, cut)
    yield from _split_by_bucket(to, n, absorbed)


def _roots_of(clusters: Clusters, n):
    """The last round's clusters: every one is its own root."""
    yield from _split_by_bucket(clusters.ids, n, clusters.ids)


class _FollowMerges(beam.DoFn):
    """Per bucket: the root of each parent (a cluster at the start of the next round) is known; each
    child (absorbed this round) takes its image's root, or its image when that is no parent (a cluster
    split off by the cut).  Children stream through; only the bucket's parents are held."""

    def process(self, element):
        _, grouped = element
        parents = list(grouped["parents"])
        if parents:
            rows = np.concatenate([p[0] for p in parents])
            roots = np.concatenate([p[1] for p in parents])
            order = np.argsort(rows)
            rows, roots = rows[order], roots[order]
            yield rows, roots
        else:
            rows = roots = np.zeros(0, np.int64)
        for image, absorbed in grouped["children"]:
            if rows.size:
                pos = np.minimum(np.searchsorted(rows, image), rows.size - 1)
                found = rows[pos] == image
                yield absorbed, np.where(found, roots[pos], image)
            else:
                yield absorbed, image


def _root_batch(labels):
    """(rows, roots) -> the roots among them, as a Batch to number."""
    rows, roots = labels
    return Batch("", {"id": rows[rows == roots]})


def _numbered_by_bucket(batch, n):
    yield from _split_by_bucket(batch.ids, n, batch.columns["row"])


def _members_by_bucket(labels, n):
    rows, roots = labels
    yield from _split_by_bucket(roots, n, rows)


class _Number(beam.DoFn):
    """Per bucket of roots: every row gets its root's number (its rank among the roots, which numbers the
    clusters by first appearance in row order); the cluster sizes are counted here, where all of a root's rows
    are."""
    SIZES = "sizes"

    def process(self, element):
        _, grouped = element
        numbered = list(grouped["numbered"])
        roots = np.concatenate([p[0] for p in numbered]) if numbered else np.zeros(0, np.int64)
        numbers = np.concatenate([p[1] for p in numbered]) if numbered else np.zeros(0, np.int64)
        order = np.argsort(roots)
        roots, numbers = roots[order], numbers[order]
        sizes = np.zeros(roots.size, np.int64)
        for root, rows in grouped["members"]:
            pos = np.searchsorted(roots, root)
            np.add.at(sizes, pos, 1)
            yield rows, numbers[pos]
        yield beam.pvalue.TaggedOutput(self.SIZES, size_counts(sizes))


class SizeSummary(beam.CombineFn):
    """Cluster-size counts of many buckets -> core.hac.sizes' summary of them all."""

    def create_accumulator(self):
        return size_counts(np.zeros(0, np.int64))

    def add_input(self, acc, counts):
        return add_size_counts([acc, counts])

    def merge_accumulators(self, accs):
        return add_size_counts(accs)

    def extract_output(self, acc):
        return size_histogram(acc)


# Exact cut at a target: the m-th lowest merge height, found 16 bits at a time from histograms.
_DIGIT_BITS = 16


def _ordered_bits(h: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 values (negative values included)."""
    bits = np.ascontiguousarray(h, np.float64).view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


def _from_ordered_bits(key: int) -> float:
    key = np.uint64(key)
    sign = np.uint64(1 << 63)
    bits = key & ~sign if key & sign else ~key
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def _digit_counts(heights, state):
    """Counts of the next 16-bit digit among the heights whose higher digits are the prefix so far."""
    keys = _ordered_bits(heights)
    shift = np.uint64(64 - _DIGIT_BITS * (state["digit"] + 1))
    if state["digit"]:
        high = np.uint64(64 - _DIGIT_BITS * state["digit"])
        keys = keys[(keys >> high) == np.uint64(state["prefix"])]
    return np.bincount(((keys >> shift) & np.uint64((1 << _DIGIT_BITS) - 1)).astype(np.int64),
                       minlength=1 << _DIGIT_BITS)


def _sum_counts(parts):
    total = np.zeros(1 << _DIGIT_BITS, np.int64)
    for p in parts:
        total += p
    return total


def _next_digit(counts, state):
    """Narrow the search to the digit holding the wanted rank."""
    if state["rank"] < 0:
        return {**state, "digit": state["digit"] + 1}
    below = np.cumsum(counts)
    digit = int(np.searchsorted(below, state["rank"], side="right"))
    rank = state["rank"] - (int(below[digit - 1]) if digit else 0)
    return {**state, "digit": state["digit"] + 1, "prefix": (state["prefix"] << _DIGIT_BITS) | digit, "rank": rank}


def _height_facts(heights, facts_of_value=None):
    """Count, largest, smallest positive (and, given a value, the smallest above it) of some heights."""
    h = np.asarray(heights, np.float64)
    above = h[h > facts_of_value] if facts_of_value is not None else h[:0]
    positive = h[h > 0]
    return {"count": int(h.size), "max": float(h.max()) if h.size else -np.inf,
            "min_positive": float(positive.min()) if positive.size else np.inf,
            "min_above": float(above.min()) if above.size else np.inf}


def _merge_facts(parts):
    out = {"count": 0, "max": -np.inf, "min_positive": np.inf, "min_above": np.inf}
    for p in parts:
        out["count"] += p["count"]
        out["max"] = max(out["max"], p["max"])
        out["min_positive"] = min(out["min_positive"], p["min_positive"])
        out["min_above"] = min(out["min_above"], p["min_above"])
    return out


def _first_state(facts, n, target):
    """The rank to find: the highest merge kept when n / target clusters are left (hac.threshold_from_heights)."""
    keep = int(np.clip(round(n - n / float(target)), 0, facts["count"]))
    return {"digit": 0, "prefix": 0, "rank": keep - 1, "keep": keep}


def _cut_from(state, facts, below):
    """hac.cut_keeping from the kept height, the first height above it and the extremes."""
    if not facts["min_positive"] < np.inf:
        return 1.0  # all points identical: any threshold gives one cluster
    keep = state["keep"]
    if keep == 0:
        return float(facts["min_positive"] / 2)  # as few merges as possible
    if keep >= facts["count"] or not below["min_above"] < np.inf:
        return float(facts["max"] * 1.5 + 1e-12)  # ties up to the highest merge move the cut past it
    kept = _from_ordered_bits(state["prefix"])
    if kept <= 0:
        return float(facts["min_positive"] / 2)
    return float((kept + below["min_above"]) / 2)


class CutAtTarget(beam.PTransform):
    """PCollection of merge-height arrays -> singleton: the threshold whose cut leaves n / target
    clusters, exactly as hac.threshold_from_heights gives on all heights at once (no worker holds
    them all: the kept height is found a 16-bit digit at a time)."""

    def __init__(self, n, target):
        super().__init__()
        self.n, self.target = n, target

    def expand(self, heights):
        side = beam.pvalue.AsSingleton
        facts = (heights | "Facts" >> beam.Map(_height_facts)
                 | "AllFacts" >> beam.CombineGlobally(_merge_facts))
        state = facts | "Rank" >> beam.Map(_first_state, self.n, self.target)
        for digit in range(64 // _DIGIT_BITS):
            counts = (heights | f"Digit{digit}" >> beam.Map(_digit_counts, side(state))
                      | f"SumDigit{digit}" >> beam.CombineGlobally(_sum_counts))
            state = counts | f"Narrow{digit}" >> beam.Map(_next_digit, side(state))
        kept = state | "Kept" >> beam.Map(lambda s: _from_ordered_bits(s["prefix"]) if s["keep"] else None)
        above = (heights | "Above" >> beam.Map(_height_facts, side(kept))
                 | "AllAbove" >> beam.CombineGlobally(_merge_facts))
        return state | "Cut" >> beam.Map(_cut_from, side(facts), side(above))


def _threshold_argument(value):
    """A checked threshold, or a singleton PCollection (checked when it is computed, in expand)."""
    return value if isinstance(value, beam.pvalue.PCollection) else hac.check_threshold(value)


def _plan(counts, prev, waiting, n, eps, merge_eps, shards, target, one_worker):
    clusters, routed = (int(c) for c in counts)
    return next_round(prev, clusters, waiting, n, shards, eps, merge_eps, target, routed, one_worker)


def _tagged(stats, plan, round_index):
    """A round's statistics with its plan; the eps it reached (a finishing round raises the plan's)."""
    return {**stats, **plan, "eps": max(plan["eps"], stats["reached"]), "round": round_index + 1}


def _summary(stats, cut, sizes, n):
    """The result's summary from the rounds' statistics, the cut and the cluster sizes."""
    rounds = sorted(stats, key=lambda r: r["round"])
    active = [r for r in rounds if r["parts"]]
    return {"distance_threshold": cut, "merged_up_to": (active or rounds)[-1]["eps"] if rounds else None,
            "merges": int(n - sizes["num_clusters"]), "rounds": sum(r["rounds"] for r in active),
            "waiting": active[-1]["waiting"] if active else 0,
            "sharded_rounds": [{k: r[k] for k in ("round", "clusters", "parts", "eps", "merges", "waiting")}
                               for r in active],
            **sizes}


class ShardedHac(beam.PTransform):
    """PCollection of (row ids int64, embeddings) batches, rows 0..n-1 -> {"labels": (rows, labels) pieces
    covering every row, labels numbered by first appearance in row order; "summary": singleton dict with
    `distance_threshold` (the cut), `merged_up_to`, `merges`, merge `rounds`, `waiting` (members whose
    nearest cluster within the threshold was across a border when the rounds ran out), the sharded
    rounds, `num_clusters`, `largest_cluster`, `singletons` and the size `histogram`}.

    `distance_threshold` is a number, or a singleton PCollection holding it (an
    eps computed in the same pipeline, e.g. by ThresholdFromTarget).  With
    `target_mean_cluster_size` the rounds merge up to it, then up to
    `merge_threshold` (the same kinds of value; default distance_threshold),
    raised while the clusters average fewer than the target, and the merges
    are then cut at the target (as hac.average_linkage does).  Every element,
    side input and partition is bounded by the partition size (about n /
    `shards` clusters plus their halo, or `halo_rows` where partitions are
    small: see core.hac.sharded.halo_width), ROWS_PER_BUCKET, SAMPLE_MAX or
    `one_worker_clusters` (default FINISH_ON_ONE_WORKER: the rounds finish
    on one worker once that few are left), not by n.
    """

    def __init__(self, distance_threshold, metric="cosine", shards=64, halo_cells=2, max_rounds=DEFAULT_MAX_ROUNDS,
                 seed=0, target_mean_cluster_size=None, merge_threshold=None, delta=0.0, one_worker_clusters=None,
                 halo_rows=None):
        super().__init__()
        self.delta = hac.check_delta(delta)
        self.eps = _threshold_argument(distance_threshold)
        self.merge_eps = None if merge_threshold is None else _threshold_argument(merge_threshold)
        if metric not in hac.METRICS:
            raise hac.HacError(f"unknown metric {metric!r}")
        check_shard_params(shards, halo_cells, max_rounds, one_worker_clusters, halo_rows)
        self.one_worker, self.halo_rows = one_worker_clusters, halo_rows
        self.target = None if target_mean_cluster_size is None else hac.check_target(target_mean_cluster_size)
        self.metric, self.shards, self.halo_cells = metric, shards, halo_cells
        self.max_rounds, self.seed = max_rounds, seed

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        measured = element_sizes.measured

        def checked(value, label):  # a number was checked in __init__; a PCollection is checked here
            if not isinstance(value, beam.pvalue.PCollection):
                return value
            return side(value | label >> beam.Map(hac.check_threshold))

        eps, merge_eps = checked(self.eps, "CheckEps"), checked(self.merge_eps, "CheckMergeEps")
        n = side(batches | "CountPoints" >> beam.Map(lambda batch: len(batch[0]))
                 | "SumPoints" >> beam.CombineGlobally(sum))
        clusters = batches | "Init" >> beam.Map(_to_clusters, self.metric)
        plan, waiting, merges, stats, finished = None, None, [], [], []
        for rnd in range(self.max_rounds):
            name = f"Round{rnd + 1}"
            seed = self.seed + rnd
            plan = (clusters
                    | f"{name}Count" >> beam.Map(_counts)
                    | f"{name}Clusters" >> beam.CombineGlobally(_sum_arrays)
                    | f"{name}Plan" >> beam.Map(_plan, side(plan) if plan is not None else None,
                                                side(waiting) if waiting is not None else 0, n, eps, merge_eps,
                                                self.shards, self.target, self.one_worker))
            split = (clusters
                     | f"{name}TakePart" >> beam.ParDo(_TakePart(rnd), side(plan))
                     .with_outputs(_TakePart.IDLE, _TakePart.FINISHED, main="taking"))
            centroids = (split.taking
                         | f"{name}Sample" >> beam.CombineGlobally(
                             BottomKByHash(partition_sample_size(self.shards), functools.partial(hashing.row_hash, seed=seed),
                                           _ids_and_means))
                         .without_defaults()
                         | f"{name}MeasureSample" >> measured("partition_sample")
                         | f"{name}Train" >> beam.Map(_train, side(plan), seed)
                         | f"{name}MeasureCentroids" >> measured("partition_centroids"))
            result = (split.taking
                      | f"{name}Route" >> beam.ParDo(_RouteClusters(self.halo_cells, self.halo_rows, rnd),
                                                     side(centroids, default_value=None), side(plan))
                      | f"{name}MeasureRouted" >> measured("partition_pieces")
                      | f"{name}Group" >> beam.GroupByKey()
                      | f"{name}Rac" >> beam.ParDo(_LocalRac(self.metric, seed, rnd, self.delta, self.target),
                                                   side(plan), n)
                      .with_outputs(_LocalRac.MERGES, _LocalRac.STATS, _LocalRac.TARGETS, main="clusters"))
            merges.append(result[_LocalRac.MERGES] | f"{name}MeasureMerges" >> measured("partition_merges"))
            round_stats = (result[_LocalRac.STATS]
                           | f"{name}Stats" >> beam.CombineGlobally(_add_stats)
                           | f"{name}Tag" >> beam.Map(_tagged, side(plan), rnd))
            stats.append(round_stats)
            waiting = round_stats | f"{name}Waiting" >> beam.Map(lambda s: s["waiting"])
            # A partition's clusters meet the ids its neighbours' members waited on: those take part in a repeat.
            marked = ((result.clusters | f"{name}MeasureOut" >> measured("partition_out"),
                       result[_LocalRac.TARGETS] | f"{name}MeasureTargets" >> measured("partition_targets"))
                      | f"{name}WithTargets" >> beam.Flatten()
                      | f"{name}GroupTargets" >> beam.GroupByKey()
                      | f"{name}Mark" >> beam.FlatMap(_mark_waited_on))
            # Clusters of a round with nothing left to merge leave the loop: the rounds after it run empty.
            finished.append(split[_TakePart.FINISHED])
            clusters = (marked, split[_TakePart.IDLE]) | f"{name}Next" >> beam.Flatten()
        clusters = (*finished, clusters) | "Finished" >> beam.Flatten()

        heights = (tuple(merges) | "AllMerges" >> beam.Flatten(pipeline=batches.pipeline)
                   | "Heights" >> beam.Map(lambda m: m[2]))
        if self.target is None:
            cut = batches.pipeline | "Cut" >> beam.Create([None]) | "Eps" >> beam.Map(lambda _, e: e, eps)
        else:
            cut = heights | "CutAtTarget" >> CutAtTarget(n, self.target)

        # Follow the merges back from the last round: labels are root rows until numbered.
        labels = clusters | "Roots" >> beam.FlatMap(_roots_of, n)
        for rnd in reversed(range(self.max_rounds)):
            name = f"Follow{rnd + 1}"
            children = merges[rnd] | f"{name}Children" >> beam.FlatMap(_children, side(cut), n)
            labels = ({"parents": labels | f"{name}MeasureParents" >> measured("follow_parents"),
                       "children": children | f"{name}MeasureChildren" >> measured("follow_children")}
                      | f"{name}Join" >> beam.CoGroupByKey()
                      | f"{name}Relabel" >> beam.ParDo(_FollowMerges())
                      | f"{name}Rebucket" >> beam.FlatMap(lambda l, n: _split_by_bucket(l[0], n, l[1]), n))
        labels = labels | "Unbucket" >> beam.Map(lambda kv: kv[1])
        numbered = (labels
                    | "RootRows" >> beam.Map(_root_batch)
                    | "RankRoots" >> ranks.RankIds())
        numbers = (numbered["ranked"] | "NumbersByBucket" >> beam.FlatMap(_numbered_by_bucket, n))
        members = labels | "MembersByBucket" >> beam.FlatMap(_members_by_bucket, n)
        result = ({"numbered": numbers | "MeasureNumbers" >> measured("number_roots"),
                   "members": members | "MeasureMembers" >> measured("number_members")}
                  | "NumberJoin" >> beam.CoGroupByKey()
                  | "Number" >> beam.ParDo(_Number()).with_outputs(_Number.SIZES, main="labels"))
        sizes = result[_Number.SIZES] | "Sizes" >> beam.CombineGlobally(SizeSummary())
        all_stats = (tuple(stats) | "AllRoundStats" >> beam.Flatten()
                     | "RoundStats" >> beam.combiners.ToList())
        summary = all_stats | "Summary" >> beam.Map(_summary, side(cut), side(sizes), n)
        return {"labels": result.labels, "summary": summary}


# ------------------------------------------------- threshold from a target size


def _row_count(batch):
    return len(batch[0])


def _layout(n, sample_size):
    """The pool size -> number of threshold cells and how many rows train them."""
    num_cells = hac.threshold_cells(n, sample_size)
    return {"num_cells": num_cells, "training_size": hac.training_size(num_cells)}


def _in_row_order(parts):
    """(rows, columns...) pieces from many batches -> one of each, sorted by row: delivery order must not matter."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return None
    rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(rows)
    return [np.concatenate([p[i] for p in parts])[order] for i in range(1, len(parts[0]))]


def _train_cells(lowest, layout, metric, margin_cells, seed):
    """Cells trained on the rows of lowest hash (hac.training_rows), in row order."""
    train_x = None
    if lowest is not None and layout["training_size"]:
        _, rows, x = lowest
        keep = np.sort(np.argsort(hashing.row_hash(rows, seed), kind="stable")[:layout["training_size"]])
        train_x = x[keep][np.argsort(rows[keep])]
    return hac.SampleCells.train(train_x, metric, layout["num_cells"], margin_cells, seed)


def _assign(batch, cells):
    rows, x = batch
    return rows, x, cells.assign(x)


def _cell_counts(assigned, cells):
    return np.bincount(assigned[2][:, 0], minlength=cells.num_cells)


def _draw(sizes, cells, sample_size, seed):
    sizes = np.zeros(cells.num_cells, np.int64) + sizes  # sum() of no batches is 0
    return hac.draw_cells(sizes, sample_size, seed)


def _sample_part(assigned, draw):
    rows, x, cells = assigned
    pos, core = draw.select(rows, cells)
    return rows[pos], x[pos], core


def _threshold(sample_parts, draw, metric, target, seed, delta):
    gathered = _in_row_order(sample_parts)
    x, core = gathered if gathered else (np.zeros((0, 0), np.float32), np.zeros(0, bool))
    return hac.threshold_from_sample(x, core, metric, target, seed, draw, delta)


class ThresholdFromTarget(beam.PTransform):
    """PCollection of (row ids int64, embeddings) batches, rows 0..n-1 -> singleton
    PCollection: the hac.ThresholdChoice that hac.choose_threshold gives on the same
    rows, whatever the batching, order or number of workers.

    Each step of hac.choose_threshold runs where its data is: counting rows and
    assigning cells per batch, training the cells (on the rows of lowest hash),
    drawing cells from the summed cell counts and the final clustering of the
    gathered sample on one worker.  Only small arrays (training rows, centroids,
    a mask over cells) travel as side inputs.
    """

    def __init__(self, target_mean_cluster_size, metric="cosine", sample_size=10_000, margin_cells=3, seed=0,
                 delta=0.0):
        super().__init__()
        self.target = hac.check_target(target_mean_cluster_size)
        self.delta = hac.check_delta(delta)
        if metric not in hac.METRICS:
            raise hac.HacError(f"unknown metric {metric!r}")
        hac.check_count("sample_size", sample_size)
        self.metric, self.sample_size, self.margin_cells, self.seed = metric, sample_size, margin_cells, seed

    def expand(self, batches):
        side = beam.pvalue.AsSingleton
        measured = element_sizes.measured
        layout = (batches
                  | "CountRows" >> beam.Map(_row_count)
                  | "SumRows" >> beam.CombineGlobally(sum)
                  | "Layout" >> beam.Map(_layout, self.sample_size))
        cells = (batches
                 | "TrainingRows" >> beam.CombineGlobally(
                     BottomKByHash(hac.threshold.TRAIN_ROWS_MAX, functools.partial(hashing.row_hash, seed=self.seed),
                                   lambda batch: batch))
                 .without_defaults()
                 | "MeasureTraining" >> measured("threshold_training")
                 | "TrainCells" >> beam.Map(_train_cells, side(layout), self.metric, self.margin_cells, self.seed)
                 | "MeasureCells" >> measured("threshold_cells"))
        assigned = batches | "AssignCells" >> beam.Map(_assign, side(cells))
        draw = (assigned
                | "CellCounts" >> beam.Map(_cell_counts, side(cells))
                | "SumCellCounts" >> beam.CombineGlobally(sum)
                | "DrawCells" >> beam.Map(_draw, side(cells), self.sample_size, self.seed)
                | "MeasureDraw" >> measured("threshold_draw"))
        return (assigned
                | "SampleRows" >> beam.Map(_sample_part, side(draw))
                | "GatherSample" >> beam.combiners.ToList()
                | "MeasureSample" >> measured("threshold_sample")
                | "Threshold" >> beam.Map(_threshold, side(draw), self.metric, self.target, self.seed, self.delta))

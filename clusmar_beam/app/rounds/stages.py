"""The four stages of a round: score, cluster, exclude, select.

Each returns the dict that state.json records for it. The pipelines get typed options
(their options class with the config's values) rather than argv, so a value cannot be
lost to a flag's spelling; the user's flag lists (beam_args, score_args, cluster_args)
are still parsed as flags.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app.rounds.config import (clustering_parameters, embedding_model, pool_fingerprint,
                                            separate_embedding_model)
from clusmar_beam.app.rounds.state import completed_rounds, now
from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")

STAGES = ("score", "cluster", "exclude", "select")


def _join(*parts) -> str:
    return FileSystems.join(*parts)


# ---------------------------------------------------------------- layout

def round_dir(workdir: str, n: int) -> str:
    return _join(workdir, "rounds", f"round-{n:04d}")


def manifest_dir(workdir: str, n: int) -> str:
    return _join(round_dir(workdir, n), "manifest")


def clusters_dir(workdir: str) -> str:
    return _join(workdir, "clusters")


def scored_pool(cfg: dict, n: int) -> str:
    if cfg["model"] is None:
        return cfg["pool"]
    return _join(round_dir(cfg["workdir"], n), "scores", "scores-*.parquet")


# ---------------------------------------------------------------- score

def score(cfg: dict, beam: list[str], n: int, with_embeddings: bool, overwrite: bool) -> dict:
    if cfg["model"] is None:
        return {"skipped": "no model: the pool carries embedding and probs"}
    from clusmar_beam.pipelines import score as pipeline
    out = _join(round_dir(cfg["workdir"], n), "scores")
    if FileSystems.exists(_join(out, storage.SUCCESS)) and not overwrite:
        summary = storage.read_json(_join(out, "scoring.json"))
        if with_embeddings and not summary.get("with_embeddings"):
            overwrite = True
        else:
            return {"rows": summary.get("rows"), "path": out, "with_embeddings": summary.get("with_embeddings")}
    values = {}
    if not with_embeddings:
        # score_args may choose the embedding for the rounds that cluster; the others write none,
        # and the score pipeline refuses an embedding choice it cannot honour.
        values.update(no_embeddings=True, embedding_layer=None, embedding_output=None)
    if overwrite:
        values["overwrite"] = True
    summary = pipeline.run(pipeline.ScoreOptions([*cfg["score_args"], *beam], pool=cfg["pool"],
                                                 model=cfg["model"], output=out, **values))
    return {"rows": summary.get("rows"), "path": out, "with_embeddings": with_embeddings}


# ---------------------------------------------------------------- cluster

def must_cluster(cfg: dict, state: dict, info: dict, recluster: bool) -> bool:
    """Clusters are made once and reused, until something they depend on changes."""
    if info["stages"].get("cluster", {}).get("status") == "done":
        return False
    current = state.get("clustering")
    if recluster or info.get("recluster_requested") or current is None:
        return True
    if not FileSystems.exists(_join(clusters_dir(cfg["workdir"]), "clustering.json")):
        return True
    if current.get("parameters") != clustering_parameters(cfg):
        old = current.get("parameters", {})
        changed = sorted(k for k in clustering_parameters(cfg) if old.get(k) != cfg[k])
        LOG.info("clustering settings changed (%s): clustering again", ", ".join(changed))
        return True
    if current.get("pool_fingerprint") not in (None, pool_fingerprint(cfg["pool"])):
        LOG.info("the pool's files changed since round %s clustered it: clustering again", current.get("round"))
        return True
    return False


def cluster(cfg: dict, beam: list[str], state: dict, n: int, need: bool) -> dict:
    """Clusters the pool when `need`, recording the clustering in `state`; else names the clusters reused."""
    if cfg["strategy"] != "cluster-margin":
        return {"skipped": f"strategy {cfg['strategy']} needs no clusters"}
    out = clusters_dir(cfg["workdir"])
    current = state.get("clustering")
    if not need:
        return {"reused_from_round": current["round"], "num_clusters": current["num_clusters"], "path": out}
    from clusmar_beam.pipelines import cluster as pipeline
    embedded = scored_pool(cfg, n)
    if separate_embedding_model(cfg):
        embedded = embed(cfg, beam)
    if cfg["distance_threshold"] is not None:
        threshold = {"distance_threshold": float(cfg["distance_threshold"])}
    else:
        threshold = {"target_mean_cluster_size": float(cfg["target_mean_cluster_size"])}
    summary = pipeline.run(pipeline.ClusterOptions([*cfg["cluster_args"], *beam], pool=embedded, output=out,
                                                   metric=cfg["metric"], seed=cfg["seed"], overwrite=True,
                                                   **threshold))
    state["clustering"] = {
        "round": n, "parameters": clustering_parameters(cfg), "model": embedding_model(cfg),
        "pool_fingerprint": pool_fingerprint(cfg["pool"]),
        "num_points": summary.get("num_points"), "num_clusters": summary.get("num_clusters"),
        "distance_threshold": summary.get("parameters", {}).get("distance_threshold"),
        "completed_at": now(), "path": out}
    return {"num_points": summary.get("num_points"), "num_clusters": summary.get("num_clusters"), "path": out}


def embed(cfg: dict, beam: list[str]) -> str:
    """Embeddings of the pool by `embedding_model`, for clustering only."""
    from clusmar_beam.pipelines import score as pipeline
    out = _join(cfg["workdir"], "embeddings")
    pipeline.run(pipeline.ScoreOptions([*cfg["score_args"], *beam], pool=cfg["pool"],
                                       model=cfg["embedding_model"], output=out, overwrite=True))
    return _join(out, "scores-*.parquet")


# ---------------------------------------------------------------- leftovers

_OUTPUT_DIRS = ("", "clusters", "embeddings", "rounds/round-*/scores", "rounds/round-*/manifest",
                "rounds/round-*/exclude")


def remove_dead_temps(workdir: str) -> int:
    """Delete what killed runs left: hidden `.tmp-*` shard directories and `*.tmp-*` files of atomic writes.

    Called with the work directory's lock held, so no live run is writing there.
    """
    patterns = []
    for sub in _OUTPUT_DIRS:
        base = _join(workdir, sub) if sub else workdir
        patterns += [_join(base, ".tmp-*"), _join(base, ".tmp-*", "*"), _join(base, "*.tmp-*")]
    found = set()
    for result in FileSystems.match(patterns):
        for m in result.metadata_list:
            path = m.path
            if "/.tmp-" in path:   # a file inside a temporary shard directory: take the whole directory
                head, _, rest = path.partition("/.tmp-")
                path = f"{head}/.tmp-{rest.split('/')[0]}" + ("/" if "://" in path else "")
            found.add(path)
    leftovers = sorted(found)
    for path in leftovers:
        try:
            FileSystems.delete([path])
        except Exception as exc:   # already gone, or not ours to delete: say so, never fail the round on it
            LOG.warning("could not remove the leftover %s: %s", path, exc)
    if leftovers:
        LOG.info("removed %d leftovers of killed runs (e.g. %s)", len(leftovers), leftovers[0])
    return len(leftovers)


# ---------------------------------------------------------------- exclude

def read_excluded(cfg: dict, state: dict, n: int, skip_unreadable_labels: bool = False) -> dict:
    """The labeled ids and the ids sent out before round n (but not those due for re-sending).

    The round reads them before it records anything in state.json, so an
    unreadable labels or manifest file stops the run with the state as it was.
    With `skip_unreadable_labels` an unreadable labels file is left out with a
    warning instead (its ids were sent in a manifest, so they stay excluded
    unless re-sending is configured); an unreadable manifest always stops the
    round, since its ids would be sent again.
    """
    kind = _id_kind(cfg["pool"], "pool")
    skipped = [] if skip_unreadable_labels else None
    labeled = read_ids(cfg["labels"], "labels", kind, missing_ok=True, skipped=skipped)
    resend = cfg["resend_after"]
    sent_parts, resendable = [], 0
    for r in completed_rounds(state):
        if r >= n:
            continue
        files = storage.match_files(_join(manifest_dir(cfg["workdir"], r), "manifest-*.tfrecord"),
                                    f"round {r} manifest")
        ids = _tfrecord_ids(files, kind)
        if resend is not None and n - r > resend:
            resendable += int(np.count_nonzero(~np.isin(ids, labeled)))
            continue
        sent_parts.append(ids)
    sent = np.concatenate(sent_parts) if sent_parts else _empty(kind)
    return {"kind": kind, "labeled": labeled, "sent": sent, "resendable": resendable,
            "skipped_labels": skipped or []}


def exclude(cfg: dict, n: int, found: dict) -> dict:
    """The ids of read_excluded into one file."""
    kind, labeled, sent, resendable = found["kind"], found["labeled"], found["sent"], found["resendable"]
    if not len(labeled):
        LOG.info("[round %d] no labels found at %s yet", n, cfg["labels"])
    excluded = np.unique(np.concatenate([labeled, sent])) if len(labeled) + len(sent) else _empty(kind)
    path = _join(round_dir(cfg["workdir"], n), "exclude", "exclude-00000-of-00001.parquet")
    if len(excluded):
        write_ids(path, excluded, kind)
    elif FileSystems.exists(path):
        FileSystems.delete([path])
    if resendable:
        LOG.info("[round %d] %d ids sent more than %d rounds ago without a label may be selected again",
                 n, resendable, cfg["resend_after"])
    out = {"labeled": int(len(labeled)), "sent_earlier": int(len(np.unique(sent))) if len(sent) else 0,
           "resendable": resendable, "excluded": int(len(excluded)), "path": path if len(excluded) else None}
    if found.get("skipped_labels"):
        out["skipped_labels"] = found["skipped_labels"]
    return out


# ---------------------------------------------------------------- select

def select(cfg: dict, beam: list[str], n: int, excluded: str | None, overwrite: bool) -> dict:
    from clusmar_beam.pipelines import select as pipeline
    out = manifest_dir(cfg["workdir"], n)
    if FileSystems.exists(_join(out, storage.SUCCESS)) and not overwrite:
        summary = storage.read_json(_join(out, "manifest.json"))   # finished before the state was saved
    else:
        values = {}
        if cfg["strategy"] == "cluster-margin":
            values["clusters"] = clusters_dir(cfg["workdir"])
        if cfg["candidates"] is not None:
            values["candidates"] = cfg["candidates"]
        elif cfg["candidate_multiplier"] is not None:
            values["candidate_multiplier"] = float(cfg["candidate_multiplier"])
        if excluded:
            values["labeled"] = excluded
        if overwrite:
            values["overwrite"] = True
        summary = pipeline.run(pipeline.SelectOptions(list(beam), pool=scored_pool(cfg, n), output=out,
                                                      batch_size=cfg["batch_size"], strategy=cfg["strategy"],
                                                      round_index=n, seed=cfg["seed"], **values))
    not_in_pool = summary.get("labeled_not_in_pool") or 0
    if not_in_pool:
        LOG.warning("[round %d] %d labeled/sent ids are not in the pool; ignored", n, not_in_pool)
    diagnostics = summary.get("diagnostics") or {}
    return {"pool_count": summary["pool_count"], "excluded_in_pool": summary.get("labeled_in_pool"),
            "not_in_pool": not_in_pool, "unlabeled": summary["unlabeled_count"], "k_m": summary.get("k_m"),
            "selected": summary["selected"], "files": summary["files"], "path": out,
            "diagnostics": {key: diagnostics.get(key) for key in ROUND_DIAGNOSTICS},
            "warnings": summary.get("warnings", [])}


# What state.json keeps of a selection's diagnostics (manifest.json has them all).
ROUND_DIAGNOSTICS = ("k_m_share_of_unlabeled", "candidate_clusters", "candidate_clusters_per_k_t",
                     "round_robin_passes_completed", "ended_inside_first_pass", "picks_from_singleton_clusters")


# ---------------------------------------------------------------- ids

def _id_kind(glob_: str, flag: str) -> str:
    """'int64', 'string' or 'bytes' from the first file's schema."""
    files = storage.match_files(glob_, flag)
    fmt = storage.detect_format(files, flag)
    schema = storage.parquet_schema(files[0]) if fmt == "parquet" else storage.tfrecord_schema(files[0])
    if "id" not in schema:
        raise InputError(f"{files[0]}: missing column 'id'")
    return schema["id"].kind


def _tfrecord_ids(files: list[str], kind: str) -> np.ndarray:
    """The `id` feature of every record; a damaged file is bad input naming the file."""
    import tensorflow as tf
    spec = {"id": tf.io.FixedLenFeature([], tf.int64 if kind == "int64" else tf.string)}
    parts = [batch["id"] for path in files for batch in storage.read_tfrecord_features(path, spec)]
    if not parts:
        return np.zeros(0, dtype=np.int64 if kind == "int64" else object)
    out = np.concatenate(parts)
    return out.astype(np.int64) if kind == "int64" else out.astype(object)


def _parquet_ids(files: list[str]) -> np.ndarray:
    parts = []
    for path in files:
        parts.append(storage.table_to_batch(storage.read_parquet_table(path, ["id"]), path).ids)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def read_ids(glob_: str, flag: str, pool_kind: str, missing_ok: bool = False,
             skipped: list | None = None) -> np.ndarray:
    """Unique ids in the files of a glob (Parquet or TFRecord), as the pool's id type.

    A file that cannot be read is an InputError naming it; with a `skipped` list, it
    is logged, added there ({"file", "error"}) and left out instead.
    """
    try:
        files = storage.match_files(glob_, flag)
    except InputError:
        if missing_ok:
            return _empty(pool_kind)
        raise
    fmt = storage.detect_format(files, flag)
    parts = []
    for path in files:
        try:
            parts.append(_file_ids(path, fmt, pool_kind))
        except InputError as exc:
            if skipped is None:
                raise
            LOG.warning("%s: skipped, unreadable: %s", path, exc)
            skipped.append({"file": path, "error": str(exc)[:300]})
    ids = np.concatenate(parts) if parts else _empty(pool_kind)
    want_int = pool_kind == "int64"
    if len(ids) and (ids.dtype == np.int64) != want_int:
        raise InputError(f"{flag} {glob_!r}: ids are {'integers' if ids.dtype == np.int64 else 'strings'} "
                         f"but the pool's ids are {'integers' if want_int else 'strings'}")
    return np.unique(ids) if len(ids) else _empty(pool_kind)


def _file_ids(path: str, fmt: str, pool_kind: str) -> np.ndarray:
    if fmt == "parquet":
        if "id" not in storage.parquet_schema(path):
            raise InputError(f"{path}: missing column 'id'")
        return _parquet_ids([path])
    kind = storage.tfrecord_schema(path).get("id")
    return _tfrecord_ids([path], kind.kind if kind else pool_kind)


def _empty(kind: str) -> np.ndarray:
    return np.zeros(0, dtype=np.int64 if kind == "int64" else object)


def write_ids(path: str, ids: np.ndarray, kind: str) -> None:
    array = storage.ids_to_arrow(ids, "binary" if kind == "bytes" else kind)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": array}), buffer, row_group_size=1 << 20)
    storage.write_bytes_atomic(path, buffer.getvalue().to_pybytes())

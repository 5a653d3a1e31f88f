"""The round config: keys, defaults, checks (the keys are documented in the package docstring).

Everything wrong with a config is reported here, naming the key, before the work
directory is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from clusmar_beam.core.errors import InputError, input_error_message
from clusmar_beam.core.hac import METRICS
from clusmar_beam.core.selection import STRATEGIES
from clusmar_beam.pipelines.options import check_direct_mode
from clusmar_beam.transforms import storage

CONFIG_KEYS = {
    "pool": str, "workdir": str, "model": (str, type(None)), "embedding_model": (str, type(None)),
    "score_args": list,
    "batch_size": int, "candidates": (int, type(None)), "candidate_multiplier": (int, float, type(None)),
    "strategy": str, "seed": int, "distance_threshold": (int, float, type(None)),
    "target_mean_cluster_size": (int, float, type(None)), "metric": str, "cluster_args": list,
    "labels": (str, type(None)), "resend_after": (int, type(None)), "beam_args": list, "beam_options": dict,
}


def load_config(path: str) -> dict:
    """The validated config with defaults filled in; InputError naming the bad key."""
    if not FileSystems.exists(path):
        raise InputError(f"--config {path!r}: file does not exist")
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        text = handle.read().decode()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml
            raw = yaml.safe_load(text)
    except Exception as exc:
        raise InputError(f"--config {path!r}: cannot parse ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"--config {path!r}: expected a mapping of keys to values")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise InputError(f"--config {path!r}: unknown key(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    for key, kinds in CONFIG_KEYS.items():
        if key in raw and (not isinstance(raw[key], kinds) or isinstance(raw[key], bool)):
            want = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
            raise InputError(f"--config {path!r}: key {key!r} must be {want} (got {raw[key]!r})")
    for key in ("pool", "workdir", "batch_size"):
        if raw.get(key) is None:
            raise InputError(f"--config {path!r}: missing required key {key!r}")
    cfg = {"model": None, "embedding_model": None, "score_args": [], "candidates": None, "candidate_multiplier": None,
           "strategy": "cluster-margin", "seed": 0, "distance_threshold": None, "target_mean_cluster_size": None,
           "metric": "cosine", "cluster_args": [], "labels": None, "resend_after": None, "beam_args": [],
           "beam_options": {}, **raw}
    base = posixpath.dirname(os.path.abspath(path)) if "://" not in path else posixpath.dirname(path)

    def resolve(value):
        return value if value is None or "://" in value or os.path.isabs(value) else os.path.join(base, value)

    for key in ("pool", "workdir", "model", "embedding_model", "labels"):
        cfg[key] = resolve(cfg[key])
    cfg["workdir"] = cfg["workdir"].rstrip("/")
    if cfg["labels"] is None:
        cfg["labels"] = FileSystems.join(cfg["workdir"], "labels", "*")
    where = f"--config {path!r}"
    if cfg["batch_size"] <= 0:
        raise InputError(f"{where}: batch_size must be positive (got {cfg['batch_size']})")
    if cfg["candidates"] is not None and cfg["candidate_multiplier"] is not None:
        raise InputError(f"{where}: give candidates or candidate_multiplier, not both")
    if cfg["candidates"] is not None and cfg["candidates"] < cfg["batch_size"]:
        raise InputError(f"{where}: candidates ({cfg['candidates']}) must be at least batch_size")
    if cfg["candidate_multiplier"] is not None and not cfg["candidate_multiplier"] >= 1:
        raise InputError(f"{where}: candidate_multiplier must be at least 1")
    if cfg["strategy"] not in STRATEGIES:
        raise InputError(f"{where}: strategy {cfg['strategy']!r}: choose one of {', '.join(STRATEGIES)}")
    if cfg["metric"] not in METRICS:
        raise InputError(f"{where}: metric {cfg['metric']!r}: choose {' or '.join(METRICS)}")
    if cfg["strategy"] == "cluster-margin":
        if (cfg["distance_threshold"] is None) == (cfg["target_mean_cluster_size"] is None):
            raise InputError(f"{where}: give exactly one of distance_threshold and target_mean_cluster_size "
                             "(strategy cluster-margin)")
        if cfg["distance_threshold"] is not None and not cfg["distance_threshold"] > 0:
            raise InputError(f"{where}: distance_threshold must be positive")
        if cfg["target_mean_cluster_size"] is not None and not cfg["target_mean_cluster_size"] >= 1:
            raise InputError(f"{where}: target_mean_cluster_size must be at least 1")
    if cfg["resend_after"] is not None and cfg["resend_after"] < 1:
        raise InputError(f"{where}: resend_after must be at least 1 (rounds)")
    for key in ("score_args", "cluster_args", "beam_args"):
        if not all(isinstance(a, str) for a in cfg[key]):
            raise InputError(f"{where}: {key} must be a list of strings (flags)")
    # Names that do not exist: a clear message now, not a stack trace in stage 3.
    storage.match_files(cfg["pool"], f"{where}: pool")
    for key in ("model", "embedding_model"):
        if cfg[key] is not None and not storage.file_or_directory_exists(cfg[key]):
            raise InputError(f"{where}: {key} {cfg[key]!r} does not exist")
    if cfg["embedding_model"] is not None and cfg["model"] is None:
        raise InputError(f"{where}: embedding_model needs model (the pool is scored by model every round)")
    try:
        check_direct_mode(PipelineOptions(beam_flags(cfg)))
    except InputError as exc:
        raise InputError(f"{where}: beam_options/beam_args: {input_error_message(exc)}") from exc
    return cfg


def beam_flags(cfg: dict) -> list[str]:
    """beam_args plus beam_options as flags: every stage's pipeline parses the same list."""
    flags = list(cfg["beam_args"])
    for name, value in cfg["beam_options"].items():
        flag = "--" + name.lstrip("-")
        if value is True:
            flags.append(flag)
        elif value not in (None, False):
            flags.append(f"{flag}={value}")
    return flags


def round_parameters(cfg: dict) -> dict:
    """What defines a round's selection; a resumed round must be started with the same."""
    return {key: cfg[key] for key in ("pool", "model", "batch_size", "candidates", "candidate_multiplier",
                                      "strategy", "seed", "labels", "resend_after", "score_args")}


def pool_fingerprint(glob_: str) -> str:
    """A digest of the pool's file names and sizes: a changed pool needs new clusters."""
    metadata = FileSystems.match([glob_])[0].metadata_list
    lines = sorted(f"{m.path}\t{m.size_in_bytes}" for m in metadata
                   if not posixpath.basename(m.path).startswith(("_", ".")))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def embedding_model(cfg: dict) -> str | None:
    return cfg["embedding_model"] or cfg["model"]


def separate_embedding_model(cfg: dict) -> bool:
    return cfg["embedding_model"] is not None and cfg["embedding_model"] != cfg["model"]


def clustering_parameters(cfg: dict) -> dict:
    """What the clusters depend on; a change clusters again."""
    params = {key: cfg[key] for key in ("pool", "distance_threshold", "target_mean_cluster_size", "metric",
                                        "cluster_args")}
    return {**params, "embedding_model": embedding_model(cfg)}

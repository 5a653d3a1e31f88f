"""One active-learning round per run: config, state, the labeled set, resume, lock.

`clusmar round --config round.yaml [--round N] [--force] [--recluster] [--break-lock]`
does, in order, only what is missing for the round:

1. score  - with a model: `clusmar score` of the pool into the round's scores/
            (embeddings too only when this round must cluster); without a model the
            pool itself carries `embedding` and `probs`/`margin` and this stage is skipped;
2. cluster - once, into clusters/, reused by later rounds; re-done when --recluster is
            given, when the embedding model changed, or when the clustering parameters
            in the config changed;
3. exclude - every id already labeled (the labels glob) or sent out in an earlier
            manifest (unless re-sending is configured) into one Parquet file;
4. select  - `clusmar select` into the round's manifest/.

Work directory layout (local path or any Beam filesystem, e.g. gs://bucket/al/):

    WORKDIR/
      state.json                    every round: parameters, model, counts, timings, manifest
                                    location; written atomically (temp file, then rename)
      lock.json                     present while a run holds the work directory: host, pid,
                                    start time, round (break a stale one with --break-lock)
      clusters/                     clusters-*.parquet + clustering.json (from `clusmar cluster`)
      embeddings/                   scores of `embedding_model` (only when it is not `model`)
      labels/                       labels coming back (Parquet or TFRecord with `id`, `label`);
                                    the default labels glob is WORKDIR/labels/*
      rounds/round-0001/
        scores/                     scores-*.parquet, scoring.json, _SUCCESS (only with a model)
        exclude/exclude-00000-of-00001.parquet
                                    ids excluded from this round (column `id`)
        manifest/                   manifest-*.tfrecord, manifest.json, _SUCCESS
      rounds/round-0002/ ...

Rounds are numbered from 1. Without --round the run resumes an unfinished round or starts
the next one; a scheduler should pass --round N so that a repeated run of a completed round
does nothing (it prints where the manifest is). --round beyond the next round, or --force
on a round older than the latest, is an error. --force re-runs a completed round (the
latest only): its scores and manifest are replaced.

Config keys (YAML or JSON; unknown keys are an error):

    pool: GLOB                      required; Parquet or TFRecord
    workdir: DIR                    required; relative paths are relative to the config file
    model: PATH                     optional Keras file / SavedModel; without it the pool must
                                    carry embedding and probs (or margin)
    embedding_model: PATH           optional: the model whose embeddings are clustered (default:
                                    `model`). Keep it fixed while `model` changes every round to
                                    cluster once, as the paper does; a changed embedding model
                                    clusters again
    score_args: [FLAG, ...]         optional extra `clusmar score` flags (e.g. --inputs x=f1,f2)
    batch_size: K_T                 required (k_t)
    candidates: K_M                 or candidate_multiplier: X (default 10); not both
    strategy: cluster-margin        | margin | random
    seed: 0
    distance_threshold: EPS         or target_mean_cluster_size: M (one of them for
                                    cluster-margin)
    metric: cosine                  | sqeuclidean
    cluster_args: [FLAG, ...]       optional extra `clusmar cluster` flags (e.g. --knn 16)
    labels: GLOB                    default WORKDIR/labels/*
    resend_after: N                 optional: an id sent out N rounds ago whose label has not
                                    come back may be selected again (default: never re-send)
    beam_args: [FLAG, ...]          Beam pipeline flags for every stage (--runner ...)
    beam_options: {name: value}     the same as a mapping (runner: DataflowRunner, ...)
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import socket
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from clusmar_beam import io, progress
from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")

STATE_FORMAT = "clusmar-round-state"
STATE_VERSION = 1
STRATEGIES = ("cluster-margin", "margin", "random")
CONFIG_KEYS = {
    "pool": str, "workdir": str, "model": (str, type(None)), "embedding_model": (str, type(None)),
    "score_args": list,
    "batch_size": int, "candidates": (int, type(None)), "candidate_multiplier": (int, float, type(None)),
    "strategy": str, "seed": int, "distance_threshold": (int, float, type(None)),
    "target_mean_cluster_size": (int, float, type(None)), "metric": str, "cluster_args": list,
    "labels": (str, type(None)), "resend_after": (int, type(None)), "beam_args": list, "beam_options": dict,
}
STAGES = ("score", "cluster", "exclude", "select")

# Test hook: called as FAULT_HOOK(stage, "before"|"after"); "after" is after the stage's
# outputs are written but before state.json records it. CLUSMAR_FAIL_STAGE=stage[:when]
# does the same for a subprocess.
FAULT_HOOK = None


class LockHeld(InputError):
    pass


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _join(*parts) -> str:
    return FileSystems.join(*parts)


def _fault(stage: str, when: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage, when)
    wanted = os.environ.get("CLUSMAR_FAIL_STAGE")
    if wanted and wanted.split(":")[0] == stage and (wanted.split(":") + ["before"])[1] == when:
        raise RuntimeError(f"CLUSMAR_FAIL_STAGE: injected failure {when} stage {stage}")


# ---------------------------------------------------------------- config

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
        cfg["labels"] = _join(cfg["workdir"], "labels", "*")
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
    if cfg["metric"] not in ("cosine", "sqeuclidean"):
        raise InputError(f"{where}: metric {cfg['metric']!r}: choose cosine or sqeuclidean")
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
    io.match_files(cfg["pool"], f"{where}: pool")
    for key in ("model", "embedding_model"):
        if cfg[key] is not None and not FileSystems.exists(cfg[key]):
            raise InputError(f"{where}: {key} {cfg[key]!r} does not exist")
    if cfg["embedding_model"] is not None and cfg["model"] is None:
        raise InputError(f"{where}: embedding_model needs model (the pool is scored by model every round)")
    return cfg


def beam_flags(cfg: dict) -> list[str]:
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
    import hashlib
    metadata = FileSystems.match([glob_])[0].metadata_list
    lines = sorted(f"{m.path}\t{m.size_in_bytes}" for m in metadata
                   if not posixpath.basename(m.path).startswith(("_", ".")))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def embedding_model(cfg: dict) -> str | None:
    return cfg["embedding_model"] or cfg["model"]


def separate_embedding_model(cfg: dict) -> bool:
    return cfg["embedding_model"] is not None and cfg["embedding_model"] != cfg["model"]


def clustering_parameters(cfg: dict) -> dict:
    params = {key: cfg[key] for key in ("pool", "distance_threshold", "target_mean_cluster_size", "metric",
                                        "cluster_args")}
    return {**params, "embedding_model": embedding_model(cfg)}


# ---------------------------------------------------------------- state

def state_path(workdir: str) -> str:
    return _join(workdir, "state.json")


def load_state(workdir: str) -> dict:
    path = state_path(workdir)
    if not FileSystems.exists(path):
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "created_at": _now(), "clustering": None,
                "rounds": {}}
    try:
        state = io.read_json(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable state file ({exc}); not touching this work directory") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a clusmar round state file (format {state.get('format') if isinstance(state, dict) else None!r}); "
                         "not touching this work directory")
    if state.get("version") != STATE_VERSION:
        raise InputError(f"{path}: written by an incompatible clusmar version (state version "
                         f"{state.get('version')!r}, this clusmar reads version {STATE_VERSION}); "
                         "use a matching clusmar or a new work directory")
    return state


def save_state(workdir: str, state: dict) -> None:
    state["updated_at"] = _now()
    io.write_json_atomic(state_path(workdir), state)


def completed_rounds(state: dict) -> list[int]:
    return sorted(int(r) for r, info in state["rounds"].items() if info.get("status") == "completed")


# ---------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(workdir: str, round_index, break_lock: bool) -> dict:
    path = _join(workdir, "lock.json")
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": _now(), "round": round_index,
            "token": uuid.uuid4().hex}
    if FileSystems.exists(path):
        try:
            holder = io.read_json(path)
        except Exception:
            holder = {}
        desc = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
                f", round {holder.get('round', '?')}")
        stale = holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"])
        if break_lock:
            LOG.warning("round: breaking the lock held by %s", desc)
        elif stale:
            LOG.warning("round: the lock's holder (%s) is no longer running on this host; taking over", desc)
        else:
            raise LockHeld(f"{workdir} is locked by another run ({desc}); if that run is dead, pass --break-lock "
                           f"(or delete {path})")
        FileSystems.delete([path])
    payload = (json.dumps(mine, indent=2) + "\n").encode()
    if "://" not in path:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise LockHeld(f"{workdir} was locked by another run just now ({path})") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
    else:  # object stores: write, then check that ours is the one that stuck
        io.write_bytes_atomic(path, payload)
        if io.read_json(path).get("token") != mine["token"]:
            raise LockHeld(f"{workdir} was locked by another run just now ({path})")
    return mine


def release_lock(workdir: str, mine: dict) -> None:
    path = _join(workdir, "lock.json")
    try:
        if FileSystems.exists(path) and io.read_json(path).get("token") == mine["token"]:
            FileSystems.delete([path])
    except Exception as exc:  # never hide the run's own error behind this one
        LOG.warning("round: could not remove %s: %s", path, exc)


# ---------------------------------------------------------------- ids

def _id_kind(glob_: str, flag: str) -> str:
    """'int64', 'string' or 'bytes' from the first file's schema."""
    files = io.match_files(glob_, flag)
    fmt = io.detect_format(files, flag)
    schema = io.parquet_schema(files[0]) if fmt == "parquet" else io.tfrecord_schema(files[0])
    if "id" not in schema:
        raise InputError(f"{files[0]}: missing column 'id'")
    return schema["id"].kind


def _tfrecord_ids(files: list[str], kind: str) -> np.ndarray:
    import tensorflow as tf
    dtype = tf.int64 if kind == "int64" else tf.string
    ds = tf.data.TFRecordDataset(files).batch(65536).map(
        lambda s: tf.io.parse_example(s, {"id": tf.io.FixedLenFeature([], dtype)})["id"])
    parts = [b.numpy() for b in ds]
    if not parts:
        return np.zeros(0, dtype=np.int64 if kind == "int64" else object)
    out = np.concatenate(parts)
    return out.astype(np.int64) if kind == "int64" else out.astype(object)


def _parquet_ids(files: list[str]) -> np.ndarray:
    parts = []
    for path in files:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            table = pq.read_table(handle, columns=["id"])
        parts.append(io.table_to_batch(table, path).ids)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def read_ids(glob_: str, flag: str, pool_kind: str, missing_ok: bool = False) -> np.ndarray:
    """Unique ids in the files of a glob (Parquet or TFRecord), as the pool's id type."""
    try:
        files = io.match_files(glob_, flag)
    except InputError:
        if missing_ok:
            return _empty(pool_kind)
        raise
    fmt = io.detect_format(files, flag)
    if fmt == "parquet":
        for path in files:
            if "id" not in io.parquet_schema(path):
                raise InputError(f"{path}: missing column 'id'")
        ids = _parquet_ids(files)
    else:
        kind = io.tfrecord_schema(files[0]).get("id")
        ids = _tfrecord_ids(files, kind.kind if kind else pool_kind)
    want_int = pool_kind == "int64"
    if len(ids) and (ids.dtype == np.int64) != want_int:
        raise InputError(f"{flag} {glob_!r}: ids are {'integers' if ids.dtype == np.int64 else 'strings'} "
                         f"but the pool's ids are {'integers' if want_int else 'strings'}")
    return np.unique(ids) if len(ids) else _empty(pool_kind)


def _empty(kind: str) -> np.ndarray:
    return np.zeros(0, dtype=np.int64 if kind == "int64" else object)


def write_ids(path: str, ids: np.ndarray, kind: str) -> None:
    array = io.ids_to_arrow(ids, "binary" if kind == "bytes" else kind)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": array}), buffer, row_group_size=1 << 20)
    io.write_bytes_atomic(path, buffer.getvalue().to_pybytes())


# ---------------------------------------------------------------- the round

class _Ticker:
    """On a terminal, a live line redrawn every second while a stage runs: elapsed time
    and the stage's counts so far (clusmar_beam.progress: rows read, rows scored,
    clusters left to merge) when its work runs in this process."""

    def __init__(self, label: str):
        import sys
        import threading
        self._stream = sys.stderr
        self._stop = threading.Event()
        self._thread = None
        progress.reset()
        if getattr(self._stream, "isatty", lambda: False)() and not os.environ.get("CLUSMAR_NO_PROGRESS"):
            start = time.time()

            def tick():
                while not self._stop.wait(1.0):
                    counts = progress.describe()
                    self._stream.write(f"\r{label}: {time.time() - start:.0f} s{', ' + counts if counts else ''}"
                                       "\x1b[K")
                    self._stream.flush()

            self._thread = threading.Thread(target=tick, daemon=True)
            self._thread.start()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._thread = None


class Round:
    """Runs (or resumes) one round; see the module docstring."""

    def __init__(self, cfg: dict, round_arg: int | None, force: bool, recluster: bool, extra_beam: list[str]):
        self.cfg, self.force, self.recluster = cfg, force, recluster
        self.workdir = cfg["workdir"]
        self.beam = beam_flags(cfg) + list(extra_beam)
        self.round_arg = round_arg

    # paths
    def round_dir(self, n: int) -> str:
        return _join(self.workdir, "rounds", f"round-{n:04d}")

    def manifest_dir(self, n: int) -> str:
        return _join(self.round_dir(n), "manifest")

    @property
    def clusters_dir(self) -> str:
        return _join(self.workdir, "clusters")

    def _save(self):
        save_state(self.workdir, self.state)

    def _pick_round(self) -> int | None:
        """The round to run, or None when it is complete and nothing is to be done."""
        rounds = self.state["rounds"]
        done = completed_rounds(self.state)
        unfinished = sorted(int(r) for r, info in rounds.items() if info.get("status") != "completed")
        last = done[-1] if done else 0
        expected = unfinished[0] if unfinished else last + 1
        n = self.round_arg if self.round_arg is not None else expected
        if n < 1:
            raise InputError(f"--round {n}: rounds are numbered from 1")
        if str(n) in rounds and rounds[str(n)].get("status") == "completed":
            if not self.force:
                return None
            if n != last:
                raise InputError(f"--round {n} goes back: rounds up to {last} are complete and later rounds "
                                 f"depend on round {n}'s manifest; --force re-runs only the latest round ({last})")
            return n
        if n != expected:
            if n > expected:
                raise InputError(f"--round {n} skips ahead: the next round is {expected}"
                                 + (f" (round {expected} is unfinished; resume it first)" if unfinished else
                                    f" (rounds up to {last} are complete)"))
            raise InputError(f"--round {n} goes back: the next round is {expected}")
        return n

    def run(self, break_lock: bool = False) -> dict:
        FileSystems.mkdirs(self.workdir) if not FileSystems.exists(self.workdir) else None
        load_state(self.workdir)   # an incompatible work directory is refused before anything is written
        lock = acquire_lock(self.workdir, self.round_arg, break_lock)
        try:
            self.state = load_state(self.workdir)
            n = self._pick_round()
            if n is None:
                info = self.state["rounds"][str(self.round_arg)]
                print(f"clusmar round: round {self.round_arg} is already complete ({info.get('selected')} selected "
                      f"at {info.get('completed_at')}); manifest: {info['manifest']}  (nothing to do; --force "
                      "re-runs it)")
                return {**info, "already_complete": True}
            return self._run_round(n)
        finally:
            release_lock(self.workdir, lock)

    def _run_round(self, n: int) -> dict:
        key = str(n)
        params = round_parameters(self.cfg)
        info = self.state["rounds"].get(key)
        if info is not None and info.get("status") == "completed":   # --force
            LOG.info("[round %d] --force: re-running the completed round", n)
            info = None
        if info is not None and info.get("parameters") != params and not self.force:
            changed = sorted(k for k in params if info.get("parameters", {}).get(k) != params[k])
            raise InputError(f"round {n} was started with different settings ({', '.join(changed)}); "
                             f"restore them, or pass --force to restart round {n} with the new config")
        if info is None or info.get("parameters") != params:
            info = {"round": n, "status": "running", "started_at": _now(), "parameters": params,
                    "model": self.cfg["model"], "pool": self.cfg["pool"], "stages": {},
                    "manifest": self.manifest_dir(n), "attempts": 0}
            force_outputs = self.force
            if self.force:   # the old outputs stop counting as complete now, so a crash cannot revive them
                for stage_dir in ("scores", "manifest"):
                    marker = _join(self.round_dir(n), stage_dir, io.SUCCESS)
                    if FileSystems.exists(marker):
                        FileSystems.delete([marker])
        else:
            force_outputs = False
            LOG.info("[round %d] resuming (stages done: %s)", n,
                     ", ".join(s for s in STAGES if info["stages"].get(s, {}).get("status") == "done") or "none")
        info["attempts"] = info.get("attempts", 0) + 1
        if self.recluster and info["stages"].get("cluster", {}).get("status") != "done":
            info["recluster_requested"] = True   # remembered, so a resumed round still re-clusters
        info["status"] = "running"
        self.state["rounds"][key] = info
        self._save()
        start = time.time()
        self.round_start = start
        need_cluster = self.cfg["strategy"] == "cluster-margin" and self._must_cluster(info)
        with_embeddings = need_cluster and not separate_embedding_model(self.cfg)
        score = info["stages"].get("score", {})
        if with_embeddings and self.cfg["model"] and score.get("status") == "done" \
                and not score.get("with_embeddings"):
            info["stages"].pop("score")   # scored without embeddings earlier, but now this round must cluster
        self._stage(n, info, "score", lambda: self._score(n, with_embeddings, force_outputs))
        self._stage(n, info, "cluster", lambda: self._cluster(n, info, need_cluster))
        self._stage(n, info, "exclude", lambda: self._exclude(n))
        self._stage(n, info, "select", lambda: self._select(n, info, force_outputs))
        sel = info["stages"]["select"]
        info.update(status="completed", completed_at=_now(), selected=sel["selected"],
                    manifest_files=sel["files"], elapsed_s=round(sum(
                        s.get("elapsed_s", 0) for s in info["stages"].values()), 1))
        self._save()
        print(f"clusmar round: round {n} complete: {sel['selected']} selected -> {info['manifest']}")
        return info

    def _stage(self, n: int, info: dict, name: str, work) -> None:
        stage = info["stages"].get(name, {})
        if stage.get("status") == "done":
            LOG.info("[round %d] %s: done earlier, skipping", n, name)
            return
        LOG.info("[round %d] %s: start", n, name)
        t0 = time.time()
        ticker = _Ticker(f"[round {n}] {name}")
        try:
            _fault(name, "before")
            result = work() or {}
            _fault(name, "after")
        except BaseException as exc:
            ticker.stop()
            info["stages"][name] = {"status": "failed", "failed_at": _now(), "elapsed_s": round(time.time() - t0, 2),
                                    "error": (str(exc).splitlines() or [type(exc).__name__])[0][:500]}
            try:
                self._save()
            except Exception:
                pass
            LOG.error("[round %d] %s: failed after %.1f s; the next run resumes here", n, name, time.time() - t0)
            raise
        ticker.stop()
        elapsed = round(time.time() - t0, 2)
        info["stages"][name] = {"status": "done", "finished_at": _now(), "elapsed_s": elapsed, **result}
        self._save()
        counts = ", ".join(f"{k} {v}" for k, v in result.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool))
        LOG.info("[round %d] %s: done in %.1f s%s", n, name, elapsed, f" ({counts})" if counts else "")

    # stage: score
    def _score(self, n: int, with_embeddings: bool, overwrite: bool) -> dict:
        if self.cfg["model"] is None:
            return {"skipped": "no model: the pool carries embedding and probs"}
        from pipelines import score
        out = _join(self.round_dir(n), "scores")
        if FileSystems.exists(_join(out, io.SUCCESS)) and not overwrite:
            summary = io.read_json(_join(out, "scoring.json"))
            if with_embeddings and not summary.get("with_embeddings"):
                overwrite = True
            else:
                return {"rows": summary.get("rows"), "path": out, "with_embeddings": summary.get("with_embeddings")}
        argv = ["--pool", self.cfg["pool"], "--model", self.cfg["model"], "--output", out, *self.cfg["score_args"],
                *self.beam]
        if not with_embeddings:
            argv.append("--no-embeddings")
        if overwrite:
            argv.append("--overwrite")
        summary = score.run(argv)
        return {"rows": summary.get("rows"), "path": out, "with_embeddings": with_embeddings}

    def _scored_pool(self, n: int) -> str:
        if self.cfg["model"] is None:
            return self.cfg["pool"]
        return _join(self.round_dir(n), "scores", "scores-*.parquet")

    # stage: cluster
    def _must_cluster(self, info: dict) -> bool:
        if info["stages"].get("cluster", {}).get("status") == "done":
            return False
        current = self.state.get("clustering")
        if self.recluster or info.get("recluster_requested") or current is None:
            return True
        if not FileSystems.exists(_join(self.clusters_dir, "clustering.json")):
            return True
        if current.get("parameters") != clustering_parameters(self.cfg):
            old = current.get("parameters", {})
            changed = sorted(k for k in clustering_parameters(self.cfg) if old.get(k) != self.cfg[k])
            LOG.info("clustering settings changed (%s): clustering again", ", ".join(changed))
            return True
        if current.get("pool_fingerprint") not in (None, pool_fingerprint(self.cfg["pool"])):
            LOG.info("the pool's files changed since round %s clustered it: clustering again", current.get("round"))
            return True
        return False

    def _cluster(self, n: int, info: dict, need: bool) -> dict:
        if self.cfg["strategy"] != "cluster-margin":
            return {"skipped": f"strategy {self.cfg['strategy']} needs no clusters"}
        current = self.state.get("clustering")
        if not need:
            return {"reused_from_round": current["round"], "num_clusters": current["num_clusters"],
                    "path": self.clusters_dir}
        from pipelines import cluster
        embedded = self._scored_pool(n)
        if separate_embedding_model(self.cfg):
            embedded = self._embed()
        argv = ["--pool", embedded, "--output", self.clusters_dir, "--metric", self.cfg["metric"],
                "--seed", str(self.cfg["seed"]), "--overwrite", *self.cfg["cluster_args"], *self.beam]
        if self.cfg["distance_threshold"] is not None:
            argv += ["--distance-threshold", repr(float(self.cfg["distance_threshold"]))]
        else:
            argv += ["--target-mean-cluster-size", repr(float(self.cfg["target_mean_cluster_size"]))]
        summary = cluster.run(argv)
        self.state["clustering"] = {
            "round": n, "parameters": clustering_parameters(self.cfg), "model": embedding_model(self.cfg),
            "pool_fingerprint": pool_fingerprint(self.cfg["pool"]),
            "num_points": summary.get("num_points"), "num_clusters": summary.get("num_clusters"),
            "distance_threshold": summary.get("parameters", {}).get("distance_threshold"),
            "completed_at": _now(), "path": self.clusters_dir}
        return {"num_points": summary.get("num_points"), "num_clusters": summary.get("num_clusters"),
                "path": self.clusters_dir}

    def _embed(self) -> str:
        """Embeddings of the pool by `embedding_model`, for clustering only."""
        from pipelines import score
        out = _join(self.workdir, "embeddings")
        score.run(["--pool", self.cfg["pool"], "--model", self.cfg["embedding_model"], "--output", out,
                   "--overwrite", *self.cfg["score_args"], *self.beam])
        return _join(out, "scores-*.parquet")

    # stage: exclude
    def _exclude(self, n: int) -> dict:
        kind = _id_kind(self.cfg["pool"], "pool")
        labeled = read_ids(self.cfg["labels"], "labels", kind, missing_ok=True)
        if not len(labeled):
            LOG.info("[round %d] no labels found at %s yet", n, self.cfg["labels"])
        resend = self.cfg["resend_after"]
        sent_parts, resendable = [], 0
        for r in completed_rounds(self.state):
            if r >= n:
                continue
            files = io.match_files(_join(self.manifest_dir(r), "manifest-*.tfrecord"), f"round {r} manifest")
            ids = _tfrecord_ids(files, kind)
            if resend is not None and n - r > resend:
                resendable += int(np.count_nonzero(~np.isin(ids, labeled)))
                continue
            sent_parts.append(ids)
        sent = np.concatenate(sent_parts) if sent_parts else _empty(kind)
        exclude = np.unique(np.concatenate([labeled, sent])) if len(labeled) + len(sent) else _empty(kind)
        path = _join(self.round_dir(n), "exclude", "exclude-00000-of-00001.parquet")
        if len(exclude):
            write_ids(path, exclude, kind)
        elif FileSystems.exists(path):
            FileSystems.delete([path])
        if resendable:
            LOG.info("[round %d] %d ids sent more than %d rounds ago without a label may be selected again",
                     n, resendable, resend)
        return {"labeled": int(len(labeled)), "sent_earlier": int(len(np.unique(sent))) if len(sent) else 0,
                "resendable": resendable, "excluded": int(len(exclude)), "path": path if len(exclude) else None}

    # stage: select
    def _select(self, n: int, info: dict, overwrite: bool) -> dict:
        from pipelines import select
        out = self.manifest_dir(n)
        if FileSystems.exists(_join(out, io.SUCCESS)) and not overwrite:
            summary = io.read_json(_join(out, "manifest.json"))   # finished before the state was saved
        else:
            argv = ["--pool", self._scored_pool(n), "--output", out, "--batch-size", str(self.cfg["batch_size"]),
                    "--strategy", self.cfg["strategy"], "--round", str(n), "--seed", str(self.cfg["seed"]),
                    *self.beam]
            if self.cfg["strategy"] == "cluster-margin":
                argv += ["--clusters", self.clusters_dir]
            if self.cfg["candidates"] is not None:
                argv += ["--candidates", str(self.cfg["candidates"])]
            elif self.cfg["candidate_multiplier"] is not None:
                argv += ["--candidate-multiplier", repr(float(self.cfg["candidate_multiplier"]))]
            exclude = info["stages"]["exclude"].get("path")
            if exclude:
                argv += ["--labeled", exclude]
            if overwrite:
                argv.append("--overwrite")
            summary = select.run(argv)
        not_in_pool = summary.get("labeled_not_in_pool") or 0
        if not_in_pool:
            LOG.warning("[round %d] %d labeled/sent ids are not in the pool; ignored", n, not_in_pool)
        return {"pool_count": summary["pool_count"], "excluded_in_pool": summary.get("labeled_in_pool"),
                "not_in_pool": not_in_pool, "unlabeled": summary["unlabeled_count"], "k_m": summary.get("k_m"),
                "selected": summary["selected"], "files": summary["files"], "path": out}


def run_round(config_path: str, round_arg: int | None = None, force: bool = False, recluster: bool = False,
              break_lock: bool = False, extra_beam=()) -> dict:
    cfg = load_config(config_path)
    return Round(cfg, round_arg, force, recluster, list(extra_beam)).run(break_lock)


# ---------------------------------------------------------------- status

def status_rows(workdir: str) -> list[dict]:
    workdir = workdir.rstrip("/")
    if not FileSystems.exists(state_path(workdir)):
        raise InputError(f"--workdir {workdir!r}: no state.json (not a `clusmar round` work directory, "
                         "or no round has started yet)")
    state = load_state(workdir)
    rows = []
    for key in sorted(state["rounds"], key=int):
        info = state["rounds"][key]
        stages = info.get("stages", {})
        done = [s for s in STAGES if stages.get(s, {}).get("status") == "done"]
        failed = [s for s in STAGES if stages.get(s, {}).get("status") == "failed"]
        status = info.get("status")
        if status != "completed":
            status = (f"failed in {failed[0]}" if failed else status) + f" ({'/'.join(done) or 'no stage'} done)"
        rows.append({
            "round": int(key), "status": status,
            "model": posixpath.basename((info.get("model") or "-").rstrip("/")) or "-",
            "pool": stages.get("select", {}).get("pool_count", "-"),
            "labeled": stages.get("exclude", {}).get("labeled", "-"),
            "selected": info.get("selected", "-"),
            "when": info.get("completed_at") or info.get("started_at") or "-",
            "where": info.get("manifest", "-"),
        })
    return rows


def format_status(workdir: str) -> str:
    rows = status_rows(workdir)
    if not rows:
        return f"{workdir}: no rounds yet"
    headers = ["round", "status", "model", "pool", "labeled", "selected", "when", "where"]
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)

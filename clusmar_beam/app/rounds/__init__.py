"""One active-learning round per run: config, state, the labeled set, resume, lock.

`clusmar round --config round.yaml [--round N] [--force] [--recluster] [--break-lock]
[--dry-run] [--detach] [--skip-unreadable-labels]` does, in order, only what is missing for
the round (--dry-run only says what that is; --detach does it in a background process):

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
      state.previous.json           the state before the last save: a run that finds state.json
                                    missing (killed while replacing it) recovers from it
      lock.json                     present while a run holds the work directory: host, pid,
                                    start time, round, renewed every minute (a stale one is taken
                                    over; --break-lock takes any other)
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

Modules: config (the keys above), state (state.json), lock (lock.json; conditional: its
conditional writes on S3 and GCS), stages (the four stages), status (`clusmar status`),
launch (--detach); this one runs a round through them.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from clusmar_beam.app.rounds import stages
from clusmar_beam.app.rounds.config import beam_flags, load_config, round_parameters, separate_embedding_model
from clusmar_beam.app.rounds.lock import acquire_lock, read_holder, release_lock
from clusmar_beam.app.rounds.stages import STAGES, _tfrecord_ids, read_ids, write_ids
from clusmar_beam.app.rounds.state import (STATE_FORMAT, STATE_VERSION, completed_rounds, load_state, mark_complete,
                                           now, save_state)
from clusmar_beam.app.rounds.status import format_status, next_round, status_rows
from clusmar_beam.core import progress
from clusmar_beam.core.errors import InputError
from clusmar_beam.pipelines.options import use_file_systems_with
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")

# What app/round.py, app/status.py and the tests use; the modules hold the rest.
__all__ = ["run_round", "plan_round", "Round", "load_config", "beam_flags", "STATE_FORMAT", "STATE_VERSION", "read_ids",
           "write_ids", "_tfrecord_ids", "status_rows", "format_status", "next_round", "FAULT_HOOK", "_Ticker"]

# Test hook: called as FAULT_HOOK(stage, "before"|"after"); "after" is after the stage's
# outputs are written but before state.json records it. CLUSMAR_FAIL_STAGE=stage[:when]
# does the same for a subprocess.
FAULT_HOOK = None


def _fault(stage: str, when: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage, when)
    wanted = os.environ.get("CLUSMAR_FAIL_STAGE")
    if wanted and wanted.split(":")[0] == stage and (wanted.split(":") + ["before"])[1] == when:
        raise RuntimeError(f"CLUSMAR_FAIL_STAGE: injected failure {when} stage {stage}")


class _Ticker:
    """On a terminal, a live line redrawn every second while a stage runs: elapsed time
    and the stage's counts so far (clusmar_beam.core.progress: rows read, rows scored,
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
    """Runs (or resumes) one round under the work directory's lock; see the module docstring."""

    def __init__(self, cfg: dict, round_arg: int | None, force: bool, recluster: bool, extra_beam: list[str],
                 skip_unreadable_labels: bool = False):
        self.cfg, self.force, self.recluster = cfg, force, recluster
        self.skip_unreadable_labels = skip_unreadable_labels
        self.workdir = cfg["workdir"]
        self.beam = beam_flags(cfg) + list(extra_beam)
        use_file_systems_with(PipelineOptions(self.beam))   # e.g. the config's --s3_endpoint_url
        self.round_arg = round_arg

    def round_dir(self, n: int) -> str:
        return stages.round_dir(self.workdir, n)

    def manifest_dir(self, n: int) -> str:
        return stages.manifest_dir(self.workdir, n)

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

    def run(self, break_lock: bool = False, log: str | None = None) -> dict:
        """The round under the lock; `log` (the log file of a detached run) is recorded in lock.json."""
        FileSystems.mkdirs(self.workdir) if not FileSystems.exists(self.workdir) else None
        load_state(self.workdir)   # an incompatible work directory is refused before anything is written
        lock = acquire_lock(self.workdir, self.round_arg, break_lock, log, PipelineOptions(self.beam))
        try:
            repairs = []
            self.state = load_state(self.workdir, repairs)
            if repairs:   # recovered, or rounds recorded complete: written back now, under the lock
                self._save()
            stages.remove_dead_temps(self.workdir)
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

    def _recorded(self, n: int) -> tuple[dict | None, dict, bool]:
        """(round n's record, or None when it is new or --force re-runs it; this config's round parameters;
        whether the record resumes with them). A record started with other settings is refused unless --force."""
        params = round_parameters(self.cfg)
        info = self.state["rounds"].get(str(n))
        if info is not None and info.get("status") == "completed":   # --force
            info = None
        if info is not None and info.get("parameters") != params and not self.force:
            changed = sorted(k for k in params if info.get("parameters", {}).get(k) != params[k])
            raise InputError(f"round {n} was started with different settings ({', '.join(changed)}); "
                             f"restore them, or pass --force to restart round {n} with the new config")
        return info, params, info is not None and info.get("parameters") == params

    def plan(self) -> dict:
        """What a run would do now, found without taking the lock or writing anything: the round, each stage
        (done, to run, or skipped, and why), the ids to exclude (every labels file and earlier manifest is
        read, so a damaged one shows now rather than in the night), and who holds the lock."""
        self.state = load_state(self.workdir)
        n = self._pick_round()
        plan = {"round": n if n is not None else self.round_arg, "workdir": self.workdir,
                "lock": read_holder(self.workdir) or None}
        if n is None:
            info = self.state["rounds"][str(self.round_arg)]
            return {**plan, "already_complete": True, "manifest": info["manifest"]}
        cfg = self.cfg
        info, _, resuming = self._recorded(n)
        done = {s for s in STAGES if resuming and info["stages"].get(s, {}).get("status") == "done"}
        info = info if resuming else {"stages": {}}
        need_cluster = cfg["strategy"] == "cluster-margin" and stages.must_cluster(cfg, self.state, info,
                                                                                   self.recluster)
        todo = {}
        todo["score"] = "done" if "score" in done else (
            "skipped: no model" if cfg["model"] is None else f"run {cfg['model']}"
            + (" with embeddings" if need_cluster and not separate_embedding_model(cfg) else ""))
        todo["cluster"] = "done" if "cluster" in done else (
            f"skipped: strategy {cfg['strategy']}" if cfg["strategy"] != "cluster-margin" else
            "run" if need_cluster else f"reuse the clusters of round {self.state['clustering']['round']}")
        if "exclude" in done:
            todo["exclude"] = "done"
        else:
            found = stages.read_excluded(cfg, self.state, n, self.skip_unreadable_labels)
            todo["exclude"] = (f"{len(found['labeled'])} labeled ids, {len(np.unique(found['sent']))} sent in "
                               f"earlier manifests")
            if found["skipped_labels"]:
                todo["exclude"] += f", {len(found['skipped_labels'])} unreadable labels files skipped"
                plan["skipped_labels"] = found["skipped_labels"]
        todo["select"] = "done" if "select" in done else (
            f"{cfg['strategy']}, k_t {cfg['batch_size']} -> {self.manifest_dir(n)}")
        return {**plan, "resuming": resuming, "stages": todo}

    def _run_round(self, n: int) -> dict:
        key = str(n)
        info, params, resumable = self._recorded(n)
        if self.force and key in self.state["rounds"] and info is None:
            LOG.info("[round %d] --force: re-running the completed round", n)
        # Labels and earlier manifests are read before anything changes (state.json, --force's markers): a
        # damaged file is one error naming it, and the next run is the same run.
        found = None
        if not (resumable and info["stages"].get("exclude", {}).get("status") == "done"):
            found = stages.read_excluded(self.cfg, self.state, n, self.skip_unreadable_labels)
        if info is None or info.get("parameters") != params:
            info = {"round": n, "status": "running", "started_at": now(), "parameters": params,
                    "model": self.cfg["model"], "pool": self.cfg["pool"], "stages": {},
                    "manifest": self.manifest_dir(n), "attempts": 0}
            force_outputs = self.force
            if self.force:   # the old outputs stop counting as complete now, so a crash cannot revive them
                for stage_dir in ("scores", "manifest"):
                    marker = FileSystems.join(self.round_dir(n), stage_dir, storage.SUCCESS)
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
        cfg, beam = self.cfg, self.beam
        need_cluster = cfg["strategy"] == "cluster-margin" and stages.must_cluster(cfg, self.state, info,
                                                                                   self.recluster)
        with_embeddings = need_cluster and not separate_embedding_model(cfg)
        score = info["stages"].get("score", {})
        if with_embeddings and cfg["model"] and score.get("status") == "done" and not score.get("with_embeddings"):
            info["stages"].pop("score")   # scored without embeddings earlier, but now this round must cluster
        self._stage(n, info, "score", lambda: stages.score(cfg, beam, n, with_embeddings, force_outputs))
        self._stage(n, info, "cluster", lambda: stages.cluster(cfg, beam, self.state, n, need_cluster))
        self._stage(n, info, "exclude", lambda: stages.exclude(cfg, n, found))
        self._stage(n, info, "select", lambda: stages.select(cfg, beam, n, info["stages"]["exclude"].get("path"),
                                                             force_outputs))
        sel = info["stages"]["select"]
        mark_complete(info)
        self._save()
        print(f"clusmar round: round {n} complete: {sel['selected']} selected -> {info['manifest']}")
        for skipped in info["stages"]["exclude"].get("skipped_labels", []):
            print(f"clusmar round: round {n} warning: labels file skipped as unreadable: {skipped['file']} "
                  f"({skipped['error']})")
        for warning in sel.get("warnings", []):
            print(f"clusmar round: round {n} warning: {warning}")
        return info

    def _stage(self, n: int, info: dict, name: str, work) -> None:
        """Runs a stage unless state.json has it done; its result, or its failure, goes to state.json."""
        stage = info["stages"].get(name, {})
        if stage.get("status") == "done":
            LOG.info("[round %d] %s: done earlier, skipping", n, name)
            return
        LOG.info("[round %d] %s: start", n, name)
        t0 = time.time()
        if name in ("score", "cluster", "select"):   # the pipelines: `clusmar status` shows which one is running
            info["stages"][name] = {"status": "running", "started_at": now()}
            self._save()
        ticker = _Ticker(f"[round {n}] {name}")
        try:
            _fault(name, "before")
            result = work() or {}
            _fault(name, "after")
        except BaseException as exc:
            ticker.stop()
            info["stages"][name] = {"status": "failed", "failed_at": now(), "elapsed_s": round(time.time() - t0, 2),
                                    "error": (str(exc).splitlines() or [type(exc).__name__])[0][:500]}
            try:
                self._save()
            except Exception:
                pass
            LOG.error("[round %d] %s: failed after %.1f s; the next run resumes here", n, name, time.time() - t0)
            raise
        ticker.stop()
        elapsed = round(time.time() - t0, 2)
        info["stages"][name] = {"status": "done", "finished_at": now(), "elapsed_s": elapsed, **result}
        self._save()
        counts = ", ".join(f"{k} {v}" for k, v in result.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool))
        LOG.info("[round %d] %s: done in %.1f s%s", n, name, elapsed, f" ({counts})" if counts else "")


def run_round(config_path: str, round_arg: int | None = None, force: bool = False, recluster: bool = False,
              break_lock: bool = False, extra_beam=(), skip_unreadable_labels: bool = False,
              log: str | None = None) -> dict:
    cfg = load_config(config_path)
    return Round(cfg, round_arg, force, recluster, list(extra_beam), skip_unreadable_labels).run(break_lock, log)


def plan_round(config_path: str, round_arg: int | None = None, force: bool = False, recluster: bool = False,
               extra_beam=(), skip_unreadable_labels: bool = False) -> dict:
    """Round.plan for a config: what `clusmar round --dry-run` prints."""
    cfg = load_config(config_path)
    return Round(cfg, round_arg, force, recluster, list(extra_beam), skip_unreadable_labels).plan()

"""state.json: the record of every round.

No moment exists without a readable state: before state.json is replaced
(write, delete, rename), the current one is copied to state.previous.json. A
run that finds state.json missing recovers from state.previous.json, one save
behind, which is safe because every stage reuses its finished outputs. A work
directory that has sent manifests but no state at all is refused rather than
started over at round 1, which would send the same ids again.
"""
from __future__ import annotations

import datetime
import logging

from apache_beam.io.filesystems import FileSystems

from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")
STATE_FORMAT = "clusmar-round-state"
STATE_VERSION = 1


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_path(workdir: str) -> str:
    return FileSystems.join(workdir, "state.json")


def previous_state_path(workdir: str) -> str:
    return FileSystems.join(workdir, "state.previous.json")


def load_state(workdir: str, repairs: list | None = None) -> dict:
    """The state, or a fresh one; a file that is not ours (or of another version) is refused, never rewritten.

    Rounds whose selection is recorded done are returned complete (complete_selected_rounds), so every
    reader (a run, its dry run, status, report) sees the same rounds. What differs from state.json (that
    and a recovery from state.previous.json) is added to `repairs`, for a run to save.
    """
    repairs = [] if repairs is None else repairs
    path = state_path(workdir)
    if not FileSystems.exists(path):
        previous = previous_state_path(workdir)
        if FileSystems.exists(previous):
            LOG.warning("%s is missing (a run stopped while replacing it); recovering from %s, one save behind: "
                        "the round it records resumes and reuses its finished outputs", path, previous)
            repairs.append("recovered from state.previous.json")
            return _completed(_read_state(previous), repairs)
        sent = _sent_manifests(workdir)
        if sent:
            raise InputError(f"{workdir}: {len(sent)} round manifests were sent out (e.g. {sent[0]}) but there is no "
                             "state.json or state.previous.json; refusing to start over at round 1, which would "
                             "select those ids again. Restore state.json from a backup (or object versioning), or "
                             "list the sent manifests' ids in the labels glob and use a new work directory")
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "created_at": now(), "clustering": None,
                "rounds": {}}
    return _completed(_read_state(path), repairs)


def _completed(state: dict, repairs: list) -> dict:
    finished = complete_selected_rounds(state)
    if finished:
        LOG.warning("round %s: the selection was done but the round not recorded complete (a run stopped before "
                    "its last save); recorded now", ", ".join(map(str, finished)))
        repairs.append(f"rounds {finished} recorded complete")
    return state


def _read_state(path: str) -> dict:
    try:
        state = storage.read_json(path)
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


def _sent_manifests(workdir: str) -> list[str]:
    pattern = FileSystems.join(workdir, "rounds", "round-*", "manifest", "manifest.json")
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:   # nothing there (some file systems raise instead of matching nothing)
        return []


def save_state(workdir: str, state: dict) -> None:
    state["updated_at"] = now()
    path = state_path(workdir)
    if FileSystems.exists(path):
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            storage.write_bytes_atomic(previous_state_path(workdir), handle.read())
    storage.write_json_atomic(path, state)


def mark_complete(info: dict) -> None:
    """Record a round whose selection is done as complete: its manifest and counts."""
    sel = info["stages"]["select"]
    info.update(status="completed", completed_at=sel.get("finished_at") or now(), selected=sel["selected"],
                manifest_files=sel["files"], elapsed_s=round(sum(
                    s.get("elapsed_s", 0) for s in info["stages"].values()), 1))


def complete_selected_rounds(state: dict) -> list[int]:
    """Mark complete the rounds whose select stage is recorded done but the round is not: a run stopped
    between the two saves, or the state was recovered from state.previous.json, one save behind.
    Returns their numbers."""
    found = []
    for key, info in state["rounds"].items():
        if info.get("status") != "completed" and info.get("stages", {}).get("select", {}).get("status") == "done":
            mark_complete(info)
            found.append(int(key))
    return sorted(found)


def completed_rounds(state: dict) -> list[int]:
    return sorted(int(r) for r, info in state["rounds"].items() if info.get("status") == "completed")

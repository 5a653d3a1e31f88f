"""state.json: the record of every round, written atomically so a crash leaves the old one whole."""
from __future__ import annotations

import datetime

from apache_beam.io.filesystems import FileSystems

from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

STATE_FORMAT = "clusmar-round-state"
STATE_VERSION = 1


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_path(workdir: str) -> str:
    return FileSystems.join(workdir, "state.json")


def load_state(workdir: str) -> dict:
    """The state, or a fresh one; a file that is not ours (or of another version) is refused, never rewritten."""
    path = state_path(workdir)
    if not FileSystems.exists(path):
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "created_at": now(), "clustering": None,
                "rounds": {}}
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


def save_state(workdir: str, state: dict) -> None:
    state["updated_at"] = now()
    storage.write_json_atomic(state_path(workdir), state)


def completed_rounds(state: dict) -> list[int]:
    return sorted(int(r) for r, info in state["rounds"].items() if info.get("status") == "completed")

"""lock.json: one run at a time per work directory, since two would select the same ids."""
from __future__ import annotations

import json
import logging
import os
import socket
import uuid

from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app.rounds.state import now
from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")


class LockHeld(InputError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(workdir: str, round_index, break_lock: bool) -> dict:
    """Our lock record; a holder on this host whose process is gone is stale and taken over."""
    path = FileSystems.join(workdir, "lock.json")
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now(), "round": round_index,
            "token": uuid.uuid4().hex}
    if FileSystems.exists(path):
        try:
            holder = storage.read_json(path)
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
        storage.write_bytes_atomic(path, payload)
        if storage.read_json(path).get("token") != mine["token"]:
            raise LockHeld(f"{workdir} was locked by another run just now ({path})")
    return mine


def release_lock(workdir: str, mine: dict) -> None:
    path = FileSystems.join(workdir, "lock.json")
    try:
        if FileSystems.exists(path) and storage.read_json(path).get("token") == mine["token"]:
            FileSystems.delete([path])
    except Exception as exc:  # never hide the run's own error behind this one
        LOG.warning("round: could not remove %s: %s", path, exc)

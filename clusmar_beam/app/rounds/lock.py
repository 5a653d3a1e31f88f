"""lock.json: one run at a time per work directory, since two would select the same ids."""
from __future__ import annotations

import fcntl
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
    """Our lock record; a holder on this host whose process is gone is stale and taken over.

    On a local (or mounted) work directory the run also holds an OS lock on
    WORKDIR/.lock for its whole life: the kernel drops it when the process dies,
    and only its holder may judge lock.json stale and replace it, so two
    recoveries cannot both take over. On object stores lock.json alone is a
    best-effort lock (write, then check that ours stuck).
    """
    path = FileSystems.join(workdir, "lock.json")
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now(), "round": round_index,
            "token": uuid.uuid4().hex}
    local = "://" not in path
    os_lock = _os_lock(workdir, path) if local else None
    try:
        if FileSystems.exists(path):
            _judge_holder(workdir, path, mine, break_lock)
        payload = (json.dumps(mine, indent=2) + "\n").encode()
        storage.write_bytes_atomic(path, payload)
        if not local and storage.read_json(path).get("token") != mine["token"]:
            raise LockHeld(f"{workdir} was locked by another run just now ({path})")
    except BaseException:
        if os_lock is not None:
            os.close(os_lock)
        raise
    mine["os_lock"] = os_lock
    return mine


def _os_lock(workdir: str, path: str) -> int:
    """An exclusive OS lock on WORKDIR/.lock, or LockHeld naming the running holder."""
    fd = os.open(os.path.join(workdir, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(f"{workdir} is locked by a running process ({_describe(_read_holder(path))}); "
                       "--break-lock cannot take the lock of a live run") from None
    return fd


def _read_holder(path: str) -> dict:
    try:
        return storage.read_json(path) if FileSystems.exists(path) else {}
    except Exception:
        return {}


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
            f", round {holder.get('round', '?')}")


def _judge_holder(workdir: str, path: str, mine: dict, break_lock: bool) -> None:
    """Return when lock.json's holder may be replaced; otherwise LockHeld."""
    holder = _read_holder(path)
    desc = _describe(holder)
    stale = holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) \
        and not _pid_alive(holder["pid"])
    if break_lock:
        LOG.warning("round: breaking the lock held by %s", desc)
    elif stale:
        LOG.warning("round: the lock's holder (%s) is no longer running on this host; taking over", desc)
    else:
        raise LockHeld(f"{workdir} is locked by another run ({desc}); if that run is dead, pass --break-lock "
                       f"(or delete {path})")


def release_lock(workdir: str, mine: dict) -> None:
    path = FileSystems.join(workdir, "lock.json")
    try:
        if FileSystems.exists(path) and storage.read_json(path).get("token") == mine["token"]:
            FileSystems.delete([path])
    except Exception as exc:  # never hide the run's own error behind this one
        LOG.warning("round: could not remove %s: %s", path, exc)
    finally:
        if mine.get("os_lock") is not None:
            os.close(mine["os_lock"])   # releases the OS lock

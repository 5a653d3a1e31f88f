"""lock.json: one run at a time per work directory, since two would select the same ids."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app.rounds import conditional
from clusmar_beam.app.rounds.state import now
from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")


# The holder renews lock.json every RENEW_SECONDS while it runs; a lock not renewed for LEASE_SECONDS is stale
# on any host, since a killed pod or a preempted VM never comes back to release it (and a new pod has a new
# host name, so "same host, process gone" cannot tell).
LEASE_SECONDS = 900
RENEW_SECONDS = 60


class LockHeld(InputError):
    pass


def _process_start(pid: int) -> str | None:
    """When the process started (boot id and start time in clock ticks): a pid reused by another process, as
    in a container restarted in the same pod, has another. None where /proc cannot tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot, open(f"/proc/{pid}/stat") as stat:
            return f"{boot.read().strip()}:{stat.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return None


def _holder_gone(holder: dict) -> bool | None:
    """Whether lock.json's holder process is gone: None when it ran on another host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    if not _pid_alive(holder["pid"]):
        return True
    return holder.get("process_start") is not None and _process_start(holder["pid"]) != holder["process_start"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(workdir: str, round_index, break_lock: bool, log: str | None = None, options=None) -> dict:
    """Our lock record, renewed from a thread until release_lock. A holder is stale, and taken over, when it
    ran on this host and its process is gone, or when nobody renewed it for LEASE_SECONDS.

    On a local (or mounted) work directory the run also holds an OS lock on
    WORKDIR/.lock for its whole life: the kernel drops it when the process dies,
    and only its holder may judge lock.json stale and replace it, so two
    recoveries cannot both take over. On S3 and GCS lock.json is written with the
    store's conditional writes (create only if absent; replace a stale holder only
    if it is still the one judged stale), so there too one of two runs wins. On
    other object stores, or without the store's client, it is a best-effort lock
    (write, then check that ours stuck).
    `options` (Beam's) configure the S3 client.
    """
    path = FileSystems.join(workdir, "lock.json")
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now(), "round": round_index,
            "token": uuid.uuid4().hex, "renewed_at": time.time(), "process_start": _process_start(os.getpid()),
            **({"log": log} if log else {})}
    payload = _payload(mine)
    local = "://" not in path
    if not local and path.split("://")[0] in conditional.SCHEMES:
        try:
            version = conditional.version(path, options)
        except conditional.Unavailable as exc:
            LOG.warning("round: %s; the lock on %s is best effort", exc, workdir)
        else:
            if version is not None:
                _judge_holder(workdir, path, mine, break_lock)
            if not conditional.put_if(path, payload, version, options):
                raise LockHeld(f"{workdir} was locked by another run just now ({_describe(_read_holder(path))})")
            mine.update(os_lock=None, conditional=True)
            mine["lease"] = _Lease(path, mine, options)
            return mine
    os_lock = _os_lock(workdir, path) if local else None
    try:
        if FileSystems.exists(path):
            _judge_holder(workdir, path, mine, break_lock)
        storage.write_bytes_atomic(path, payload)
        if not local and storage.read_json(path).get("token") != mine["token"]:
            raise LockHeld(f"{workdir} was locked by another run just now ({path})")
    except BaseException:
        if os_lock is not None:
            os.close(os_lock)
        raise
    mine["os_lock"] = os_lock
    mine["lease"] = _Lease(path, mine, options)
    return mine


def _payload(mine: dict) -> bytes:
    return (json.dumps({k: v for k, v in mine.items() if k not in ("os_lock", "lease", "conditional")}, indent=2)
            + "\n").encode()


class _Lease:
    """Renews our lock.json from a daemon thread every RENEW_SECONDS until stopped; a renewal that finds the
    lock taken (broken, or judged stale) logs it and stops."""

    def __init__(self, path: str, mine: dict, options, every: float = RENEW_SECONDS):
        self.path, self.mine, self.options, self.every = path, mine, options, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="clusmar-lock-lease", daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopped.wait(self.every):
            try:
                if not self.renew():
                    LOG.error("round: the lock on %s was taken by another run (%s); this run no longer holds it",
                              self.path, _describe(_read_holder(self.path)))
                    return
            except Exception as exc:   # a store hiccup: try again at the next renewal
                LOG.warning("round: could not renew %s: %s", self.path, exc)

    def renew(self) -> bool:
        """Write a new renewed_at if the lock is still ours; False if it is not."""
        conditional_store = bool(self.mine.get("conditional"))
        version = conditional.version(self.path, self.options) if conditional_store else None
        if _read_holder(self.path).get("token") != self.mine["token"]:
            return False
        self.mine["renewed_at"] = time.time()
        if conditional_store:
            return conditional.put_if(self.path, _payload(self.mine), version, self.options)
        storage.write_bytes_atomic(self.path, _payload(self.mine))
        return True

    def stop(self):
        self.stopped.set()
        self.thread.join()


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


def read_holder(workdir: str) -> dict:
    """lock.json's holder ({} when free), with `alive`: whether its process runs, when that can be told (it ran
    on this host, or its lease ran out), else None."""
    holder = _read_holder(FileSystems.join(workdir, "lock.json"))
    if holder:
        gone = _holder_gone(holder)
        holder = {key: value for key, value in holder.items() if key != "token"}
        renewed = holder.get("renewed_at")
        expired = isinstance(renewed, (int, float)) and time.time() - renewed > LEASE_SECONDS
        holder["alive"] = (not gone) if gone is not None else (False if expired else None)
    return holder


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"
            f", round {holder.get('round', '?')}")


def _judge_holder(workdir: str, path: str, mine: dict, break_lock: bool) -> None:
    """Return when lock.json's holder may be replaced; otherwise LockHeld."""
    holder = _read_holder(path)
    desc = _describe(holder)
    gone = _holder_gone(holder)
    renewed = holder.get("renewed_at")
    silent = time.time() - renewed if isinstance(renewed, (int, float)) else None
    if break_lock:
        LOG.warning("round: breaking the lock held by %s", desc)
    elif gone:
        LOG.warning("round: the lock's holder (%s) is no longer running on this host; taking over", desc)
    elif silent is not None and silent > LEASE_SECONDS:
        LOG.warning("round: the lock's holder (%s) has not renewed it for %.0f s (lease %d s); taking over",
                    desc, silent, LEASE_SECONDS)
    else:
        raise LockHeld(f"{workdir} is locked by another run ({desc}); if that run is dead, pass --break-lock "
                       f"(or delete {path})")


def release_lock(workdir: str, mine: dict) -> None:
    path = FileSystems.join(workdir, "lock.json")
    if mine.get("lease") is not None:
        mine["lease"].stop()
    try:
        if FileSystems.exists(path) and storage.read_json(path).get("token") == mine["token"]:
            FileSystems.delete([path])
    except Exception as exc:  # never hide the run's own error behind this one
        LOG.warning("round: could not remove %s: %s", path, exc)
    finally:
        if mine.get("os_lock") is not None:
            os.close(mine["os_lock"])   # releases the OS lock

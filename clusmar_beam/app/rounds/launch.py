"""`clusmar round --detach`: submit the round and return, leaving it to a background process.

The round's stages are consecutive pipelines whose driver must wait on each; the
background process is that driver, in a session of its own so that it outlives
the shell (and the scheduler task) that started it. The command returns once the
process holds the work directory's lock, so `clusmar status` shows the round
running (stage, pid, host, log), or at once with the process's own error when it
stops before that (a held lock, a bad config, a round already complete).
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time

from clusmar_beam.app.rounds.lock import read_holder
from clusmar_beam.core.errors import InputError


def default_log_path() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"clusmar-round-{stamp}-{os.getpid()}.log")


def detach(argv: list[str], workdir: str, log: str, wait_seconds: float = 300.0) -> dict:
    """Start `clusmar round ARGV --log-file LOG` in the background; returns {"pid", "log", "started"}."""
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    command = [sys.executable, "-m", "clusmar_beam.app.cli", "round", *argv, "--log-file", log]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "CLUSMAR_NO_PROGRESS": "1"})
    deadline = time.time() + wait_seconds
    while time.time() < deadline:
        code = process.poll()
        if code is not None:
            last = _last_lines(log)
            if code == 0:   # nothing to do (the round was complete), or done already
                print(last)
                return {"pid": process.pid, "log": log, "started": False, "exit_code": 0}
            raise InputError(f"the background round stopped at once (exit {code}): {last} (log: {log})")
        if read_holder(workdir).get("pid") == process.pid:
            print(f"clusmar round: running in the background: pid {process.pid}, log {log}; "
                  f"`clusmar status --workdir {workdir}` follows it")
            return {"pid": process.pid, "log": log, "started": True}
        time.sleep(0.5)
    print(f"clusmar round: started in the background (pid {process.pid}, log {log}) but it has not taken the "
          f"lock after {wait_seconds:.0f} s; `clusmar status --workdir {workdir}` will show it")
    return {"pid": process.pid, "log": log, "started": None}


def _last_lines(path: str, count: int = 3) -> str:
    with open(path, errors="replace") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(no output)"

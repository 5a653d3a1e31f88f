"""The rows and the table of `clusmar status`, read from state.json only (no run is needed)."""
from __future__ import annotations

import posixpath

from apache_beam.io.filesystems import FileSystems

from clusmar_beam.app.rounds.lock import read_holder
from clusmar_beam.app.rounds.stages import STAGES
from clusmar_beam.app.rounds.state import load_state, previous_state_path, state_path
from clusmar_beam.core.errors import InputError


def next_round(workdir: str) -> int:
    """The round `clusmar round` without --round would run: the first unfinished one, else the next."""
    state = load_state(workdir.rstrip("/"))   # a fresh state in a new directory; refuses one that lost its state
    rounds = {int(k): info for k, info in state["rounds"].items()}
    unfinished = sorted(n for n, info in rounds.items() if info.get("status") != "completed")
    return unfinished[0] if unfinished else max(rounds, default=0) + 1


def status_rows(workdir: str) -> list[dict]:
    workdir = workdir.rstrip("/")
    if not FileSystems.exists(state_path(workdir)) and not FileSystems.exists(previous_state_path(workdir)):
        raise InputError(f"--workdir {workdir!r}: no state.json (not a `clusmar round` work directory, "
                         "or no round has started yet)")
    state = load_state(workdir)
    holder = read_holder(workdir)
    live = bool(holder) and holder.get("alive") is not False
    rows = []
    for key in sorted(state["rounds"], key=int):
        info = state["rounds"][key]
        stages = info.get("stages", {})
        done = [s for s in STAGES if stages.get(s, {}).get("status") == "done"]
        failed = [s for s in STAGES if stages.get(s, {}).get("status") == "failed"]
        running = [s for s in STAGES if stages.get(s, {}).get("status") == "running"]
        status = info.get("status")
        if status != "completed":
            if failed:
                status = f"failed in {failed[0]}"
            elif running:
                status = f"running {running[0]}" if live else f"stopped in {running[0]}"
            elif not live:
                status = "stopped"
            status += f" ({'/'.join(done) or 'no stage'} done)"
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


def describe_lock(workdir: str) -> str | None:
    """One line on the run holding the work directory, if any."""
    holder = read_holder(workdir)
    if not holder:
        return None
    where = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}"
    log = f"; log: {holder['log']}" if holder.get("log") else ""
    if holder.get("alive") is False:
        return f"lock.json is held by a run that is no longer running ({where}): the next run takes it over"
    return f"a run holds the work directory ({where}{log})"


def format_status(workdir: str) -> str:
    rows = status_rows(workdir)
    lock = describe_lock(workdir)
    if not rows:
        return f"{workdir}: no rounds yet" + (f"\n{lock}" if lock else "")
    headers = ["round", "status", "model", "pool", "labeled", "selected", "when", "where"]
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines + ([lock] if lock else []))

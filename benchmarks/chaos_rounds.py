"""Rounds driven like a scheduler does, with the faults a scheduler meets injected between and inside them.

Each iteration asks `clusmar status --next-round` for the round and runs `clusmar round --round N`, after one
fault drawn at random: the run SIGKILLed (with its whole process group) while a given stage runs, a labels
file truncated, state.json deleted (a run killed while replacing it), several runs started at once, or none.
After each completed round the labelers answer part of its manifest. At the end: every round complete, no id
sent twice, no labeled id sent again, and the next round is the one after the last.

    .venv/bin/python benchmarks/chaos_rounds.py --workdir /tmp/chaos --rounds 6 --seed 1
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLUSMAR = [sys.executable, "-m", "clusmar_beam.app.cli"]
ENV = {**os.environ, "CLUSMAR_NO_PROGRESS": "1"}


def clusmar(*argv, check=True):
    run = subprocess.run([*CLUSMAR, *argv], capture_output=True, text=True, env=ENV)
    if check and run.returncode != 0:
        raise SystemExit(f"clusmar {' '.join(argv)} exited {run.returncode}: {run.stderr[-2000:]}")
    return run


def state(workdir):
    path = os.path.join(workdir, "state.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def manifest_ids(workdir, n):
    import tensorflow as tf
    directory = os.path.join(workdir, "rounds", f"round-{n:04d}", "manifest")
    files = sorted(f for f in os.listdir(directory) if f.startswith("manifest-"))
    ids = []
    for record in tf.data.TFRecordDataset([os.path.join(directory, f) for f in files]):
        ids.append(tf.train.Example.FromString(record.numpy()).features.feature["id"].int64_list.value[0])
    return ids


def kill_during(config, n, workdir, stage, rng):
    """Start the round, SIGKILL its process group once `stage` runs (or after a random delay)."""
    process = subprocess.Popen([*CLUSMAR, "round", "--config", config, "--round", str(n)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    delay = rng.uniform(0.0, 0.8)
    seen = None
    while time.time() < deadline and process.poll() is None:
        stages = state(workdir).get("rounds", {}).get(str(n), {}).get("stages", {})
        if stages.get(stage, {}).get("status") == "running":
            seen = seen or time.time()
            if time.time() - seen > delay:
                break
        time.sleep(0.05)
    if process.poll() is not None:
        return f"finished before it could be killed in {stage}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"killed in {stage}" if seen else f"killed before {stage} started"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-examples", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=300)
    parser.add_argument("--faults", default="none,kill,kill,kill,corrupt-labels,lose-state,concurrent",
                        help="the faults drawn from, with repeats as weights")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    root = os.path.abspath(args.workdir)
    pool = os.path.join(root, "pool")
    if not os.path.exists(os.path.join(pool, "_SUCCESS")):
        clusmar("generate-pool", "--output", pool, "--num-examples", str(args.num_examples), "--dim", str(args.dim),
                "--num-classes", "6", "--seed", str(args.seed), "--region-sizes", "heavy-tailed", "--num-shards", "3")
    workdir = os.path.join(root, "al")
    config = os.path.join(root, "round.yaml")
    with open(config, "w") as out:
        out.write(f"pool: {pool}/pool-*.parquet\nworkdir: {workdir}\nbatch_size: {args.batch_size}\n"
                  f"candidate_multiplier: 4\ntarget_mean_cluster_size: 5\nseed: {args.seed}\n")
    labels = os.path.join(workdir, "labels")
    faults = []
    started = time.time()
    while True:
        n = int(clusmar("status", "--workdir", workdir, "--next-round").stdout.strip())
        if n > args.rounds:
            break
        fault = rng.choice(args.faults.split(","))
        if fault == "kill":
            clustered = state(workdir).get("clustering") is not None
            stage = "select" if clustered else rng.choice(["cluster", "select"])
            faults.append((n, kill_during(config, n, workdir, stage, rng)))
        elif fault == "corrupt-labels" and os.path.isdir(labels) and "exclude" not in [   # read by this run
                s for s, v in state(workdir).get("rounds", {}).get(str(n), {}).get("stages", {}).items()
                if v.get("status") == "done"]:
            bad = os.path.join(labels, f"late-{n}.parquet")
            good = sorted(os.listdir(labels))[0]
            data = open(os.path.join(labels, good), "rb").read()
            open(bad, "wb").write(data[: len(data) // 2])
            before = open(os.path.join(workdir, "state.json"), "rb").read()
            run = clusmar("round", "--config", config, "--round", str(n), check=False)
            assert run.returncode == 2 and bad in run.stderr, run.stderr
            assert open(os.path.join(workdir, "state.json"), "rb").read() == before
            os.remove(bad)   # someone finds the file and removes it
            faults.append((n, "truncated labels file: refused, state unchanged"))
        elif fault == "lose-state" and os.path.exists(os.path.join(workdir, "state.json")):
            os.remove(os.path.join(workdir, "state.json"))   # then the round runs as usual
            clusmar("round", "--config", config, "--round", str(n))
            faults.append((n, "state.json deleted before the run: recovered"))
        elif fault == "concurrent":
            runs = [subprocess.Popen([*CLUSMAR, "round", "--config", config, "--round", str(n)], env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
            codes = sorted(p.wait() for p in runs)
            faults.append((n, f"3 runs at once: exit codes {codes}"))
            assert codes[0] == 0 and set(codes) <= {0, 2}, codes   # one runs; the others are refused or find it done
        else:
            clusmar("round", "--config", config, "--round", str(n))
            faults.append((n, "none"))
        answer = os.path.join(labels, f"labels-round-{n}.parquet")
        if state(workdir).get("rounds", {}).get(str(n), {}).get("status") == "completed" \
                and not os.path.exists(answer):
            ids = np.array(manifest_ids(workdir, n), dtype=np.int64)
            answered = ids[: int(len(ids) * rng.uniform(0.3, 0.9))]
            os.makedirs(labels, exist_ok=True)
            pq.write_table(pa.table({"id": answered, "label": answered % 6}), answer)
    sent = [i for n in range(1, args.rounds + 1) for i in manifest_ids(workdir, n)]
    final = state(workdir)
    complete = all(final["rounds"][str(n)]["status"] == "completed" for n in range(1, args.rounds + 1))
    for n, what in faults:
        print(f"round {n}: {what}")
    print(f"{args.rounds} rounds complete: {complete}; ids sent {len(sent)}, distinct {len(set(sent))}; "
          f"next round {clusmar('status', '--workdir', workdir, '--next-round').stdout.strip()}; "
          f"{time.time() - started:.0f} s")
    assert complete and len(sent) == len(set(sent)) == args.rounds * args.batch_size


if __name__ == "__main__":
    main()

"""`clusmar round`: one whole active-learning round from a config file.

Scores the pool with the round's model (when the config names one), clusters it once
(reused by later rounds), excludes every id already labeled or sent out, selects the
batch and writes the manifest, doing only what is missing. State, labels, clusters and
manifests live in the config's work directory; see clusmar_beam.app.rounds for the layout and
the config keys. `clusmar status --workdir DIR` prints a table of the rounds.
"""
from __future__ import annotations

import sys

from clusmar_beam.app import rounds
from clusmar_beam.app.rounds import launch
from clusmar_beam.pipelines.options import SubcommandOptions, _parser, parse_options, require


class RoundOptions(SubcommandOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--config", help="round config, YAML or JSON (keys: see clusmar_beam.app.rounds)")
        parser.add_argument("--round", dest="round_index", type=int,
                            help="the round to run (default: resume the unfinished round, else the next one); "
                                 "a completed round is not run again")
        parser.add_argument("--force", action="store_true",
                            help="re-run the latest completed round (its manifest is replaced), or restart an "
                                 "unfinished round with changed settings")
        parser.add_argument("--recluster", action="store_true", help="cluster the pool again in this round")
        parser.add_argument("--break-lock", dest="break_lock", action="store_true",
                            help="take the work directory's lock even if another run seems to hold it")
        parser.add_argument("--skip-unreadable-labels", dest="skip_unreadable_labels", action="store_true",
                            help="leave out a labels file that cannot be read, with a warning (recorded in "
                                 "state.json), instead of stopping; its ids stay excluded as sent")
        parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                            help="print what the run would do (round, stages, ids to exclude, lock) and exit; "
                                 "reads every labels file and earlier manifest, writes nothing, takes no lock")
        parser.add_argument("--detach", action="store_true",
                            help="submit and return: run the round in a background process and exit once it "
                                 "holds the work directory's lock (`clusmar status` then shows it running)")
        parser.add_argument("--log-file", dest="log_file",
                            help="with --detach: the background run's log (default: a new file in the temp "
                                 "directory); recorded in lock.json")


def _beam_argv(argv):
    own = [cls for cls in RoundOptions.mro() if "_add_argparse_args" in cls.__dict__
           and issubclass(cls, SubcommandOptions)]
    _, rest = _parser(own).parse_known_args(list(argv or []))
    return rest


def run(argv=None) -> dict:
    _, opts = parse_options(RoundOptions, argv)
    config = require(opts.config, "--config")
    beam_argv = _beam_argv(argv)
    if opts.dry_run:
        plan = rounds.plan_round(config, opts.round_index, opts.force, opts.recluster, beam_argv,
                                 opts.skip_unreadable_labels)
        print(_format_plan(plan))
        return plan
    if opts.detach:
        own = [a for a in _without(list(argv or []), "--log-file") if a != "--detach"]
        workdir = rounds.load_config(config)["workdir"]
        return launch.detach(own, workdir, opts.log_file or launch.default_log_path())
    return rounds.run_round(config, opts.round_index, opts.force, opts.recluster, opts.break_lock,
                            beam_argv, opts.skip_unreadable_labels, opts.log_file)


def _without(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _format_plan(plan: dict) -> str:
    lines = [f"clusmar round --dry-run: {plan['workdir']}"]
    if plan.get("already_complete"):
        lines.append(f"round {plan['round']} is already complete (manifest {plan['manifest']}); nothing to do")
    else:
        lines.append(f"round {plan['round']}" + (" (resuming)" if plan["resuming"] else ""))
        lines += [f"  {stage:8s} {what}" for stage, what in plan["stages"].items()]
        lines += [f"  unreadable labels file: {s['file']} ({s['error']})" for s in plan.get("skipped_labels", [])]
    lock = plan.get("lock")
    if lock:
        state = {True: "running", False: "no longer running", None: "on another host"}[lock.get("alive")]
        lines.append(f"lock: held by pid {lock.get('pid')} on {lock.get('host')} since {lock.get('started_at')} "
                     f"({state})")
    else:
        lines.append("lock: free")
    return "\n".join(lines)


if __name__ == "__main__":
    from clusmar_beam.app.cli import main
    sys.exit(main(["round"] + sys.argv[1:]))

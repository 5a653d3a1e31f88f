"""`clusmar status --workdir DIR`: a table of the work directory's active-learning rounds.

Columns: round, status (and the stages done of an unfinished round), model, pool size,
labels back when the round started, selected, when (completed, or started), where (the
manifest directory). --json prints state.json's rounds instead.
"""
from __future__ import annotations

import json
import sys

from clusmar_beam.app import rounds
from clusmar_beam.pipelines.options import SubcommandOptions, parse_options, require


class StatusOptions(SubcommandOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--workdir", help="the work directory of `clusmar round`")
        parser.add_argument("--json", dest="as_json", action="store_true", help="print the rounds as JSON")
        parser.add_argument("--next-round", dest="next_round", action="store_true",
                            help="print only the round a scheduler should run next: the unfinished one, else the "
                                 "one after the last completed (1 in a new work directory)")


def run(argv=None) -> dict:
    _, opts = parse_options(StatusOptions, argv)
    workdir = require(opts.workdir, "--workdir").rstrip("/")
    if opts.next_round:
        n = rounds.next_round(workdir)
        print(n)
        return {"next_round": n}
    rows = rounds.status_rows(workdir)
    print(json.dumps(rows, indent=2) if opts.as_json else rounds.format_status(workdir))
    return {"rounds": rows}


if __name__ == "__main__":
    from clusmar_beam.app.cli import main
    sys.exit(main(["status"] + sys.argv[1:]))

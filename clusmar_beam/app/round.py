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


def _beam_argv(argv):
    own = [cls for cls in RoundOptions.mro() if "_add_argparse_args" in cls.__dict__
           and issubclass(cls, SubcommandOptions)]
    _, rest = _parser(own).parse_known_args(list(argv or []))
    return rest


def run(argv=None) -> dict:
    _, opts = parse_options(RoundOptions, argv)
    config = require(opts.config, "--config")
    return rounds.run_round(config, opts.round_index, opts.force, opts.recluster, opts.break_lock,
                            _beam_argv(argv))


if __name__ == "__main__":
    from clusmar_beam.app.cli import main
    sys.exit(main(["round"] + sys.argv[1:]))

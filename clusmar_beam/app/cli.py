"""The `clusmar` console script: one subcommand per pipeline.

Bad input ends with one line on stderr and exit status 2; the output directory
is left without its completion marker.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our one-line errors

from clusmar_beam.core.errors import input_error_message

SUBCOMMANDS = {
    "generate-pool": ("clusmar_beam.pipelines.generate_pool", "write a synthetic, web-like pool"),
    "cluster": ("clusmar_beam.pipelines.cluster", "average-linkage HAC of the pool's embeddings, cut at a distance"),
    "select": ("clusmar_beam.pipelines.select", "choose the next batch (cluster-margin, margin or random) and write the manifest"),
    "score": ("clusmar_beam.pipelines.score", "embeddings, probabilities and margins from a TensorFlow model"),
    "round": ("clusmar_beam.app.round", "one whole active-learning round from a config file (resumable)"),
    "status": ("clusmar_beam.app.status", "a table of the rounds in a `clusmar round` work directory"),
    "simulate": ("clusmar_beam.app.simulate", "replay active learning on a labelled pool: strategies side by side"),
    "report": ("clusmar_beam.app.report", "one offline HTML page for a simulation or a round work directory"),
}

USAGE = "usage: clusmar {" + ",".join(SUBCOMMANDS) + "} [flags] [Beam pipeline flags]\n\n" + "\n".join(
    f"  {name:14s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()) + \
    "\n\nEach subcommand takes --help, and the standard Beam flags (--runner, --direct_num_workers, ...)."


def _configure_logging():
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("clusmar").setLevel(logging.INFO)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if "--help" in rest or "-h" in rest:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        _print_help(name, module)
        return 0
    _configure_logging()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        module.run(rest)
    except Exception as exc:  # one clear line for bad input; a traceback for anything else
        message = input_error_message(exc)
        if message is None:
            raise
        print(f"clusmar {name}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _print_help(name, module):
    import argparse
    from clusmar_beam.pipelines.options import options_class_of
    options_class = options_class_of(module)
    parser = argparse.ArgumentParser(prog=f"clusmar {name}", description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Standard Beam pipeline flags (--runner, --direct_num_workers, ...) "
                                            "are accepted and passed to Beam.")
    for cls in reversed(options_class.mro()):
        if "_add_argparse_args" in cls.__dict__ and cls.__module__.startswith("clusmar_beam"):
            cls._add_argparse_args(parser)
    parser.print_help()


if __name__ == "__main__":
    sys.exit(main())

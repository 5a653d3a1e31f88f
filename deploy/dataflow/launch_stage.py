"""The Flex Template's program: one `clusmar` subcommand, its flags from the template parameters.

The template launcher passes every parameter as `--name=value` with the names of
metadata.json, which use underscores (`batch_size`); clusmar's own flags use dashes
(`--batch-size`), and its switches take no value. Beam's flags (runner, project,
region, temp_location, sdk_container_image, ...) pass through unchanged.
"""
import argparse
import importlib
import sys

from clusmar_beam.app import cli
from clusmar_beam.pipelines.options import options_class_of


def own_parser(subcommand: str) -> argparse.ArgumentParser:
    """A parser of the flags clusmar itself defines for a subcommand (not Beam's)."""
    module = importlib.import_module(cli.SUBCOMMANDS[subcommand][0])
    parser = argparse.ArgumentParser(add_help=False)
    for cls in options_class_of(module).mro():
        if "_add_argparse_args" in cls.__dict__ and cls.__module__.startswith("clusmar_beam"):
            cls._add_argparse_args(parser)
    return parser


def clusmar_argv(argv: list[str]) -> list[str]:
    """['--stage=select', '--batch_size=100000', '--runner=DataflowRunner', ...] -> clusmar's argv."""
    stage = next((a.split("=", 1)[1] for a in argv if a.startswith("--stage=")), None)
    if stage not in cli.SUBCOMMANDS:
        raise SystemExit(f"launch_stage: --stage must be one of {', '.join(cli.SUBCOMMANDS)} (got {stage!r})")
    actions = {option: action for action in own_parser(stage)._actions for option in action.option_strings}
    out = [stage]
    for arg in argv:
        if arg.startswith("--stage="):
            continue
        name, eq, value = arg.partition("=")
        if name not in actions and name.replace("_", "-") in actions:
            name = name.replace("_", "-")
        if name in actions and actions[name].nargs == 0:       # a switch: --overwrite=true -> --overwrite
            if value.lower() in ("true", "1", "yes", ""):
                out.append(name)
            continue
        out.append(f"{name}{eq}{value}")
    return out


if __name__ == "__main__":
    sys.exit(cli.main(clusmar_argv(sys.argv[1:])))

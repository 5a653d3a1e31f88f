"""Building and running pipelines the same way for every subcommand."""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, TestOptions

from clusmar_beam.core.errors import InputError
from clusmar_beam.transforms import storage

LOG = logging.getLogger("clusmar")


class SubcommandOptions(PipelineOptions):
    """Base of every subcommand's options class.

    Subcommand options derive from this flagless class rather than from
    PipelineOptions: Beam builds one parser from all *direct* subclasses of
    PipelineOptions, so subcommands may then reuse a flag name (--batch-size,
    --round) with their own meaning without clashing.
    """


class OutputOptions(SubcommandOptions):
    """Flags of every pipeline that writes an output directory."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--output", help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace a completed output directory")
        parser.add_argument("--seed", type=int, default=0, help="seed of every hash-based random choice")


class CommonOptions(OutputOptions):
    """Flags of the pipelines that read a pool and write an output directory."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--pool", help="glob of the pool (Parquet or TFRecord)")


def _parser(classes):
    from apache_beam.options.pipeline_options import _BeamArgumentParser
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in classes:
        cls._add_argparse_args(parser)
    return parser


def parse_options(options_class, argv):
    """(Beam's PipelineOptions, the subcommand's options) from argv, or from an instance of options_class.

    The subcommand's flags are parsed by its own class; only what is left goes
    to Beam, and anything Beam does not know either is an error, not a warning.
    Callers in this process (clusmar round) pass typed values instead,
    `SelectOptions(flags, pool=..., batch_size=...)`: its flags are checked and
    split the same way, and the values set on it are the subcommand's options.
    """
    given = None
    if isinstance(argv, options_class):
        given, argv = argv, list(argv._flags or [])  # the values set on it override its flags
    argv = list(argv or [])
    own = [cls for cls in options_class.mro()[:options_class.mro().index(PipelineOptions)]
           if "_add_argparse_args" in cls.__dict__]
    _, beam_argv = _parser(own).parse_known_args(argv)
    beam_classes = {str(cls): cls for cls in PipelineOptions.__subclasses__() if cls not in own}
    _, unknown = _parser(beam_classes.values()).parse_known_args(beam_argv)
    unknown = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    if unknown:
        raise InputError("unknown flag(s): " + ", ".join(unknown))
    options = PipelineOptions(beam_argv)
    use_file_systems_with(options)
    return options, given if given is not None else options_class(argv)


def use_file_systems_with(options: PipelineOptions) -> None:
    """Configure Beam's file systems from these flags for the reads and writes done outside a pipeline (schemas,
    summaries, state): a file system such as S3 is unusable until it has options, even empty ones."""
    from apache_beam.io.filesystems import FileSystems
    FileSystems.set_options(options)


def options_class_of(module):
    """The subcommand options class a pipeline module defines."""
    return next(value for value in vars(module).values()
                if isinstance(value, type) and issubclass(value, SubcommandOptions)
                and value not in (SubcommandOptions, OutputOptions, CommonOptions))


def require(value, flag: str):
    if value is None:
        raise InputError(f"{flag} is required")
    return value


def _direct_runner(options):
    """The FnApiRunner the DirectRunner would pick, without first trying Prism.

    In Beam 2.77 the DirectRunner first tries the Prism runner, which it
    downloads; on an offline machine that means a wait and a fallback. The
    FnApiRunner honours --direct_num_workers and --direct_running_mode.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


_DIRECT_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")


def check_direct_mode(options) -> None:
    """Refuse the FnApiRunner's multi_threading mode with several workers: in Beam 2.77 it drops elements of
    large shuffles (benchmarks/check_direct_threads.py, no clusmar code in it), and a piece of a pool lost in
    select's join would go unnoticed.  multi_processing runs the same bundles in separate processes and keeps
    them all."""
    if options.view_as(StandardOptions).runner not in _DIRECT_RUNNERS:
        return
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_threading" and direct.direct_num_workers != 1:
        raise InputError(f"--direct_running_mode multi_threading with --direct_num_workers "
                         f"{direct.direct_num_workers}: Beam {beam.__version__}'s FnApiRunner drops elements of large "
                         "shuffles in this mode; use --direct_running_mode multi_processing")


def make_pipeline(options) -> beam.Pipeline:
    if options.view_as(StandardOptions).runner in _DIRECT_RUNNERS:
        check_direct_mode(options)
        return beam.Pipeline(runner=_direct_runner(options), options=options)
    return beam.Pipeline(options=options)


class Finished(NamedTuple):
    summary: dict
    result: object  # the PipelineResult
    seconds: float
    output: str


def build_and_run(options_class, argv, build, name: str, summary_name: str):
    """What every pipeline's run() does: options from argv (or typed values), `build(pipeline, opts)` -> its
    OutputDir, run to completion (temporary files removed either way; after a failure, an output directory
    the run made too), then the summary it wrote.
    Returns a Finished (summary, PipelineResult, seconds, output directory)."""
    options, opts = parse_options(options_class, argv)
    start = time.time()
    pipeline = make_pipeline(options)
    output = build(pipeline, opts)
    try:
        result = run_pipeline(pipeline, name)
    except BaseException:
        output.abandon()
        raise
    output.remove_temp()
    if options.view_as(TestOptions).dry_run:   # the runner built the job and submitted nothing
        LOG.info("%s: --dry_run: the job was built and not submitted; nothing was written to %s", name, output.path)
        return Finished({"dry_run": True}, result, time.time() - start, output.path)
    return Finished(storage.read_json(output.join(summary_name)), result, time.time() - start, output.path)


def run_pipeline(pipeline: beam.Pipeline, name: str):
    """Run to completion and log the elapsed time; returns the PipelineResult."""
    start = time.time()
    result = pipeline.run()
    if result is not None:   # None from a Dataflow --dry_run
        result.wait_until_finish()
    LOG.info("%s: pipeline finished in %.1f s", name, time.time() - start)
    return result

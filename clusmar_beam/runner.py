"""Building and running pipelines the same way for every subcommand."""
from __future__ import annotations

import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from clusmar_beam.errors import InputError

LOG = logging.getLogger("clusmar")


def parse_options(options_class, argv):
    """Pipeline options from argv; unknown flags are an error, not a warning."""
    options = PipelineOptions(list(argv or []))
    known = options.get_all_options()
    everything = options.get_all_options(retain_unknown_options=True)
    unknown = sorted(set(everything) - set(known))
    if unknown:
        raise InputError("unknown flag(s): " + ", ".join("--" + name for name in unknown))
    return options, options.view_as(options_class)


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


def make_pipeline(options) -> beam.Pipeline:
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "direct", "FnApiRunner"):
        return beam.Pipeline(runner=_direct_runner(options), options=options)
    return beam.Pipeline(options=options)


def run_pipeline(pipeline: beam.Pipeline, name: str):
    """Run to completion and log the elapsed time; returns the PipelineResult."""
    start = time.time()
    result = pipeline.run()
    result.wait_until_finish()
    LOG.info("%s: pipeline finished in %.1f s", name, time.time() - start)
    return result

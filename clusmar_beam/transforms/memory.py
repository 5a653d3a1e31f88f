"""Memory asked of the runner (Beam's `min_ram` resource hint) by the few steps that hold more than a batch.

Dataflow gives such a step a worker with at least that much memory (other runners
ignore the hint); a pipeline-wide `--resource_hints=min_ram=...` still applies
when it is larger. The models are the peaks measured in benchmarks/RESULTS.md
("One-worker HAC memory by dimension", "Selection at scale"), rounded up, plus a base for
the SDK worker and the libraries; deploy/README.md turns them into machine types.
"""
from __future__ import annotations

import math

GiB = 1 << 30
# The Python SDK worker with TensorFlow, FAISS and pyarrow loaded, before any data.
WORKER_BASE_BYTES = 1 * GiB
# The one-worker HAC's bytes per point whatever the dimension (kept candidates, counts, bookkeeping) ...
HAC_BYTES_PER_POINT = 600
# ... plus these per point and dimension (the embeddings, their float64 sums, index rows).
HAC_BYTES_PER_POINT_AND_DIM = 24
# The k_m candidates of a selection, kept, merged and ordered on one worker: 4.5-5.0 GB at k_m = 10M.
BYTES_PER_CANDIDATE = 400


def one_worker_hac_bytes(num_points: int, dim: int) -> int:
    """What the step that clusters the whole pool on one worker needs.

    Per point, not per embedding byte: the per-cluster state does not shrink with the dimension, so a
    low-dimensional pool needs many times its embeddings' bytes.
    """
    return WORKER_BASE_BYTES + int(num_points) * (HAC_BYTES_PER_POINT + HAC_BYTES_PER_POINT_AND_DIM * int(dim))


def candidates_bytes(k_m: int) -> int:
    """What the steps that keep and order the k_m lowest-margin candidates need."""
    return WORKER_BASE_BYTES + BYTES_PER_CANDIDATE * int(k_m)


def with_min_ram(transform, nbytes: int):
    """`transform` with a min_ram hint of `nbytes`, rounded up to whole GiB (machine types come in GiB)."""
    return transform.with_resource_hints(min_ram=int(math.ceil(nbytes / GiB)) * GiB)

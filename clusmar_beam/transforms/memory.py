"""Memory asked of the runner (Beam's `min_ram` resource hint) by the few steps that hold more than a batch.

Dataflow gives such a step a worker with at least that much memory (other runners
ignore the hint); a pipeline-wide `--resource_hints=min_ram=...` still applies
when it is larger. The models are the peaks measured in benchmarks/RESULTS.md
("1M end to end", "Selection at scale"), rounded up, plus a base for the SDK
worker and the libraries; deploy/README.md turns them into machine types.
"""
from __future__ import annotations

import math

GiB = 1 << 30
# The Python SDK worker with TensorFlow, FAISS and pyarrow loaded, before any data.
WORKER_BASE_BYTES = 1 * GiB
# The one-worker HAC peaks at 6.6-7.8x the float32 embeddings it clusters (1M and 10M x 64-d).
HAC_BYTES_PER_EMBEDDING_BYTE = 8
# The k_m candidates of a selection, kept, merged and ordered on one worker: 4.5-5.0 GB at k_m = 10M.
BYTES_PER_CANDIDATE = 400


def one_worker_hac_bytes(embedding_bytes: int) -> int:
    """What the step that clusters the whole pool on one worker needs."""
    return WORKER_BASE_BYTES + HAC_BYTES_PER_EMBEDDING_BYTE * int(embedding_bytes)


def candidates_bytes(k_m: int) -> int:
    """What the steps that keep and order the k_m lowest-margin candidates need."""
    return WORKER_BASE_BYTES + BYTES_PER_CANDIDATE * int(k_m)


def with_min_ram(transform, nbytes: int):
    """`transform` with a min_ram hint of `nbytes`, rounded up to whole GiB (machine types come in GiB)."""
    return transform.with_resource_hints(min_ram=int(math.ceil(nbytes / GiB)) * GiB)

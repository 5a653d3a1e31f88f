"""The threshold for a target mean cluster size, estimated on a sample of whole k-means cells."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from clusmar_beam.core import hashing
from clusmar_beam.core.hac.index import TwoLevelQuantiser
from clusmar_beam.core.hac.linkage import (TARGET_OVERSHOOT, HacResult, average_linkage, cut_keeping,
                                      merge_all_threshold)
from clusmar_beam.core.hac.prepare import HacError, METRICS, check_count, check_target, prepare
from clusmar_beam.core.hac.rac import EXACT_SEARCH_MAX


@dataclasses.dataclass
class ThresholdChoice:
    """A sample's estimate of the threshold for a target mean cluster size, and where to merge up to.

    The estimate can be off by a factor of two in mean size on big pools (a
    few thousand cells are drawn from hundreds of thousands), so the full
    run merges up to `merge_threshold`, the sample's threshold for
    TARGET_OVERSHOOT times the target, and is then cut exactly at the target
    (average_linkage with target_mean_cluster_size).
    """

    distance_threshold: float      # the sample's estimate for the target
    target_mean_cluster_size: float
    sample_points: int
    sample_points_with_margin: int
    sample_cells: int
    num_cells: int
    sample_mean_cluster_size: float
    merge_threshold: float         # the sample's estimate for TARGET_OVERSHOOT x the target

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"sample eps={self.distance_threshold:.6g} for mean cluster size {self.target_mean_cluster_size:g}, "
                f"merging up to {self.merge_threshold:.6g}, from {self.sample_points_with_margin} points in "
                f"{self.sample_cells} of {self.num_cells} cells")


def choose_threshold(
    embeddings: np.ndarray,
    metric: str,
    target_mean_cluster_size: float,
    *,
    sample_size: int = 10_000,
    cell_size: int | None = None,
    margin_cells: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    delta: float = 0.0,
) -> ThresholdChoice:
    """Estimate on a sample the eps whose average-linkage cut averages the target cluster size.

    The estimate only says how far to merge the pool (merge_threshold: the
    estimate for TARGET_OVERSHOOT x the target); average_linkage with
    target_mean_cluster_size then cuts the pool's own merges at the target.

    A uniform subsample of a big pool is sparser than the pool (each point
    keeps a fraction of its neighbours), so its dendrogram merges later and
    would give too large an eps (measured on a 200K pool: a uniform 20K
    sample picks an eps giving mean size 70 for a target of 10).  Instead the
    pool is cut into k-means cells of about `cell_size` (default
    sample_size / 4) points (above _FLAT_SAMPLE_CELLS_MAX cells, behind a
    two-level quantiser, so a row costs about 9 sqrt(cells) distances to
    place, not one per cell), whole cells are drawn at random until
    `sample_size` points are taken (inside a cell the density is the pool's),
    and the points of neighbouring cells that have a drawn cell among their
    `margin_cells` nearest centroids are added as a margin, so that clusters
    crossing a cell border are not cut short.  The sample's whole dendrogram
    (exact RAC, merges recorded) is then cut at the eps where the core
    points' estimated mean cluster size reaches the target.

    This is the in-memory run of the steps below (threshold_cells,
    training_rows, SampleCells, draw_cells, threshold_from_sample);
    transforms.sharded_hac.ThresholdFromTarget runs the same steps as a Beam pipeline.
    Rows are numbered 0..n-1 in the given order; the choice depends only on
    each row's number and vector and the seed.
    """
    target = check_target(target_mean_cluster_size)
    if metric not in METRICS:
        raise HacError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    check_count("sample_size", sample_size)
    X = np.asarray(embeddings)
    if X.ndim != 2:
        raise HacError(f"embeddings must be a 2-D array (rows x dims), got shape {X.shape}")
    n = X.shape[0]
    t0 = time.perf_counter()
    num_cells = threshold_cells(n, sample_size, cell_size)
    cells = SampleCells.train(X[training_rows(n, num_cells, seed)], metric, num_cells, margin_cells, seed)
    near = cells.assign(X)
    draw = draw_cells(np.bincount(near[:, 0], minlength=cells.num_cells), sample_size, seed)
    pos, core = draw.select(np.arange(n), near)
    choice = threshold_from_sample(X[pos], core, metric, target, seed, draw, delta)
    if log is not None:
        log(f"threshold: {choice.describe()} ({time.perf_counter() - t0:.1f}s)")
    return choice


def _threshold_for_core(result: HacResult, core: np.ndarray, target: float):
    """Threshold whose cut gives the core points a mean cluster size of `target`.

    The pool's number of clusters is the sum over its points of 1 / (size of
    the point's cluster), so the pool's mean cluster size is estimated as
    1 / mean over core points of 1 / cluster size.  Core points' clusters are
    (nearly) complete because the margin around them was clustered too.
    Returns (eps, estimated mean size at eps).
    """
    n = core.size
    order = np.argsort(result.heights, kind="stable")
    h = result.heights[order]
    pairs = result.pairs[order]
    if not (h > 0).any():
        return 1.0, float(n)  # all points identical: any threshold gives one cluster

    def mean_size(m):  # estimate after the m lowest merges
        graph = scipy.sparse.coo_matrix((np.ones(m), (pairs[:m, 0], pairs[:m, 1])), shape=(n, n))
        _, label = scipy.sparse.csgraph.connected_components(graph, directed=False)
        size = np.bincount(label)[label[core]]
        return 1.0 / np.mean(1.0 / size)

    lo, hi = 0, h.size  # mean_size grows with m; smallest m reaching the target
    if mean_size(hi) < target:
        return float(h[-1] * 1.5 + 1e-12), mean_size(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_size(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    eps = cut_keeping(h, lo)
    return eps, float(mean_size(int(np.count_nonzero(h <= eps))))


TRAIN_PER_CELL = 64  # training rows per k-means cell of the threshold sample
_ASSIGN_BLOCK = 1 << 17


def threshold_cells(n: int, sample_size: int, cell_size: int | None = None) -> int:
    """Number of k-means cells the threshold sample is drawn from; 1: the whole pool is the sample."""
    if n <= sample_size:
        return 1
    return max(2, int(round(n / (cell_size or max(1, sample_size // 4)))))


def lowest_hash_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The k rows of 0..n-1 with the lowest hashing.row_hash(row, seed), ascending.

    A row's hash depends only on its number and the seed, so a pipeline that
    sees the rows in any order and batching takes the same rows.  The hashes
    are distinct (splitmix64 is a bijection), so the k lowest are one set.
    """
    rows = np.arange(n, dtype=np.int64)
    if k >= n:
        return rows
    if k <= 0:
        return rows[:0]
    return np.sort(rows[np.argpartition(hashing.row_hash(rows, seed), k - 1)[:k]])


# At most this many rows train the threshold cells, however large the pool: on a
# pool of tens of millions the cells get fewer training rows each, but the
# training set stays one bounded element (the sharded path gathers it).
TRAIN_ROWS_MAX = 1 << 18


def training_size(num_cells: int) -> int:
    """How many rows train the cell centroids (none for one cell)."""
    return min(TRAIN_PER_CELL * num_cells, TRAIN_ROWS_MAX) if num_cells > 1 else 0


def training_rows(n: int, num_cells: int, seed: int) -> np.ndarray:
    """Rows whose vectors train the cell centroids (bottom-k by hash)."""
    return lowest_hash_rows(n, training_size(num_cells), seed)


# Above this many threshold cells they are found by a two-level quantiser:
# a flat one costs num_cells distances per pool row (40K at 100M rows).
_FLAT_SAMPLE_CELLS_MAX = 1024


@dataclasses.dataclass
class SampleCells:
    """The k-means cells of the threshold sample; small enough to ship to every worker."""

    cells: TwoLevelQuantiser | None  # over prepared vectors; None for one cell
    offset: np.ndarray | None     # sqeuclidean: the training rows' mean, the origin of the centroids
    metric: str
    num_cells: int
    near: int                     # cells given to each row: its home cell and margin cells

    @classmethod
    def train(cls, train_x, metric: str, num_cells: int, margin_cells: int, seed: int) -> "SampleCells":
        """Cells from the raw vectors of the training rows, in row order."""
        near = max(1, min(int(margin_cells), num_cells))
        if num_cells == 1:
            return cls(None, None, metric, 1, near)
        train = prepare(train_x, metric).astype(np.float32)
        cells = TwoLevelQuantiser(train, num_cells, seed, flat_max=_FLAT_SAMPLE_CELLS_MAX,
                                  layout_max=_FLAT_SAMPLE_CELLS_MAX)
        # the two-level split rounds the lists per group: the count it made is the count
        return cls(cells, np.asarray(train_x, np.float64).mean(axis=0), metric, cells.centroids.shape[0], near)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """(rows, near) nearest cells of a block of raw vectors, home cell first."""
        if self.cells is None:
            return np.zeros((x.shape[0], 1), np.int64)
        blocks = []
        for s in range(0, x.shape[0], _ASSIGN_BLOCK):
            part = x[s:s + _ASSIGN_BLOCK]
            if self.metric == "cosine":
                part = part / np.linalg.norm(part, axis=1, keepdims=True)
            else:
                part = part - self.offset
            blocks.append(self.cells.nearest(part, self.near))
        return np.concatenate(blocks) if blocks else np.zeros((0, self.near), np.int64)


@dataclasses.dataclass
class CellDraw:
    """Which rows the threshold sample takes: those near the drawn cells, or fixed rows."""

    drawn: np.ndarray | None          # bool per cell; None: every cell was too big
    fallback_rows: np.ndarray | None  # then a uniform sample: these rows (ascending)
    sample_cells: int
    num_cells: int

    def select(self, rows: np.ndarray, cells: np.ndarray):
        """(positions, ascending, of a block's rows in the sample; which of those are core).

        A row is in the sample when one of its nearest cells was drawn (the
        margin, where a drawn cell's clusters continue), core when its home
        cell was.  `rows` are the block's row numbers, `cells` SampleCells.assign's.
        """
        if self.drawn is None:
            pos = np.flatnonzero(np.isin(rows, self.fallback_rows))
            return pos, np.ones(pos.size, bool)
        pos = np.flatnonzero(self.drawn[cells].any(axis=1))
        return pos, self.drawn[cells[pos, 0]]


def draw_cells(sizes: np.ndarray, sample_size: int, seed: int) -> CellDraw:
    """Whole cells in a seeded random order until `sample_size` rows are taken.

    `sizes` are the rows per home cell.  Cells over 2 * sample_size rows are
    skipped; when every cell is (degenerate data), the sample is the
    `sample_size` rows of lowest hash instead.
    """
    sizes = np.asarray(sizes, np.int64)
    rng = np.random.default_rng([seed, 0xCE11])
    drawn = np.zeros(sizes.size, bool)
    total = 0
    for c in rng.permutation(sizes.size):
        if sizes[c] == 0 or sizes[c] > 2 * sample_size:
            continue
        drawn[c] = True
        total += sizes[c]
        if total >= sample_size:
            break
    if not drawn.any():
        return CellDraw(None, lowest_hash_rows(int(sizes.sum()), sample_size, seed), 0, sizes.size)
    return CellDraw(drawn, None, int(drawn.sum()), sizes.size)


def threshold_from_sample(sample_x: np.ndarray, core: np.ndarray, metric: str, target: float, seed: int,
                          draw: CellDraw, delta: float = 0.0) -> ThresholdChoice:
    """The sample's raw vectors (in row order) clustered completely (merges (1 + delta)-good), cut where its
    core reaches the target."""
    sample = prepare(sample_x, metric)
    # The whole dendrogram of a sample that is small by design: exact search throughout.
    result = average_linkage(sample, merge_all_threshold(sample, metric), metric, seed=seed,
                             exact_search_max=max(EXACT_SEARCH_MAX, sample.shape[0]), delta=delta)
    eps, mean_size = _threshold_for_core(result, core, target)
    merge_eps, _ = _threshold_for_core(result, core, TARGET_OVERSHOOT * target)
    return ThresholdChoice(eps, target, int(core.sum()), int(core.size), draw.sample_cells, draw.num_cells,
                           mean_size, max(merge_eps, eps))


def flat_clusters(embeddings: np.ndarray, metric: str, distance_threshold: float | None = None,
                  target_mean_cluster_size: float | None = None, *, sample_size: int = 10_000, seed: int = 0,
                  delta: float = 0.0, log: Callable[[str], None] | None = None, on_choice=None,
                  **linkage_options) -> tuple[HacResult, ThresholdChoice | None]:
    """Average-linkage flat clusters cut at a distance, or at a target mean size (threshold chosen on a sample).

    The one-worker path of `clusmar cluster` and `clusmar simulate` both cluster
    through here; `on_choice(choice)` sees the sample's choice before the pool's
    HAC starts. The HAC works in place on a float64 copy; a caller that hands over its only reference
    lets the input be freed while it runs.
    """
    choice = None
    eps = distance_threshold
    if eps is None:
        choice = choose_threshold(embeddings, metric, target_mean_cluster_size, sample_size=sample_size,
                                  seed=seed, log=log, delta=delta)
        if on_choice is not None:
            on_choice(choice)
        eps = choice.merge_threshold
    rows = np.array(embeddings, dtype=np.float64)   # always a copy: the HAC overwrites it
    del embeddings
    result = average_linkage(rows, eps, metric, target_mean_cluster_size=target_mean_cluster_size, seed=seed,
                             log=log, overwrite_input=True, delta=delta, **linkage_options)
    return result, choice

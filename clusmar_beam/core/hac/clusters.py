"""`Clusters`: the one statistics type of clusters, shared by the RAC and the sharded rounds."""
from __future__ import annotations

import dataclasses

import numpy as np

from clusmar_beam.core.hac.prepare import prepare


@dataclasses.dataclass
class Clusters:
    """Statistics of many clusters: ids, count n, vector sum S and, for squared Euclidean, the within-cluster
    sum of squared deviations W (every average linkage is exact from these).

    Rac returns the clusters left with their input rows as ids (W None for cosine).  The
    sharded rounds name a cluster by its smallest point row and add `route`, the point a cluster is
    partitioned by (NaN: its own mean; a cluster that waited on a neighbour across a border is routed
    with it)."""

    ids: np.ndarray
    cnt: np.ndarray
    S: np.ndarray
    W: np.ndarray
    route: np.ndarray | None = None
    # Single points may travel as the pool's float32 rows (half the bytes of float64 statistics): S is then
    # the raw embedding, prepared for this metric (hac.prepare, row by row) where it is used.
    raw_metric: str | None = None

    def __len__(self):
        return int(self.ids.size)

    def take(self, idx):
        return Clusters(self.ids[idx], self.cnt[idx], self.S[idx], self.W[idx],
                        None if self.route is None else self.route[idx], self.raw_metric)

    @staticmethod
    def concat(parts):
        parts = [p for p in parts if len(p)]
        if len({p.raw_metric for p in parts}) > 1:
            raise ValueError("cannot join raw points and cluster statistics")
        routes = None
        if any(p.route is not None for p in parts):
            routes = np.concatenate([p.route if p.route is not None else np.full(p.S.shape, np.nan, np.float32)
                                     for p in parts])
        return Clusters(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "cnt", "S", "W")),
                        routes, parts[0].raw_metric if parts else None)

    def sums(self) -> np.ndarray:
        """S as float64 statistics (raw points prepared)."""
        if self.raw_metric == "cosine":
            return prepare(self.S, "cosine")
        return np.array(self.S, np.float64)

    def means(self):
        return self.sums() / self.cnt[:, None]

    def routed(self) -> np.ndarray:
        """Mask of the clusters with a route of their own (see core.hac.sharded.next_round: the ones a round
        that repeats its threshold takes)."""
        if self.route is None:
            return np.zeros(len(self), bool)
        return ~np.isnan(self.route[:, 0])

    def routing_points(self) -> np.ndarray:
        points = np.ascontiguousarray(self.means(), np.float32)
        if self.route is not None:
            given = ~np.isnan(self.route[:, 0])
            points[given] = self.route[given]
        return points

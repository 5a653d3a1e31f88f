"""Average-linkage HAC cut at a distance threshold, without an n x n matrix.

- prepare: METRICS, HacError, input checks, the prepared float64 rows, exact duplicate rows.
- index: the FAISS side: exact and IVF indexes over cluster vectors, the two-level quantiser, threads.
- rac: reciprocal agglomerative clustering (RAC) rounds over cluster statistics (Rac).
- linkage: the entry point average_linkage, HacResult, and cuts of the merges made.
- threshold: the threshold for a target mean cluster size, from a sample of k-means cells.
"""
from clusmar_beam.core.hac.index import FlatIndex, IvfIndex, TwoLevelQuantiser, default_nlist, on_all_cores
from clusmar_beam.core.hac.linkage import (TARGET_OVERSHOOT, TARGET_RAISE, HacResult, average_linkage, cut_keeping,
                                      labels_from_edges, merge_all_threshold, threshold_from_heights)
from clusmar_beam.core.hac.prepare import (METRICS, HacError, check_count, check_delta, check_target, check_threshold,
                                      collapse_duplicates, number_by_first_appearance, prepare)
from clusmar_beam.core.hac.clusters import Clusters
from clusmar_beam.core.hac.rac import DEFAULT_DELTA, DEFAULT_K, EXACT_SEARCH_MAX, Rac, keep_rows
from clusmar_beam.core.hac.threshold import (TRAIN_PER_CELL, CellDraw, SampleCells, ThresholdChoice, choose_threshold,
                                        flat_clusters,
                                        draw_cells, lowest_hash_rows, threshold_cells, threshold_from_sample,
                                        training_rows, training_size)

__all__ = [
    "CellDraw", "Clusters", "DEFAULT_DELTA", "DEFAULT_K", "EXACT_SEARCH_MAX", "FlatIndex", "HacError",
    "HacResult", "IvfIndex", "METRICS", "Rac", "SampleCells", "TARGET_OVERSHOOT", "TARGET_RAISE",
    "TRAIN_PER_CELL", "ThresholdChoice", "TwoLevelQuantiser", "average_linkage", "check_count", "check_delta",
    "check_target", "check_threshold", "choose_threshold", "collapse_duplicates", "cut_keeping",
    "default_nlist", "draw_cells", "flat_clusters", "keep_rows", "labels_from_edges", "lowest_hash_rows",
    "merge_all_threshold", "number_by_first_appearance", "on_all_cores", "prepare", "threshold_cells",
    "threshold_from_heights", "threshold_from_sample", "training_rows", "training_size",
]

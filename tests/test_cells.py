"""core.cells (k-means cells, nearest cells, rows grouped by key) and core.hashing's sampling order."""
import numpy as np

from clusmar_beam.core import cells, hashing


def test_split_by_key_groups_positions_in_order():
    keys = np.array([3, 1, 3, 0, 1, 3])
    got = [(k, pos.tolist()) for k, pos in cells.split_by_key(keys)]
    assert got == [(0, [3]), (1, [1, 4]), (3, [0, 2, 5])]
    assert list(cells.split_by_key(np.zeros(0, np.int64))) == []


def test_probe_cells_are_the_nearest_centroids_nearest_first():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(20, 8)).astype(np.float32)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    got = cells.probe_cells(centroids, x, 3)
    d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(got, np.argsort(d, axis=1, kind="stable")[:, :3])
    assert cells.probe_cells(centroids, x, 50).shape == (300, 20)   # never more probes than cells


def test_train_centroids_never_more_cells_than_rows_and_seeded():
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(30, 4)).astype(np.float32)
    assert cells.train_centroids(sample, 100, 0).shape == (30, 4)
    assert np.allclose(cells.train_centroids(sample, 1, 0), sample.mean(axis=0, keepdims=True))
    assert np.array_equal(cells.train_centroids(sample, 5, 7), cells.train_centroids(sample, 5, 7))


def test_row_hash_order_does_not_depend_on_the_sharding():
    rows = np.arange(10_000, dtype=np.int64)
    whole = rows[np.argsort(hashing.row_hash(rows, 3))][:100]
    parts = np.concatenate([p[np.argsort(hashing.row_hash(p, 3))][:100] for p in np.array_split(rows[::-1], 7)])
    assert np.array_equal(np.sort(parts[np.argsort(hashing.row_hash(parts, 3))][:100]), np.sort(whole))
    assert not np.array_equal(hashing.row_hash(rows, 3), hashing.row_hash(rows, 4))


def test_splitmix64_matches_the_reference_sequence():
    """splitmix64 from state 0: the published first outputs of the generator (Vigna's splitmix64.c)."""
    state, out = 0, []
    for _ in range(3):
        out.append(hashing.splitmix64_int(state))
        state = (state + hashing.GOLDEN) & ((1 << 64) - 1)
    assert out == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]

"""Seeded 64-bit hashes of ids: the only source of randomness that decides outputs.

Everything random that decides an output (tie-breaks, picks inside a cluster,
samples, partition draws, synthetic pools) is a hash of ids, never a draw in
worker order, so any runner and any number of workers give the same files.
"""
from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-spread 64-bit mix (a copy; wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 step of each uint64: the finaliser of x + GOLDEN."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(x, np.uint64) + np.uint64(GOLDEN))


def splitmix64_int(x: int) -> int:
    """splitmix64 of one Python int (its low 64 bits)."""
    return int(splitmix64(np.array([x & _MASK64], np.uint64))[0])


def id_keys(ids: np.ndarray) -> np.ndarray:
    """A uint64 per id: the int64 bits, or an 8-byte BLAKE2b digest of text/binary ids."""
    if ids.dtype != object:
        return ids.astype(np.int64).view(np.uint64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(x, digest_size=8).digest(), "little") for x in ids),
                       dtype=np.uint64, count=len(ids))


def seeded_hash(ids: np.ndarray, *salts: int) -> np.ndarray:
    """uint64 hash of each id (int64 or bytes) under integer salts (seed, round, ...)."""
    state = np.uint64(0)
    with np.errstate(over="ignore"):
        for salt in salts:
            state = splitmix64(np.array([state ^ np.uint64(salt & _MASK64)]))[0]
        return mix64(id_keys(ids) ^ state)


def tiebreak_hash(ids, seed: int) -> np.ndarray:
    """Breaks ties in margin (the contract: a seeded hash of the id)."""
    return seeded_hash(ids, seed, 0x7469655F)          # 'tie_'


def pick_hash(ids, seed: int, round_index: int) -> np.ndarray:
    """The random pick inside a cluster (the contract: a seeded hash of (seed, round, id))."""
    return seeded_hash(ids, seed, round_index, 0x7069636B)  # 'pick'


def row_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """A seeded hash of int64 row numbers or ids: the sampling order of every bottom-k sample."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(rows, np.int64).view(np.uint64) + np.uint64((seed * GOLDEN) % (1 << 64)))


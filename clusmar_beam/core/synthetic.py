"""Synthetic active-learning pool that looks like web data, generated shard by shard.

Data: ~num_examples/20 clusters with heavy-tailed (lognormal) sizes. The plan stores at most a few
thousand base clusters; finer sub-clusters are derived by hashing (seed, cluster id). Centres are
random directions with norm ~1; ~30% sit in dense regions (groups of centres 0.1-0.4 apart in cosine
distance). A point = centre + Gaussian noise of per-cluster spread (within-cluster cosine distance
~0.001 for tight clusters to ~0.4 for diffuse ones), not normalised, so cosine and sqeuclidean both
work. ~15% of rows are near-duplicate bursts: copies of a hashed source point + 1e-3 noise.
Each cluster has a majority class and a confusable neighbouring class (id +-1/+-2 mod C); probs =
softmax of logits favouring the majority (confident in tight clusters, uncertain in diffuse ones,
in dense regions and far from the centre); label ~ probs: the majority class ~85% of the time.

Region sizes (``make_plan(..., region_sizes=...)``): "lognormal" (default) caps every base cluster
at max(3%, 2/B) of the pool. "heavy-tailed" mimics real web pools, where a few dense regions (a
near-duplicate flood, one dominant kind of image) hold much of the data: base sizes follow a power
law (the largest three hold ~13-20%, ~8-18% and ~5-16% of the pool, the largest at most 20%; the
next ones a few percent; then a long tail of small bases). Bases from 3% of the pool up (those
from 0.3% partly) are flat diffuse blobs: no sub-clusters, noise norm ~0.4 and a per-point noise
scale lognormal with sigma 0.65 (0.25 elsewhere), so some points sit far out. That is the hard
case for average-linkage HAC: one growing cluster becomes everyone's nearest neighbour. Bursts
and labels work as above (the blobs' class confidence is that of an ordinary base).

Determinism: per-row randomness comes from one numpy Generator per block of BLOCK_SIZE ids, seeded
with SeedSequence([seed, stream, block]); per-cluster and per-burst values come from a splitmix64
hash. Each block is always generated whole and then sliced, so [a, b) + [b, c) == [a, c) bit for bit
whatever the shard boundaries or the number of workers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import ndtri

from clusmar_beam.core import hashing
from clusmar_beam.core.validate import check_int

__all__ = [
    "BLOCK_SIZE",
    "PoolPlan",
    "make_plan",
    "shard_bounds",
    "generate_rows",
    "true_cluster_ids",
    "default_num_shards",
    "REGION_SIZES",
]

BLOCK_SIZE = 4096  # ids per random block; fixed, so shard boundaries never matter
ROWS_PER_SHARD = 100_000

# Tunables of the data model.
_ROWS_PER_CLUSTER = 20
_MIN_CLUSTERS = 8
_PLAN_FLOAT_BUDGET = 1 << 19  # max base-centre floats stored in the plan (2 MB of float32)
_MAX_BASE_CLUSTERS = 50_000
_MIN_BASE_CLUSTERS = 256
_BANK_ROWS = 2048  # rows of the normal bank (offset = mix of two rows: 2048**2 combinations)
_BURST_FRACTION = 0.15
_MEAN_BURST_SIZE = 8.0
_BURST_NOISE = 1e-3  # per-coordinate noise of near-duplicates
_BURST_LOGIT_NOISE = 0.03
_SUB_POWER = 2.0  # sub-cluster index = floor(count * u**_SUB_POWER): power-law sizes
_BURST_POWER = 2.0
_SUB_OFFSET = 0.45  # typical norm of a sub-cluster centre offset from its base centre
_LOGIT_NOISE = 0.5  # std of the logit noise on every class
_MEDIAN_SPREAD = 0.22  # median norm of the noise around a centre
_BASE_CONFIDENCE = 4.0  # logit margin (beyond log(C-1)) of a median cluster
_BASE_GAP = 2.0  # logit gap majority vs neighbouring class (before spread/region factors)
_MAJORITY_KEEP = 0.8  # prob. that a sub-cluster keeps its base's majority class
_RADIAL_SIGMA = 0.25  # log-sd of a point's noise scale around its centre (lognormal mode)

# region_sizes="heavy-tailed": the three largest bases hold shares s1 > s2 > s3 drawn below,
# the others follow a power law in their rank (k**-_HT_POWER, jittered) for the rest of the pool.
REGION_SIZES = ("lognormal", "heavy-tailed")
_HT_TOP = (0.13, 0.20)  # share of the largest base, uniform in this range (the cap is 0.20)
_HT_RATIO = (0.6, 0.9)  # s2 / s1 and s3 / s2, uniform in this range
_HT_POWER = 1.1  # base of rank k >= 4 gets weight ~ k**-_HT_POWER
_HT_JITTER = 0.3  # lognormal jitter of those weights
_HT_FLAT = (0.003, 0.03)  # share from which a base starts to / fully becomes a flat diffuse blob
_HT_BIG_SPREAD = 0.4  # median noise norm of a flat blob
_HT_BIG_SIGMA = 0.65  # log-sd of a point's noise scale in a flat blob (some points far out)
_STREAM_HEAVY = 0x4EA7

# Stream tags (arbitrary constants) that separate the random streams.
_STREAM_PLAN = 0x51A7
_STREAM_BLOCK = 0xB10C
_TAG_SUB = 0x5B
_TAG_BURST = 0xB5

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(hashing.GOLDEN)


@dataclasses.dataclass(frozen=True, eq=False)
class PoolPlan:
    """Small, picklable global description of the pool (built once on the driver).

    Per-base-cluster arrays have length ``num_base_clusters``. ``eq=False`` because the
    fields are numpy arrays (equality is identity; compare fields explicitly if needed).
    """

    num_examples: int
    dim: int
    num_classes: int
    seed: int
    num_clusters: int  # total number of (sub-)clusters
    num_base_clusters: int
    num_regions: int
    num_bursts: int
    burst_fraction: float
    region_sizes: str  # "lognormal" or "heavy-tailed" (see make_plan)
    base_centers: np.ndarray  # (B, dim) float32, norms ~1
    base_cum_weight: np.ndarray  # (B,) float64, cumulative sampling weight, last == 1
    base_sub_start: np.ndarray  # (B,) int64, global index of the base's first sub-cluster
    base_sub_count: np.ndarray  # (B,) int64, number of sub-clusters (>= 1)
    base_spread: np.ndarray  # (B,) float32, expected norm of a point's noise
    base_noise_sigma: np.ndarray  # (B,) float32, log-sd of a point's noise scale (0.25 or more)
    base_class: np.ndarray  # (B,) int64 majority class
    base_alt_class: np.ndarray  # (B,) int64 confusable neighbouring class
    base_confidence: np.ndarray  # (B,) float32, logit margin level (difficulty^-1)
    base_gap: np.ndarray  # (B,) float32, logit gap majority vs neighbouring class
    base_region: np.ndarray  # (B,) int64, dense region id or -1
    normal_bank: np.ndarray  # (P, dim) float32 standard normals; sub-cluster/burst offsets

    def nbytes(self) -> int:
        return sum(
            v.nbytes for v in dataclasses.asdict(self).values() if isinstance(v, np.ndarray)
        )


# --------------------------------------------------------------------------- hashing


def _hash_uniform(seed: int, tag: int, idx: np.ndarray, ncols: int) -> np.ndarray:
    """(len(idx), ncols) float64 uniforms in (0, 1), a pure function of (seed, tag, idx, col)."""
    k = tag
    while True:  # fold all 64-bit chunks of (arbitrarily large) seed into the key
        k = hashing.splitmix64_int(k ^ (seed & _MASK64))
        seed >>= 64
        if not seed:
            break
    key = np.uint64(k)
    h0 = hashing.splitmix64(idx.astype(np.uint64) ^ key)
    cols = (np.arange(1, ncols + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    h = hashing.splitmix64(h0[:, None] + cols)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------- plan


def _heavy_tailed_weights(rng: np.random.Generator, nb: int) -> np.ndarray:
    """Base weights (sum 1) of region_sizes="heavy-tailed", in random base order: the three
    largest hold ~13-20%, ~8-18% and ~5-16% of the pool, the next ones a few percent, then a
    power-law tail of small bases. No base above 20% (when nb >= 5)."""
    s1 = rng.uniform(*_HT_TOP)
    s2 = s1 * rng.uniform(*_HT_RATIO)
    s3 = s2 * rng.uniform(*_HT_RATIO)
    head = np.array([s1, s2, s3])[: min(3, nb)]
    rank = np.arange(head.size + 1, nb + 1, dtype=np.float64)
    tail = rank**-_HT_POWER * rng.lognormal(0.0, _HT_JITTER, size=rank.size)
    if tail.size:
        tail *= (1.0 - head.sum()) / tail.sum()
        weight = np.concatenate([head, tail])
    else:
        weight = head / head.sum()
    cap = max(_HT_TOP[1], 1.0 / nb)
    for _ in range(nb):  # water-fill: clip at the cap, give the excess to the others
        over = weight > cap * (1 + 1e-12)
        if not over.any():
            break
        weight[over] = cap
        rest = weight < cap
        if not rest.any():
            break
        weight[rest] *= (1.0 - weight[~rest].sum()) / weight[rest].sum()
    return weight[rng.permutation(nb)]


def make_plan(
    num_examples: int,
    dim: int,
    num_classes: int,
    seed: int = 0,
    *,
    region_sizes: str = "lognormal",
) -> PoolPlan:
    """Builds the global plan (on the driver). Cheap, and small whatever ``num_examples`` is:
    at most ``2**19`` centre floats plus a normal bank and a few per-base arrays (about
    3 MB pickled for dim 64).

    ``region_sizes``: "lognormal" (default) caps every base cluster at max(3%, 2/B) of the
    pool; "heavy-tailed" gives base sizes a power law whose largest few bases hold 10-20% of
    the pool each, as large flat diffuse blobs (see the module docstring).
    """
    n = check_int("num_examples", num_examples, 1)
    d = check_int("dim", dim, 2)
    c = check_int("num_classes", num_classes, 2)
    seed = check_int("seed", seed, 0)
    if region_sizes not in REGION_SIZES:
        raise ValueError(
            f"region_sizes must be one of {', '.join(REGION_SIZES)}; got {region_sizes!r}"
        )
    heavy = region_sizes == "heavy-tailed"
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_PLAN]))
    # Heavy-tailed draws come from their own stream, so `rng` draws the same sequence in
    # both modes (same centres, regions and classes for a seed).
    rng_heavy = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_PLAN, _STREAM_HEAVY]))

    k_total = max(_MIN_CLUSTERS, int(round(n / _ROWS_PER_CLUSTER)))
    base_cap = max(_MIN_BASE_CLUSTERS, min(_MAX_BASE_CLUSTERS, _PLAN_FLOAT_BUDGET // d))
    nb = min(k_total, base_cap)

    # Heavy-tailed base weights; no single base above max(3%, 2/nb) of the pool.
    weight = rng.lognormal(0.0, 1.3, size=nb)
    weight /= weight.sum()
    weight = np.minimum(weight, max(0.03, 2.0 / nb))
    weight /= weight.sum()
    if heavy:
        weight = _heavy_tailed_weights(rng_heavy, nb)
        # flat = 0 for bases below 0.3% of the pool, 1 from 3% up (log-linear in between):
        # big bases become flat diffuse blobs without sub-clusters.
        lo, hi = _HT_FLAT
        flat = np.clip(np.log(weight / lo) / math.log(hi / lo), 0.0, 1.0)
    else:
        flat = np.zeros(nb)
    cum_weight = np.cumsum(weight)
    cum_weight /= cum_weight[-1]

    # Sub-clusters: allocate k_total sub-clusters across bases, sublinearly in the weight.
    if nb == k_total:
        sub_count = np.ones(nb, dtype=np.int64)
    else:
        share = weight**0.7
        if heavy:
            share = share * (1.0 - flat)
        share = share / share.sum() * (k_total - nb)
        sub_count = 1 + np.floor(share).astype(np.int64)
        rest = k_total - int(sub_count.sum())
        if rest > 0:
            sub_count[np.argsort(-(share - np.floor(share)), kind="stable")[:rest]] += 1
    sub_start = np.concatenate([[0], np.cumsum(sub_count)[:-1]]).astype(np.int64)

    # Geometry: random unit directions, ~30% of bases grouped in dense regions.
    centers = rng.standard_normal((nb, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    num_regions = max(2, min(512, nb // 25))
    region = np.full(nb, -1, dtype=np.int64)
    in_region = rng.random(nb) < 0.3
    region_weight = rng.lognormal(0.0, 1.0, size=num_regions)
    region_weight /= region_weight.sum()
    region[in_region] = rng.choice(num_regions, size=int(in_region.sum()), p=region_weight)
    region_dir = rng.standard_normal((num_regions, d))
    region_dir /= np.linalg.norm(region_dir, axis=1, keepdims=True)
    region_rho = rng.uniform(0.35, 0.75, size=num_regions)
    idx = np.flatnonzero(in_region)
    if idx.size:
        rho = region_rho[region[idx]] * rng.lognormal(0.0, 0.15, size=idx.size)
        jitter = rng.standard_normal((idx.size, d)) * (rho / math.sqrt(d))[:, None]
        pts = region_dir[region[idx]] + jitter
        centers[idx] = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    centers *= rng.lognormal(0.0, 0.08, size=(nb, 1))

    spread = np.clip(np.exp(rng.normal(math.log(_MEDIAN_SPREAD), 0.5, size=nb)), 0.03, 0.9)
    noise_sigma = np.full(nb, _RADIAL_SIGMA)
    model_spread = spread  # how hard the base is for the model (confidence and gap below)
    if heavy:
        # Big bases: diffuse (noise norm ~0.4) and with a widely varying per-point scale; the
        # model is no less sure of them than of other bases (model_spread is unchanged).
        big = np.clip(np.exp(rng_heavy.normal(math.log(_HT_BIG_SPREAD), 0.15, size=nb)), 0.28, 0.6)
        spread = np.exp((1.0 - flat) * np.log(spread) + flat * np.log(big))
        noise_sigma = _RADIAL_SIGMA + flat * (_HT_BIG_SIGMA - _RADIAL_SIGMA)

    # Classes: skewed prior; dense regions share a theme class.
    prior = 1.0 / np.arange(1, c + 1) ** 0.8
    prior = prior[rng.permutation(c)]
    prior /= prior.sum()
    base_class = rng.choice(c, size=nb, p=prior)
    region_class = rng.choice(c, size=num_regions, p=prior)
    use_theme = in_region & (rng.random(nb) < 0.6)
    base_class[use_theme] = region_class[region[use_theme]]
    offsets = rng.choice(np.array([-2, -1, 1, 2]), size=nb)
    alt_class = (base_class + offsets) % c
    same = alt_class == base_class
    alt_class[same] = (base_class[same] + 1) % c

    # Logit margin over the other classes: lower for diffuse clusters and in dense regions.
    confidence = (
        _BASE_CONFIDENCE
        + 1.1 * np.log(_MEDIAN_SPREAD / model_spread)
        - 0.8 * in_region
        + rng.normal(0.0, 0.5, size=nb)
    )
    # Gap to the neighbouring class: small for diffuse clusters and in dense regions.
    gap = (
        (_BASE_GAP + rng.exponential(1.0, size=nb))
        * (_MEDIAN_SPREAD / model_spread) ** 0.6
        * np.where(in_region, 0.7, 1.0)
    )

    bank_rows = max(64, min(_BANK_ROWS, _PLAN_FLOAT_BUDGET // (2 * d)))
    bank = rng.standard_normal((bank_rows, d))

    num_bursts = max(1, int(round(_BURST_FRACTION * n / _MEAN_BURST_SIZE)))

    def ro(a: np.ndarray, dtype) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=dtype)
        a.setflags(write=False)
        return a

    return PoolPlan(
        num_examples=n,
        dim=d,
        num_classes=c,
        seed=seed,
        num_clusters=int(sub_count.sum()),
        num_base_clusters=nb,
        num_regions=num_regions,
        num_bursts=num_bursts,
        burst_fraction=_BURST_FRACTION,
        region_sizes=region_sizes,
        base_centers=ro(centers, np.float32),
        base_cum_weight=ro(cum_weight, np.float64),
        base_sub_start=ro(sub_start, np.int64),
        base_sub_count=ro(sub_count, np.int64),
        base_spread=ro(spread, np.float32),
        base_noise_sigma=ro(noise_sigma, np.float32),
        base_class=ro(base_class, np.int64),
        base_alt_class=ro(alt_class, np.int64),
        base_confidence=ro(confidence, np.float32),
        base_gap=ro(gap, np.float32),
        base_region=ro(region, np.int64),
        normal_bank=ro(bank, np.float32),
    )


# --------------------------------------------------------------------------- sharding


def default_num_shards(num_examples: int) -> int:
    """About one shard per 100K rows, at least 1."""
    n = check_int("num_examples", num_examples, 1)
    return max(1, -(-n // ROWS_PER_SHARD))


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` id ranges covering ``[0, num_examples)``.

    Sizes differ by at most one; ``num_shards`` is capped at ``num_examples`` so that no
    shard is empty.
    """
    n = check_int("num_examples", num_examples, 1)
    s = min(check_int("num_shards", num_shards, 1), n)
    q, r = divmod(n, s)
    bounds, start = [], 0
    for i in range(s):
        end = start + q + (1 if i < r else 0)
        bounds.append((start, end))
        start = end
    return bounds


# --------------------------------------------------------------------------- generation


def _pick_cluster(plan: PoolPlan, u_base: np.ndarray, u_sub: np.ndarray):
    """Maps two uniforms to (base index, global sub-cluster index)."""
    b = np.searchsorted(plan.base_cum_weight, u_base, side="right")
    b = np.minimum(b, plan.num_base_clusters - 1)
    cnt = plan.base_sub_count[b]
    j = np.minimum((cnt * u_sub**_SUB_POWER).astype(np.int64), cnt - 1)
    return b, plan.base_sub_start[b] + j


def _block_draws(plan: PoolPlan, block: int, assignment_only: bool = False):
    """Per-row randomness of one block of ids (always the full block, in a fixed order)."""
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([plan.seed, _STREAM_BLOCK, block]))
    )
    u = rng.random((5, BLOCK_SIZE))  # burst?, base, sub, burst pick, label
    is_burst = u[0] < plan.burst_fraction
    burst = np.minimum(
        (plan.num_bursts * u[3] ** _BURST_POWER).astype(np.int64), plan.num_bursts - 1
    )
    burst = np.where(is_burst, burst, -1)
    if assignment_only:
        return u, burst, None
    draws = {
        "radial": rng.standard_normal(BLOCK_SIZE),
        "jitter": rng.standard_normal(BLOCK_SIZE),
        "pos": rng.standard_normal((BLOCK_SIZE, plan.dim), dtype=np.float32),
        # Uniform logit noise (cheaper than Gaussian; only its scale matters).
        "logit": rng.random((BLOCK_SIZE, plan.num_classes), dtype=np.float32),
    }
    return u, burst, draws


def _bank_vectors(plan: PoolPlan, h: np.ndarray) -> np.ndarray:
    """Standard normal-like vectors from two hashed rows of the plan's normal bank."""
    p = plan.normal_bank.shape[0]
    i = np.minimum((h[:, 0] * p).astype(np.int64), p - 1)
    j = np.minimum((h[:, 1] * p).astype(np.int64), p - 1)
    return (plan.normal_bank[i] + plan.normal_bank[j]) * np.float32(1.0 / math.sqrt(2.0))


def _burst_values(plan: PoolPlan, bursts: np.ndarray, full: bool):
    """Hash-derived per-burst values: cluster pick, and (if full) source-point randomness."""
    c = plan.num_classes
    h = _hash_uniform(plan.seed, _TAG_BURST, bursts, 2 if not full else 7 + c)
    out = {"u_base": h[:, 0], "u_sub": h[:, 1]}
    if full:
        z = ndtri(h[:, 2:4])
        out["radial"] = z[:, 0]
        out["jitter"] = z[:, 1]
        out["u_label"] = h[:, 4]
        out["pos"] = _bank_vectors(plan, h[:, 5:7])
        out["logit"] = h[:, 7:].astype(np.float32)
    return out


def _row_clusters(plan: PoolPlan, u: np.ndarray, burst: np.ndarray):
    """(base, sub-cluster) of every row of a block (burst rows use their burst's cluster)."""
    u_base, u_sub = u[1].copy(), u[2].copy()
    is_burst = burst >= 0
    ub, binv = np.unique(burst[is_burst], return_inverse=True)
    bv = _burst_values(plan, ub, full=False)
    u_base[is_burst] = bv["u_base"][binv]
    u_sub[is_burst] = bv["u_sub"][binv]
    return _pick_cluster(plan, u_base, u_sub)


def _cluster_values(plan: PoolPlan, cluster: np.ndarray):
    """Attributes of the sub-clusters ``cluster`` (arrays aligned with it): centre, spread,
    log-sd of the per-point noise scale, majority class, neighbouring class, confidence and
    gap. Pure function of each id."""
    base = plan.base_sub_start.searchsorted(cluster, side="right") - 1
    h = _hash_uniform(plan.seed, _TAG_SUB, cluster, 6)
    z = ndtri(h[:, 1:4])
    has_subs = plan.base_sub_count[base] > 1
    rho = np.where(has_subs, _SUB_OFFSET * np.exp(0.3 * z[:, 0]), 0.0)
    offset_scale = (rho / math.sqrt(plan.dim)).astype(np.float32)
    offset = _bank_vectors(plan, h[:, 4:6]) * offset_scale[:, None]
    center = plan.base_centers[base] + offset
    # Keep the base centre's norm: sub-clusters differ from their base by direction only.
    center *= (
        np.linalg.norm(plan.base_centers[base], axis=1) / np.linalg.norm(center, axis=1)
    )[:, None]
    spread = plan.base_spread[base] * np.where(has_subs, np.exp(0.25 * z[:, 1]), 1.0)
    spread = np.clip(spread, 0.03, 0.9)
    keep = (h[:, 0] < _MAJORITY_KEEP) | ~has_subs
    major = np.where(keep, plan.base_class[base], plan.base_alt_class[base])
    alt = np.where(keep, plan.base_alt_class[base], plan.base_class[base])
    conf = plan.base_confidence[base] + 1.1 * np.log(plan.base_spread[base] / spread)
    conf = conf + np.where(has_subs, 0.3 * z[:, 2], 0.0)
    gap = plan.base_gap[base] * (plan.base_spread[base] / spread) ** 0.6
    return center, spread, plan.base_noise_sigma[base], major, alt, conf, gap


def _generate_block(plan: PoolPlan, block: int) -> dict[str, np.ndarray]:
    """All rows of one block; a pure function of (plan, block)."""
    d, c = plan.dim, plan.num_classes
    u, burst, dr = _block_draws(plan, block)
    is_burst = burst >= 0
    nb = int(is_burst.sum())

    # Burst rows take their randomness from the burst source (hash) + tiny row noise.
    ub, binv = np.unique(burst[is_burst], return_inverse=True)
    bv = _burst_values(plan, ub, full=True)
    u_base, u_sub, u_label = u[1].copy(), u[2].copy(), u[4].copy()
    radial, jitter = dr["radial"], dr["jitter"]
    u_base[is_burst] = bv["u_base"][binv]
    u_sub[is_burst] = bv["u_sub"][binv]
    u_label[is_burst] = bv["u_label"][binv]
    radial[is_burst] = bv["radial"][binv]
    jitter[is_burst] = bv["jitter"][binv]
    radial = np.clip(radial, -2.5, 2.5)

    _, cluster = _pick_cluster(plan, u_base, u_sub)
    uk, kinv = np.unique(cluster, return_inverse=True)
    center, spread, sigma, major, alt, conf, gap = _cluster_values(plan, uk)

    # Embedding: centre + Gaussian noise of norm ~ spread * exp(sigma * radial), sigma = 0.25
    # (0.65 in the flat blobs of the heavy-tailed mode; 0.25 is exact in float32).
    factor = np.exp(sigma[kinv].astype(np.float64) * radial)
    scale = (spread[kinv] * factor / math.sqrt(d)).astype(np.float32)
    pos = dr["pos"]
    emb = center[kinv]
    if nb:
        noise = pos.copy()
        noise[is_burst] = bv["pos"][binv]
        emb += noise * scale[:, None]
        emb[is_burst] += np.float32(_BURST_NOISE) * pos[is_burst]
    else:
        emb += pos * scale[:, None]

    # Logits: uniform noise of std _LOGIT_NOISE on every class, the majority class boosted
    # by the cluster's confidence and the neighbouring class `gap` behind it.
    half = np.float32(_LOGIT_NOISE * math.sqrt(3.0))
    z = dr["logit"]
    if nb:
        z[is_burst] = bv["logit"][binv] + np.float32(_BURST_LOGIT_NOISE) * (z[is_burst] - 0.5)
    z *= 2 * half
    # Rows far from their centre (radial > 0) are less confident.
    margin = math.log(c - 1) + conf[kinv] + 0.7 * jitter - 0.4 * radial
    gap_row = gap[kinv] * np.exp(0.35 * jitter - 0.3 * radial) - 0.3
    rows = np.arange(BLOCK_SIZE)
    y, a = major[kinv], alt[kinv]
    z[rows, y] += margin.astype(np.float32)
    z[rows, a] += (margin - gap_row).astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z, out=z)
    probs /= probs.sum(axis=1, keepdims=True)

    # Label ~ Categorical(probs) by inverse CDF over the order [y, a, other classes...]:
    # only the rare rows that fall beyond y and a need a cumulative sum.
    py, pa = probs[rows, y].astype(np.float64), probs[rows, a].astype(np.float64)
    total = probs.sum(axis=1, dtype=np.float64)
    t = u_label * total
    label = np.where(t < py, y, a)
    rest = np.flatnonzero((t >= py + pa) & (total - py - pa > 0))
    if rest.size:
        pr = probs[rest].astype(np.float64)
        pr[np.arange(rest.size), y[rest]] = 0.0
        pr[np.arange(rest.size), a[rest]] = 0.0
        cdf = np.cumsum(pr, axis=1)
        r = t[rest] - py[rest] - pa[rest]
        k = np.minimum((cdf < r[:, None]).sum(axis=1), c - 1)
        # Guard against rounding: never return y/a or a zero-probability class from here.
        ok = pr[np.arange(rest.size), k] > 0
        k = np.where(ok, k, np.argmax(pr, axis=1))
        label[rest] = k
    return {"embedding": emb, "probs": probs, "label": label.astype(np.int64)}


def _check_range(plan: PoolPlan, start: int, end: int) -> tuple[int, int]:
    start = check_int("start", start, 0)
    end = check_int("end", end, 0)
    if not start <= end <= plan.num_examples:
        raise ValueError(
            f"need 0 <= start <= end <= num_examples={plan.num_examples}, got [{start}, {end})"
        )
    return start, end


def generate_rows(plan: PoolPlan, start: int, end: int) -> dict[str, np.ndarray]:
    """Rows with ids ``start..end-1``: ``id`` int64, ``embedding`` float32 (m, dim),
    ``probs`` float32 (m, num_classes), ``label`` int64 (m,).

    Depends only on ``(plan, start, end)``; each id's row is the same whatever range it is
    generated in. Work is done block by block (``BLOCK_SIZE`` ids), memory O(m * (dim + C)).
    """
    start, end = _check_range(plan, start, end)
    m = end - start
    emb = np.empty((m, plan.dim), dtype=np.float32)
    probs = np.empty((m, plan.num_classes), dtype=np.float32)
    label = np.empty(m, dtype=np.int64)
    if m:
        for block in range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            b0 = block * BLOCK_SIZE
            lo, hi = max(start, b0), min(end, b0 + BLOCK_SIZE)
            out = _generate_block(plan, block)
            emb[lo - start : hi - start] = out["embedding"][lo - b0 : hi - b0]
            probs[lo - start : hi - start] = out["probs"][lo - b0 : hi - b0]
            label[lo - start : hi - start] = out["label"][lo - b0 : hi - b0]
    return {
        "id": np.arange(start, end, dtype=np.int64),
        "embedding": emb,
        "probs": probs,
        "label": label,
    }


def true_cluster_ids(plan: PoolPlan, start: int, end: int) -> dict[str, np.ndarray]:
    """Ground truth for rows ``start..end-1`` (for evaluation/diagnostics):
    ``cluster`` (global sub-cluster index, int64), ``base`` (base cluster, int64) and
    ``burst`` (burst id or -1, int64). Consistent with ``generate_rows``.
    """
    start, end = _check_range(plan, start, end)
    m = end - start
    cluster = np.empty(m, dtype=np.int64)
    base = np.empty(m, dtype=np.int64)
    burst = np.empty(m, dtype=np.int64)
    if m:
        for block in range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            b0 = block * BLOCK_SIZE
            lo, hi = max(start, b0), min(end, b0 + BLOCK_SIZE)
            u, bu, _ = _block_draws(plan, block, assignment_only=True)
            bb, kk = _row_clusters(plan, u, bu)
            sl, bl = slice(lo - start, hi - start), slice(lo - b0, hi - b0)
            cluster[sl], base[sl], burst[sl] = kk[bl], bb[bl], bu[bl]
    return {"cluster": cluster, "base": base, "burst": burst}

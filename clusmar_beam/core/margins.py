"""Margins (lower = more uncertain) from a model's class scores.

- multi-class (softmax) outputs: top-1 minus top-2 probability;
- multi-label (sigmoid) outputs, the *multi-label rule*: each class c is a
  binary decision whose margin is |p_c - (1 - p_c)| = |2 p_c - 1|; an example's
  margin is its least certain decision, min over classes of |2 p_c - 1|,
  optionally over a subset of classes only.
Raw logits are turned into probabilities first (softmax, or sigmoid when
multi-label).
"""
from __future__ import annotations

import numpy as np

from clusmar_beam.core.batch import PROBS_SUM_TOLERANCE
from clusmar_beam.core.errors import InputError

OUTPUT_MODES = ("probs", "logits")


def to_probabilities(scores: np.ndarray, outputs: str, multi_label: bool, where: str) -> np.ndarray:
    """Raw outputs -> float32 probabilities, checking they are finite and (for --outputs probs) valid."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError(f"{where}: output has shape {scores.shape}, not one probability vector per example")
    if scores.shape[1] < 2 and not multi_label:
        raise InputError(f"{where}: output has {scores.shape[1]} class; margins need at least 2 "
                         "(for one sigmoid output pass --multi-label)")
    if outputs == "logits":
        x = scores.astype(np.float32, copy=True)
        if multi_label:
            # sigmoid through tanh: no overflow for large |x|
            np.multiply(x, 0.5, out=x)
            np.tanh(x, out=x)
            x += 1.0
            x *= 0.5
        else:
            x -= x.max(axis=1, keepdims=True)
            np.exp(x, out=x)
            x /= x.sum(axis=1, keepdims=True)
        return x
    probs = scores.astype(np.float32, copy=False)
    hint = "; if the model returns logits pass --outputs logits"
    low = probs.min(axis=1) < -PROBS_SUM_TOLERANCE
    high = probs.max(axis=1) > 1 + PROBS_SUM_TOLERANCE
    if multi_label:
        bad = int(np.count_nonzero(low | high))
        if bad:
            raise InputError(f"{where}: output is not a probability vector: {bad} of {len(probs)} rows have "
                             f"values outside [0, 1]{hint}")
        return probs
    sums = probs.sum(axis=1, dtype=np.float64)
    off = np.abs(sums - 1.0) > PROBS_SUM_TOLERANCE
    bad = low | high | off
    count = int(np.count_nonzero(bad))
    if count:
        example = sums[bad][0]
        raise InputError(f"{where}: output is not a probability vector: {count} of {len(probs)} rows have values "
                         f"outside [0, 1] or do not sum to 1 (e.g. sum {example:.4f}){hint}, or --multi-label "
                         "for independent sigmoid outputs")
    return probs


def top2_margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability in float64: the two highest values of each row without
    sorting it: an argmax, one masked copy and a max.
    """
    n = len(probs)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    rows = np.arange(n)
    first = probs.argmax(axis=1)
    top1 = probs[rows, first]
    rest = probs.copy()
    rest[rows, first] = -np.inf
    return top1.astype(np.float64) - rest.max(axis=1).astype(np.float64)


def margins(probs: np.ndarray, multi_label: bool = False, classes=None) -> np.ndarray:
    """float32 margins: top-1 − top-2 probability, or (multi-label) min over classes of |2p − 1|."""
    if multi_label:
        p = probs if classes is None else probs[:, list(classes)]
        return np.abs(2.0 * p.astype(np.float64) - 1.0).min(axis=1).astype(np.float32)
    return top2_margins(probs).astype(np.float32)

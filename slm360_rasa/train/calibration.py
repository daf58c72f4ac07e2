"""Confidence calibration: temperature scaling (Guo et al. 2017) and expected calibration error.

A fine-tuned classifier's softmax is usually over-confident; dividing its logits by one
temperature T > 1, fitted on held-out examples by minimising the negative log-likelihood,
makes the top probability track accuracy, so a FallbackClassifier threshold of 0.3 means
roughly "right 30% of the time". T never changes which intent ranks first.

The ECE here is the one the benchmark reports (benchmarks/_metrics.py imports it): 15
equal-width confidence bins of (0, 1], each weighted by its share of the examples.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

ECE_BINS = 15

# Range of the fitted temperature. Below T_MIN the logits would be sharpened more than
# 4x: held-out sets with one or two errors can ask for that, and it would push every
# confidence, out-of-scope messages' included, towards 1. Above T_MAX a model's
# probabilities are already near uniform for any logit margin it produces in practice.
T_MIN = 0.25
T_MAX = 20.0
# Golden-section steps on log T: the bracket log(T_MAX / T_MIN) = 4.4 shrinks by 0.618 per
# step, so 60 steps leave it below 1e-11, far under any change that moves a probability.
_GOLDEN_STEPS = 60
_INV_PHI = (math.sqrt(5) - 1) / 2


def _check(logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, K) and labels (N,), got {logits.shape} and {labels.shape}")
    if logits.shape[0] == 0:
        raise ValueError("no examples to calibrate on")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be in [0, {logits.shape[1]}), got range [{labels.min()}, {labels.max()}]")


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax(logits (N, K) / temperature)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(z)), np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature in [t_min, t_max] minimising the NLL of `labels` under softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in u = log T, so a fixed number of
    golden-section steps on u finds the minimum deterministically (no tolerance-dependent
    stopping). When every example is already classified correctly the NLL keeps falling
    as T -> 0 and the data has no finite optimum, only "be more confident": we return 1.0
    (leave the model as it is) rather than the lower bound.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.int64)
    _check(z, y)
    if not 0 < t_min <= 1 <= t_max:
        raise ValueError(f"need 0 < t_min <= 1 <= t_max, got t_min={t_min!r}, t_max={t_max!r}")
    if np.array_equal(z.argmax(axis=1), y):
        return 1.0
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = nll(z, y, math.exp(c)), nll(z, y, math.exp(d))
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = nll(z, y, math.exp(d))
    return float(math.exp((a + b) / 2))


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    # Bins are (lo, hi], as in Guo et al. 2017: bin b holds b/n < c <= (b+1)/n; a confidence
    # of exactly 0 goes to the first bin. Rounding first keeps c = k/n on the intended side
    # despite float error (e.g. 0.2 * 15 = 3.0000000000000004).
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    idx = np.ceil(np.round(c * n_bins, 9)).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> List[dict]:
    """Per-bin count, mean confidence and accuracy over equal-width bins of (0, 1].

    Returns one dict per bin (empty bins included, with nan means) with keys
    lo, hi, n, confidence, accuracy: the data of a reliability diagram.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.shape} vs {corr.shape}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    idx = _bin_index(conf, n_bins)
    out = []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                    "confidence": float(conf[m].mean()) if n else float("nan"),
                    "accuracy": float(corr[m].mean()) if n else float("nan")})
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of (n_bin / N) * |accuracy_bin - mean confidence_bin| (nan if N = 0)."""
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(b["n"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))

"""Confidence calibration: temperature scaling (Guo et al. 2017) and expected calibration error.

A fine-tuned classifier's softmax is usually over-confident; dividing its logits by one
temperature T > 1, fitted on held-out examples by minimising the negative log-likelihood,
makes the top probability track accuracy, so a FallbackClassifier threshold of 0.3 means
roughly "right 30% of the time". T never changes which intent ranks first.

Out-of-scope mass. A softmax over the bot's intents must hand all of its probability to
them, so a message about none of them ("what's the weather on Mars") can still get 0.9
for some intent. `fit_temperature_with_background` adds one more logit, b, for "none of
these" (it is not an intent and never ranks): the served confidence of intent k is

    p_k = exp(z_k / T) / (exp(b / T) + sum_j exp(z_j / T))
        = softmax(z / T)_k * sigmoid((E - b) / T),   E = T logsumexp(z / T)

E, the free energy of the logits (Liu et al. 2020, "Energy-based out-of-distribution
detection"), is high when the encoder recognises the input as one of the intents and low
when all logits are weak, which MSP alone (the top probability) does not see. b is set to
the `quantile` of E over the held-out in-scope examples (an example that unfamiliar gets
its confidence halved), and T is fitted with b in place by the same golden-section search
on the held-out NLL, so in-scope confidences stay calibrated. Measured on the benchmark's
CLINC150 model (its own 500 held-out examples, quantile 0.01; FallbackClassifier threshold
chosen on valid / oos_valid as the README describes): oos_test recall 0.526 -> 0.652 while
in-scope test accuracy drops 1.00 point instead of 1.07; test ECE 0.026 -> 0.020. On
Banking77 (no out-of-scope data) ECE 0.010 -> 0.011.

The ECE here is the one the benchmark reports (benchmarks/metrics.py imports it): 15
equal-width confidence bins of (0, 1], each weighted by its share of the examples.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..checks import check_int
from ..model.calibration import background_softmax, energy, in_scope_probability

logger = logging.getLogger(__name__)

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


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float, background: Optional[float] = None) -> float:
    """Mean negative log-likelihood of `labels` (N,) under softmax(logits (N, K) / temperature),
    or under `background_softmax` when a background logit is given."""
    if background is not None:
        p = background_softmax(logits, temperature, background)[np.arange(len(logits)), np.asarray(labels)]
        return float(-np.mean(np.log(np.maximum(p, 1e-300))))
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(z)), np.asarray(labels)]))


def _golden_log_t(f: Callable[[float], float], t_min: float, t_max: float) -> float:
    """The T in [t_min, t_max] minimising f(T), by _GOLDEN_STEPS golden-section steps on log T.

    A fixed number of steps (no tolerance-dependent stopping) keeps the result deterministic.
    """
    if not 0 < t_min <= 1 <= t_max:
        raise ValueError(f"need 0 < t_min <= 1 <= t_max, got t_min={t_min!r}, t_max={t_max!r}")
    a, b = math.log(t_min), math.log(t_max)
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(math.exp(d))
    return float(math.exp((a + b) / 2))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The temperature in [t_min, t_max] minimising the NLL of `labels` under softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in u = log T, so golden-section steps on u find
    the minimum. When every example is already classified correctly the NLL keeps falling
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
    return _golden_log_t(lambda t: nll(z, y, t), t_min, t_max)


def _background_at(z: np.ndarray, t: float, quantile: float) -> float:
    return float(np.quantile(energy(z, t), quantile))


def fit_temperature_with_background(logits: np.ndarray, labels: np.ndarray, quantile: float,
                                    t_min: float = T_MIN, t_max: float = T_MAX) -> Tuple[float, float]:
    """(T, b): the background logit b = `quantile` of the held-out energies at T, and the T in
    [t_min, t_max] minimising the held-out NLL with b in place (the golden-section search of
    `fit_temperature`; deterministic). See the module docstring."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.int64)
    _check(z, y)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    t = _golden_log_t(lambda t: nll(z, y, t, _background_at(z, t, quantile)), t_min, t_max)
    return t, _background_at(z, t, quantile)


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
    check_int("n_bins", n_bins, lo=1)
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


# ------------------------------------------------------------------ a model's calibration

# Fewer held-out examples than this leave T = 1: with a handful of examples one of them
# moves the NLL optimum a long way, and a wrong T is worse than none.
MIN_CALIBRATION_EXAMPLES = 20
# The out-of-scope logit is used only if it leaves the median held-out example at least
# this much in scope (sigmoid((E - b) / T)); see `calibrate`.
MIN_IN_SCOPE = 0.95


def calibrate(model, oos_quantile: Optional[float]) -> dict:
    """Fit `model`'s temperature (and out-of-scope logit at `oos_quantile`, None = off) on its
    training state's held-out intent logits, through the served weights, and record held-out
    accuracy, NLL and ECE before and after in `model.calibration` (also returned). T = 1 when
    there are fewer than MIN_CALIBRATION_EXAMPLES readable held-out examples or no intent head."""
    from ..model.heads import INTENT, softmax

    holdout = model.training.holdout
    model.temperature, model.background_logit = 1.0, None
    info: dict = {"n_holdout": len(holdout), "temperature": 1.0, "fitted": False,
                  "oos_quantile": oos_quantile, "background_logit": None}
    if f"{INTENT}.weight" not in model.heads or not model.intents:
        info["reason"] = "no intent head"
        model.calibration = info
        return info
    known = [i for i, y in enumerate(holdout.intents) if y in model.intents]
    logits = model.intent_logits([holdout.texts[i] for i in known]) if known else np.zeros((0, 0))
    rows = [r for r in range(len(known)) if np.isfinite(logits[r]).all()]
    if rows:
        z = logits[rows].astype(np.float64)
        y = np.array([model.intents.index(holdout.intents[known[r]]) for r in rows])
        correct = z.argmax(1) == y
        info.update(accuracy=float(correct.mean()), nll_before=nll(z, y, 1.0),
                    ece_before=expected_calibration_error(softmax(z).max(1), correct))
    info["n_used"] = len(rows)
    if len(rows) < MIN_CALIBRATION_EXAMPLES:
        info["reason"] = f"fewer than {MIN_CALIBRATION_EXAMPLES} held-out examples; temperature left at 1"
        logger.info("SLM360: %d held-out examples (< %d), confidences are not calibrated (T = 1)",
                    len(rows), MIN_CALIBRATION_EXAMPLES)
    else:
        t = b = None
        if oos_quantile:
            t, b = fit_temperature_with_background(z, y, oos_quantile)
            # The "none of these" logit only helps where held-out energies are spread out,
            # i.e. the model knows its intents well: a typical held-out example must stay at
            # least MIN_IN_SCOPE in scope. A weak model (tiny bot, few epochs) has all its
            # energies close together, and the logit would take mass from every answer.
            typical = float(np.median(in_scope_probability(z, t, b)))
            info["typical_in_scope"] = typical
            if typical < MIN_IN_SCOPE:
                t = b = None
                info["background_off"] = (f"a typical held-out example would be only {typical:.2f} in scope "
                                          f"(< {MIN_IN_SCOPE}): plain temperature scaling")
        if t is None:
            t = fit_temperature(z, y)
        model.temperature, model.background_logit = t, b
        info.update(temperature=t, background_logit=b, fitted=True, nll_after=nll(z, y, t, b),
                    ece_after=expected_calibration_error(background_softmax(z, t, b).max(1), correct))
        logger.info("SLM360: temperature %.3f%s fitted on %d held-out examples (accuracy %.3f, ECE %.3f -> %.3f)",
                    t, "" if b is None else f" and out-of-scope logit {b:.2f}", len(rows), info["accuracy"],
                    info["ece_before"], info["ece_after"])
    model.calibration = info
    return info

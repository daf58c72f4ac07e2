"""Serving side of calibration: calibrated intent probabilities from logits, T and b.

The served confidence of intent k, with temperature T and the out-of-scope ("none of
these") logit b fitted by train/calibration.py on held-out examples, is

    p_k = exp(z_k / T) / (exp(b / T) + sum_j exp(z_j / T))
        = softmax(z / T)_k * sigmoid((E - b) / T),   E = T logsumexp(z / T)

so the probabilities sum to P(in scope) < 1; with no b it is the plain softmax(z / T).
train/calibration.py explains how T and b are chosen and what they measured.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def energy(logits: np.ndarray, temperature: float) -> np.ndarray:
    """E = T logsumexp(z / T) per row of logits (N, K): high for inputs the classifier knows."""
    z = np.asarray(logits, np.float64)
    t = float(temperature)
    top = z.max(axis=1)
    return t * np.log(np.exp((z - top[:, None]) / t).sum(axis=1)) + top


def in_scope_probability(logits: np.ndarray, temperature: float, background: float) -> np.ndarray:
    """sigmoid((E - b) / T) per row: the share of probability `background_softmax` leaves to
    the intents (its rows' sums)."""
    return 1.0 / (1.0 + np.exp((float(background) - energy(logits, temperature)) / float(temperature)))


def background_softmax(logits: np.ndarray, temperature: float, background: Optional[float]) -> np.ndarray:
    """Intent probabilities (N, K) float64: softmax over [z, background] / T without its last
    column (they sum to P(in scope) < 1); the plain softmax(z / T) when background is None."""
    z = np.asarray(logits, np.float64) / float(temperature)
    if background is not None:
        z = np.concatenate([z, np.full((z.shape[0], 1), float(background) / float(temperature))], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p[:, : np.asarray(logits).shape[1]]

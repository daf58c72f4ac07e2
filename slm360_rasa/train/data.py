"""Batching shared by pretraining and fine-tuning: seeded, length-bucketed, padded."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> List[np.ndarray]:
    """The batches of one epoch: a seeded shuffle, then length-sorted within windows of
    50 batches (less padding), then the windows' batches shuffled again."""
    rng = np.random.default_rng([seed, 1000 + epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * 50
    batches: List[np.ndarray] = []
    for w0 in range(0, len(perm), window):
        idx = perm[w0:w0 + window]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        chunk = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        order = rng.permutation(len(chunk))
        batches.extend(chunk[i] for i in order)
    return batches


def pad(seqs: List[np.ndarray], pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences into (B, T) ids and mask."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, np.int64)
    mask = np.zeros((len(seqs), T), np.float32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1.0
    return ids, mask

"""Data helpers shared by pretraining, fine-tuning and continual learning: seeded,
length-bucketed, padded batches; stratified held-out splits and samples of `Examples`
(model/examples.py)."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..checks import check_int
from ..model.examples import Examples


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


# ------------------------------------------------------------------ stratified sampling


def _groups(labels: Sequence[str]) -> Dict[str, np.ndarray]:
    """Positions of each label, labels in sorted order (so the result never depends on input order of labels)."""
    order: Dict[str, List[int]] = {}
    for i, lab in enumerate(labels):
        order.setdefault(lab, []).append(i)
    return {lab: np.array(order[lab], np.int64) for lab in sorted(order)}


def _allocate(sizes: np.ndarray, caps: np.ndarray, k: int, at_least_one: bool = False) -> np.ndarray:
    """Split `k` draws over groups in proportion to `sizes`, never more than `caps`.

    Largest-remainder rounding; the remainder goes round by round to the groups furthest
    below their proportional share (ties to the lower index), skipping full groups. With
    `at_least_one`, every group with a free slot gets one first when k allows it (so a
    replay buffer never drops a rare label). Requires k <= caps.sum().
    """
    take = np.zeros(len(sizes), np.int64)
    if k <= 0:
        return take
    floor = np.minimum(caps, 1) if at_least_one and k >= int((caps > 0).sum()) else np.zeros_like(caps)
    share = k * sizes / max(int(sizes.sum()), 1)
    take = np.maximum(floor, np.minimum(np.floor(share).astype(np.int64), caps))
    while take.sum() < k:
        open_ = np.flatnonzero(take < caps)
        # Furthest below its share first; stable sort keeps ties in index order.
        order = open_[np.argsort(-(share[open_] - take[open_]), kind="stable")]
        for g in order[: k - int(take.sum())]:
            take[g] += 1
    while take.sum() > k:  # the guaranteed one per group pushed the total over k
        over = np.flatnonzero(take > floor)
        take[over[np.argmax(take[over] - share[over])]] -= 1
    return take


def stratified_holdout(labels: Sequence[str], fraction: float, max_n: int, seed) -> Tuple[np.ndarray, np.ndarray]:
    """Split positions into (train_idx, holdout_idx), both sorted, stratified by label.

    About `fraction` of the examples (rounded, at most `max_n`) are held out, each label
    contributing in proportion to its count, but never its last two examples: a label with
    fewer than 3 examples contributes none, so every label keeps at least 2 to learn from.
    Which examples of a label are held out is a seeded draw (`seed`: an int or a sequence
    of ints for numpy's SeedSequence); same labels + seed give the same split.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction!r}")
    check_int("holdout max_n", max_n, lo=0)
    n = len(labels)
    groups = _groups(labels)
    sizes = np.array([len(g) for g in groups.values()], np.int64)
    caps = np.maximum(sizes - 2, 0)
    k = min(int(math.floor(fraction * n + 0.5)), int(max_n), int(caps.sum()))
    take = _allocate(sizes, caps, k)
    rng = np.random.default_rng(seed)
    held = [g[rng.permutation(len(g))[:t]] for g, t in zip(groups.values(), take)]
    hold_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.ones(n, bool)
    keep[hold_idx] = False
    return np.flatnonzero(keep).astype(np.int64), hold_idx.astype(np.int64)


def holdout_split(examples: Examples, fraction: float, max_n: int, seed) -> Tuple[Examples, Examples]:
    """(train, held-out) examples by `stratified_holdout` on the intents; a held-out example
    whose text also occurs in the training part goes back to training, since the model
    would have seen that exact text (data sets do repeat texts)."""
    tr, ho = stratified_holdout(examples.intents, fraction, max_n, seed)
    train_texts = {examples.texts[i] for i in tr}
    leak = [i for i in ho if examples.texts[i] in train_texts]
    if leak:
        tr = np.sort(np.concatenate([tr, np.array(leak, np.int64)]))
        ho = np.array([i for i in ho if examples.texts[i] not in train_texts], np.int64)
    return examples.subset(tr), examples.subset(ho)


def stratified_sample(labels: Sequence[str], n: int, seed) -> np.ndarray:
    """Sorted positions of a seeded sample of `n` examples (all of them when n >= len),
    stratified by label, with every label represented when n >= the number of labels."""
    check_int("sample size", n, lo=0)
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    groups = _groups(labels)
    sizes = np.array([len(g) for g in groups.values()], np.int64)
    take = _allocate(sizes, sizes, int(n), at_least_one=True)
    rng = np.random.default_rng(seed)
    picked = [g[rng.permutation(len(g))[:t]] for g, t in zip(groups.values(), take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)

"""Training of the heads (model/heads.py serves them): init, loss, gradients, BILOU labels.

Both heads are a linear map followed by softmax cross-entropy; `softmax_xent` returns the
loss, the probabilities and the gradient w.r.t. the logits, and `linear_head_backward`
chains it to the head input, so the caller feeds it into `nano.model.backward`. Entity
labels are BILOU tags over the encoder's WordPiece tokens, derived from character spans.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ..model.heads import OUTSIDE, softmax

IGNORE = -1  # label of tokens that take no part in the entity loss ([CLS], [SEP], padding)


def init_linear(n_out: int, n_in: int, seed: int, name: str) -> Dict[str, np.ndarray]:
    """Seeded small-init weight (n_out, n_in) and zero bias for a head called `name`."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    return {f"{name}.weight": (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32),
            f"{name}.bias": np.zeros(n_out, np.float32)}


def softmax_xent(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0):
    """Mean cross-entropy over rows whose label != IGNORE.

    logits (N, K), labels (N,). Returns (loss, probs (N, K), dlogits (N, K)).
    """
    probs = softmax(logits)
    valid = labels != IGNORE
    n = int(valid.sum())
    dlogits = np.zeros_like(logits)
    if n == 0:
        return 0.0, probs, dlogits
    K = logits.shape[-1]
    target = np.zeros_like(probs[valid])
    target[np.arange(n), labels[valid]] = 1.0
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / K
    logp = np.log(np.clip(probs[valid], 1e-30, None))
    loss = float(-(target * logp).sum() / n)
    dlogits[valid] = (probs[valid] - target) / n
    return loss, probs, dlogits


def linear_head_forward(x: np.ndarray, p: Dict[str, np.ndarray], name: str) -> np.ndarray:
    """x (..., C) @ W.T + b."""
    W, b = p[f"{name}.weight"], p[f"{name}.bias"]
    return (x.reshape(-1, x.shape[-1]) @ W.T + b).reshape(x.shape[:-1] + (W.shape[0],))  # (..., K)


def linear_head_backward(x: np.ndarray, dlogits: np.ndarray, p: Dict[str, np.ndarray], name: str):
    """Returns (dx, grads of the head)."""
    W = p[f"{name}.weight"]
    x2 = x.reshape(-1, x.shape[-1])  # (N, C)
    d2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, K)
    grads = {f"{name}.weight": d2.T @ x2, f"{name}.bias": d2.sum(axis=0)}
    return (d2 @ W).reshape(x.shape), grads


def bilou_labels(offsets: np.ndarray, length: int, entities: Sequence[dict], tag_index: Dict[str, int],
                 T: int) -> np.ndarray:
    """Tag ids (T,) for one text: tokens overlapping an entity's [start, end) get its BILOU tags.

    Special tokens (offsets (0, 0)) and padding get IGNORE. Entities whose type is unknown to
    `tag_index` are treated as outside (they cannot be predicted anyway).
    """
    labels = np.full(T, IGNORE, np.int64)
    real = [i for i in range(length) if offsets[i][1] > offsets[i][0]]
    for i in real:
        labels[i] = tag_index[OUTSIDE]
    for ent in sorted(entities, key=lambda e: (e["start"], e["end"])):
        if f"U-{ent['entity']}" not in tag_index:
            continue
        toks = [i for i in real if offsets[i][0] < ent["end"] and offsets[i][1] > ent["start"]]
        if not toks:
            continue
        if len(toks) == 1:
            labels[toks[0]] = tag_index[f"U-{ent['entity']}"]
            continue
        labels[toks[0]] = tag_index[f"B-{ent['entity']}"]
        for i in toks[1:-1]:
            labels[i] = tag_index[f"I-{ent['entity']}"]
        labels[toks[-1]] = tag_index[f"L-{ent['entity']}"]
    return labels

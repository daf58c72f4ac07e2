"""Task heads on top of the encoder: intent (pooled -> softmax) and entities (tokens -> BILOU).

Both heads are a linear map followed by softmax cross-entropy; `*_forward` returns the loss,
the probabilities and the gradient w.r.t. the head input, so the caller chains it into
`nano.model.backward`. Entity labels are BILOU tags over the encoder's WordPiece tokens,
derived from character spans, and decoded back to character spans snapped to word edges.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -1  # label of tokens that take no part in the entity loss ([CLS], [SEP], padding)
OUTSIDE = "O"
BILOU = ("B", "I", "L", "U")


def init_linear(n_out: int, n_in: int, seed: int, name: str) -> Dict[str, np.ndarray]:
    """Seeded small-init weight (n_out, n_in) and zero bias for a head called `name`."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    return {f"{name}.weight": (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32),
            f"{name}.bias": np.zeros(n_out, np.float32)}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


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


def linear_head_predict(x: np.ndarray, p: Dict[str, np.ndarray], name: str) -> np.ndarray:
    """`linear_head_forward` for serving: x (N, C) float32, one numba loop on this thread (no
    BLAS threads; see kernels.linear_serial). Same values up to float32 summation order."""
    from ..nano.kernels import linear_serial

    W, b = p[f"{name}.weight"], p[f"{name}.bias"]
    out = np.empty((x.shape[0], W.shape[0]), np.float32)
    linear_serial(np.ascontiguousarray(x, dtype=np.float32), W, b, out)
    return out


def linear_head_backward(x: np.ndarray, dlogits: np.ndarray, p: Dict[str, np.ndarray], name: str):
    """Returns (dx, grads of the head)."""
    W = p[f"{name}.weight"]
    x2 = x.reshape(-1, x.shape[-1])  # (N, C)
    d2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, K)
    grads = {f"{name}.weight": d2.T @ x2, f"{name}.bias": d2.sum(axis=0)}
    return (d2 @ W).reshape(x.shape), grads


# ----------------------------------------------------------------------- BILOU


def tag_names(entity_types: Sequence[str]) -> List[str]:
    """["O", "B-a", "I-a", "L-a", "U-a", "B-b", ...] for sorted entity types."""
    return [OUTSIDE] + [f"{p}-{e}" for e in sorted(entity_types) for p in BILOU]


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


def _snap(text: str, start: int, end: int) -> Tuple[int, int]:
    """Widen a span to whole words: WordPiece may split a word inside an entity."""
    while start > 0 and text[start - 1].isalnum() and text[start].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum() and text[end - 1].isalnum():
        end += 1
    return start, end


def decode_bilou(text: str, offsets: np.ndarray, probs: np.ndarray, tags: Sequence[str]) -> List[dict]:
    """Entity spans from per-token tag probabilities (T, n_tags) of one text.

    Greedy argmax per token; a span opens on B/U, on a change of type or after O, and closes
    on L/U/O. Confidence = mean probability of the chosen tags over the span's tokens.
    """
    out: List[dict] = []
    cur: Optional[dict] = None

    def close():
        nonlocal cur
        if cur is not None:
            s, e = _snap(text, cur["start"], cur["end"])
            value = text[s:e]
            if value.strip():
                out.append({"start": s, "end": e, "value": value, "entity": cur["entity"],
                            "confidence_entity": float(np.mean(cur["p"]))})
        cur = None

    for i in range(len(offsets)):
        a, b = int(offsets[i][0]), int(offsets[i][1])
        if b <= a:  # [CLS], [SEP]
            continue
        k = int(np.argmax(probs[i]))
        tag = tags[k]
        if tag == OUTSIDE:
            close()
            continue
        prefix, ent = tag.split("-", 1)
        if cur is None or prefix in ("B", "U") or cur["entity"] != ent:
            close()
            cur = {"start": a, "end": b, "entity": ent, "p": []}
        cur["end"] = b
        cur["p"].append(float(probs[i, k]))
        if prefix in ("L", "U"):
            close()
    close()
    # Overlaps can only come from snapping; keep the more confident span.
    out.sort(key=lambda e: (e["start"], -e["confidence_entity"]))
    kept: List[dict] = []
    for e in out:
        if kept and e["start"] < kept[-1]["end"]:
            if e["confidence_entity"] > kept[-1]["confidence_entity"]:
                kept[-1] = e
            continue
        kept.append(e)
    return kept

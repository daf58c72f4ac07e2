"""The served heads: intent (pooled vector -> softmax) and entities (token states -> BILOU spans).

Both heads are a linear map; here is only what prediction needs: the numba matmul of a
head, softmax, the BILOU tag set and the decoder from per-token tag probabilities back to
character spans snapped to word edges. Training (losses, gradients, BILOU labels from
spans) is in train/heads.py.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

OUTSIDE = "O"
BILOU = ("B", "I", "L", "U")
# Tensor name prefixes of the two heads: "<prefix>.weight" (n_out, dim), "<prefix>.bias" (n_out,).
INTENT = "head.intent"
ENTITY = "head.entity"


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def linear_head_predict(x: np.ndarray, p: Dict[str, np.ndarray], name: str) -> np.ndarray:
    """`linear_head_forward` for serving: x (N, C) float32, one numba loop on this thread (no
    BLAS threads; see kernels.linear_serial). Same values up to float32 summation order."""
    from ..nano.kernels import linear_serial

    W, b = p[f"{name}.weight"], p[f"{name}.bias"]
    out = np.empty((x.shape[0], W.shape[0]), np.float32)
    linear_serial(np.ascontiguousarray(x, dtype=np.float32), W, b, out)
    return out


# ----------------------------------------------------------------------- BILOU


def tag_names(entity_types: Sequence[str]) -> List[str]:
    """["O", "B-a", "I-a", "L-a", "U-a", "B-b", ...] for sorted entity types."""
    return [OUTSIDE] + [f"{p}-{e}" for e in sorted(entity_types) for p in BILOU]


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

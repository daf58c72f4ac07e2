"""The Fisher diagonal's storage format inside a model file (continual learning's state).

Fisher storage ("log2-q4-g32"), in the manner of nano/quant.py's block_q4
------------------------------------------------------------------------
A Fisher value is a non-negative importance that spans many orders of magnitude and is
itself a noisy estimate, so it is stored as a 4-bit *logarithmic* code relative to the
largest value of its group. A tensor is flattened (row-major) and cut into groups of
FISHER_GROUP = 32 consecutive values (the last group may be shorter):

    fisher.<name>.top    float16 (ceil(n / 32),)  log2 of the group's largest value
                                                   (0.0 for a group of zeros)
    fisher.<name>.codes  uint8   (ceil(n / 2),)    4-bit codes, element 2j in the low
                                                   nibble of byte j, element 2j+1 in the high
                                                   nibble (an odd tail is padded with ZERO)

    value = 2 ** (top - code)   for code in 0..14   (code = round(top - log2 value))
    value = 0                   for code 15 (FISHER_ZERO_CODE): the value is below
                                2 ** (top - 14.5), i.e. < 1/23,000 of the group's largest

So a stored value is within a factor 2 ** 0.5 (plus f16 rounding of `top`, < 2 ** 0.03)
of the estimate; 4.5 bits per value, the bit budget of the INT4 weights. For the shipped
6.4M-parameter encoder with the embedding frozen (the default) the Fisher covers 4,325,632
encoder values, 2,433,168 bytes (`fisher_bytes`), plus 0.56 bytes per head value (11 KB
for a 77-intent head): the saved model grows by about 2.4 MB.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

FISHER_FORMAT = "log2-q4-g32"
FISHER_PREFIX = "fisher."
FISHER_GROUP = 32  # values per group sharing one f16 `top`
FISHER_ZERO_CODE = 15  # the 4-bit code that means "zero"
FISHER_OCTAVES = FISHER_ZERO_CODE  # codes 0..14: 0 to 14 octaves below the group's top

Arrays = Dict[str, np.ndarray]


def encode_fisher(fisher: Arrays) -> Arrays:
    """Tensors `fisher.<name>.top` / `fisher.<name>.codes` for each non-negative array (layout above)."""
    out: Arrays = {}
    for name, f in fisher.items():
        v = np.asarray(f, np.float64).ravel()
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"Fisher values of {name!r} must be finite and >= 0")
        n = v.size
        n_groups = -(-n // FISHER_GROUP)
        padded = np.zeros(n_groups * FISHER_GROUP)
        padded[:n] = v
        groups = padded.reshape(n_groups, FISHER_GROUP)
        gmax = groups.max(axis=1)
        with np.errstate(divide="ignore"):
            top = np.where(gmax > 0, np.log2(np.where(gmax > 0, gmax, 1.0)), 0.0).astype(np.float16)
            logv = np.log2(np.where(groups > 0, groups, 1.0))
        # Codes are relative to the *stored* (f16-rounded) top, so decoding sees the same reference.
        rel = top.astype(np.float64)[:, None] - logv
        codes = np.clip(np.rint(rel), 0, FISHER_OCTAVES - 1).astype(np.uint8)
        codes[(groups <= 0) | (rel > FISHER_OCTAVES - 0.5)] = FISHER_ZERO_CODE
        flat = codes.ravel()[:n]
        if n % 2:
            flat = np.concatenate([flat, np.array([FISHER_ZERO_CODE], np.uint8)])
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        out[f"{FISHER_PREFIX}{name}.top"] = top
        out[f"{FISHER_PREFIX}{name}.codes"] = packed
    return out


def _fisher_pair(tensors: Arrays, name: str, shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """The (top, codes) tensors of `name`, checked against `shape`; errors name the tensor."""
    try:
        top, packed = tensors[f"{FISHER_PREFIX}{name}.top"], tensors[f"{FISHER_PREFIX}{name}.codes"]
    except KeyError as e:
        raise ValueError(f"Fisher tensor of {name!r} is missing {e.args[0]!r}") from None
    n = int(np.prod(shape))
    n_groups = -(-n // FISHER_GROUP)
    if top.dtype != np.float16 or packed.dtype != np.uint8 or top.shape != (n_groups,) \
            or packed.shape != (-(-n // 2),):
        raise ValueError(f"Fisher tensors of {name!r} have {top.dtype}{top.shape} / {packed.dtype}{packed.shape}; "
                         f"for shape {tuple(shape)} expected float16({n_groups},) / uint8({-(-n // 2)},)")
    return top, packed


def check_fisher(tensors: Arrays, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Raise ValueError, naming the tensor, unless `tensors` hold a valid Fisher for `shapes`
    (what `decode_fisher` checks, without decoding: loading a model for serving never needs
    the values)."""
    for name, shape in shapes.items():
        _fisher_pair(tensors, name, shape)


def decode_fisher(tensors: Arrays, shapes: Dict[str, Tuple[int, ...]]) -> Arrays:
    """Float32 Fisher arrays of the given shapes from `encode_fisher`'s tensors; errors name the tensor."""
    out: Arrays = {}
    for name, shape in shapes.items():
        top, packed = _fisher_pair(tensors, name, shape)
        n = int(np.prod(shape))
        codes = np.empty(packed.size * 2, np.uint8)
        codes[0::2] = packed & 0x0F
        codes[1::2] = packed >> 4
        codes = codes[:n]
        gtop = np.repeat(top.astype(np.float64), FISHER_GROUP)[:n]
        vals = np.where(codes == FISHER_ZERO_CODE, 0.0, np.exp2(gtop - codes))
        out[name] = vals.reshape(shape).astype(np.float32)
    return out


def fisher_bytes(n_values: int) -> int:
    """Bytes `encode_fisher` stores for one tensor of `n_values` values."""
    return 2 * -(-n_values // FISHER_GROUP) + -(-n_values // 2)

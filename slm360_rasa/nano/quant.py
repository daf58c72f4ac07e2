"""INT4 group-wise weight format (Q4, group size 32), reference quantizer and dequantizer.

Format, in the manner of ggml's `block_q4_0`
---------------------------------------------
A weight matrix W is stored (out, in), row-major; its input dimension is cut into groups
of QK = 32 consecutive weights. Each group is one block:

    block_q4 {                     // 32 weights, 18 bytes, 4.5 bits per weight
        float16 d;                 // scale
        uint8   qs[QK / 2];        // 16 bytes of 4-bit codes
    }
    weight[j]      = (int(qs[j] & 0x0F) - Q4_ZERO) * d     for j in 0..15  (low nibble)
    weight[j + 16] = (int(qs[j] >> 4)   - Q4_ZERO) * d     for j in 0..15  (high nibble)

i.e. the same nibble order as ggml: byte j holds element j in its low nibble and
element j + 16 in its high nibble. Codes are unsigned 0..15 with a zero point of 8,
so representable values are d * {-8, ..., +7}.

We keep the blocks *planar* rather than interleaved, so the numba kernels read plain
arrays and the file holds two tensors per matrix:

    <name>.q4        uint8   (out, in_padded // 2)    the qs[] of every block, row by row
    <name>.q4_scale  float16 (out, in_padded // 32)   the d of every block, row by row

`in_padded` is `in` rounded up to a multiple of QK; padded weights are zero (their codes
are Q4_ZERO). The only padded matrix in Nano is w2 (in = hidden_dim = 682 -> 704); the
runtime pads w1/w3 with zero rows to match, so silu(0) * 0 = 0 fills the gap exactly.

Choosing d: ggml's q4_0 maps the largest-magnitude weight m of a block to -8 exactly
(d = m / -8). We start from that and also try a grid of slightly smaller scales, keeping,
per block, the one with the lowest squared error (the rounding-error search llama.cpp
calls make_qx_quants). The quantizer returns its error so every tensor's cost is known.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

QK = 32  # weights per block (group size along the input dimension)
Q4_ZERO = 8  # code of the value 0
Q4_MAX_CODE = 15  # codes are 4-bit
BLOCK_BYTES = 2 + QK // 2  # f16 scale + 16 code bytes = 18
BITS_PER_WEIGHT = 8.0 * BLOCK_BYTES / QK  # 4.5
CODES_SUFFIX = ".q4"
SCALE_SUFFIX = ".q4_scale"

# Scale candidates tried per block, as fractions of ggml's max-magnitude scale.
_SCALE_GRID = np.linspace(1.0, 0.70, 16)

assert QK % 2 == 0 and BLOCK_BYTES == 18


@dataclass
class QuantError:
    """Quantization error of one tensor (dequantized minus original)."""

    max_abs: float
    rmse: float
    rel_rmse: float  # rmse / rms(original)
    cosine: float  # cosine between original and dequantized, flattened

    def to_dict(self) -> Dict[str, float]:
        """Plain dict for logs and JSON reports."""
        return {"max_abs": self.max_abs, "rmse": self.rmse, "rel_rmse": self.rel_rmse, "cosine": self.cosine}


@dataclass
class Q4Tensor:
    """A Q4 matrix: planar codes and scales plus the logical input width."""

    codes: np.ndarray  # uint8 (out, in_padded // 2)
    scales: np.ndarray  # float16 (out, in_padded // QK)
    in_features: int

    @property
    def shape(self) -> Tuple[int, int]:
        """Logical (out, in) shape of the original matrix."""
        return (self.codes.shape[0], self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes on disk and in memory (codes + f16 scales)."""
        return int(self.codes.nbytes + self.scales.nbytes)


def padded_width(n: int) -> int:
    """`n` rounded up to a multiple of QK."""
    return (n + QK - 1) // QK * QK


def _encode_blocks(blocks: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes 0..15 for blocks (n, QK) at scales d (n, 1); zero scale gives the zero code."""
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    return np.clip(np.rint(blocks * inv) + Q4_ZERO, 0, Q4_MAX_CODE)


def quantize_q4(w: np.ndarray) -> Tuple[Q4Tensor, QuantError]:
    """Quantize a float matrix (out, in) to Q4; returns the tensor and its error."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_q4 expects a 2-D (out, in) matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_q4: the matrix holds NaN or infinite values; refusing to quantize")
    out_f, in_f = w.shape
    in_p = padded_width(in_f)
    wp = np.zeros((out_f, in_p), dtype=np.float64)
    wp[:, :in_f] = w
    blocks = wp.reshape(-1, QK)  # (out * in_p / QK, QK)
    # ggml q4_0: the signed value of largest magnitude maps to code 0 (= -8 * d).
    idx = np.argmax(np.abs(blocks), axis=1)
    m = blocks[np.arange(blocks.shape[0]), idx][:, None]  # (nblocks, 1)
    best_d = m / -Q4_ZERO
    best_err = np.full((blocks.shape[0], 1), np.inf)
    for frac in _SCALE_GRID:
        # Scales are stored in f16, so score each candidate at its f16 value.
        d = (m / -Q4_ZERO * frac).astype(np.float16).astype(np.float64)
        q = _encode_blocks(blocks, d)
        err = np.sum(((q - Q4_ZERO) * d - blocks) ** 2, axis=1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
    d16 = best_d.astype(np.float16)
    q = _encode_blocks(blocks, d16.astype(np.float64)).astype(np.uint8)  # (nblocks, QK)
    packed = (q[:, : QK // 2] | (q[:, QK // 2:] << 4)).astype(np.uint8)  # (nblocks, QK/2)
    t = Q4Tensor(
        codes=np.ascontiguousarray(packed.reshape(out_f, in_p // 2)),  # (out, in_p / 2)
        scales=np.ascontiguousarray(d16.reshape(out_f, in_p // QK)),  # (out, in_p / QK)
        in_features=in_f,
    )
    return t, quant_error(w, dequantize_q4(t))


def dequantize_q4(t: Q4Tensor) -> np.ndarray:
    """Reference dequantizer: Q4 -> float32 (out, in_features)."""
    out_f = t.codes.shape[0]
    qs = t.codes.reshape(-1, QK // 2)  # (nblocks, 16)
    lo = (qs & 0x0F).astype(np.int16) - Q4_ZERO
    hi = (qs >> 4).astype(np.int16) - Q4_ZERO
    q = np.concatenate([lo, hi], axis=1)  # (nblocks, QK): element j then j + 16
    d = t.scales.reshape(-1, 1).astype(np.float32)  # (nblocks, 1)
    w = (q.astype(np.float32) * d).reshape(out_f, -1)  # (out, in_p)
    return w[:, : t.in_features]


def quant_error(original: np.ndarray, approx: np.ndarray) -> QuantError:
    """Error statistics of `approx` against `original` (same shape)."""
    a = np.asarray(original, dtype=np.float64).ravel()
    b = np.asarray(approx, dtype=np.float64).ravel()
    diff = b - a
    rms = float(np.sqrt(np.mean(a * a))) if a.size else 0.0
    rmse = float(np.sqrt(np.mean(diff * diff))) if a.size else 0.0
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return QuantError(
        max_abs=float(np.max(np.abs(diff))) if a.size else 0.0,
        rmse=rmse,
        rel_rmse=rmse / rms if rms > 0 else 0.0,
        cosine=float(a @ b / denom) if denom > 0 else 1.0,
    )


def quantize_params(params: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, QuantError]]:
    """Quantize every 2-D tensor of a Nano parameter dict; 1-D tensors (norms) stay float32.

    Returns the tensors to store (`name.q4`, `name.q4_scale`, norms as-is) and the error
    of each quantized matrix.
    """
    out: Dict[str, np.ndarray] = {}
    errors: Dict[str, QuantError] = {}
    for name, w in params.items():
        if w.ndim == 2:
            t, err = quantize_q4(w)
            out[name + CODES_SUFFIX] = t.codes
            out[name + SCALE_SUFFIX] = t.scales
            errors[name] = err
        else:
            out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return out, errors


def float_params(tensors: Dict[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """Float32 weights named as in `config.param_shapes()`: a tensor stored in float is used as
    it is, one stored as Q4 is dequantized. Errors name the tensor and the expected shape."""
    out = {}
    for name, shape in config.param_shapes().items():
        if name in tensors:
            out[name] = np.ascontiguousarray(tensors[name], np.float32)
        elif len(shape) == 2:
            out[name] = np.ascontiguousarray(dequantize_q4(q4_from_tensors(tensors, name, shape[1])), np.float32)
        else:
            raise ValueError(f"weights are missing tensor {name!r}")
        if out[name].shape != shape:
            raise ValueError(f"tensor {name!r} has shape {out[name].shape}, expected {shape}")
    return out


def q4_from_tensors(tensors: Dict[str, np.ndarray], name: str, in_features: int) -> Q4Tensor:
    """Rebuild a Q4Tensor for `name` from stored tensors, validating shapes and dtypes."""
    try:
        codes, scales = tensors[name + CODES_SUFFIX], tensors[name + SCALE_SUFFIX]
    except KeyError as e:
        raise ValueError(f"INT4 tensor {name!r} is incomplete: missing {e.args[0]!r}") from None
    in_p = padded_width(in_features)
    if codes.dtype != np.uint8 or scales.dtype != np.float16:
        raise ValueError(f"INT4 tensor {name!r} has dtypes {codes.dtype}/{scales.dtype}, expected uint8/float16")
    if codes.ndim != 2 or codes.shape[1] != in_p // 2 or scales.shape != (codes.shape[0], in_p // QK):
        raise ValueError(
            f"INT4 tensor {name!r} has codes {codes.shape} and scales {scales.shape}; "
            f"for {in_features} inputs expected (out, {in_p // 2}) and (out, {in_p // QK})"
        )
    return Q4Tensor(codes=codes, scales=scales, in_features=in_features)

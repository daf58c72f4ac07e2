"""INT4 path: Q8 activations x Q4 weights, and the Q4 embedding gather.

quant.py stores a matrix W (M, K) planar, ggml q4_0 nibble order: codes (M, K/2) uint8
where byte 16b + j of a row holds weight 32b + j (low nibble) and 32b + 16 + j (high
nibble), scales (M, K/QK) f16, weight = (code - 8) * scale. `repack_q4` (run once at load
by the runtime) retiles the same 4-bit codes for integer dot products, and each INT4
matmul first quantizes its input to 8 bits per block of 32 (`quantize_q8`, ggml's
q4_0 x q8_0 scheme): the products are then exact int32 sums, 64 multiply-adds per
AVX512-VNNI instruction (vpdpbusd) with no per-weight dequantization, scaled to float once
per block. Measured at 12 tokens: 1.5-2.6x faster than dequantizing the weights to
float32 and multiplying in FMA (the previous kernel), at an extra relative error of about
0.2 % per matmul (block_q8 rounding).

Activations: block_q8 (as ggml's block_q8_0). Before each INT4 matmul, every token's
input row is quantized in blocks of QK = 32 along the input, like the weights:

    xs[n, g]    float32  d = max |x[n, 32 g : 32 g + 32]| * float32(1/127)   (0 for a zero block)
    xq[n, k]    int8     x[n, k] / d rounded half to even, in [-127, 127]
    xsum8[n, g] int32    Q4_ZERO * sum of block g's xq (the weights' zero-point term)

so x[n, k] ~ xq[n, k] * xs[n, k // 32] with an error of at most d / 2 per element.

Weights: tiled for VNNI (`repack_q4`). vpdpbusd multiplies 4 adjacent unsigned bytes of
one operand with 4 signed bytes of the other and adds the 4 products to an int32 lane.
Lanes run across 16 output rows, each lane's 4 bytes are 4 consecutive inputs (a
"k-quad"); the activation quad is broadcast to all lanes. Per tile of Q4_TILE = 32 rows
and block g the codes are 512 bytes, [jp][h][r][q] (jp < 4, h < 2, r < 16, q < 4):

    byte codes_t[t, g, 128 jp + 64 h + 4 r + q]
        low nibble  = code of row 32 t + 16 h + r, input 32 g + 4 (2 jp)     + q
        high nibble = code of row 32 t + 16 h + r, input 32 g + 4 (2 jp + 1) + q
    scales_t[t, g, r] float32 = scale of row 32 t + r, block g

so one 64-byte load is two zmm of codes (mask / shift) for quads 2 jp and 2 jp + 1 of 16
rows. Codes stay 4-bit (0..15, unsigned, as stored): with w = (c - 8) d_w,

    out[n, m] = sum_g d_w[m, g] xs[n, g] (sum_k c[m, k] xq[n, k] - 8 sum_k xq[n, k])

where the inner sum is exact int32 arithmetic (|.| <= 32 * 15 * 127). Rows past M are
padding: code 8, scale 0. The integer part does not depend on the instruction set: where
the CPU has no AVX512-VNNI the same sums come from a generic widening multiply-add
(`_ir._dpbusd`), and the float epilogue is the same IR, so results are identical.

The token embedding table keeps the planar layout (rows are gathered, not multiplied).
"""
import numpy as np
from numba import carray, njit, prange

from ._ir import HAS_VNNI, _q8_block, _q8q4_4x32, _stack_f32
from .layout import HALF_QK, Q4_ACC_SIZE, Q4_BLOCK_BYTES_T, Q4_TILE, Q4_TOKEN_CHUNK, Q4_ZERO, QK, VNNI_QUAD


@njit(cache=True, fastmath=True)
def _quantize_q8_row(x, xq, xs, xsum8, n):
    """block_q8 of row n of x (see the module docstring) into xq[n], xs[n], xsum8[n]."""
    for g in range(x.shape[1] // QK):
        _q8_block(x, xq, xs, xsum8, n, g)


@njit(parallel=True, cache=True, fastmath=True)
def quantize_q8(x, xq, xs, xsum8, serial=False):
    """Quantize activations x (N, K) f32 to block_q8: xq (N, K) int8, xs / xsum8 (N, K/QK).

    `serial`: run on the calling thread (short inputs: a parallel region costs more than
    the work); the rows are the same either way.
    """
    if serial:
        for n in range(x.shape[0]):
            _quantize_q8_row(x, xq, xs, xsum8, n)
    else:
        for n in prange(x.shape[0]):
            _quantize_q8_row(x, xq, xs, xsum8, n)


def repack_q4(codes, scales):
    """Planar Q4 (quant.py) -> the VNNI tiled layout of this module's docstring; pure numpy, once at load.

    codes (M, K/2) uint8, scales (M, K/QK) -> codes (T, K/QK, 512) uint8 and scales
    (T, K/QK, Q4_TILE) float32 with T = ceil(M / Q4_TILE); padding rows are code 8, scale 0.
    """
    M, half_k = codes.shape
    G = scales.shape[1]
    if half_k != G * HALF_QK:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} disagree (QK={QK})")
    T = (M + Q4_TILE - 1) // Q4_TILE
    c = np.full((T * Q4_TILE, G, HALF_QK), 0x88, np.uint8)
    c[:M] = codes.reshape(M, G, HALF_QK)
    # ggml nibble order -> one code per input: block byte j holds inputs j and j + 16.
    full = np.concatenate([c & 15, c >> 4], axis=2)  # (T*32, G, QK) codes 0..15
    full = full.reshape(T, 2, 16, G, 4, 2, VNNI_QUAD)  # (t, h, r, g, jp, nibble, q)
    full = full.transpose(0, 3, 4, 1, 2, 6, 5)  # (t, g, jp, h, r, q, nibble)
    packed = (full[..., 0] | (full[..., 1] << 4)).astype(np.uint8)  # (t, g, jp, h, r, q)
    codes_t = np.ascontiguousarray(packed.reshape(T, G, Q4_BLOCK_BYTES_T))
    s = np.zeros((T * Q4_TILE, G), np.float32)
    s[:M] = scales
    scales_t = np.ascontiguousarray(s.reshape(T, Q4_TILE, G).transpose(0, 2, 1))
    return codes_t, scales_t


@njit(cache=True, fastmath=True)
def _q8q4_tile(xq, xs, xsum8, codes, scales, t, c0, c1, out):
    """out[c0:c1, t*Q4_TILE : +Q4_TILE] for one tile (see matmul_q8q4)."""
    M = out.shape[1]
    m0_u = np.uint64(t * Q4_TILE)  # unsigned: no wraparound checks, so the copies vectorize
    rows_u = np.uint64(min(Q4_TILE, M - t * Q4_TILE))
    acc = carray(_stack_f32(Q4_ACC_SIZE), (4, Q4_TILE))  # 4 tokens x 32 rows
    n = c0
    while n < c1:
        nt = min(4, c1 - n)
        # A tail of 1-3 tokens runs a micro-kernel of that many tokens (ntok is a literal, so
        # each variant is its own code); the unused token indices repeat the last one.
        n1, n2, n3 = min(n + 1, c1 - 1), min(n + 2, c1 - 1), min(n + 3, c1 - 1)
        if nt == 4:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 4, HAS_VNNI)
        elif nt == 3:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 3, HAS_VNNI)
        elif nt == 2:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 2, HAS_VNNI)
        else:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 1, HAS_VNNI)
        for i in range(nt):
            for r in range(rows_u):
                out[n + i, m0_u + r] = acc[i, r]
        n += nt


@njit(parallel=True, cache=True, fastmath=True)
def matmul_q8q4(xq, xs, xsum8, codes, scales, out, serial=False):
    """out (N, M) = x @ W.T for block_q8 activations (quantize_q8) and tiled Q4 weights.

    codes (T, K/QK, 512) uint8 and scales (T, K/QK, Q4_TILE) float32 from `repack_q4`;
    one loop over (token chunk, tile) jobs, parallel unless `serial`. `serial` is for a
    caller that runs numba on one thread: entering a parallel region costs a few
    microseconds even then, 24 times per utterance. Both loops run the same tiles with the
    same token ranges, so each output gets the same sums either way.
    """
    N, K = xq.shape
    if codes.shape[0] and (codes.shape[1] * QK != K or xs.shape[1] * QK != K):
        raise ValueError("matmul_q8q4: activations and the tiled Q4 weights disagree on the input width")
    T = codes.shape[0]
    if serial:
        # Nested loops, not the flat job index below: on one thread its division and extra
        # work per tile cost about 15 % of an 11-token matmul (measured).
        for c0 in range(0, N, Q4_TOKEN_CHUNK):
            for t in range(T):
                _q8q4_tile(xq, xs, xsum8, codes, scales, t, c0, min(N, c0 + Q4_TOKEN_CHUNK), out)
    else:
        # Many small jobs rather than a few whole tiles (wo and w2 have only 8): a thread that
        # starts late delays the barrier by one job, not by a quarter of the matmul.
        n_chunks = (N + Q4_TOKEN_CHUNK - 1) // Q4_TOKEN_CHUNK
        for job in prange(n_chunks * T):
            c = job // T
            c0 = c * Q4_TOKEN_CHUNK
            _q8q4_tile(xq, xs, xsum8, codes, scales, job - c * T, c0, min(N, c0 + Q4_TOKEN_CHUNK), out)


@njit(cache=True, fastmath=True)
def dequant_row_q4(codes_row, scales_row, out_row):
    """Unpack one Q4 row: codes (in_p/2,) uint8, scales (in_p/QK,) f32 -> out (in_p,) f32."""
    for b in range(scales_row.shape[0]):
        d = scales_row[b]
        cb = b * HALF_QK
        ob = b * QK
        for j in range(HALF_QK):
            byte = codes_row[cb + j]
            out_row[ob + j] = (np.float32(byte & 15) - Q4_ZERO) * d
            out_row[ob + j + HALF_QK] = (np.float32(byte >> 4) - Q4_ZERO) * d


@njit(parallel=True, cache=True, fastmath=True)
def embed_q4(ids, codes, scales, out):
    """out[n] = dequant(table row ids[n])."""
    for n in prange(ids.shape[0]):
        dequant_row_q4(codes[ids[n]], scales[ids[n]], out[n])

"""Numba kernels for SLM360 Nano inference (f32 and INT4). Plain arrays in, plain arrays out.

Tokens of a batch are *packed*: row n of every activation matrix is one real token, and
sequence b owns rows starts[b]:starts[b + 1]. Linear layers therefore never touch padding,
and only attention and pooling look at sequence boundaries.

Conventions (as llama2.c's `matmul`): weights are (out, in) row-major; only the outer loop
of a kernel is parallel (`prange`); every output element is computed by one thread in a
fixed order, so results do not depend on the number of threads.

INT4 matmul dequantizes a tile of ROW_TILE weight rows once into a small f32 buffer and
reuses it for every token of a TOKEN_CHUNK of the batch ("per-tile dequantization"):
the unpacking cost is paid once per chunk instead of once per token. See quant.py for
the byte layout; scales arrive here as float32 (converted once at load).
"""
import math

import numpy as np
from numba import njit, prange

QK = 32  # must equal quant.QK
HALF_QK = QK // 2
Q4_ZERO = 8.0
ROW_TILE = 4  # weight rows dequantized and multiplied together (4 accumulators per token)
TOKEN_CHUNK = 64  # tokens sharing one dequantized tile; keeps the x chunk in L1/L2


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


@njit(cache=True, fastmath=True)
def _tile_dot(x, w, n_rows, c0, c1, m0, out):
    """out[n, m0 + r] = x[n] . w[r] for n in [c0, c1), r < n_rows; w is (ROW_TILE, K).

    Full tiles use 4 tokens x 4 rows = 16 independent accumulators: with fewer, the loop
    waits on FMA latency instead of issuing two FMAs per cycle.
    """
    K = x.shape[1]
    n = c0
    if n_rows == ROW_TILE:
        while n + 4 <= c1:
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(K):
                w0 = w[0, k]
                w1 = w[1, k]
                w2 = w[2, k]
                w3 = w[3, k]
                x0 = x[n, k]
                x1 = x[n + 1, k]
                x2 = x[n + 2, k]
                x3 = x[n + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
                a20 += x2 * w0
                a21 += x2 * w1
                a22 += x2 * w2
                a23 += x2 * w3
                a30 += x3 * w0
                a31 += x3 * w1
                a32 += x3 * w2
                a33 += x3 * w3
            out[n, m0] = a00
            out[n, m0 + 1] = a01
            out[n, m0 + 2] = a02
            out[n, m0 + 3] = a03
            out[n + 1, m0] = a10
            out[n + 1, m0 + 1] = a11
            out[n + 1, m0 + 2] = a12
            out[n + 1, m0 + 3] = a13
            out[n + 2, m0] = a20
            out[n + 2, m0 + 1] = a21
            out[n + 2, m0 + 2] = a22
            out[n + 2, m0 + 3] = a23
            out[n + 3, m0] = a30
            out[n + 3, m0 + 1] = a31
            out[n + 3, m0 + 2] = a32
            out[n + 3, m0 + 3] = a33
            n += 4
    for r in range(n_rows):
        for t in range(n, c1):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[t, k] * w[r, k]
            out[t, m0 + r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def matmul_f32(x, w, out):
    """out (N, M) = x (N, K) @ w.T, w (M, K) float32."""
    N = x.shape[0]
    M = w.shape[0]
    n_tiles = (M + ROW_TILE - 1) // ROW_TILE
    for c0 in range(0, N, TOKEN_CHUNK):
        c1 = min(N, c0 + TOKEN_CHUNK)
        for t in prange(n_tiles):
            m0 = t * ROW_TILE
            _tile_dot(x, w[m0:m0 + ROW_TILE], min(ROW_TILE, M - m0), c0, c1, m0, out)


@njit(parallel=True, cache=True, fastmath=True)
def matmul_q4(x, codes, scales, out):
    """out (N, M) = x (N, K) @ dequant(codes, scales).T; codes (M, K/2) u8, scales (M, K/QK) f32."""
    N, K = x.shape
    M = codes.shape[0]
    n_tiles = (M + ROW_TILE - 1) // ROW_TILE
    for c0 in range(0, N, TOKEN_CHUNK):
        c1 = min(N, c0 + TOKEN_CHUNK)
        for t in prange(n_tiles):
            m0 = t * ROW_TILE
            n_rows = min(ROW_TILE, M - m0)
            w = np.empty((ROW_TILE, K), np.float32)
            for r in range(n_rows):
                dequant_row_q4(codes[m0 + r], scales[m0 + r], w[r])
            _tile_dot(x, w, n_rows, c0, c1, m0, out)


@njit(parallel=True, cache=True, fastmath=True)
def embed_f32(ids, table, out):
    """out[n] = table[ids[n]]."""
    for n in prange(ids.shape[0]):
        out[n, :] = table[ids[n]]


@njit(parallel=True, cache=True, fastmath=True)
def embed_q4(ids, codes, scales, out):
    """out[n] = dequant(table row ids[n])."""
    for n in prange(ids.shape[0]):
        dequant_row_q4(codes[ids[n]], scales[ids[n]], out[n])


@njit(parallel=True, cache=True, fastmath=True)
def rmsnorm(x, w, eps, out):
    """out[n] = x[n] / sqrt(mean(x[n]^2) + eps) * w."""
    N, C = x.shape
    for n in prange(N):
        ss = np.float32(0.0)
        for c in range(C):
            ss += x[n, c] * x[n, c]
        r = np.float32(1.0 / math.sqrt(ss / C + eps))
        for c in range(C):
            out[n, c] = x[n, c] * r * w[c]


@njit(parallel=True, cache=True, fastmath=True)
def rope_inplace(qkv, positions, cos, sin, n_rot_heads, head_dim):
    """Rotate adjacent pairs of the first n_rot_heads heads of each row (q then k) by position."""
    half = head_dim // 2
    for n in prange(qkv.shape[0]):
        p = positions[n]
        for h in range(n_rot_heads):
            o = h * head_dim
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                x0 = qkv[n, o + 2 * i]
                x1 = qkv[n, o + 2 * i + 1]
                qkv[n, o + 2 * i] = x0 * c - x1 * s
                qkv[n, o + 2 * i + 1] = x0 * s + x1 * c


@njit(parallel=True, cache=True, fastmath=True)
def attention(qkv, starts, n_heads, n_kv_heads, head_dim, out):
    """Bidirectional GQA within each packed sequence.

    qkv (N, C + 2 * KV * D): columns [q | k | v]; out (N, C). Query head h reads KV head
    h // (n_heads // n_kv_heads).
    """
    B = starts.shape[0] - 1
    C = n_heads * head_dim
    kvd = n_kv_heads * head_dim
    rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for job in prange(B * n_heads):
        b = job // n_heads
        h = job % n_heads
        s0 = starts[b]
        T = starts[b + 1] - s0
        qo = h * head_dim
        ko = C + (h // rep) * head_dim
        vo = C + kvd + (h // rep) * head_dim
        p = np.empty(T, np.float32)
        acc = np.empty(head_dim, np.float32)
        for i in range(T):
            mx = -np.inf
            for j in range(T):
                s = np.float32(0.0)
                for d in range(head_dim):
                    s += qkv[s0 + i, qo + d] * qkv[s0 + j, ko + d]
                s *= scale
                p[j] = s
                if s > mx:
                    mx = s
            tot = np.float32(0.0)
            for j in range(T):
                e = np.float32(math.exp(p[j] - mx))
                p[j] = e
                tot += e
            inv = np.float32(1.0) / tot
            acc[:] = 0.0
            for j in range(T):
                pj = p[j] * inv
                for d in range(head_dim):
                    acc[d] += pj * qkv[s0 + j, vo + d]
            for d in range(head_dim):
                out[s0 + i, qo + d] = acc[d]


@njit(parallel=True, cache=True, fastmath=True)
def silu_mul(h13, hidden_width, out):
    """out[n, j] = silu(h13[n, j]) * h13[n, hidden_width + j] (the SwiGLU gate)."""
    for n in prange(h13.shape[0]):
        for j in range(hidden_width):
            a = h13[n, j]
            out[n, j] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * h13[n, hidden_width + j]


@njit(parallel=True, cache=True, fastmath=True)
def add_inplace(x, y):
    """x += y, row by row."""
    for n in prange(x.shape[0]):
        for c in range(x.shape[1]):
            x[n, c] += y[n, c]


@njit(parallel=True, cache=True, fastmath=True)
def mean_pool(h, starts, out):
    """out[b] = mean of h rows starts[b]:starts[b + 1]."""
    for b in prange(starts.shape[0] - 1):
        s0 = starts[b]
        s1 = starts[b + 1]
        out[b, :] = 0.0
        for n in range(s0, s1):
            for c in range(h.shape[1]):
                out[b, c] += h[n, c]
        inv = np.float32(1.0) / max(s1 - s0, 1)
        for c in range(h.shape[1]):
            out[b, c] *= inv


@njit(cache=True, fastmath=True)
def _linear(x, quantized, wf, wc, ws, layer, out):
    """One layer's linear map from the f32 or the Q4 weight stack."""
    if quantized:
        matmul_q4(x, wc[layer], ws[layer], out)
    else:
        matmul_f32(x, wf[layer], out)


@njit(cache=True, fastmath=True)
def encoder_forward(ids, starts, positions, quantized, emb_f, emb_c, emb_s,
                    attn_norm, ffn_norm, final_norm,
                    wqkv_f, wqkv_c, wqkv_s, wo_f, wo_c, wo_s,
                    w13_f, w13_c, w13_s, w2_f, w2_c, w2_s,
                    cos, sin, n_heads, n_kv_heads, hidden_width, eps,
                    x, xn, qkv, att, proj, h13, gate, pooled):
    """The whole encoder on packed tokens; leaves token states in `xn` and means in `pooled`.

    Weight stacks are indexed by layer: wqkv (L, C + 2 KV D, C) is [wq; wk; wv],
    w13 (L, 2 Hw, C) is [w1; w3] with Hw = hidden_width (padded for Q4), w2 (L, C, Hw).
    With quantized=True the *_c (uint8 codes) and *_s (f32 scales) stacks are used, else
    the *_f (float32) ones; the unused set may be empty. Buffers x, xn, att, proj (N, C),
    qkv (N, C + 2 KV D), h13 (N, 2 Hw), gate (N, Hw), pooled (B, C) are overwritten.
    """
    head_dim = x.shape[1] // n_heads
    if quantized:
        embed_q4(ids, emb_c, emb_s, x)
    else:
        embed_f32(ids, emb_f, x)
    for layer in range(attn_norm.shape[0]):
        rmsnorm(x, attn_norm[layer], eps, xn)
        _linear(xn, quantized, wqkv_f, wqkv_c, wqkv_s, layer, qkv)
        rope_inplace(qkv, positions, cos, sin, n_heads + n_kv_heads, head_dim)
        attention(qkv, starts, n_heads, n_kv_heads, head_dim, att)
        _linear(att, quantized, wo_f, wo_c, wo_s, layer, proj)
        add_inplace(x, proj)
        rmsnorm(x, ffn_norm[layer], eps, xn)
        _linear(xn, quantized, w13_f, w13_c, w13_s, layer, h13)
        silu_mul(h13, hidden_width, gate)
        _linear(gate, quantized, w2_f, w2_c, w2_s, layer, proj)
        add_inplace(x, proj)
    rmsnorm(x, final_norm, eps, xn)
    mean_pool(xn, starts, pooled)

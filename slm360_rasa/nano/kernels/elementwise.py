"""Row-wise kernels of the encoder: RMSNorm, RoPE, attention, SwiGLU, residual + norm, pooling.

Tokens of a batch are *packed*: row n of every activation matrix is one real token, and
sequence b owns rows starts[b]:starts[b + 1]. Only attention and pooling look at
sequence boundaries; everything else is one independent row per token.

Each kernel is one row (or job) function and one driver that runs it over all rows: in a
`prange` loop, or with `serial=True` in a plain loop on the calling thread (short inputs:
a parallel region costs more than a few microseconds of work). Both loops call the same
row function, so the flag never changes a result; it exists because numba compiles
`prange` into a parallel region unconditionally.
"""
import math

import numpy as np
from numba import carray, njit, prange

from ._ir import _i32_as_f32, _rank1_4x32, _stack_f32
from .layout import ATT_ACC_SIZE, ATT_TILE, ATT_TILE_U


# exp(x) = 2^n * e^g with n = round(x log2 e), g = x - n ln 2 in [-ln2/2, ln2/2]; e^g by
# its Taylor series to g^7 (truncation error < 3e-9 relative, below float32's 6e-8), 2^n
# by writing n + 127 into the exponent bits. Plain float/int arithmetic, so LLVM
# vectorizes loops that call it (math.exp stays a scalar libm call without Intel's SVML).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two: n * _LN2_HI is exact in float32
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MAX = np.float32(88.0)  # e^88 < float32 max; 2^127 is the largest scale we build
_EXP_MIN = np.float32(-87.0)  # e^-87 > smallest normal float32; below it we flush to ~0


@njit(cache=True, fastmath=True, inline="always")
def fast_exp(x):
    """float32 e^x within 4e-7 relative error for x in [-87, 88] (clamped outside), vectorizable."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    g = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * g + np.float32(1.0 / 720.0)
    p = p * g + np.float32(1.0 / 120.0)
    p = p * g + np.float32(1.0 / 24.0)
    p = p * g + np.float32(1.0 / 6.0)
    p = p * g + np.float32(0.5)
    p = p * g + np.float32(1.0)
    p = p * g + np.float32(1.0)
    return p * _i32_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(cache=True, fastmath=True)
def _rmsnorm_row(x, w, eps, out, n):
    """Row n of `rmsnorm`."""
    C = x.shape[1]
    ss = np.float32(0.0)
    for c in range(C):
        ss += x[n, c] * x[n, c]
    r = np.float32(1.0 / math.sqrt(ss / C + eps))
    for c in range(C):
        out[n, c] = x[n, c] * r * w[c]


@njit(parallel=True, cache=True, fastmath=True)
def rmsnorm(x, w, eps, out, serial=False):
    """out[n] = x[n] / sqrt(mean(x[n]^2) + eps) * w; on the calling thread if `serial`."""
    if serial:
        for n in range(x.shape[0]):
            _rmsnorm_row(x, w, eps, out, n)
    else:
        for n in prange(x.shape[0]):
            _rmsnorm_row(x, w, eps, out, n)


@njit(cache=True, fastmath=True)
def _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n):
    """Row n of `rope_inplace`."""
    half = head_dim // 2
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
def rope_inplace(qkv, positions, cos, sin, n_rot_heads, head_dim, serial=False):
    """Rotate adjacent pairs of the first n_rot_heads heads of each row (q then k) by position."""
    if serial:
        for n in range(qkv.shape[0]):
            _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n)
    else:
        for n in prange(qkv.shape[0]):
            _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n)


@njit(cache=True)
def _attention_scratch(T, head_dim):
    """Scratch of `_attention_job` for sequences of up to T tokens: q (T4, D), kt (D, Tp),
    v (T, Dp) zero-initialised (its padding columns are never written), p (T4, Tp)."""
    Tp = (T + ATT_TILE - 1) // ATT_TILE * ATT_TILE
    Dp = (head_dim + ATT_TILE - 1) // ATT_TILE * ATT_TILE
    T4 = (T + 3) // 4 * 4
    return (np.empty((T4, head_dim), np.float32), np.empty((head_dim, Tp), np.float32),
            np.zeros((max(T, 1), Dp), np.float32), np.empty((T4, Tp), np.float32))


@njit(cache=True, fastmath=True, error_model="numpy")
def _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q, kt, v, p):
    """Attention of one (sequence, query head) pair; see `attention`.

    Both products (scores = Q K^T and out = P V) run the micro-kernel of the INT4 matmul,
    `_rank1_4x32`: 4 query rows x ATT_TILE columns of accumulators, one broadcast per row and
    one ATT_TILE-wide FMA row per step of the reduction. The columns (keys for the scores,
    head dimensions for the output) are zero-padded to multiples of ATT_TILE, so the work is
    whole vectors whatever the sequence length; with plain loops a 12-token sequence spent
    its time entering 12-wide loops (runtime alias and trip-count checks), not multiplying.
    Padded keys get scores that are never read, padded dimensions outputs never stored.
    q, kt, v, p: scratch from `_attention_scratch` for at least this sequence's length,
    reused across jobs (one allocation per call rather than four per head: at 13 tokens
    the allocations were a fifth of the time); the padding this job reads is zeroed here.
    """
    C = n_heads * head_dim
    kvd = n_kv_heads * head_dim
    rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    b = job // n_heads
    h = job - b * n_heads
    s0 = starts[b]
    T = starts[b + 1] - s0
    qo = h * head_dim
    ko = C + (h // rep) * head_dim
    vo = C + kvd + (h // rep) * head_dim
    Tp = (T + ATT_TILE - 1) // ATT_TILE * ATT_TILE  # keys, padded
    Dp = (head_dim + ATT_TILE - 1) // ATT_TILE * ATT_TILE  # head dimensions, padded
    T4 = (T + 3) // 4 * 4  # query rows, padded to the micro-kernel's 4
    # Row views (1-D, contiguous) rather than 2-D indexing: the copies then vectorize.
    for j in range(T):
        src = qkv[s0 + j]
        qr = q[j]
        vr = v[j]
        for d in range(head_dim):
            qr[d] = src[qo + d] * scale
        for d in range(head_dim):
            vr[d] = src[vo + d]
        for d in range(head_dim):
            kt[d, j] = src[ko + d]
    for j in range(T, T4):
        q[j, :] = 0.0
    for d in range(head_dim):
        ktr = kt[d]
        for j in range(T, Tp):
            ktr[j] = 0.0
    acc = carray(_stack_f32(ATT_ACC_SIZE), (4, ATT_TILE))
    for i0 in range(0, T4, 4):
        # Scores of queries i0..i0+3 against keys j0..j0+ATT_TILE-1. Every score sums its
        # dimensions in order 0..D-1: results do not depend on the batch.
        for j0 in range(0, Tp, ATT_TILE):
            # Unsigned column index j0u + r (both uint64): numba then adds no negative-index
            # wraparound, which would turn the row copy into a scatter (as in _q8q4_tile).
            j0u = np.uint64(j0)
            for i in range(4):
                for r in range(ATT_TILE):
                    acc[i, r] = 0.0
            _rank1_4x32(acc, kt, 0, j0, head_dim, q, i0, i0 + 1, i0 + 2, i0 + 3, 0)
            for i in range(4):
                for r in range(ATT_TILE_U):
                    p[i0 + i, j0u + r] = acc[i, r]
        # Softmax over the T real keys of each of the 4 rows (padding rows are harmless).
        for i in range(i0, i0 + 4):
            row = p[i]
            mx = row[0]
            for j in range(1, T):
                mx = max(mx, row[j])
            for j in range(T):
                row[j] = fast_exp(row[j] - mx)
            tot = np.float32(0.0)
            for j in range(T):
                tot += row[j]
            inv = np.float32(1.0) / tot
            for j in range(T):
                row[j] *= inv
        # out rows i0..i0+3 = P V, ATT_TILE head dimensions at a time.
        for d0 in range(0, Dp, ATT_TILE):
            for i in range(4):
                for r in range(ATT_TILE):
                    acc[i, r] = 0.0
            _rank1_4x32(acc, v, 0, d0, T, p, i0, i0 + 1, i0 + 2, i0 + 3, 0)
            for i in range(min(4, T - i0)):
                for r in range(min(ATT_TILE, head_dim - d0)):
                    out[s0 + i0 + i, qo + d0 + r] = acc[i, r]


@njit(cache=True)
def _longest(starts):
    """Length of the longest packed sequence (0 for none)."""
    longest = 0
    for b in range(starts.shape[0] - 1):
        longest = max(longest, starts[b + 1] - starts[b])
    return longest


@njit(parallel=True, cache=True, fastmath=True)
def attention(qkv, starts, n_heads, n_kv_heads, head_dim, out, serial=False):
    """Bidirectional GQA within each packed sequence.

    qkv (N, C + 2 * KV * D): columns [q | k | v]; out (N, C). Query head h reads KV head
    h // (n_heads // n_kv_heads).

    Each (sequence, head) pair is one job (`_attention_job`): its scaled queries, keys
    (transposed) and values are copied into padded scratch and both products run the
    micro-kernel `_rank1_4x32`. Every score sums its dimensions in order 0..D-1, so results
    do not depend on the batch a sequence is packed into. In parallel, each job allocates
    its own scratch, sized for its sequence (jobs run on any thread); with `serial` (the
    caller runs numba on one thread) all jobs share one scratch on the calling thread.
    """
    n_jobs = (starts.shape[0] - 1) * n_heads
    if serial:
        q1, kt1, v1, p1 = _attention_scratch(_longest(starts), head_dim)
        for job in range(n_jobs):
            _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q1, kt1, v1, p1)
    else:
        for job in prange(n_jobs):
            b = job // n_heads
            q, kt, v, p = _attention_scratch(starts[b + 1] - starts[b], head_dim)
            _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q, kt, v, p)


@njit(cache=True, fastmath=True, error_model="numpy")
def _silu_row(h13, hidden_width, out, n):
    """Row n of `silu_mul`."""
    for j in range(hidden_width):
        a = h13[n, j]
        out[n, j] = a / (np.float32(1.0) + fast_exp(-a)) * h13[n, hidden_width + j]


@njit(parallel=True, cache=True, fastmath=True)
def silu_mul(h13, hidden_width, out, serial=False):
    """out[n, j] = silu(h13[n, j]) * h13[n, hidden_width + j] (the SwiGLU gate)."""
    if serial:
        for n in range(h13.shape[0]):
            _silu_row(h13, hidden_width, out, n)
    else:
        for n in prange(h13.shape[0]):
            _silu_row(h13, hidden_width, out, n)


@njit(cache=True, fastmath=True)
def _add_norm_row(x, y, w, eps, out, n):
    """Row n of `add_norm`."""
    for c in range(x.shape[1]):
        x[n, c] += y[n, c]
    _rmsnorm_row(x, w, eps, out, n)


@njit(parallel=True, cache=True, fastmath=True)
def add_norm(x, y, w, eps, out, serial=False):
    """x += y (the residual), then out = rmsnorm(x) * w, in one pass over each row."""
    if serial:
        for n in range(x.shape[0]):
            _add_norm_row(x, y, w, eps, out, n)
    else:
        for n in prange(x.shape[0]):
            _add_norm_row(x, y, w, eps, out, n)


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

"""f32 path: float32 matmuls (the encoder's f32 precision and the serving heads) and the embedding gather.

Conventions (as llama2.c's `matmul`): weights are (out, in) row-major; only the outer loop
of a kernel is parallel (`prange`); every output element is computed by one thread in a
fixed order, so results do not depend on the number of threads.
"""
import numpy as np
from numba import njit, prange

from .layout import ROW_TILE, TOKEN_CHUNK


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


@njit(cache=True, fastmath=True)
def linear_serial(x, w, b, out):
    """out (N, M) = x (N, K) @ w (M, K).T + b (M,), on the calling thread.

    For the small prediction heads at serving time: numpy's matmul there goes to OpenBLAS,
    whose worker threads, once woken, compete with the encoder and with other processes
    for the cores (measured: a (1, 256) x (256, 77) head took 1.5 ms at P50 under load
    instead of 0.02 ms).
    """
    N, M = x.shape[0], w.shape[0]
    for m0 in range(0, M, ROW_TILE):  # matmul_f32's tiles, on this thread
        _tile_dot(x, w[m0:m0 + ROW_TILE], min(ROW_TILE, M - m0), 0, N, m0, out)
    for n in range(N):
        for m in range(M):
            out[n, m] += b[m]


@njit(parallel=True, cache=True, fastmath=True)
def embed_f32(ids, table, out):
    """out[n] = table[ids[n]]."""
    for n in prange(ids.shape[0]):
        out[n, :] = table[ids[n]]


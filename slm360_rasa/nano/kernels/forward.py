"""The encoder forward pass on packed tokens, and the bundles it takes.

`EncoderWeights` holds everything fixed at load (weights stacked per layer, RoPE tables,
shape constants); `Scratch` holds the activation buffers, allocated once by the runtime and
grown only when a larger chunk arrives. Both are NamedTuples of arrays and scalars: numba
types them by their class, so functions taking them stay cacheable, and `encoder_forward`
takes six arguments instead of forty. Crossing from Python costs about 5 us more per call
than forty plain arguments (measured; plain tuples cost nothing extra, so it is numba's
typing of namedtuples), about 1 % of one utterance. Inside, the bundles are unpacked once
and the kernels get plain arrays.

Tokens are packed (see `kernels/elementwise.py`): linear layers never touch padding, and
only attention and pooling look at sequence boundaries.
"""
from typing import NamedTuple

import numpy as np
from numba import njit

from .elementwise import add_norm, attention, mean_pool, rmsnorm, rope_inplace, silu_mul
from .f32 import embed_f32, matmul_f32
from .layout import QK, SERIAL_ROWS
from .q8xq4 import embed_q4, matmul_q8q4, quantize_q8


class LinearStack(NamedTuple):
    """One linear map per layer, in one of two precisions; the unused set may be empty.

    f32: (L, M, K) float32, applied as x @ W.T. codes (L, T, K/QK, 512) uint8 and scales
    (L, T, K/QK, Q4_TILE) float32: the same map in the tiled layout of `q8xq4.repack_q4`.
    An empty Q4 set keeps its rank (e.g. (L, 0, 0, 0)) so that both precisions share one
    compiled forward.
    """

    f32: np.ndarray
    codes: np.ndarray
    scales: np.ndarray


class EncoderWeights(NamedTuple):
    """Everything `encoder_forward` reads but never writes.

    quantized: run the Q4 sets (codes / scales) rather than the f32 ones. The embedding
    table is emb_f32 (V, C) float32, or planar Q4 emb_codes (V, C/2) uint8 and emb_scales
    (V, C/QK) float32 (rows are gathered, not multiplied, so it stays planar). Norm weights:
    attn_norm and ffn_norm (L, C), final_norm (C,). Linear maps: wqkv (C + 2 KV D outputs)
    is [wq; wk; wv], wo (C outputs), w13 (2 Hw outputs) is [w1; w3] with Hw = hidden_width
    (H padded to whole Q4 blocks for INT4), w2 (C outputs, Hw inputs). cos / sin
    (max_seq_len, D/2) float32 RoPE tables. Scalars must be typed as in `make` (int, bool,
    float32): other types compile another specialization.
    """

    quantized: bool
    emb_f32: np.ndarray
    emb_codes: np.ndarray
    emb_scales: np.ndarray
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    final_norm: np.ndarray
    wqkv: LinearStack
    wo: LinearStack
    w13: LinearStack
    w2: LinearStack
    cos: np.ndarray
    sin: np.ndarray
    n_heads: int
    n_kv_heads: int
    hidden_width: int
    eps: np.float32

    @classmethod
    def make(cls, quantized, n_heads, n_kv_heads, hidden_width, eps, **arrays) -> "EncoderWeights":
        """The bundle with its scalars cast to the types the compiled forward expects."""
        return cls(quantized=bool(quantized), n_heads=int(n_heads), n_kv_heads=int(n_kv_heads),
                   hidden_width=int(hidden_width), eps=np.float32(eps), **arrays)


class Scratch(NamedTuple):
    """Activation buffers of `encoder_forward`, all overwritten by it.

    x, xn, att, proj (N, C), qkv (N, C + 2 KV D), h13 (N, 2 Hw), gate (N, Hw) float32;
    pooled (B, C) float32; the block_q8 scratch of the INT4 matmuls xq (N, >= max(C, Hw))
    int8, xs (N, >= max(C, Hw) / QK) float32 and xsum8 (same) int32. `encoder_forward`
    leaves the final token states in xn and the mean-pooled vectors in pooled.
    """

    x: np.ndarray
    xn: np.ndarray
    att: np.ndarray
    proj: np.ndarray
    qkv: np.ndarray
    h13: np.ndarray
    gate: np.ndarray
    pooled: np.ndarray
    xq: np.ndarray
    xs: np.ndarray
    xsum8: np.ndarray

    @classmethod
    def allocate(cls, n_tokens: int, n_seqs: int, dim: int, qkv_width: int, hidden_width: int) -> "Scratch":
        """Buffers for up to n_tokens packed tokens in up to n_seqs sequences."""
        widest = max(dim, hidden_width)  # block_q8 scratch serves every INT4 matmul input
        f32 = np.float32
        return cls(x=np.empty((n_tokens, dim), f32), xn=np.empty((n_tokens, dim), f32),
                   att=np.empty((n_tokens, dim), f32), proj=np.empty((n_tokens, dim), f32),
                   qkv=np.empty((n_tokens, qkv_width), f32), h13=np.empty((n_tokens, 2 * hidden_width), f32),
                   gate=np.empty((n_tokens, hidden_width), f32), pooled=np.empty((n_seqs, dim), f32),
                   xq=np.empty((n_tokens, widest), np.int8), xs=np.empty((n_tokens, widest // QK), f32),
                   xsum8=np.empty((n_tokens, widest // QK), np.int32))

    @property
    def n_tokens(self) -> int:
        """Token capacity."""
        return self.x.shape[0]

    @property
    def n_seqs(self) -> int:
        """Sequence capacity."""
        return self.pooled.shape[0]

    def head(self, n_tokens: int, n_seqs: int) -> "Scratch":
        """Views of the first n_tokens rows (token buffers) and n_seqs rows (pooled)."""
        pooled = self.pooled
        return self._make([a[:n_seqs] if a is pooled else a[:n_tokens] for a in self])


@njit(cache=True, fastmath=True)
def _linear(x, quantized, lin, layer, out, xq, xs, xsum8, serial, one_thread):
    """One layer's linear map (a LinearStack): f32 weights, or block_q8(x) times the tiled Q4 weights.

    xq / xs / xsum8 are scratch for the quantized input, at least (N, K) / (N, K/QK).
    `serial`: quantize on this thread; `one_thread` (numba runs one thread): multiply on it too.
    """
    if quantized:
        K = x.shape[1]
        G = K // QK
        q, sc, m = xq[:, :K], xs[:, :G], xsum8[:, :G]
        quantize_q8(x, q, sc, m, serial)
        matmul_q8q4(q, sc, m, lin.codes[layer], lin.scales[layer], out, one_thread)
    else:
        matmul_f32(x, lin.f32[layer], out)


@njit(cache=True, fastmath=True)
def encoder_forward(ids, starts, positions, w, s, one_thread=False):
    """The whole encoder on packed tokens; leaves token states in `s.xn` and means in `s.pooled`.

    ids (N,) token ids, starts (B + 1,) sequence offsets, positions (N,) position of each
    token in its sequence, all int64; w: EncoderWeights; s: Scratch with exactly N token
    rows and B pooled rows (`Scratch.head`). `one_thread` (the caller runs numba on one
    thread) runs attention and the INT4 matmuls without parallel regions, which on one
    thread are pure scheduling overhead.
    """
    # Scratch arrays go to the kernels one by one: passing the whole bundle to every
    # `_linear` call made a one-utterance forward 10 % slower (measured).
    x, xn, qkv, att, proj, h13, gate = s.x, s.xn, s.qkv, s.att, s.proj, s.h13, s.gate
    xq, xs, xsum8 = s.xq, s.xs, s.xsum8
    quantized, eps, n_heads, n_kv_heads = w.quantized, w.eps, w.n_heads, w.n_kv_heads
    head_dim = x.shape[1] // n_heads
    # Short inputs (one utterance) run the element-wise kernels on this thread: they take
    # a few microseconds, less than a parallel region costs; only matmuls and attention fork.
    serial = x.shape[0] < SERIAL_ROWS
    if quantized:
        embed_q4(ids, w.emb_codes, w.emb_scales, x)
    else:
        embed_f32(ids, w.emb_f32, x)
    n_layers = w.attn_norm.shape[0]
    for layer in range(n_layers):
        if layer == 0:
            rmsnorm(x, w.attn_norm[0], eps, xn, serial)
        _linear(xn, quantized, w.wqkv, layer, qkv, xq, xs, xsum8, serial, one_thread)
        rope_inplace(qkv, positions, w.cos, w.sin, n_heads + n_kv_heads, head_dim, serial)
        attention(qkv, starts, n_heads, n_kv_heads, head_dim, att, one_thread)
        _linear(att, quantized, w.wo, layer, proj, xq, xs, xsum8, serial, one_thread)
        add_norm(x, proj, w.ffn_norm[layer], eps, xn, serial)
        _linear(xn, quantized, w.w13, layer, h13, xq, xs, xsum8, serial, one_thread)
        silu_mul(h13, w.hidden_width, gate, serial)
        _linear(gate, quantized, w.w2, layer, proj, xq, xs, xsum8, serial, one_thread)
        # The residual add of this block fused with the next block's input norm.
        w_next = w.attn_norm[layer + 1] if layer + 1 < n_layers else w.final_norm
        add_norm(x, proj, w_next, eps, xn, serial)
    mean_pool(xn, starts, s.pooled)

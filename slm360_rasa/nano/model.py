"""SLM360 Nano in numpy: the executable spec, forward *and* backward.

Everything the numba runtime computes is defined here first; the kernels are tested
against these functions. Training (pretraining, fine-tuning, continual learning) runs on
these functions too, so every layer has a `*_forward` returning `(out, cache)` and a
`*_backward` taking the upstream gradient and the cache. All functions follow the dtype
of their inputs: float32 for training, float64 for the finite-difference gradient checks.

Architecture (docs/DESIGN.md, "The encoder"):

    ids -> tok_embeddings -> n_layers x [
        x = x + wo(Attention(RoPE(wq(rmsnorm(x))), RoPE(wk(rmsnorm(x))), wv(rmsnorm(x))))
        x = x + w2(silu(w1(rmsnorm(x))) * w3(rmsnorm(x)))
    ] -> rmsnorm -> mean pool over real tokens

Weight names follow llama2.c; linear weights are stored (out, in) and applied as x @ W.T.
Attention is bidirectional; padded key positions are masked; query head h reads KV head
h // (n_heads // n_kv_heads) (grouped-query attention). RoPE rotates adjacent pairs
(x[2i], x[2i+1]) by angle pos * rope_theta ** (-2i / head_dim), as llama2.c does.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .config import NanoConfig

Params = Dict[str, np.ndarray]

# ---------------------------------------------------------------------------- init


def init_params(config: NanoConfig, seed: int = 0, dtype=np.float32) -> Params:
    """Seeded random parameters: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers).

    The per-tensor generator is derived from (seed, tensor index) so the result does not
    depend on dict iteration details, and one tensor's shape never shifts another's draws.
    """
    params: Params = {}
    resid_std = 0.02 / np.sqrt(2 * config.n_layers)
    for idx, (name, shape) in enumerate(config.param_shapes().items()):
        rng = np.random.default_rng([seed, idx])
        if name.endswith("norm"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".wo") or name.endswith(".w2"):
            params[name] = (rng.standard_normal(shape) * resid_std).astype(dtype)
        else:
            params[name] = (rng.standard_normal(shape) * 0.02).astype(dtype)
    return params


# ----------------------------------------------------------------------- embedding


def embedding_forward(ids: np.ndarray, table: np.ndarray):
    """Look up rows of `table` (V, C) for integer `ids` (B, T) -> (B, T, C)."""
    return table[ids], (ids, table.shape)


def embedding_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Gradient of the table: rows of `dout` summed per id (deterministic, no np.add.at)."""
    ids, shape = cache
    flat_ids = ids.reshape(-1)  # (B*T,)
    flat = dout.reshape(-1, shape[1])  # (B*T, C)
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    uniq, starts = np.unique(sorted_ids, return_index=True)
    grad = np.zeros(shape, dtype=dout.dtype)
    grad[uniq] = np.add.reduceat(flat[order], starts, axis=0)
    return grad


# ------------------------------------------------------------------------- RMSNorm


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    return x * r * w, (x, r, w)


def rmsnorm_backward(dy: np.ndarray, cache):
    """Returns (dx, dw)."""
    x, r, w = cache
    dw = np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)
    g = dy * w
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)
    return dx, dw


# -------------------------------------------------------------------------- linear


def _mm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (..., K) @ w (K, M) as ONE 2-D matmul: numpy runs a stacked (B, T, K) @ (K, M)
    product as B small products, several times slower than a single GEMM."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1] + (w.shape[-1],))  # (..., M)


def linear_forward(x: np.ndarray, w: np.ndarray):
    """y = x @ w.T with w stored (out, in)."""
    return _mm(x, w.T), (x, w)


def linear_backward(dy: np.ndarray, cache):
    """Returns (dx, dw)."""
    x, w = cache
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return _mm(dy, w), dw


# ---------------------------------------------------------------------------- RoPE


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype=np.float32):
    """cos, sin tables (T, head_dim // 2) for positions 0..seq_len-1, computed in float64."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * freqs[None, :]  # (T, D/2)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs of x (B, T, H, D) by the position's angles (tables may be longer than T)."""
    T = x.shape[1]
    c = cos[None, :T, None, :]  # (1, T, 1, D/2)
    s = sin[None, :T, None, :]
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * c - xo * s
    out[..., 1::2] = xe * s + xo * c
    return out


def rope_backward(dout: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The inverse rotation (the transpose of an orthogonal map)."""
    T = dout.shape[1]
    c = cos[None, :T, None, :]  # (1, T, 1, D/2)
    s = sin[None, :T, None, :]
    de, do = dout[..., 0::2], dout[..., 1::2]
    dx = np.empty_like(dout)
    dx[..., 0::2] = de * c + do * s
    dx[..., 1::2] = -de * s + do * c
    return dx


# ----------------------------------------------------------------------- attention


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray):
    """Bidirectional grouped-query attention.

    q (B, T, H, D); k, v (B, T, KV, D); mask (B, T) with 1 for real tokens.
    Returns (B, T, H*D). Padded keys get zero weight; every row has at least one real key.
    """
    B, T, H, D = q.shape
    KV = k.shape[2]
    rep = H // KV
    qh = q.transpose(0, 2, 1, 3)  # (B, H, T, D)
    kh = np.repeat(k, rep, axis=2).transpose(0, 2, 1, 3)  # (B, H, T, D)
    vh = np.repeat(v, rep, axis=2).transpose(0, 2, 1, 3)  # (B, H, T, D)
    scale = 1.0 / np.sqrt(D)
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * scale  # (B, H, T, T)
    keymask = mask[:, None, None, :].astype(bool)  # (B, 1, 1, T)
    scores = np.where(keymask, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ vh  # (B, H, T, D)
    out = out.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, H*D)
    return out, (qh, kh, vh, p, scale, rep)


def attention_backward(dout: np.ndarray, cache):
    """Returns (dq (B,T,H,D), dk (B,T,KV,D), dv (B,T,KV,D))."""
    qh, kh, vh, p, scale, rep = cache
    B, H, T, D = qh.shape
    KV = H // rep
    do = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    dp = do @ vh.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dvh = p.transpose(0, 1, 3, 2) @ do  # (B, H, T, D)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale  # (B, H, T, T)
    dqh = ds @ kh  # (B, H, T, D)
    dkh = ds.transpose(0, 1, 3, 2) @ qh  # (B, H, T, D)
    dq = dqh.transpose(0, 2, 1, 3)  # (B, T, H, D)
    # Heads were repeated as [kv0]*rep + [kv1]*rep ..., so fold groups of `rep` back.
    dk = dkh.transpose(0, 2, 1, 3).reshape(B, T, KV, rep, D).sum(axis=3)  # (B, T, KV, D)
    dv = dvh.transpose(0, 2, 1, 3).reshape(B, T, KV, rep, D).sum(axis=3)  # (B, T, KV, D)
    return dq, dk, dv


# -------------------------------------------------------------------------- SwiGLU


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form never overflows and is one vectorised pass (no masks).
    out = np.tanh(x * 0.5)
    out += 1.0
    out *= 0.5
    return out


def swiglu_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray):
    """w2(silu(w1 x) * w3 x); x (..., C) -> (..., C)."""
    a = _mm(x, w1.T)  # (..., hidden)
    b = _mm(x, w3.T)  # (..., hidden)
    sa = _sigmoid(a)
    g = a * sa * b
    return _mm(g, w2.T), (x, a, b, sa, g, w1, w2, w3)


def swiglu_backward(dy: np.ndarray, cache):
    """Returns (dx, dw1, dw2, dw3)."""
    x, a, b, sa, g, w1, w2, w3 = cache
    C, Hd = x.shape[-1], a.shape[-1]
    dw2 = dy.reshape(-1, dy.shape[-1]).T @ g.reshape(-1, Hd)
    dg = _mm(dy, w2)  # (..., hidden)
    silu = a * sa
    db = dg * silu
    da = dg * b * sa * (1.0 + a * (1.0 - sa))
    x2 = x.reshape(-1, C)
    dw1 = da.reshape(-1, Hd).T @ x2
    dw3 = db.reshape(-1, Hd).T @ x2
    dx = _mm(da, w1) + _mm(db, w3)
    return dx, dw1, dw2, dw3


# ----------------------------------------------------------------------- mean pool


def mean_pool_forward(h: np.ndarray, mask: np.ndarray):
    """Mean of h (B, T, C) over real tokens (mask (B, T)) -> (B, C)."""
    m = mask.astype(h.dtype)[:, :, None]  # (B, T, 1)
    count = np.maximum(m.sum(axis=1), 1.0)  # (B, 1)
    return (h * m).sum(axis=1) / count, (m, count)


def mean_pool_backward(dpooled: np.ndarray, cache) -> np.ndarray:
    """Spread dpooled (B, C) back over the real tokens -> (B, T, C)."""
    m, count = cache
    return (dpooled / count)[:, None, :] * m


# ----------------------------------------------------------------------- the block


def block_forward(x: np.ndarray, mask: np.ndarray, p: Params, prefix: str, config: NanoConfig, cos, sin):
    """One encoder block; x (B, T, C) -> (B, T, C)."""
    B, T, C = x.shape
    H, KV, D = config.n_heads, config.n_kv_heads, config.head_dim
    xn, c_n1 = rmsnorm_forward(x, p[prefix + "attention_norm"], config.norm_eps)
    q, c_q = linear_forward(xn, p[prefix + "wq"])
    k, c_k = linear_forward(xn, p[prefix + "wk"])
    v, c_v = linear_forward(xn, p[prefix + "wv"])
    q = rope_forward(q.reshape(B, T, H, D), cos, sin)  # (B, T, H, D)
    k = rope_forward(k.reshape(B, T, KV, D), cos, sin)  # (B, T, KV, D)
    v = v.reshape(B, T, KV, D)  # (B, T, KV, D)
    att, c_att = attention_forward(q, k, v, mask)
    o, c_o = linear_forward(att, p[prefix + "wo"])
    x = x + o
    xn2, c_n2 = rmsnorm_forward(x, p[prefix + "ffn_norm"], config.norm_eps)
    f, c_f = swiglu_forward(xn2, p[prefix + "w1"], p[prefix + "w2"], p[prefix + "w3"])
    return x + f, (c_n1, c_q, c_k, c_v, c_att, c_o, c_n2, c_f)


def block_backward(dout: np.ndarray, cache, prefix: str, config: NanoConfig, cos, sin, grads: Params):
    """Backward through one block; accumulates parameter grads into `grads`, returns dx."""
    c_n1, c_q, c_k, c_v, c_att, c_o, c_n2, c_f = cache
    B, T, C = dout.shape
    H, KV, D = config.n_heads, config.n_kv_heads, config.head_dim
    dxn2, grads[prefix + "w1"], grads[prefix + "w2"], grads[prefix + "w3"] = swiglu_backward(dout, c_f)
    dx_mid, grads[prefix + "ffn_norm"] = rmsnorm_backward(dxn2, c_n2)
    dx = dout + dx_mid
    datt, grads[prefix + "wo"] = linear_backward(dx, c_o)
    dq, dk, dv = attention_backward(datt, c_att)
    dq = rope_backward(dq, cos, sin).reshape(B, T, H * D)  # (B, T, C)
    dk = rope_backward(dk, cos, sin).reshape(B, T, KV * D)  # (B, T, KV*D)
    dv = dv.reshape(B, T, KV * D)  # (B, T, KV*D)
    dxn_q, grads[prefix + "wq"] = linear_backward(dq, c_q)
    dxn_k, grads[prefix + "wk"] = linear_backward(dk, c_k)
    dxn_v, grads[prefix + "wv"] = linear_backward(dv, c_v)
    dx_attn, grads[prefix + "attention_norm"] = rmsnorm_backward(dxn_q + dxn_k + dxn_v, c_n1)
    return dx + dx_attn


# ----------------------------------------------------------------------- the model


def forward(params: Params, ids: np.ndarray, mask: np.ndarray, config: NanoConfig, n_frozen: int = 0):
    """Full encoder. ids, mask (B, T). Returns (hidden (B, T, C), pooled (B, C), cache).

    `hidden` is the final RMSNorm output (token states); `pooled` its masked mean.
    `n_frozen` blocks (and the embedding, when > 0) get no gradient in `backward`,
    which lets fine-tuning skip their caches.
    """
    B, T = ids.shape
    if T > config.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len {config.max_seq_len}; truncate first")
    dtype = params["tok_embeddings"].dtype
    cos, sin = rope_cos_sin(T, config.head_dim, config.rope_theta, dtype)
    x, c_emb = embedding_forward(ids, params["tok_embeddings"])
    caches = []
    for i in range(config.n_layers):
        x, c = block_forward(x, mask, params, f"layers.{i}.", config, cos, sin)
        caches.append(c if i >= n_frozen else None)
    h, c_norm = rmsnorm_forward(x, params["norm"], config.norm_eps)
    pooled, c_pool = mean_pool_forward(h, mask)
    return h, pooled, (c_emb, caches, c_norm, c_pool, cos, sin, n_frozen)


def backward(cache, config: NanoConfig, dpooled: Optional[np.ndarray] = None,
             dhidden: Optional[np.ndarray] = None, embedding_grad: bool = True) -> Params:
    """Gradients of all trainable parameters given d(loss)/d(pooled) and/or d(loss)/d(hidden).

    Frozen blocks (see `forward`) and, when any block is frozen or `embedding_grad` is
    False, the embedding are absent from the returned dict.
    """
    c_emb, caches, c_norm, c_pool, cos, sin, n_frozen = cache
    if dpooled is None and dhidden is None:
        raise ValueError("backward needs dpooled or dhidden")
    dh = mean_pool_backward(dpooled, c_pool) if dpooled is not None else 0.0
    if dhidden is not None:
        dh = dh + dhidden
    grads: Params = {}
    dx, grads["norm"] = rmsnorm_backward(dh, c_norm)
    for i in reversed(range(n_frozen, config.n_layers)):
        dx = block_backward(dx, caches[i], f"layers.{i}.", config, cos, sin, grads)
    if n_frozen == 0 and embedding_grad:
        grads["tok_embeddings"] = embedding_backward(dx, c_emb)
    return grads


def encode(params: Params, ids: np.ndarray, mask: np.ndarray, config: NanoConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Inference-only convenience: (hidden (B, T, C), pooled (B, C))."""
    h, pooled, _ = forward(params, ids, mask, config)
    return h, pooled

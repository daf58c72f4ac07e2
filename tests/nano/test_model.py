"""Finite-difference gradient checks for every layer of nano/model.py and the whole model.

Everything runs in float64 on a tiny config so central differences are accurate to ~1e-8.
Each check contracts the layer output with a fixed random tensor R (loss = sum(out * R)),
so d(loss)/d(out) = R, and compares the analytic input/parameter gradients with
(loss(theta + eps) - loss(theta - eps)) / (2 eps) on a sample of coordinates.
"""
import numpy as np
import pytest

from slm360_rasa.nano import model as M
from slm360_rasa.nano.config import NanoConfig

EPS = 1e-6
RTOL = 1e-5
ATOL = 1e-8


def numgrad(f, x, n_samples=24, seed=0):
    """Central differences of scalar f() w.r.t. a sample of entries of x (modified in place)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(x.size, size=min(n_samples, x.size), replace=False)
    out = []
    flat = x.reshape(-1)
    for i in idx:
        old = flat[i]
        flat[i] = old + EPS
        fp = f()
        flat[i] = old - EPS
        fm = f()
        flat[i] = old
        out.append((fp - fm) / (2 * EPS))
    return idx, np.array(out)


def check(analytic, f, x, **kw):
    """Assert that analytic (same shape as x) matches central differences of f at x."""
    idx, num = numgrad(f, x, **kw)
    np.testing.assert_allclose(analytic.reshape(-1)[idx], num, rtol=RTOL, atol=ATOL)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_rmsnorm_grad(rng):
    x = rng.standard_normal((2, 3, 8))
    w = rng.standard_normal(8)
    R = rng.standard_normal((2, 3, 8))
    y, cache = M.rmsnorm_forward(x, w, 1e-5)
    dx, dw = M.rmsnorm_backward(R, cache)
    loss = lambda: np.sum(M.rmsnorm_forward(x, w, 1e-5)[0] * R)
    check(dx, loss, x)
    check(dw, loss, w)


def test_rmsnorm_matches_definition(rng):
    x = rng.standard_normal((4, 8))
    w = rng.standard_normal(8)
    y, _ = M.rmsnorm_forward(x, w, 1e-5)
    expect = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(y, expect, rtol=1e-12)


def test_linear_grad(rng):
    x = rng.standard_normal((2, 3, 8))
    w = rng.standard_normal((5, 8))
    R = rng.standard_normal((2, 3, 5))
    _, cache = M.linear_forward(x, w)
    dx, dw = M.linear_backward(R, cache)
    loss = lambda: np.sum(M.linear_forward(x, w)[0] * R)
    check(dx, loss, x)
    check(dw, loss, w)


def test_embedding_grad_accumulates_repeated_ids(rng):
    table = rng.standard_normal((7, 4))
    ids = np.array([[1, 3, 1], [6, 1, 0]])
    R = rng.standard_normal((2, 3, 4))
    _, cache = M.embedding_forward(ids, table)
    d = M.embedding_backward(R, cache)
    loss = lambda: np.sum(M.embedding_forward(ids, table)[0] * R)
    check(d, loss, table, n_samples=28)
    np.testing.assert_allclose(d[1], R[0, 0] + R[0, 2] + R[1, 1])
    assert np.all(d[[2, 4, 5]] == 0)


def test_rope_is_rotation_and_grad(rng):
    x = rng.standard_normal((2, 5, 3, 8))
    cos, sin = M.rope_cos_sin(5, 8, 10000.0, np.float64)
    y = M.rope_forward(x, cos, sin)
    # A rotation preserves the norm of every pair, and position 0 is the identity.
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-12)
    R = rng.standard_normal(x.shape)
    dx = M.rope_backward(R, cos, sin)
    check(dx, lambda: np.sum(M.rope_forward(x, cos, sin) * R), x)


def test_rope_relative_position_property(rng):
    """q.k after RoPE depends only on the position difference (what makes RoPE relative)."""
    D = 8
    cos, sin = M.rope_cos_sin(12, D, 10000.0, np.float64)
    q = rng.standard_normal(D)
    k = rng.standard_normal(D)

    def dot(pq, pk):
        qq = np.broadcast_to(q, (1, 12, 1, D)).copy()
        kk = np.broadcast_to(k, (1, 12, 1, D)).copy()
        return M.rope_forward(qq, cos, sin)[0, pq, 0] @ M.rope_forward(kk, cos, sin)[0, pk, 0]

    assert dot(3, 1) == pytest.approx(dot(9, 7), rel=1e-10)


def test_attention_grad_with_padding(rng):
    B, T, H, KV, D = 2, 5, 4, 2, 6
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, KV, D))
    v = rng.standard_normal((B, T, KV, D))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    R = rng.standard_normal((B, T, H * D))
    _, cache = M.attention_forward(q, k, v, mask)
    dq, dk, dv = M.attention_backward(R, cache)
    loss = lambda: np.sum(M.attention_forward(q, k, v, mask)[0] * R)
    check(dq, loss, q)
    check(dk, loss, k)
    check(dv, loss, v)
    # Padded keys must not influence anything.
    assert np.all(dk[1, 3:] == 0) and np.all(dv[1, 3:] == 0)


def test_attention_ignores_padded_keys_and_groups_heads(rng):
    B, T, H, KV, D = 1, 4, 4, 2, 3
    q = rng.standard_normal((B, T, H, D))
    k = rng.standard_normal((B, T, KV, D))
    v = rng.standard_normal((B, T, KV, D))
    mask = np.array([[1, 1, 0, 0]])
    out, _ = M.attention_forward(q, k, v, mask)
    k2, v2 = k.copy(), v.copy()
    k2[:, 2:] = 99.0
    v2[:, 2:] = -99.0
    out2, _ = M.attention_forward(q, k2, v2, mask)
    np.testing.assert_allclose(out, out2)
    # Query head 3 reads KV head 1 (GQA groups of H // KV = 2): check against a direct softmax.
    s = q[0, 0, 3] @ k[0, :2, 1].T / np.sqrt(D)
    p = np.exp(s - s.max())
    p /= p.sum()
    np.testing.assert_allclose(out[0, 0, 3 * D:4 * D], p @ v[0, :2, 1], rtol=1e-12)


def test_swiglu_grad(rng):
    x = rng.standard_normal((2, 3, 6))
    w1 = rng.standard_normal((10, 6))
    w2 = rng.standard_normal((6, 10))
    w3 = rng.standard_normal((10, 6))
    R = rng.standard_normal((2, 3, 6))
    _, cache = M.swiglu_forward(x, w1, w2, w3)
    dx, dw1, dw2, dw3 = M.swiglu_backward(R, cache)
    loss = lambda: np.sum(M.swiglu_forward(x, w1, w2, w3)[0] * R)
    for g, t in ((dx, x), (dw1, w1), (dw2, w2), (dw3, w3)):
        check(g, loss, t)


def test_mean_pool_grad(rng):
    h = rng.standard_normal((2, 4, 3))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    R = rng.standard_normal((2, 3))
    pooled, cache = M.mean_pool_forward(h, mask)
    np.testing.assert_allclose(pooled[0], h[0, :2].mean(0))
    dh = M.mean_pool_backward(R, cache)
    check(dh, lambda: np.sum(M.mean_pool_forward(h, mask)[0] * R), h)


TINY = NanoConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=32)


def _tiny_batch(rng):
    ids = rng.integers(1, TINY.vocab_size, size=(2, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    ids[1, 4:] = TINY.pad_id
    return ids, mask


@pytest.mark.parametrize("n_frozen", [0, 1])
def test_whole_model_grad(rng, n_frozen):
    params = M.init_params(TINY, seed=3, dtype=np.float64)
    # Scale weights up so the check is not dominated by the near-linear small-init regime.
    for name in params:
        if not name.endswith("norm"):
            params[name] *= 10.0
    ids, mask = _tiny_batch(rng)
    Rp = rng.standard_normal((2, TINY.dim))
    Rh = rng.standard_normal((2, 6, TINY.dim)) * mask[:, :, None]

    def loss():
        h, pooled, _ = M.forward(params, ids, mask, TINY)
        return np.sum(pooled * Rp) + np.sum(h * Rh)

    _, _, cache = M.forward(params, ids, mask, TINY, n_frozen=n_frozen)
    grads = M.backward(cache, TINY, dpooled=Rp, dhidden=Rh)
    expected = {n for n in params if not (n_frozen and (n == "tok_embeddings" or n.startswith("layers.0.")))}
    assert set(grads) == expected
    for name in sorted(grads):
        check(grads[name], loss, params[name], n_samples=8, seed=hash(name) % 1000)


def test_padding_does_not_change_real_outputs(rng):
    params = M.init_params(TINY, seed=0, dtype=np.float64)
    ids = rng.integers(1, TINY.vocab_size, size=(1, 4))
    h1, p1 = M.encode(params, ids, np.ones((1, 4)), TINY)
    ids_pad = np.concatenate([ids, np.full((1, 3), TINY.pad_id)], axis=1)
    mask_pad = np.array([[1, 1, 1, 1, 0, 0, 0]])
    h2, p2 = M.encode(params, ids_pad, mask_pad, TINY)
    np.testing.assert_allclose(h1[0], h2[0, :4], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p1, p2, rtol=1e-10, atol=1e-12)


def test_init_is_seeded():
    a = M.init_params(TINY, seed=5)
    b = M.init_params(TINY, seed=5)
    c = M.init_params(TINY, seed=6)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["layers.0.wq"], c["layers.0.wq"])


def test_forward_rejects_too_long():
    params = M.init_params(TINY, seed=0)
    ids = np.ones((1, TINY.max_seq_len + 1), dtype=np.int64)
    with pytest.raises(ValueError, match="max_seq_len"):
        M.forward(params, ids, np.ones_like(ids), TINY)

"""Numba kernels (nano/kernels/) against the numpy reference (nano/model.py, nano/quant.py)."""
import numba
import numpy as np
import pytest

from slm360_rasa.nano import kernels as K
from slm360_rasa.nano.kernels import _ir as IR
from slm360_rasa.nano import model as M
from slm360_rasa.nano import quant as Q
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.runtime import Encoder

TOL = 1e-4


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("N,M_,Kd", [(1, 4, 32), (5, 13, 64), (70, 9, 96), (130, 40, 256)])
def test_matmul_f32(rng, N, M_, Kd):
    x = rng.standard_normal((N, Kd)).astype(np.float32)
    w = rng.standard_normal((M_, Kd)).astype(np.float32)
    out = np.empty((N, M_), np.float32)
    K.matmul_f32(x, w, out)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-4, atol=1e-4)


def q8(x):
    """block_q8 of x through the kernel: (xq, xs, xsum8)."""
    N, Kd = x.shape
    xq = np.empty((N, Kd), np.int8)
    xs = np.empty((N, Kd // K.QK), np.float32)
    xm = np.empty((N, Kd // K.QK), np.int32)
    K.quantize_q8(x, xq, xs, xm)
    return xq, xs, xm


def test_quantize_q8_matches_its_definition(rng):
    x = rng.standard_normal((9, 96)).astype(np.float32) * rng.uniform(0.01, 50, (9, 1)).astype(np.float32)
    x[3, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    x[4, 5] = 1e-30  # a block whose max is tiny but not zero
    xq, xs, xm = q8(x)
    blocks = x.reshape(9, 3, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=2)
    np.testing.assert_allclose(xs, amax / 127, rtol=1e-6)
    inv = np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0)
    want = np.rint(blocks * inv[:, :, None]).reshape(9, 96)
    # float32 arithmetic may land a value within one ulp of a .5 boundary on the other side.
    assert np.abs(xq - want).max() <= 1 and np.mean(xq != want) < 1e-3
    assert np.abs(xq).max() <= 127 and (xq[3, 32:64] == 0).all() and xs[3, 1] == 0
    np.testing.assert_array_equal(xm, 8 * xq.reshape(9, 3, 32).astype(np.int64).sum(axis=2))
    # Reconstruction error is at most half a step per element.
    recon = (xq.reshape(9, 3, 32) * xs[:, :, None]).reshape(9, 96)
    assert (np.abs(recon - x) <= np.repeat(xs, 32, axis=1) / 2 * (1 + 1e-5) + 1e-37).all()


# Shapes cover: partial row tiles (M % Q4_TILE), one block and many (704 = 22 blocks),
# token tails (N % 4) and several token chunks (N > Q4_TOKEN_CHUNK = 64, 67 and 301 with a
# partial last one).
@pytest.mark.parametrize("N,M_,Kd", [(1, 4, 32), (7, 10, 64), (67, 9, 704), (12, 64, 256),
                                     (3, 33, 288), (301, 40, 160)])
def test_matmul_q8q4_is_exact_block_arithmetic(rng, N, M_, Kd):
    """The kernel computes sum_g d_w xs (int dot) exactly up to float32 accumulation."""
    w = rng.standard_normal((M_, Kd)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    x = rng.standard_normal((N, Kd)).astype(np.float32)
    xq, xs, xm = q8(x)
    out = np.full((N, M_), np.nan, np.float32)
    K.matmul_q8q4(xq, xs, xm, *K.repack_q4(t.codes, t.scales), out)
    x_hat = (xq.reshape(N, -1, 32) * xs[:, :, None].astype(np.float64)).reshape(N, Kd)
    want = x_hat @ Q.dequantize_q4(t).T.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # ... and stays close to the float product with the same INT4 weights (q8 rounding only).
    full = x @ Q.dequantize_q4(t).T
    assert np.abs(out - full).max() <= 0.02 * np.abs(full).max()


def test_repack_q4_layout(rng):
    """Byte 128 jp + 64 h + 4 r + q of (tile t, block g): row 32 t + 16 h + r, inputs
    32 g + 8 jp + q (low nibble) and + 4 (high nibble); padding rows are code 8, scale 0."""
    w = rng.standard_normal((40, 64)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    codes, scales = K.repack_q4(t.codes, t.scales)
    assert codes.shape == (2, 2, 512) and codes.dtype == np.uint8
    assert scales.shape == (2, 2, K.Q4_TILE) and scales.dtype == np.float32
    planar = np.concatenate([t.codes.reshape(40, 2, 16) & 15, t.codes.reshape(40, 2, 16) >> 4], axis=2)
    planar = planar.reshape(40, 64)  # code of (row, input)
    for m in (0, 5, 17, 31, 32, 39):
        tt, h, r = m // 32, (m % 32) // 16, m % 16
        for g in range(2):
            for jp in range(4):
                for q in range(4):
                    byte = codes[tt, g, 128 * jp + 64 * h + 4 * r + q]
                    assert byte & 15 == planar[m, 32 * g + 8 * jp + q]
                    assert byte >> 4 == planar[m, 32 * g + 8 * jp + 4 + q]
        np.testing.assert_array_equal(scales[tt, :, m % 32], t.scales[m].astype(np.float32))
    pad = codes[1].reshape(2, 4, 2, 16, 4)[:, :, :, 8:, :]  # rows 40..63 = (h 0, r 8..15), (h 1, all)
    assert (pad == 0x88).all() and (codes[1].reshape(2, 4, 2, 16, 4)[:, :, 1] == 0x88).all()
    assert (scales[1, :, 8:] == 0).all()


@numba.njit
def _micro_both(acc_hw, acc_generic, codes, scales, t, xq, xs, xm, n0, n1, n2, n3):
    IR._q8q4_4x32(acc_hw, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 4, 1)
    IR._q8q4_4x32(acc_generic, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 4, 0)


HW = K.HAS_VNNI  # a plain int global: numba passes it to the intrinsic as a literal


@numba.njit
def _micro_tails(acc4, acc1, acc2, acc3, codes, scales, t, xq, xs, xm, n0, n1, n2, n3):
    IR._q8q4_4x32(acc4, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 4, HW)
    IR._q8q4_4x32(acc1, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 1, HW)
    IR._q8q4_4x32(acc2, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 2, HW)
    IR._q8q4_4x32(acc3, codes, scales, t, xq, xs, xm, n0, n1, n2, n3, 3, HW)


def test_micro_kernel_tails_equal_the_four_token_kernel(rng):
    """The 1-, 2- and 3-token variants give each token the bits of the 4-token kernel and
    leave the accumulator rows of the tokens they skip untouched."""
    w = rng.standard_normal((32, 256)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    codes, scales = K.repack_q4(t.codes, t.scales)
    xq, xs, xm = q8(rng.standard_normal((5, 256)).astype(np.float32))
    full = np.empty((4, 32), np.float32)
    tails = [np.full((4, 32), -7.0, np.float32) for _ in range(3)]
    _micro_tails(full, *tails, codes, scales, 0, xq, xs, xm, 1, 3, 0, 4)
    x_hat = (xq.reshape(5, -1, 32) * xs[:, :, None].astype(np.float64)).reshape(5, 256)
    want = (x_hat @ Q.dequantize_q4(t).T.astype(np.float64))[[1, 3, 0, 4]]
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for n_tok, acc in zip((1, 2, 3), tails):
        np.testing.assert_array_equal(acc[:n_tok], full[:n_tok])
        assert (acc[n_tok:] == -7.0).all()


@pytest.mark.skipif(not K.HAS_VNNI, reason="needs a CPU with AVX512-VNNI to run vpdpbusd")
def test_generic_integer_path_equals_vpdpbusd(rng):
    """CPUs without AVX512-VNNI compute the same bits through the widening fallback."""
    w = rng.standard_normal((64, 704)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    codes, scales = K.repack_q4(t.codes, t.scales)
    x = (rng.standard_normal((6, 704)) * 3).astype(np.float32)
    xq, xs, xm = q8(x)
    xq[0, :64] = 127
    xq[1, :64] = -127  # extremes of the signed operand against codes up to 15
    a, b = np.empty((4, 32), np.float32), np.empty((4, 32), np.float32)
    for tile in range(codes.shape[0]):
        _micro_both(a, b, codes, scales, tile, xq, xs, xm, 0, 1, 4, 5)
        np.testing.assert_array_equal(a, b)


def test_matmul_q8q4_does_not_depend_on_thread_count(rng):
    w = rng.standard_normal((100, 704)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    codes, scales = K.repack_q4(t.codes, t.scales)
    xq, xs, xm = q8(rng.standard_normal((13, 704)).astype(np.float32))
    one, many = np.empty((13, 100), np.float32), np.empty((13, 100), np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        K.matmul_q8q4(xq, xs, xm, codes, scales, one)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        K.matmul_q8q4(xq, xs, xm, codes, scales, many)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_dequant_row_and_embedding(rng):
    table = rng.standard_normal((20, 64)).astype(np.float32)
    t, _ = Q.quantize_q4(table)
    ids = np.array([3, 0, 19, 3], np.int64)
    out = np.empty((4, 64), np.float32)
    K.embed_q4(ids, t.codes, t.scales.astype(np.float32), out)
    np.testing.assert_array_equal(out, Q.dequantize_q4(t)[ids])
    K.embed_f32(ids, table, out)
    np.testing.assert_array_equal(out, table[ids])


def test_rmsnorm(rng):
    x = rng.standard_normal((9, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(x, w, np.float32(1e-5), out)
    np.testing.assert_allclose(out, M.rmsnorm_forward(x, w, 1e-5)[0], rtol=1e-5, atol=1e-5)


def test_rope_and_attention_on_packed_sequences(rng):
    H, KV, D = 4, 2, 8
    lengths = [5, 1, 3]
    cos, sin = M.rope_cos_sin(16, D, 10000.0)
    seqs = [rng.standard_normal((T, (H + 2 * KV) * D)).astype(np.float32) for T in lengths]
    qkv = np.concatenate(seqs)
    starts = np.array([0, 5, 6, 9], np.int64)
    positions = np.concatenate([np.arange(T) for T in lengths]).astype(np.int64)
    K.rope_inplace(qkv, positions, cos, sin, H + KV, D)
    out = np.empty((9, H * D), np.float32)
    K.attention(qkv, starts, H, KV, D, out)
    ser = np.empty_like(out)
    K.attention(qkv, starts, H, KV, D, ser, serial=True)
    np.testing.assert_array_equal(ser, out)  # same jobs, same order of sums: bit-identical
    for b, s in enumerate(seqs):
        T = lengths[b]
        q = M.rope_forward(s[:, : H * D].reshape(1, T, H, D), cos, sin)
        k = M.rope_forward(s[:, H * D:(H + KV) * D].reshape(1, T, KV, D), cos, sin)
        v = s[:, (H + KV) * D:].reshape(1, T, KV, D)
        ref, _ = M.attention_forward(q, k, v, np.ones((1, T)))
        np.testing.assert_allclose(out[starts[b]:starts[b + 1]], ref[0], rtol=1e-5, atol=1e-5)


# More keys than one ATT_TILE (a full tile and a partial one), and a head wider than one
# (two output tiles, the second partial), with query counts that are not multiples of 4.
@pytest.mark.parametrize("D,T", [(8, K.ATT_TILE + 8), (K.ATT_TILE + 8, 5), (32, 1)])
def test_attention_tiles_and_padding(rng, D, T):
    H, KV = 2, 1
    qkv = rng.standard_normal((T, (H + 2 * KV) * D)).astype(np.float32)
    out = np.empty((T, H * D), np.float32)
    K.attention(qkv, np.array([0, T], np.int64), H, KV, D, out)
    q = qkv[:, : H * D].reshape(1, T, H, D)
    k = qkv[:, H * D:(H + KV) * D].reshape(1, T, KV, D)
    v = qkv[:, (H + KV) * D:].reshape(1, T, KV, D)
    ref, _ = M.attention_forward(q, k, v, np.ones((1, T)))
    np.testing.assert_allclose(out, ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kn", [0, 1, 37])
def test_rank1_micro_kernel_on_offset_strided_operands(rng, kn):
    from numba import njit

    @njit
    def run(acc, w, w_row, w_col, kn, x, rows, x_col):
        IR._rank1_4x32(acc, w, w_row, w_col, kn, x, rows[0], rows[1], rows[2], rows[3], x_col)

    w = rng.standard_normal((50, 70)).astype(np.float32)  # row stride 70, columns from 5
    x = rng.standard_normal((9, 60)).astype(np.float32)
    rows = np.array([7, 2, 2, 0])  # any rows, repeats allowed
    acc = rng.standard_normal((4, 32)).astype(np.float32)
    expect = acc.astype(np.float64) + x[rows, 3:3 + kn].astype(np.float64) @ w[4:4 + kn, 5:37]
    run(acc, w, 4, 5, kn, x, rows, 3)
    np.testing.assert_allclose(acc, expect, rtol=1e-5, atol=1e-5)


def test_fast_exp_matches_libm_over_the_float32_range():
    from numba import njit

    @njit
    def apply(a, out):
        for i in range(a.shape[0]):
            out[i] = K.fast_exp(a[i])

    x = np.concatenate([np.linspace(-87, 88, 200_001), [0.0, -1e-8, 1e-8]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 4e-7
    # Outside the range it clamps instead of overflowing to inf or producing nan.
    far = np.array([-1e4, -100.0, 100.0, 1e4, np.inf, -np.inf], np.float32)
    got = np.empty_like(far)
    apply(far, got)
    assert np.all(np.isfinite(got)) and got[0] < 1e-37 and got[-3] > 1e38


class _VocabOnly:
    """Stands in for the tokenizer when tests feed token ids directly."""

    vocab_size = 40
    sha256 = "none"


TINY = NanoConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=32)


def _batch(rng):
    lengths = np.array([6, 2, 9], np.int64)
    ids = [rng.integers(1, TINY.vocab_size, size=n) for n in lengths]
    T = lengths.max()
    padded = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for b, s in enumerate(ids):
        padded[b, : len(s)] = s
        mask[b, : len(s)] = 1
    return np.concatenate(ids), lengths, padded, mask


def _reference(params, padded, mask, lengths):
    h, pooled, _ = M.forward(params, padded, mask, TINY)
    return np.concatenate([h[b, :n] for b, n in enumerate(lengths)]), pooled


def test_encoder_forward_f32_matches_reference(rng):
    params = M.init_params(TINY, seed=1)
    for n in params:  # larger weights make the check meaningful
        if not n.endswith("norm"):
            params[n] *= 5
    flat, lengths, padded, mask = _batch(rng)
    enc = Encoder.from_params(params, TINY, precision="f32", tokenizer=_VocabOnly())
    hidden, pooled = enc.forward_packed(flat, lengths)
    ref_h, ref_p = _reference(params, padded, mask, lengths)
    assert np.abs(hidden - ref_h).max() <= TOL
    assert np.abs(pooled - ref_p).max() <= TOL


def _q8_round(x: np.ndarray) -> np.ndarray:
    """numpy block_q8 round trip along the last axis (zero-padded to whole blocks), float32."""
    K_ = x.shape[-1]
    Kp = -(-K_ // 32) * 32
    xp = np.zeros(x.shape[:-1] + (Kp,), np.float32)
    xp[..., :K_] = x
    b = xp.reshape(x.shape[:-1] + (Kp // 32, 32))  # (..., blocks, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(b * inv)
    return (q * (amax * np.float32(1 / 127))).reshape(xp.shape)[..., :K_]


def test_encoder_forward_int4_matches_reference_on_quantized_weights_and_inputs(rng, monkeypatch):
    """Separates kernel error from quantization error: the reference uses the same Q4
    weights and rounds every linear input to block_q8, as the INT4 kernels do."""
    params = M.init_params(TINY, seed=2)
    for n in params:
        if not n.endswith("norm"):
            params[n] *= 5
        else:
            # Unit norm weights would leave the first layer's inputs at exact ratios of
            # Q4 codes, i.e. exact rounding ties for block_q8, which float noise between
            # numpy and numba then breaks either way; any other weights make ties unlikely.
            params[n] = (1 + 0.2 * rng.standard_normal(params[n].shape)).astype(np.float32)
    deq = {n: (Q.dequantize_q4(Q.quantize_q4(w)[0]) if w.ndim == 2 else w) for n, w in params.items()}
    flat, lengths, padded, mask = _batch(rng)
    enc = Encoder.from_params(params, TINY, precision="int4", tokenizer=_VocabOnly())
    hidden, pooled = enc.forward_packed(flat, lengths)
    mm = M._mm
    monkeypatch.setattr(M, "_mm", lambda x, w: mm(_q8_round(x), w))  # every linear map of the model
    ref_h, ref_p = _reference(deq, padded, mask, lengths)
    assert np.abs(hidden - ref_h).max() <= TOL
    assert np.abs(pooled - ref_p).max() <= TOL
    assert set(enc.quant_errors) == {n for n in params if params[n].ndim == 2}


@pytest.mark.parametrize("precision", ["f32", "int4"])
def test_results_do_not_depend_on_thread_count(rng, precision):
    params = M.init_params(TINY, seed=3)
    flat, lengths, _, _ = _batch(rng)
    enc = Encoder.from_params(params, TINY, precision=precision, tokenizer=_VocabOnly())
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [a.copy() for a in enc.forward_packed(flat, lengths)]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = [a.copy() for a in enc.forward_packed(flat, lengths)]
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_matmul_q8q4_serial_equals_parallel(rng):
    """The one-thread INT4 matmul gives the parallel kernel's bits (token chunks and tails)."""
    w = rng.standard_normal((72, 288)).astype(np.float32)
    t, _ = Q.quantize_q4(w)
    codes, scales = K.repack_q4(t.codes, t.scales)
    for n in (1, 6, 13, 130):
        xq, xs, xm = q8(rng.standard_normal((n, 288)).astype(np.float32))
        par, ser = np.empty((n, 72), np.float32), np.full((n, 72), np.nan, np.float32)
        K.matmul_q8q4(xq, xs, xm, codes, scales, par)
        K.matmul_q8q4(xq, xs, xm, codes, scales, ser, serial=True)
        np.testing.assert_array_equal(ser, par)

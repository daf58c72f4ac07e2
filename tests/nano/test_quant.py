"""Tests of the INT4 format in nano/quant.py: layout, nibble order, padding, error reports."""
import numpy as np
import pytest

from slm360_rasa.nano import quant as Q


def test_constants_describe_the_block():
    assert Q.QK == 32
    assert Q.BLOCK_BYTES == 18
    assert Q.BITS_PER_WEIGHT == 4.5


def test_nibble_order_matches_documented_layout():
    # One block whose codes are 0..15 then 15..0: element j -> low nibble of byte j,
    # element j + 16 -> high nibble of byte j.
    d = 0.5
    codes = np.concatenate([np.arange(16), np.arange(15, -1, -1)])
    w = ((codes - Q.Q4_ZERO) * d)[None, :]
    t, err = Q.quantize_q4(w)
    assert t.codes.shape == (1, 16) and t.scales.shape == (1, 1)
    assert float(t.scales[0, 0]) == d
    for j in range(16):
        assert t.codes[0, j] & 0x0F == codes[j]
        assert t.codes[0, j] >> 4 == codes[j + 16]
    assert err.max_abs == 0.0


def test_exactly_representable_matrix_round_trips():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.01, 1.0, size=(6, 4, 1)).astype(np.float16).astype(np.float64)
    q = rng.integers(0, 16, size=(6, 4, 32))
    q[:, :, 0] = 0  # the largest magnitude, -8 d, pins the scale exactly
    w = ((q - 8) * d).reshape(6, 128)
    t, err = Q.quantize_q4(w)
    np.testing.assert_array_equal(Q.dequantize_q4(t), w.astype(np.float32))
    assert err.max_abs == 0.0 and err.cosine == pytest.approx(1.0)


def test_padding_of_a_non_multiple_width():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 682)).astype(np.float32)
    t, err = Q.quantize_q4(w)
    assert t.codes.shape == (3, 704 // 2) and t.scales.shape == (3, 704 // 32)
    assert t.shape == (3, 682)
    back = Q.dequantize_q4(t)
    assert back.shape == (3, 682)
    # The padded tail of the last block holds zero codes.
    last = t.codes[:, -16:]
    lo, hi = last & 0x0F, last >> 4
    n_real_in_last = 682 - 21 * 32  # 10
    assert np.all(lo[:, n_real_in_last:] == 8) and np.all(hi == 8)


def test_zero_block_has_zero_scale():
    t, err = Q.quantize_q4(np.zeros((2, 64)))
    assert np.all(t.scales == 0) and np.all(t.codes == 0x88)
    assert err.max_abs == 0.0


def test_error_report_and_scale_search_beats_plain_q4_0():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 256)).astype(np.float32) * 0.02
    t, err = Q.quantize_q4(w)
    # Plain ggml q4_0 (scale = max-magnitude / -8) for comparison.
    b = w.reshape(-1, 32).astype(np.float64)
    m = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None]
    d = (m / -8).astype(np.float16).astype(np.float64)
    plain = ((np.clip(np.rint(b / d) + 8, 0, 15) - 8) * d).reshape(w.shape)
    plain_err = Q.quant_error(w, plain)
    assert err.rmse < plain_err.rmse
    assert err.cosine > 0.99
    assert 0.0 < err.rel_rmse < 0.15
    assert err.max_abs == pytest.approx(np.abs(Q.dequantize_q4(t) - w).max(), rel=1e-6)
    assert t.nbytes == 256 * 256 // 2 + 256 * 8 * 2


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_q4(np.zeros(32))
    w = np.zeros((1, 32))
    w[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Q.quantize_q4(w)


def test_quantize_params_and_rebuild():
    rng = np.random.default_rng(3)
    params = {"a": rng.standard_normal((8, 64)).astype(np.float32), "n": np.ones(64, np.float32)}
    stored, errors = Q.quantize_params(params)
    assert set(stored) == {"a.q4", "a.q4_scale", "n"} and set(errors) == {"a"}
    t = Q.q4_from_tensors(stored, "a", 64)
    assert Q.dequantize_q4(t).shape == (8, 64)
    with pytest.raises(ValueError, match="expected"):
        Q.q4_from_tensors(stored, "a", 96)
    with pytest.raises(ValueError, match="missing"):
        Q.q4_from_tensors(stored, "b", 64)

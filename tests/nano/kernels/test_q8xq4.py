"""kernels/q8xq4.py: the serial and parallel loops of the INT4 kernels give the same bits."""
import numba
import numpy as np
import pytest

from slm360_rasa.nano import kernels as K
from slm360_rasa.nano import quant as Q


@pytest.fixture
def rng():
    return np.random.default_rng(5)


def _q8(x, serial):
    N, Kd = x.shape
    xq = np.full((N, Kd), 99, np.int8)
    xs = np.full((N, Kd // K.QK), np.nan, np.float32)
    xm = np.full((N, Kd // K.QK), -1, np.int32)
    K.quantize_q8(x, xq, xs, xm, serial=serial)
    return xq, xs, xm


@pytest.mark.parametrize("N", [1, 13, K.Q4_TOKEN_CHUNK * 2 + 3])
def test_quantize_and_matmul_serial_equal_parallel(rng, N):
    w = rng.standard_normal((70, 704)).astype(np.float32)
    codes, scales = K.repack_q4(*(lambda t: (t.codes, t.scales))(Q.quantize_q4(w)[0]))
    x = rng.standard_normal((N, 704)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        par, ser = _q8(x, False), _q8(x, True)
        for a, b in zip(par, ser):
            np.testing.assert_array_equal(a, b)
        outs = [np.full((N, 70), np.nan, np.float32) for _ in range(2)]
        K.matmul_q8q4(*par, codes, scales, outs[0], serial=False)
        K.matmul_q8q4(*par, codes, scales, outs[1], serial=True)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[0]).all()


@pytest.mark.parametrize("serial", [False, True])
def test_matmul_q8q4_rejects_a_width_mismatch(rng, serial):
    t, _ = Q.quantize_q4(rng.standard_normal((8, 64)).astype(np.float32))
    codes, scales = K.repack_q4(t.codes, t.scales)
    xq, xs, xm = _q8(rng.standard_normal((3, 96)).astype(np.float32), True)
    with pytest.raises(ValueError, match="input width"):
        K.matmul_q8q4(xq, xs, xm, codes, scales, np.empty((3, 8), np.float32), serial=serial)


def test_dequant_row_q4_matches_quant(rng):
    t, _ = Q.quantize_q4(rng.standard_normal((3, 96)).astype(np.float32))
    ref = Q.dequantize_q4(t)
    out = np.empty(96, np.float32)
    for m in range(3):
        K.dequant_row_q4(t.codes[m], t.scales[m].astype(np.float32), out)
        np.testing.assert_array_equal(out, ref[m])

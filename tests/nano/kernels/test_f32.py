"""kernels/f32.py: the float32 matmuls against numpy."""
import numba
import numpy as np
import pytest

from slm360_rasa.nano import kernels as K


@pytest.fixture
def rng():
    return np.random.default_rng(3)


# Output widths that are not multiples of ROW_TILE, token counts around the 4-token tile.
@pytest.mark.parametrize("N,M,Kd", [(1, 77, 256), (6, 9, 32), (70, 5, 40)])
def test_linear_serial_matches_numpy(rng, N, M, Kd):
    x = rng.standard_normal((N, Kd)).astype(np.float32)
    w = rng.standard_normal((M, Kd)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    out = np.full((N, M), np.nan, np.float32)
    K.linear_serial(x, w, b, out)
    np.testing.assert_allclose(out, x @ w.T + b, rtol=1e-4, atol=1e-4)


def test_matmul_f32_does_not_depend_on_thread_count(rng):
    x = rng.standard_normal((150, 96)).astype(np.float32)
    w = rng.standard_normal((45, 96)).astype(np.float32)
    one, many = np.empty((150, 45), np.float32), np.empty((150, 45), np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        K.matmul_f32(x, w, one)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        K.matmul_f32(x, w, many)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_embed_f32_gathers_rows(rng):
    table = rng.standard_normal((10, 8)).astype(np.float32)
    ids = np.array([9, 0, 9, 4], np.int64)
    out = np.empty((4, 8), np.float32)
    K.embed_f32(ids, table, out)
    np.testing.assert_array_equal(out, table[ids])

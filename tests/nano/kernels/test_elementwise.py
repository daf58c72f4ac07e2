"""kernels/elementwise.py: each driver's serial and parallel loops give the same bits, and
the row kernels match the numpy reference (nano/model.py)."""
import numba
import numpy as np
import pytest

from slm360_rasa.nano import kernels as K
from slm360_rasa.nano import model as M

H, KV, D = 4, 2, 16
C = H * D


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.fixture
def all_threads():
    before = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield
    numba.set_num_threads(before)


def _packed(lengths):
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    return starts, positions


def _serial_and_parallel(kernel, *args, out):
    """kernel(*args, serial=...) run both ways on copies of `args`; the two `args[out]` after."""
    results = []
    for serial in (True, False):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        kernel(*copies, serial=serial)
        results.append(copies[out])
    return results


# Row counts: fewer and more than SERIAL_ROWS (the encoder's switch), and an odd one.
@pytest.mark.parametrize("N", [1, 37, K.SERIAL_ROWS + 23])
def test_row_kernels_serial_equal_parallel(rng, all_threads, N):
    x = rng.standard_normal((N, C)).astype(np.float32)
    y = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    eps = np.float32(1e-5)
    empty = np.full_like(x, np.nan)
    _, positions = _packed([N])
    cos, sin = M.rope_cos_sin(N, D, 10000.0)
    qkv = rng.standard_normal((N, (H + 2 * KV) * D)).astype(np.float32)
    hw = 40
    h13 = (rng.standard_normal((N, 2 * hw)) * 4).astype(np.float32)
    cases = [
        _serial_and_parallel(K.rmsnorm, x, w, eps, empty, out=3),
        _serial_and_parallel(K.add_norm, x, y, w, eps, empty, out=0),  # the residual, in place
        _serial_and_parallel(K.add_norm, x, y, w, eps, empty, out=4),
        _serial_and_parallel(K.rope_inplace, qkv, positions, cos, sin, H + KV, D, out=0),
        _serial_and_parallel(K.silu_mul, h13, hw, np.full((N, hw), np.nan, np.float32), out=2),
    ]
    for ser, par in cases:
        assert np.isfinite(ser).all()
        np.testing.assert_array_equal(ser, par)


@pytest.mark.parametrize("lengths", [[3], [3, 40, 1, 17], [1] * 9, [K.ATT_TILE + 5, 2, K.SERIAL_ROWS]])
def test_attention_serial_equals_parallel(rng, all_threads, lengths):
    """The serial loop reuses one scratch sized for the longest sequence, the parallel one
    allocates per job: the padding each job reads is zeroed by the job, so bits agree."""
    starts, _ = _packed(lengths)
    qkv = rng.standard_normal((int(starts[-1]), (H + 2 * KV) * D)).astype(np.float32)
    outs = [np.full((int(starts[-1]), C), np.nan, np.float32) for _ in range(2)]
    K.attention(qkv, starts, H, KV, D, outs[0], serial=False)
    K.attention(qkv, starts, H, KV, D, outs[1], serial=True)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[0]).all()


def test_silu_mul_matches_its_definition(rng):
    hw = 24
    h13 = (rng.standard_normal((7, 2 * hw)) * 5).astype(np.float32)
    out = np.empty((7, hw), np.float32)
    K.silu_mul(h13, hw, out)
    a, b = h13[:, :hw].astype(np.float64), h13[:, hw:].astype(np.float64)
    np.testing.assert_allclose(out, a / (1 + np.exp(-a)) * b, rtol=2e-6, atol=1e-6)


def test_add_norm_adds_the_residual_then_normalises(rng):
    x = rng.standard_normal((6, C)).astype(np.float32)
    y = rng.standard_normal((6, C)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    want_x = x + y
    out = np.empty_like(x)
    K.add_norm(x, y, w, np.float32(1e-5), out)
    np.testing.assert_allclose(x, want_x, rtol=1e-6)
    np.testing.assert_allclose(out, M.rmsnorm_forward(want_x, w, 1e-5)[0], rtol=1e-5, atol=1e-5)


def test_mean_pool_per_sequence(rng):
    starts = np.array([0, 4, 5, 5, 12], np.int64)  # includes an empty sequence
    h = rng.standard_normal((12, C)).astype(np.float32)
    out = np.full((4, C), np.nan, np.float32)
    K.mean_pool(h, starts, out)
    for b in range(4):
        s0, s1 = starts[b], starts[b + 1]
        want = h[s0:s1].mean(axis=0) if s1 > s0 else np.zeros(C)
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-6)

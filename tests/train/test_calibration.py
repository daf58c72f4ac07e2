"""Temperature scaling and ECE (train/calibration.py) against synthetic data with a known answer.

The served side (energy, background_softmax) is tested in tests/model/test_calibration.py."""
import numpy as np
import pytest

from slm360_rasa.model.calibration import background_softmax, energy
from slm360_rasa.train.calibration import (T_MAX, T_MIN, expected_calibration_error, fit_temperature,
                                           fit_temperature_with_background, nll, reliability_bins)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _synthetic(t0, n=6000, k=8, seed=0):
    """Logits and labels drawn from softmax(logits / t0): t0 is the true temperature."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * 4.0
    p = _softmax(z / t0)
    u = rng.random(n)
    y = np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), k - 1)  # inverse-CDF draw per row
    return z, y


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5, 6.0])
def test_fit_temperature_recovers_the_true_temperature(t0):
    z, y = _synthetic(t0)
    t = fit_temperature(z, y)
    assert abs(t - t0) < 0.06 * t0, (t, t0)
    # Independent reference: brute-force grid minimum of the NLL.
    grid = np.exp(np.linspace(np.log(T_MIN), np.log(T_MAX), 801))  # log-spacing 0.0055
    best = grid[np.argmin([nll(z, y, g) for g in grid])]
    assert abs(np.log(t) - np.log(best)) < 0.006
    assert nll(z, y, t) <= min(nll(z, y, t * 1.01), nll(z, y, t / 1.01))


def test_nll_matches_a_direct_computation():
    z = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = np.array([0, 1])
    t = 1.7
    p = np.exp(z / t) / np.exp(z / t).sum(axis=1, keepdims=True)
    assert nll(z, y, t) == pytest.approx(-np.mean(np.log(p[[0, 1], [0, 1]])), rel=1e-12)


def test_fit_temperature_is_deterministic_and_clamped():
    z, y = _synthetic(2.0, n=500, seed=3)
    assert fit_temperature(z, y) == fit_temperature(z.copy(), y.copy())
    # Labels independent of the logits: the best temperature is "infinitely flat", clamped to T_MAX.
    rng = np.random.default_rng(1)
    assert fit_temperature(z, rng.integers(0, z.shape[1], len(z))) == pytest.approx(T_MAX, rel=1e-6)
    # One error among confident right answers asks for sharpening; the bound stops it at T_MIN.
    # (unconstrained optimum near T = 0.08: the one error is a near-tie, so sharpening costs it little).
    z2 = np.tile([[1.0, 0.0]], (200, 1))
    z2[0] = [0.0, 0.001]
    y2 = np.zeros(200, np.int64)
    assert fit_temperature(z2, y2) == pytest.approx(T_MIN, rel=1e-6)


def test_all_correct_keeps_temperature_one():
    z = np.array([[3.0, 0.0], [0.0, 2.0], [5.0, 1.0]])
    assert fit_temperature(z, np.array([0, 1, 0])) == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no examples"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="t_min"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 1]), t_min=2.0)


def test_ece_on_hand_made_cases():
    # Two bins: (0.95: 1 of 2 right) and (0.55: 2 of 2 right): 0.5 * 0.45 + 0.5 * 0.45.
    assert expected_calibration_error([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 1]) == pytest.approx(0.45)
    assert expected_calibration_error([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9, 0.9, 0.3], [1, 1, 1, 0]) == pytest.approx(0.75 * 0.1 + 0.25 * 0.3)
    assert np.isnan(expected_calibration_error([], []))
    # With one bin ECE is |accuracy - mean confidence|.
    assert expected_calibration_error([0.2, 0.6, 1.0], [1, 1, 0], n_bins=1) == pytest.approx(abs(2 / 3 - 0.6))
    # Bins are (lo, hi]: 0.2 = 3/15 belongs to bin 2, not bin 3, despite 0.2 * 15 = 3.0000000000000004.
    bins = reliability_bins([0.2], [1])
    assert bins[2]["n"] == 1 and bins[3]["n"] == 0


def test_temperature_scaling_lowers_ece_on_overconfident_logits():
    z, y = _synthetic(3.0, n=4000, seed=5)  # labels are 3x "softer" than the logits say
    t = fit_temperature(z, y)
    before = expected_calibration_error(_softmax(z).max(1), _softmax(z).argmax(1) == y)
    after = expected_calibration_error(_softmax(z / t).max(1), _softmax(z).argmax(1) == y)
    assert before > 0.15 and after < 0.03


def test_benchmark_uses_this_ece():
    from benchmarks import metrics

    from slm360_rasa.train import calibration

    assert metrics.expected_calibration_error is calibration.expected_calibration_error
    assert metrics.reliability_bins is calibration.reliability_bins


def test_background_logit_lowers_confidence_where_every_logit_is_weak():
    """In-scope rows have one strong logit; "out-of-scope" rows only weak ones, which plain
    softmax can still make confident. The background logit separates them; the fit keeps
    held-out NLL at least as good as T alone could with the background in place."""
    rng = np.random.default_rng(0)
    n, k = 2000, 10
    y = rng.integers(0, k, n)
    z = rng.standard_normal((n, k))
    z[np.arange(n), y] += 8.0  # in scope: energy about 8
    oos = rng.standard_normal((500, k))
    oos[:, 0] += 2.5  # weak but peaked: plain softmax still puts ~0.6 on intent 0
    t, b = fit_temperature_with_background(z, y, 0.01)
    assert b == pytest.approx(np.quantile(energy(z, t), 0.01))
    assert (t, b) == fit_temperature_with_background(z, y, 0.01)  # deterministic
    plain = _softmax(oos / fit_temperature(z, y)).max(axis=1)
    with_bg = background_softmax(oos, t, b).max(axis=1)
    assert np.median(plain) > 0.4 and np.median(with_bg) < 0.05
    inscope = background_softmax(z, t, b).max(axis=1)
    assert np.median(inscope) > 0.97  # in-scope confidences barely move
    ece_bg = expected_calibration_error(inscope, background_softmax(z, t, b).argmax(axis=1) == y)
    assert ece_bg < 0.02
    with pytest.raises(ValueError, match="quantile"):
        fit_temperature_with_background(z, y, 0.0)

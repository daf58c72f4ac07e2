"""Served calibration (model/calibration.py): energy, P(in scope) and the background softmax by definition."""
import numpy as np

from slm360_rasa.model.calibration import background_softmax, energy, in_scope_probability


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_background_softmax_and_energy_by_definition():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((50, 6)) * 3
    np.testing.assert_allclose(background_softmax(z, 1.7, None), _softmax(z / 1.7), rtol=1e-12)
    e = energy(z, 1.7)
    np.testing.assert_allclose(e, 1.7 * np.log(np.exp(z / 1.7).sum(axis=1)), rtol=1e-12)
    p = background_softmax(z, 1.7, 2.0)
    # softmax(z / T) times P(in scope) = sigmoid((E - b) / T); the ranking never changes.
    np.testing.assert_allclose(p, _softmax(z / 1.7) / (1 + np.exp((2.0 - e) / 1.7))[:, None], rtol=1e-10)
    assert (p.sum(axis=1) < 1).all() and (p.argmax(axis=1) == z.argmax(axis=1)).all()
    # in_scope_probability is the share the intents keep: the rows' sums.
    np.testing.assert_allclose(in_scope_probability(z, 1.7, 2.0), p.sum(axis=1), rtol=1e-10)


def test_background_softmax_is_softmax_with_one_more_logit():
    """Direct definition: softmax over [z, b] / T, the last column dropped; large logits do not overflow."""
    z = np.array([[2.0, 0.0, -1.0], [800.0, 799.0, 790.0]])
    t, b = 0.8, 1.5
    for row in z:
        full = np.append(row, b) / t
        full = np.exp(full - full.max())
        full /= full.sum()
        np.testing.assert_allclose(background_softmax(row[None], t, b)[0], full[:-1], rtol=1e-12)
    out = background_softmax(z, t, b)
    assert out.shape == (2, 3) and out.dtype == np.float64 and np.isfinite(out).all()
    # Far above the background logit the intents keep (almost) all the probability.
    assert 1 - out[1].sum() < 1e-12

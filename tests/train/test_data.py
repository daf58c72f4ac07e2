"""Data helpers (train/data.py): stratified held-out split and stratified sample (and the held-out
split of `Examples`). `Examples` itself is tested in tests/model/test_examples.py."""
from collections import Counter

import numpy as np
import pytest

from slm360_rasa.model.examples import Examples
from slm360_rasa.train.data import holdout_split, stratified_holdout, stratified_sample

LABELS = ["a"] * 40 + ["b"] * 10 + ["c"] * 3 + ["d"] * 2 + ["e"] * 1 + ["f"] * 24
RNG_ORDER = np.random.default_rng(0).permutation(len(LABELS))
MIXED = [LABELS[i] for i in RNG_ORDER]  # labels interleaved, as in real data


def test_holdout_is_a_stratified_partition():
    tr, ho = stratified_holdout(MIXED, 0.2, 500, seed=7)
    assert len(np.intersect1d(tr, ho)) == 0 and sorted(np.concatenate([tr, ho]).tolist()) == list(range(len(MIXED)))
    assert list(tr) == sorted(tr) and list(ho) == sorted(ho)
    assert len(ho) == round(0.2 * len(MIXED))  # 16 of 80
    held = Counter(MIXED[i] for i in ho)
    total = Counter(MIXED)
    for lab, n in total.items():
        assert n - held[lab] >= min(n, 2), lab  # every label keeps at least two to train on
        if n < 3:
            assert held[lab] == 0, lab
    # Proportional to the label's size, up to rounding (a: 8, f: 4.8, b: 2, c: 0.6 of 16).
    assert held["a"] == 8 and held["f"] in (4, 5) and held["b"] == 2 and sum(held.values()) == 16


def test_holdout_is_seeded_and_capped():
    a = stratified_holdout(MIXED, 0.2, 500, seed=7)
    b = stratified_holdout(MIXED, 0.2, 500, seed=7)
    c = stratified_holdout(MIXED, 0.2, 500, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(stratified_holdout(MIXED, 0.2, 5, seed=7)[1]) == 5
    assert len(stratified_holdout(MIXED, 0.0, 500, seed=7)[1]) == 0
    # Nothing can be held out when no label has three examples.
    tr, ho = stratified_holdout(["x", "x", "y", "y", "z"], 0.4, 500, seed=0)
    assert len(ho) == 0 and len(tr) == 5


def test_holdout_validates_its_arguments():
    with pytest.raises(ValueError, match="fraction"):
        stratified_holdout(MIXED, 1.0, 10, seed=0)
    with pytest.raises(ValueError, match="max_n"):
        stratified_holdout(MIXED, 0.1, -1, seed=0)


def test_sample_keeps_every_label_and_is_seeded():
    idx = stratified_sample(MIXED, 12, seed=3)
    assert len(idx) == 12 and len(set(idx.tolist())) == 12 and list(idx) == sorted(idx)
    assert set(MIXED[i] for i in idx) == set(MIXED)  # even "e", with one example
    assert np.array_equal(idx, stratified_sample(MIXED, 12, seed=3))
    assert not np.array_equal(idx, stratified_sample(MIXED, 12, seed=4))
    assert np.array_equal(stratified_sample(MIXED, 500, seed=3), np.arange(len(MIXED)))
    # Fewer slots than labels: proportional, the big labels first.
    small = Counter(MIXED[i] for i in stratified_sample(MIXED, 3, seed=0))
    assert sum(small.values()) == 3 and small["a"] >= 1


def test_holdout_split_returns_leaked_texts_to_training():
    """A held-out example whose text also occurs among the training examples goes back to training."""
    texts = [f"t{i}" for i in range(10)] + ["dup", "dup"]
    ex = Examples.build(texts, ["a"] * 6 + ["b"] * 6)
    _, plain_ho = stratified_holdout(ex.intents, 0.5, 500, seed=1)
    assert 11 in plain_ho and 10 not in plain_ho  # one "dup" held out, its twin trained on
    train, held = holdout_split(ex, 0.5, 500, seed=1)
    assert held.texts == [texts[i] for i in plain_ho if i != 11]
    assert train.texts == [t for i, t in enumerate(texts) if i not in plain_ho or i == 11]

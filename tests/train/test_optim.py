"""AdamW, schedule and clipping (train/optim.py), and bit-identical seeded training steps."""
import math

import numpy as np
import pytest

from slm360_rasa.nano import model as M
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.train.optim import AdamW, OptimConfig, global_norm, lr_at


def test_adamw_matches_the_textbook_update():
    cfg = OptimConfig(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, warmup_steps=0, total_steps=10,
                      min_lr_ratio=1.0, grad_clip=0.0)
    p = {"w": np.array([1.0, -2.0], np.float32), "attention_norm": np.array([1.0], np.float32)}
    opt = AdamW(p, cfg)
    w = np.array([1.0, -2.0])
    m = v = np.zeros(2)
    for t in range(1, 4):
        g = np.array([0.5, -1.5]) * t
        opt.step(p, {"w": g.astype(np.float32), "attention_norm": np.array([0.3], np.float32)})
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        w = w * (1 - 0.1 * 0.1)
        w = w - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        np.testing.assert_allclose(p["w"], w, rtol=1e-5)
    # Norm gains are not decayed: only the Adam step moves them.
    assert p["attention_norm"][0] == pytest.approx(1.0 - 3 * 0.1, rel=1e-4)


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_gradient_clipping_scales_to_the_limit():
    cfg = OptimConfig(lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
                      min_lr_ratio=1.0)
    p = {"a": np.zeros(2, np.float32)}
    info = AdamW(p, cfg).step(p, {"a": np.array([3.0, 4.0], np.float32)})
    assert info["grad_norm"] == pytest.approx(5.0)
    assert global_norm({"a": np.array([3.0, 4.0])}) == pytest.approx(5.0)


def test_lr_multiplier_and_frozen_names():
    cfg = OptimConfig(lr=0.1, weight_decay=0.0, warmup_steps=0, grad_clip=0.0, min_lr_ratio=1.0)
    p = {"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32), "c": np.zeros(1, np.float32)}
    opt = AdamW(p, cfg, trainable=["a", "b"], lr_mult={"b": 10.0})
    g = {k: np.ones(1, np.float32) for k in p}
    opt.step(p, g)
    assert p["b"][0] == pytest.approx(10 * p["a"][0]) and p["c"][0] == 0.0


@pytest.mark.parametrize("bad", [dict(lr=0), dict(betas=(1.0, 0.9)), dict(weight_decay=-1), dict(min_lr_ratio=2)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        OptimConfig(**bad)


def test_two_seeded_training_steps_are_bit_identical():
    cfg = NanoConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=100)

    def run():
        params = M.init_params(cfg, seed=11)
        rng = np.random.default_rng(5)
        ids = rng.integers(1, 100, size=(4, 7))
        mask = np.ones((4, 7), np.float32)
        opt = AdamW(params, OptimConfig(lr=1e-2, warmup_steps=0))
        for _ in range(2):
            _, pooled, cache = M.forward(params, ids, mask, cfg)
            opt.step(params, M.backward(cache, cfg, dpooled=pooled - 1.0))
        return params

    a, b = run(), run()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k

"""Distillation (train/distill.py): loss gradient, a loss that falls, bit-identical resume."""
import numpy as np
import pytest

from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.train import distill as D

SMALL = NanoConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)


class BagOfWordsTeacher:
    """A cheap deterministic stand-in teacher: hashed bag of words, projected to 384, unit norm."""

    name = "test-bow-teacher"

    def __init__(self):
        self.proj = np.random.default_rng(0).standard_normal((64, 384))

    def encode(self, texts, batch_size=64):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 64] += 1.0
        e = out @ self.proj + 1e-3
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def _corpus(tmp_path, n=240):
    rng = np.random.default_rng(1)
    words = ["book", "a", "table", "for", "two", "play", "some", "jazz", "what", "is", "the", "weather",
             "in", "paris", "transfer", "money", "to", "my", "savings", "card", "lost", "please"]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(n)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(tmp_path, out="run", **kw):
    base = dict(corpus=str(_corpus(tmp_path)), out_dir=str(tmp_path / out), cache_dir=str(tmp_path / "cache"),
                n_heldout=40, epochs=3, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=7,
                eval_every=0, model=SMALL.to_dict())
    base.update(kw)
    return D.DistillConfig(**base)


def test_cosine_mse_loss_gradient():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((5, 7))
    t = rng.standard_normal((5, 7))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    loss, ds, cos = D.cosine_mse_loss(s, t, 0.7)
    eps = 1e-6
    for idx in [(0, 0), (2, 3), (4, 6), (1, 5)]:
        sp, sm = s.copy(), s.copy()
        sp[idx] += eps
        sm[idx] -= eps
        num = (D.cosine_mse_loss(sp, t, 0.7)[0] - D.cosine_mse_loss(sm, t, 0.7)[0]) / (2 * eps)
        assert ds[idx] == pytest.approx(num, rel=1e-5, abs=1e-8)
    ref_cos = np.mean(np.sum(s * t, 1) / np.linalg.norm(s, axis=1))
    assert cos == pytest.approx(ref_cos)


def test_loss_decreases_and_heldout_cosine_improves(tmp_path):
    cfg = _cfg(tmp_path, epochs=4)
    summary = D.run(cfg, progress=False, teacher=BagOfWordsTeacher())
    assert summary["finished"]
    state = D.load_checkpoint(tmp_path / "run" / D.STATE_FILE)
    hist = [h for h in state.extra["history"] if "loss" in h]
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert summary["heldout_cos"] > 0.5
    log = (tmp_path / "run" / D.LOG_FILE).read_text()
    assert '"tokens_per_s"' in log and '"event": "summary"' in log


def test_resume_gives_identical_weights(tmp_path):
    teacher = BagOfWordsTeacher()
    full = _cfg(tmp_path, out="full")
    D.run(full, progress=False, teacher=teacher)
    split = _cfg(tmp_path, out="split")
    first = D.run(split, progress=False, teacher=teacher, max_steps=10)
    assert not first["finished"] and first["step"] == 10
    second = D.run(split, progress=False, teacher=teacher)
    assert second["finished"]
    a = D.load_checkpoint(tmp_path / "full" / D.STATE_FILE).tensors
    b = D.load_checkpoint(tmp_path / "split" / D.STATE_FILE).tensors
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_resume_refuses_changed_settings(tmp_path):
    teacher = BagOfWordsTeacher()
    D.run(_cfg(tmp_path, max_length=32), progress=False, teacher=teacher, max_steps=3)
    with pytest.raises(ValueError, match="max_length"):
        D.run(_cfg(tmp_path, max_length=48), progress=False, teacher=teacher)


def test_missing_corpus_names_the_path(tmp_path):
    cfg = _cfg(tmp_path, corpus=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        D.run(cfg, progress=False, teacher=BagOfWordsTeacher())


def test_export_release_writes_master_and_int4(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    D.run(cfg, progress=False, teacher=BagOfWordsTeacher())
    path = D.export_release(cfg, tmp_path / "release.safetensors")
    ck = D.load_checkpoint(path)
    assert ck.tensors["tok_embeddings"].dtype == np.float16
    assert "layers.0.wq.q4" in ck.tensors and "distill.proj.weight" not in ck.tensors
    assert ck.extra["kind"] == "release" and "layers.0.w2" in ck.extra["quant_error"]


def test_init_from_warm_starts_from_an_earlier_run(tmp_path):
    teacher = BagOfWordsTeacher()
    first = _cfg(tmp_path, out="first", epochs=1)
    D.run(first, progress=False, teacher=teacher)
    src = tmp_path / "first" / D.STATE_FILE
    second = _cfg(tmp_path, out="second", epochs=1, init_from=str(src))
    state = D.init_state(second, total_steps=10)
    before = D.load_checkpoint(src).tensors
    for name in ("layers.1.w2", "tok_embeddings", D.PROJ_W):
        assert np.array_equal(state.params[name], before[name])
    assert state.step == 0 and state.opt.step_count == 0
    with pytest.raises(ValueError, match="architecture"):
        D.init_state(_cfg(tmp_path, out="x", init_from=str(src), model={**SMALL.to_dict(), "n_layers": 3}), 10)

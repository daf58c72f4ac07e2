"""Continual learning (train/continual.py): EWC penalty, replay, Fisher diagonal, the guard.

The Fisher's storage format is tested in tests/model/test_fisher.py."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from slm360_rasa.config import FinetuneConfig
from slm360_rasa.model import IntentEntityModel
from slm360_rasa.model.examples import Examples
from slm360_rasa.model.heads import INTENT
from slm360_rasa.nano import model as M
from slm360_rasa.nano.checkpoint import load_checkpoint, save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.model import init_params
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.train.continual import ContinualLearner, EWCPenalty, empirical_fisher, remember
from slm360_rasa.train.data import pad
from slm360_rasa.train.trainer import Replay, Trainer, start_model
from tests.train.toybot import columns, toy_examples

SMALL = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
BASE = dict(epochs=20, batch_size=8, learning_rate=2e-3, holdout_fraction=0.25)
SWAP = {"book": "hours", "hours": "book", "menu": "menu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, init_params(SMALL, seed=0), SMALL, NanoTokenizer.load().sha256)


def _trainer(checkpoint, penalty=None, **kw):
    """A Trainer of a fresh model on the small checkpoint, config BASE with `kw` over it."""
    cfg = FinetuneConfig(**{**BASE, **kw})
    model, params = start_model(cfg, checkpoint=str(checkpoint))
    return Trainer(model, cfg, params, penalty=penalty)


def _fit(checkpoint, data, penalty=None, replay=None, **kw):
    """A model trained on `data` with its replay buffer and Fisher, as `finetune` makes one."""
    trainer = _trainer(checkpoint, penalty=penalty, **kw)
    trainer.fit(*columns(data), progress=False, replay=replay)
    remember(trainer)
    return trainer.model


@pytest.fixture(scope="module")
def base(checkpoint, tmp_path_factory):
    """A model trained on the toy bot (12 of 48 examples held out) and its saved file."""
    m = _fit(checkpoint, toy_examples())
    return m, m.save(tmp_path_factory.mktemp("base") / "model.safetensors")


def _tensors(path):
    return load_file(str(path))


# ------------------------------------------------------------------ EWC


def test_ewc_penalty_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    shapes = {"a": (5, 7), "b": (11,)}
    fisher = {k: rng.uniform(0, 3, s) for k, s in shapes.items()}
    anchor = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params = {k: anchor[k] + rng.standard_normal(s) * 0.3 for k, s in shapes.items()}
    params["c"] = rng.standard_normal(3)  # no Fisher: not penalised
    pen = EWCPenalty(fisher, anchor, ewc_lambda=2.5, normalize=False)
    loss, grads = pen(params)
    direct = 0.5 * 2.5 * sum(float((fisher[k] * (params[k] - anchor[k]) ** 2).sum()) for k in shapes)
    assert loss == pytest.approx(direct, rel=1e-12)
    assert set(grads) == {"a", "b"}
    eps = 1e-6
    for k in shapes:
        fd = np.zeros_like(params[k])
        for i in np.ndindex(params[k].shape):
            p_plus = {n: v.copy() for n, v in params.items()}
            p_minus = {n: v.copy() for n, v in params.items()}
            p_plus[k][i] += eps
            p_minus[k][i] -= eps
            fd[i] = (pen(p_plus)[0] - pen(p_minus)[0]) / (2 * eps)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-9)
    # The anchor is a copy: moving the caller's array later changes nothing.
    anchor["a"] += 1.0
    assert pen(params)[0] == loss


def test_ewc_normalises_the_fisher_to_mean_one():
    rng = np.random.default_rng(2)
    fisher = {"a": rng.uniform(0, 3e-8, (4, 6)).astype(np.float32), "b": rng.uniform(0, 1e-8, 9).astype(np.float32)}
    anchor = {k: np.zeros_like(v) for k, v in fisher.items()}
    params = {k: np.full_like(v, 0.1) for k, v in fisher.items()}
    mean = np.concatenate([f.ravel() for f in fisher.values()]).astype(np.float64).mean()
    raw = EWCPenalty(fisher, anchor, 3.0, normalize=False)(params)[0]
    norm = EWCPenalty(fisher, anchor, 3.0)
    assert np.mean(np.concatenate([f.ravel() for f in norm.fisher.values()])) == pytest.approx(1.0, rel=1e-5)
    assert norm(params)[0] == pytest.approx(raw / mean, rel=1e-5)
    # A Fisher of zeros (nothing learnt) stays zero rather than dividing by zero.
    zeros = EWCPenalty({"a": np.zeros((2, 2), np.float32)}, {"a": np.zeros((2, 2))}, 1.0)
    assert zeros({"a": np.ones((2, 2))})[0] == 0.0


def test_fit_adds_the_penalty_to_every_step(checkpoint):
    data = toy_examples(6)
    plain = _fit(checkpoint, data, epochs=3, holdout_fraction=0.0)
    calls = []

    def zero(params):
        calls.append(1)
        return 0.0, {k: np.zeros_like(v) for k, v in params.items()}

    m = _fit(checkpoint, data, penalty=zero, epochs=3, holdout_fraction=0.0)
    assert len(calls) == 3 * -(-len(data) // BASE["batch_size"])
    for k in plain.training.params:
        assert np.array_equal(plain.training.params[k], m.training.params[k]), k
    # A strong EWC anchored at the start keeps the weights near it.
    start = start_model(FinetuneConfig(), checkpoint=str(checkpoint))[1]
    ones = {k: np.ones_like(v) for k, v in start.items()}
    held = _fit(checkpoint, data, penalty=EWCPenalty(ones, start, ewc_lambda=1e4), epochs=3, holdout_fraction=0.0)
    drift = lambda mm: sum(float(np.abs(mm.training.params[k] - start[k]).sum()) for k in start)  # noqa: E731
    assert drift(held) < 0.3 * drift(plain)
    assert "penalty" in held.training.history[-1] and "penalty" not in plain.training.history[-1]


def _record_batches(trainer):
    """Wrap trainer._batch_grads to record the example positions of every batch."""
    seen, inner = [], trainer._batch_grads

    def spy(allp, seqs, y, tags, b, *rest):
        seen.append(np.asarray(b).copy())
        return inner(allp, seqs, y, tags, b, *rest)

    trainer._batch_grads = spy
    return seen


def test_fit_replays_the_whole_buffer_like_plain_data_by_default(checkpoint):
    data, old = toy_examples(6), toy_examples(4, offset=8)
    joined = _fit(checkpoint, data + old, epochs=2, holdout_fraction=0.0)
    split = _fit(checkpoint, data, replay=Replay(Examples.build(*columns(old))), epochs=2, holdout_fraction=0.0)
    # Replay(per_epoch=None) trains on exactly what concatenating the examples trains on.
    for k in joined.training.params:
        assert np.array_equal(joined.training.params[k], split.training.params[k]), k
    assert split.training.replay == joined.training.replay


def test_fit_replays_a_fresh_sample_each_epoch(checkpoint):
    data, old = toy_examples(4), toy_examples(12, offset=4)
    n, replay = len(data), Examples.build(*columns(old))
    # With a penalty too (its gradients once shadowed the per-epoch count).
    zero = lambda params: (0.0, {k: np.zeros_like(v) for k, v in params.items()})  # noqa: E731
    trainer = _trainer(checkpoint, penalty=zero, epochs=3, holdout_fraction=0.0)
    seen = _record_batches(trainer)
    trainer.fit(*columns(data), progress=False, replay=Replay(replay, per_epoch=6))
    steps = -(-(n + 6) // BASE["batch_size"])
    assert len(seen) == 3 * steps
    epochs = [np.concatenate(seen[e * steps:(e + 1) * steps]) for e in range(3)]
    picked = []
    for pos in epochs:
        # Every new example once per epoch, plus 6 distinct replayed ones, 2 of each intent.
        assert sorted(pos[pos < n].tolist()) == list(range(n))
        r = pos[pos >= n] - n
        assert len(r) == 6 == len(set(r.tolist()))
        assert sorted(replay.intents[i] for i in r) == ["book"] * 2 + ["hours"] * 2 + ["menu"] * 2
        picked.append(frozenset(r.tolist()))
    assert len(set(picked)) > 1  # a fresh sample, not the same six every epoch
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="replay_per_epoch must be an integer >= 0"):
            Replay(replay, per_epoch=bad)


# ------------------------------------------------------------------ Fisher


def test_empirical_fisher_of_the_intent_bias_matches_a_direct_computation(checkpoint):
    data = toy_examples(4)
    trainer = _trainer(checkpoint, epochs=2, entity_recognition=False, holdout_fraction=0.0, freeze_layers=1)
    trainer.fit(*columns(data), progress=False)
    m = trainer.model
    ex = Examples.build(*columns(data))
    fisher = empirical_fisher(trainer, ex)
    # Frozen block 0 and the (frozen) embedding get no Fisher; everything trained does.
    assert not any(k.startswith("layers.0.") or k == "tok_embeddings" for k in fisher)
    assert {"layers.1.wq", "norm", f"{INTENT}.weight", f"{INTENT}.bias"} <= set(fisher)
    # d loss / d bias = softmax(logits) - onehot for one example: compute it independently.
    batch = m.tokenizer.encode_batch(ex.texts, max_length=trainer.cfg.max_length)
    ids, mask = pad([batch.ids[i, : batch.lengths[i]].astype(np.int64) for i in range(len(ex))], SMALL.pad_id)
    _, pooled, _ = M.forward(m.training.params, ids, mask, SMALL)
    logits = pooled @ m.heads[f"{INTENT}.weight"].T + m.heads[f"{INTENT}.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(len(m.intents))[[m.intents.index(i) for i in ex.intents]]
    np.testing.assert_allclose(fisher[f"{INTENT}.bias"], ((p - onehot) ** 2).mean(0), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="at least one example"):
        empirical_fisher(trainer, Examples())


def test_continual_state_round_trips_through_save_and_load(base):
    m, path = base
    st = m.training
    back = IntentEntityModel.load(path, training=True)
    assert st.fisher_names and back.training.fisher_names == st.fisher_names
    f1, f2 = m.fisher(), back.fisher()
    for k in f1:
        assert np.array_equal(f1[k], f2[k]), k
        assert f1[k].shape == (st.params[k] if k in st.params else m.heads[k]).shape
    assert back.training.holdout == st.holdout and back.training.replay == st.replay and len(st.holdout) == 12
    assert back.temperature == m.temperature and back.calibration == m.calibration
    # Held-out examples are not in the replay buffer (it holds every training example here).
    assert not set(st.holdout.texts) & set(st.replay.texts) and len(st.holdout) + len(st.replay) == 48
    # Loading and saving again without training keeps every tensor bit-identical.
    again = back.save(path.parent / "again.safetensors")
    a, b = _tensors(path), _tensors(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Loaded for serving, the model has no training state: no Fisher to read, nothing to learn from.
    served = IntentEntityModel.load(path)
    assert served.training is None
    with pytest.raises(ValueError, match="training=True"):
        served.fisher()
    with pytest.raises(ValueError, match="training state"):
        ContinualLearner(served)


def test_without_ewc_no_fisher_is_computed(checkpoint):
    m = _fit(checkpoint, toy_examples(4), epochs=1, ewc_lambda=0.0)
    assert m.training.fisher_names == [] and m.fisher() == {} and len(m.training.replay) > 0


# ------------------------------------------------------------------ learner


def test_unknown_labels_are_refused_by_name(base):
    m, _ = base
    learner = ContinualLearner(m.copy())
    with pytest.raises(ValueError, match="'greet'"):
        learner.learn(["hello there"], ["greet"])
    with pytest.raises(ValueError, match="'time'"):
        learner.learn(["book at 8"], ["book"], [[{"start": 8, "end": 9, "entity": "time"}]])
    with pytest.raises(ValueError, match="same length"):
        learner.learn(["a", "b"], ["book"])


def test_harmful_update_is_refused_and_the_weights_are_kept(base, tmp_path):
    _, path = base
    learner = ContinualLearner.load(path, epochs=5)
    before = {k: v.copy() for k, v in learner.model.training.params.items()}
    texts, intents, _ = columns(toy_examples())
    bad = [(t, SWAP[i]) for t, i in zip(texts, intents) if i != "menu"] * 3
    report = learner.learn([b[0] for b in bad], [b[1] for b in bad])
    assert not report.accepted and report.guard == "holdout" and report.n_guard == 12
    assert report.drop > 0.02 and report.accuracy_before - report.accuracy_after == pytest.approx(report.drop)
    assert report.max_forgetting == 0.02 and report.seconds > 0
    assert all(np.array_equal(before[k], learner.model.training.params[k]) for k in before)
    out = learner.save(tmp_path / "after.safetensors")
    a, b = _tensors(path), _tensors(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    log = load_checkpoint(out).extra["continual"]
    assert len(log) == 1 and log[0]["accepted"] is False and "REFUSED" in report.summary()


def test_harmful_update_passes_with_the_guard_off(base):
    _, path = base
    learner = ContinualLearner.load(path, epochs=5, max_forgetting=None)
    texts, intents, _ = columns(toy_examples())
    bad = [(t, SWAP[i]) for t, i in zip(texts, intents) if i != "menu"] * 3
    report = learner.learn([b[0] for b in bad], [b[1] for b in bad])
    assert report.accepted and report.drop > 0.02 and report.max_forgetting is None


def test_benign_update_is_accepted_and_deterministic(base, tmp_path):
    m, path = base
    new = toy_examples(16, offset=16)  # unseen book examples, hours/menu again
    reports, models = [], []
    for _ in range(2):
        learner = ContinualLearner.load(path, epochs=5, learning_rate=2e-4)
        reports.append(learner.learn(*columns(new)))
        models.append(learner.model)
    r = reports[0]
    assert r.accepted and r.drop <= 0.02 and r.guard == "holdout"
    assert r.n_replay > 0 and r.n_new_train + r.n_new_holdout < len(new)  # old held-out texts stay out
    upd = models[0].training
    assert not any(np.array_equal(upd.params[k], m.training.params[k]) for k in ("layers.1.wq", "norm"))
    assert not set(m.training.holdout.texts) & set(upd.replay.texts)  # never trained on, never replayed
    assert set(m.training.holdout.texts) <= set(upd.holdout.texts)  # the guard set carries over
    assert len(upd.continual) == 1 and upd.continual[0]["accepted"] is True
    # Same data + seed: the same update, down to the bytes of the saved file.
    files = [mm.save(tmp_path / f"{i}.safetensors").read_bytes() for i, mm in enumerate(models)]
    assert files[0] == files[1]


def test_replay_ratio_sets_the_replayed_examples_per_epoch(base):
    m, _ = base
    new = toy_examples(16, offset=16)
    full = ContinualLearner(m.copy(), epochs=1).learn(*columns(new))
    part = ContinualLearner(m.copy(), epochs=1, replay_ratio=0.25).learn(*columns(new))
    assert full.replay_per_epoch == full.n_replay > 0
    assert part.n_replay == full.n_replay and part.n_new_train == full.n_new_train
    assert part.replay_per_epoch == min(part.n_replay, -(-part.n_new_train // 4)) < part.n_replay
    assert f"{part.replay_per_epoch} replayed examples (of {part.n_replay}) per epoch" in part.summary()
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="replay_ratio must be a finite number > 0"):
            FinetuneConfig(replay_ratio=bad)


def test_an_update_of_old_held_out_examples_only_replays_the_buffer(base):
    m, _ = base
    st = m.training
    # Every text is an old held-out one: it stays held out, so the update trains on the buffer alone.
    report = ContinualLearner(m.copy(), epochs=1, replay_ratio=0.25).learn(list(st.holdout.texts),
                                                                         list(st.holdout.intents))
    assert report.n_new_train == 0 and report.n_replay == len(st.replay) > 0
    assert report.replay_per_epoch == report.n_replay  # a ratio of nothing new still replays everything
    with pytest.raises(ValueError, match="no training examples"):
        Trainer(m.copy(), st.finetune).fit([], [], progress=False)

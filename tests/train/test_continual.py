"""Continual learning (train/continual.py): Fisher storage, EWC penalty, replay, the guard."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from slm360_rasa.nano import model as M
from slm360_rasa.nano.checkpoint import load_checkpoint, save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.model import init_params
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.train.continual import (FISHER_GROUP, ContinualLearner, EWCPenalty, check_fisher, decode_fisher,
                                         empirical_fisher, encode_fisher, fisher_bytes)
from slm360_rasa.train.data import Examples, pad
from slm360_rasa.train.finetune import INTENT, FinetuneConfig, IntentEntityModel
from toybot import columns, toy_examples

SMALL = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
BASE = dict(epochs=20, batch_size=8, learning_rate=2e-3, holdout_fraction=0.25)
SWAP = {"book": "hours", "hours": "book", "menu": "menu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, init_params(SMALL, seed=0), SMALL, NanoTokenizer.load().sha256)


def _fit(checkpoint, data, **kw):
    m = IntentEntityModel.from_pretrained(FinetuneConfig(**{**BASE, **kw}), checkpoint=str(checkpoint))
    m.fit(*columns(data), progress=False)
    return m


@pytest.fixture(scope="module")
def base(checkpoint, tmp_path_factory):
    """A model trained on the toy bot (12 of 48 examples held out) and its saved file."""
    m = _fit(checkpoint, toy_examples())
    return m, m.save(tmp_path_factory.mktemp("base") / "model.safetensors")


def _tensors(path):
    return load_file(str(path))


# ------------------------------------------------------------------ Fisher storage


def test_fisher_codes_keep_values_within_half_an_octave():
    rng = np.random.default_rng(0)
    f = np.exp2(rng.uniform(-40, 0, size=(37, 29)))  # 40 octaves, odd sizes, groups cross rows
    f[3, :] = 0.0
    f[5, 7] = 0.0
    enc = encode_fisher({"w": f})
    assert enc["fisher.w.codes"].dtype == np.uint8 and enc["fisher.w.top"].dtype == np.float16
    n_bytes = sum(v.nbytes for v in enc.values())
    assert n_bytes == fisher_bytes(f.size) == 2 * -(-f.size // FISHER_GROUP) + -(-f.size // 2)
    back = decode_fisher(enc, {"w": f.shape})["w"].astype(np.float64)
    flat, bflat = f.ravel(), back.ravel()
    gmax = np.repeat([g.max() for g in np.array_split(flat, range(FISHER_GROUP, flat.size, FISHER_GROUP))],
                     FISHER_GROUP)[: flat.size]
    kept = flat >= gmax * 2.0 ** -14.4
    ratio = bflat[kept] / flat[kept]
    assert np.all(ratio <= 2 ** 0.54) and np.all(ratio >= 2 ** -0.54)
    assert np.all(bflat[flat == 0] == 0)
    # Values far below their group's top become 0; they weigh < 1/23,000 of it.
    assert np.all(bflat[flat < gmax * 2.0 ** -14.6] == 0)


def test_fisher_codes_refuse_bad_values_and_shapes():
    with pytest.raises(ValueError, match="w"):
        encode_fisher({"w": np.array([1.0, -1.0])})
    enc = encode_fisher({"w": np.ones((4, 8))})
    with pytest.raises(ValueError, match="w"):
        decode_fisher(enc, {"w": (4, 9)})
    with pytest.raises(ValueError, match="missing"):
        decode_fisher(enc, {"v": (4, 8)})
    # The load-time check refuses the same files without decoding them.
    check_fisher(enc, {"w": (4, 8)})
    with pytest.raises(ValueError, match="expected float16"):
        check_fisher(enc, {"w": (4, 9)})
    with pytest.raises(ValueError, match="missing"):
        check_fisher(enc, {"v": (4, 8)})


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

    m = IntentEntityModel.from_pretrained(FinetuneConfig(**{**BASE, "epochs": 3, "holdout_fraction": 0.0}),
                                          checkpoint=str(checkpoint))
    m.fit(*columns(data), progress=False, penalty=zero)
    assert len(calls) == 3 * -(-len(data) // BASE["batch_size"])
    for k in plain.params:
        assert np.array_equal(plain.params[k], m.params[k]), k
    # A strong EWC anchored at the start keeps the weights near it.
    start = IntentEntityModel.from_pretrained(FinetuneConfig(), checkpoint=str(checkpoint)).params
    ones = {k: np.ones_like(v) for k, v in start.items()}
    held = IntentEntityModel.from_pretrained(FinetuneConfig(**{**BASE, "epochs": 3, "holdout_fraction": 0.0}),
                                             checkpoint=str(checkpoint))
    held.fit(*columns(data), progress=False, penalty=EWCPenalty(ones, start, ewc_lambda=1e4))
    drift = lambda mm: sum(float(np.abs(mm.params[k] - start[k]).sum()) for k in start)  # noqa: E731
    assert drift(held) < 0.3 * drift(plain)
    assert "penalty" in held.history[-1] and "penalty" not in plain.history[-1]


def _record_batches(model):
    """Wrap model._batch_grads to record the example positions of every batch."""
    seen, inner = [], model._batch_grads

    def spy(allp, seqs, y, tags, b, *rest):
        seen.append(np.asarray(b).copy())
        return inner(allp, seqs, y, tags, b, *rest)

    model._batch_grads = spy
    return seen


def test_fit_replays_the_whole_buffer_like_plain_data_by_default(checkpoint):
    data, old = toy_examples(6), toy_examples(4, offset=8)
    cfg = FinetuneConfig(**{**BASE, "epochs": 2, "holdout_fraction": 0.0})
    joined = IntentEntityModel.from_pretrained(cfg, checkpoint=str(checkpoint))
    joined.fit(*columns(data + old), progress=False)
    split = IntentEntityModel.from_pretrained(cfg, checkpoint=str(checkpoint))
    split.fit(*columns(data), progress=False, replay=Examples.build(*columns(old)))
    # replay_per_epoch=None trains on exactly what concatenating the examples trains on.
    for k in joined.params:
        assert np.array_equal(joined.params[k], split.params[k]), k
    assert split.replay == joined.replay


def test_fit_replays_a_fresh_sample_each_epoch(checkpoint):
    data, old = toy_examples(4), toy_examples(12, offset=4)
    n, replay = len(data), Examples.build(*columns(old))
    # ewc_lambda 0: no Fisher afterwards, whose per-example gradients would be recorded too.
    m = IntentEntityModel.from_pretrained(FinetuneConfig(**{**BASE, "epochs": 3, "holdout_fraction": 0.0,
                                                            "ewc_lambda": 0.0}), checkpoint=str(checkpoint))
    seen = _record_batches(m)
    # With a penalty too (its gradients once shadowed the per-epoch count).
    zero = lambda params: (0.0, {k: np.zeros_like(v) for k, v in params.items()})  # noqa: E731
    m.fit(*columns(data), progress=False, replay=replay, replay_per_epoch=6, penalty=zero)
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
    with pytest.raises(ValueError, match="replay_per_epoch must be an integer >= 0"):
        m.fit(*columns(data), progress=False, replay=replay, replay_per_epoch=-1)


# ------------------------------------------------------------------ Fisher


def test_empirical_fisher_of_the_intent_bias_matches_a_direct_computation(checkpoint):
    data = toy_examples(4)
    m = _fit(checkpoint, data, epochs=2, entity_recognition=False, holdout_fraction=0.0, freeze_layers=1)
    ex = Examples.build(*columns(data))
    fisher = empirical_fisher(m, ex)
    # Frozen block 0 and the (frozen) embedding get no Fisher; everything trained does.
    assert not any(k.startswith("layers.0.") or k == "tok_embeddings" for k in fisher)
    assert {"layers.1.wq", "norm", f"{INTENT}.weight", f"{INTENT}.bias"} <= set(fisher)
    # d loss / d bias = softmax(logits) - onehot for one example: compute it independently.
    batch = m.tokenizer.encode_batch(ex.texts, max_length=m.cfg.max_length)
    ids, mask = pad([batch.ids[i, : batch.lengths[i]].astype(np.int64) for i in range(len(ex))], SMALL.pad_id)
    _, pooled, _ = M.forward(m.params, ids, mask, SMALL)
    logits = pooled @ m.heads[f"{INTENT}.weight"].T + m.heads[f"{INTENT}.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(len(m.intents))[[m.intents.index(i) for i in ex.intents]]
    np.testing.assert_allclose(fisher[f"{INTENT}.bias"], ((p - onehot) ** 2).mean(0), rtol=1e-4, atol=1e-9)


def test_continual_state_round_trips_through_save_and_load(base):
    m, path = base
    back = IntentEntityModel.load(path)
    assert m.fisher_names and back.fisher_names == m.fisher_names
    f1, f2 = m.fisher(), back.fisher()
    for k in f1:
        assert np.array_equal(f1[k], f2[k]), k
        assert f1[k].shape == (m.params[k] if k in m.params else m.heads[k]).shape
    assert back.holdout == m.holdout and back.replay == m.replay and len(m.holdout) == 12
    assert back.temperature == m.temperature and back.calibration == m.calibration
    # Held-out examples are not in the replay buffer (it holds every training example here).
    assert not set(m.holdout.texts) & set(m.replay.texts) and len(m.holdout) + len(m.replay) == 48
    # Loading and saving again without training keeps every tensor bit-identical.
    again = back.save(path.parent / "again.safetensors")
    a, b = _tensors(path), _tensors(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_without_ewc_no_fisher_is_computed(checkpoint):
    m = _fit(checkpoint, toy_examples(4), epochs=1, ewc_lambda=0.0)
    assert m.fisher_names == [] and m.fisher() == {} and len(m.replay) > 0


# ------------------------------------------------------------------ learner


def test_unknown_labels_are_refused_by_name(base):
    m, _ = base
    learner = ContinualLearner(m.clone())
    with pytest.raises(ValueError, match="'greet'"):
        learner.learn(["hello there"], ["greet"])
    with pytest.raises(ValueError, match="'time'"):
        learner.learn(["book at 8"], ["book"], [[{"start": 8, "end": 9, "entity": "time"}]])
    with pytest.raises(ValueError, match="same length"):
        learner.learn(["a", "b"], ["book"])


def test_harmful_update_is_refused_and_the_weights_are_kept(base, tmp_path):
    _, path = base
    learner = ContinualLearner.load(path, epochs=5)
    before = {k: v.copy() for k, v in learner.model.params.items()}
    texts, intents, _ = columns(toy_examples())
    bad = [(t, SWAP[i]) for t, i in zip(texts, intents) if i != "menu"] * 3
    report = learner.learn([b[0] for b in bad], [b[1] for b in bad])
    assert not report.accepted and report.guard == "holdout" and report.n_guard == 12
    assert report.drop > 0.02 and report.accuracy_before - report.accuracy_after == pytest.approx(report.drop)
    assert report.max_forgetting == 0.02 and report.seconds > 0
    assert all(np.array_equal(before[k], learner.model.params[k]) for k in before)
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
    upd = models[0]
    assert not any(np.array_equal(upd.params[k], m.params[k]) for k in ("layers.1.wq", "norm"))
    assert not set(m.holdout.texts) & set(upd.replay.texts)  # never trained on, never replayed
    assert set(m.holdout.texts) <= set(upd.holdout.texts)  # the guard set carries over
    assert len(upd.continual) == 1 and upd.continual[0]["accepted"] is True
    # Same data + seed: the same update, down to the bytes of the saved file.
    files = [mm.save(tmp_path / f"{i}.safetensors").read_bytes() for i, mm in enumerate(models)]
    assert files[0] == files[1]


def test_replay_ratio_sets_the_replayed_examples_per_epoch(base):
    m, _ = base
    new = toy_examples(16, offset=16)
    full = ContinualLearner(m.clone(), epochs=1).learn(*columns(new))
    part = ContinualLearner(m.clone(), epochs=1, replay_ratio=0.25).learn(*columns(new))
    assert full.replay_per_epoch == full.n_replay > 0
    assert part.n_replay == full.n_replay and part.n_new_train == full.n_new_train
    assert part.replay_per_epoch == min(part.n_replay, -(-part.n_new_train // 4)) < part.n_replay
    assert f"{part.replay_per_epoch} replayed examples (of {part.n_replay}) per epoch" in part.summary()
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="replay_ratio must be a finite number > 0"):
            FinetuneConfig(replay_ratio=bad)


def test_an_update_of_old_held_out_examples_only_replays_the_buffer(base):
    m, _ = base
    # Every text is an old held-out one: it stays held out, so the update trains on the buffer alone.
    report = ContinualLearner(m.clone(), epochs=1, replay_ratio=0.25).learn(list(m.holdout.texts),
                                                                          list(m.holdout.intents))
    assert report.n_new_train == 0 and report.n_replay == len(m.replay) > 0
    assert report.replay_per_epoch == report.n_replay  # a ratio of nothing new still replays everything
    with pytest.raises(ValueError, match="no training examples"):
        m.clone().fit([], [], progress=False)

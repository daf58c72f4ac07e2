"""Fine-tuning (train/trainer.py, train/finetune.py): learns a toy task, handles edge cases,
round-trips to disk, calibrates on held-out examples, and is deterministic (bytes on disk,
numba thread count)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slm360_rasa.nano.checkpoint import save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.model import init_params
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.config import FinetuneConfig
from slm360_rasa.model import IntentEntityModel
from slm360_rasa.model.calibration import background_softmax
from slm360_rasa.train.calibration import (MIN_CALIBRATION_EXAMPLES, MIN_IN_SCOPE, fit_temperature,
                                           fit_temperature_with_background, nll)
from slm360_rasa.train.continual import remember
from slm360_rasa.train.finetune import finetune
from slm360_rasa.train.trainer import Trainer, start_model
from tests.train.toybot import columns, toy_examples

SMALL = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)

DATA = [
    ("book a table for 4 people", "book", [(17, 18, "people")]),
    ("reserve a table for 2", "book", [(20, 21, "people")]),
    ("i need a table for 6 tonight", "book", [(19, 20, "people")]),
    ("table for 3 please", "book", [(10, 11, "people")]),
    ("when do you open", "hours", []),
    ("what are your opening hours", "hours", []),
    ("are you open on sunday", "hours", []),
    ("what time do you close", "hours", []),
    ("show me the menu", "menu", []),
    ("what dishes do you serve", "menu", []),
    ("do you have vegan food", "menu", []),
    ("can i see the menu please", "menu", []),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, init_params(SMALL, seed=0), SMALL, NanoTokenizer.load().sha256)


def _fit(checkpoint, data=DATA, **kw):
    cfg = FinetuneConfig(**{"epochs": 25, "batch_size": 4, "learning_rate": 2e-3, **kw})
    texts = [d[0] for d in data]
    ents = [[{"start": s, "end": e, "entity": t, "value": d[0][s:e]} for s, e, t in d[2]] for d in data]
    return finetune(texts, [d[1] for d in data], ents, cfg, checkpoint=str(checkpoint), progress=False)


def test_learns_intents_and_entities(checkpoint):
    m = _fit(checkpoint)
    history = m.training.history
    assert history[-1]["t_loss"] < 0.3 * history[0]["t_loss"]
    assert history[-1]["i_acc"] == 1.0
    preds = m.predict([d[0] for d in DATA])
    acc = np.mean([m.intents[int(p.intent_probs.argmax())] == d[1] for p, d in zip(preds, DATA)])
    assert acc >= 0.9
    ents = preds[0].entities
    assert [(e["value"], e["entity"]) for e in ents] == [("4", "people")]
    assert 0 < ents[0]["confidence_entity"] <= 1


def test_single_intent_no_entities_and_one_example(checkpoint):
    m = _fit(checkpoint, data=[("hello there", "greet", [])], epochs=2)
    p = m.predict(["hi"])[0]
    assert m.intents == ["greet"] and p.intent_probs.shape == (1,) and p.entities == []


def test_same_seed_gives_bit_identical_weights(checkpoint):
    a = _fit(checkpoint, epochs=2)
    b = _fit(checkpoint, epochs=2)
    for k in a.training.params:
        assert np.array_equal(a.training.params[k], b.training.params[k]), k
    for k in a.heads:
        assert np.array_equal(a.heads[k], b.heads[k]), k


# ------------------------------------------------------------------ held-out set and calibration


@pytest.mark.parametrize("oos_quantile,epochs", [(0.01, 2), (0.01, 8), (None, 2)])
def test_temperature_is_fitted_on_held_out_examples_and_used_by_predict(checkpoint, tmp_path, oos_quantile, epochs):
    data = toy_examples(16)
    cfg = FinetuneConfig(epochs=epochs, batch_size=8, learning_rate=2e-3, holdout_fraction=0.5,
                         oos_quantile=oos_quantile)
    m, params = start_model(cfg, checkpoint=str(checkpoint))
    trainer = Trainer(m, cfg, params)
    trainer.fit(*columns(data), progress=False)
    remember(trainer)
    holdout, replay = m.training.holdout, m.training.replay
    # 24 of 48 held out (8 per intent), none of them trained on or replayed.
    assert len(holdout) == 24 and sorted(set(holdout.intents)) == m.intents
    assert not set(holdout.texts) & set(replay.texts) and len(replay) == 24
    cal = m.calibration
    assert cal["fitted"] and cal["n_used"] == 24 >= MIN_CALIBRATION_EXAMPLES
    # The stored T (and out-of-scope logit) are the NLL optimum over the held-out intent
    # logits of the served (INT4) model.
    z = m.intent_logits(holdout.texts).astype(np.float64)
    y = np.array([m.intents.index(i) for i in holdout.intents])
    if m.background_logit is None:
        assert m.temperature == fit_temperature(z, y)
        assert cal["nll_after"] == pytest.approx(nll(z, y, m.temperature)) and cal["nll_after"] <= cal["nll_before"]
    else:
        assert (m.temperature, m.background_logit) == fit_temperature_with_background(z, y, oos_quantile)
    # The out-of-scope logit is kept exactly when a typical held-out example stays >= 95% in scope:
    # after 2 epochs the toy model's energies are too close together (off), after 8 they are not.
    assert (m.background_logit is not None) == (oos_quantile is not None and cal["typical_in_scope"] >= MIN_IN_SCOPE)
    assert (m.background_logit is not None) == (oos_quantile is not None and epochs == 8)
    assert ("background_off" in cal) == (oos_quantile is not None and epochs == 2)
    assert m.temperature == cal["temperature"] and m.temperature != 1.0 and cal["background_logit"] == m.background_logit
    assert cal["accuracy"] == pytest.approx(float(np.mean(z.argmax(1) == y)))
    assert {"ece_before", "ece_after"} <= set(cal)
    # predict = softmax over [logits, background] / T without the background's column.
    texts = ["book a table for 7", "when do you open", "show me the menu"]
    expected = background_softmax(m.intent_logits(texts), m.temperature, m.background_logit)
    got = np.stack([p.intent_probs for p in m.predict(texts)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert (got.sum(axis=1) < 1).all() if m.background_logit is not None else np.allclose(got.sum(axis=1), 1, atol=1e-6)
    # save/load keeps T and the logit (and so the probabilities) exactly.
    back = IntentEntityModel.load(m.save(tmp_path / "m.safetensors"))
    assert back.temperature == m.temperature and back.calibration == m.calibration
    assert back.background_logit == m.background_logit
    assert np.array_equal(np.stack([p.intent_probs for p in back.predict(texts)]), got)


def test_few_held_out_examples_leave_the_temperature_at_one(checkpoint):
    m = _fit(checkpoint, epochs=2)  # 12 examples: 1 held out
    assert len(m.training.holdout) == 1 and m.temperature == 1.0
    assert m.calibration["fitted"] is False and "fewer than" in m.calibration["reason"]
    off = _fit(checkpoint, epochs=1, holdout_fraction=0.0)
    assert len(off.training.holdout) == 0 and off.temperature == 1.0 and len(off.training.replay) == len(DATA)


# ------------------------------------------------------------------ determinism


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_same_seed_gives_byte_identical_model_files(checkpoint, tmp_path):
    # Held-out set, temperature, replay buffer and Fisher included: 8 per intent holds out 3.
    data = [(t, i, [(e["start"], e["end"], e["entity"]) for e in ents]) for t, i, ents in toy_examples(8)]
    a = _fit(checkpoint, data=data, epochs=2).save(tmp_path / "a.safetensors")
    b = _fit(checkpoint, data=data, epochs=2).save(tmp_path / "b.safetensors")
    assert _sha256(a) == _sha256(b)
    c = _fit(checkpoint, data=data, epochs=2, random_seed=7).save(tmp_path / "c.safetensors")
    assert _sha256(c) != _sha256(a)


_PRINT_PROBS = """
import json, sys
from slm360_rasa.model import IntentEntityModel
m = IntentEntityModel.load(sys.argv[1])
texts = json.loads(sys.argv[2])
out = []
for p in m.predict(texts):
    out.append([float(x).hex() for x in p.intent_probs] + [[e["start"], e["end"], float(e["confidence_entity"]).hex()]
                                                           for e in p.entities])
print(json.dumps(out))
"""


def test_predictions_do_not_depend_on_the_numba_thread_count(checkpoint, tmp_path):
    path = _fit(checkpoint, epochs=3).save(tmp_path / "m.safetensors")
    # One long batch (> the runtime's parallel threshold) and short texts.
    texts = [d[0] for d in DATA] + [" ".join(d[0] for d in DATA)]
    outs = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads, RASA_TELEMETRY_ENABLED="false")
        r = subprocess.run([sys.executable, "-c", _PRINT_PROBS, str(path), json.dumps(texts)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]

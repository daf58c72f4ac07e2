"""The served model (model/intent_entity.py): save/load round trips, serving loads only what
serving needs, warm-up, and bad input never raising."""
import numpy as np
import pytest

from slm360_rasa.model import IntentEntityModel
from slm360_rasa.model.fisher import FISHER_PREFIX
from tests.model.conftest import DATA


def test_save_load_round_trip_gives_identical_predictions(trained):
    m, path = trained
    texts = [d[0] for d in DATA] + ["", "🙂", "x" * 5000, "\x00\x07", "预订一张桌子"]
    before = m.predict(texts)
    for training in (False, True):
        m2 = IntentEntityModel.load(path, training=training)
        after = m2.predict(texts)
        for a, b in zip(before, after):
            if a.intent_probs is None:
                assert b.intent_probs is None
            else:
                np.testing.assert_array_equal(a.intent_probs, b.intent_probs)
            assert a.entities == b.entities
        assert m2.intents == m.intents and m2.tags == m.tags and m2.temperature == m.temperature
        assert m2.background_logit == m.background_logit and m2.calibration == m.calibration


def test_serving_load_reads_no_master_weights_fisher_or_replay(trained):
    m, path = trained
    served = IntentEntityModel.load(path)
    assert served.training is None
    assert not any(k.startswith(FISHER_PREFIX) for k in served.encoder_tensors)
    # The encoder is held as its stored INT4 codes: a few bytes per weight, not float32 masters.
    assert all(v.dtype != np.float32 or v.ndim == 1 for k, v in served.encoder_tensors.items()), \
        [k for k, v in served.encoder_tensors.items() if v.dtype == np.float32 and v.ndim > 1]
    with pytest.raises(ValueError, match="training=True"):
        served.save(path.parent / "again.safetensors")
    with pytest.raises(ValueError, match="training=True"):
        served.fisher()


def test_training_load_restores_the_training_state_and_saves_byte_identically(trained):
    m, path = trained
    full = IntentEntityModel.load(path, training=True)
    st, orig = full.training, m.training
    assert st.holdout == orig.holdout and st.replay == orig.replay and st.finetune == orig.finetune
    assert st.history == orig.history and st.fisher_names == orig.fisher_names and st.fisher_names
    assert sorted(st.params) == sorted(orig.params)
    again = full.save(path.parent / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()
    for k, f in full.fisher().items():
        assert f.shape == (st.params[k] if k in st.params else full.heads[k]).shape


def test_warm_up_builds_the_serving_encoder_before_the_first_message(trained):
    _, path = trained
    before = IntentEntityModel.load(path).predict(["when do you open"])[0].intent_probs
    fresh = IntentEntityModel.load(path)
    assert fresh._encoder is None and fresh.warm_up() > 0 and fresh._encoder is not None
    np.testing.assert_array_equal(fresh.predict(["when do you open"])[0].intent_probs, before)


def test_copy_is_independent(trained):
    m, _ = trained
    c = m.copy()
    c.heads["head.intent.bias"][0] += 1.0
    c.training.params["norm"][0] += 1.0
    c.training.history.append({"epoch": 99})
    assert m.heads["head.intent.bias"][0] != c.heads["head.intent.bias"][0]
    assert m.training.params["norm"][0] != c.training.params["norm"][0]
    assert m.training.history[-1] != {"epoch": 99}


def test_entity_spans_are_always_valid(trained):
    m, _ = trained
    texts = ["table for 7 please " * 40, "", "🙂 table for 🙂 2", "book\ta\ntable for 3", "x" * 10000]
    for text, p in zip(texts, m.predict(texts)):
        last = 0
        for e in p.entities:
            assert 0 <= last <= e["start"] < e["end"] <= len(text)
            assert e["value"] == text[e["start"]:e["end"]]
            last = e["end"]

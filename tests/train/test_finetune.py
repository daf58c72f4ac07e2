"""Fine-tuning (train/finetune.py): learns a toy task, handles edge cases, round-trips to disk."""
import numpy as np
import pytest

from slm360_rasa.nano.checkpoint import save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.model import init_params
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.train.finetune import FinetuneConfig, IntentEntityModel

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
    m = IntentEntityModel.from_pretrained(cfg, checkpoint=str(checkpoint))
    texts = [d[0] for d in data]
    ents = [[{"start": s, "end": e, "entity": t, "value": d[0][s:e]} for s, e, t in d[2]] for d in data]
    m.fit(texts, [d[1] for d in data], ents, progress=False)
    return m


def test_learns_intents_and_entities(checkpoint):
    m = _fit(checkpoint)
    assert m.history[-1]["t_loss"] < 0.3 * m.history[0]["t_loss"]
    assert m.history[-1]["i_acc"] == 1.0
    preds = m.predict([d[0] for d in DATA])
    acc = np.mean([m.intents[int(p.intent_probs.argmax())] == d[1] for p, d in zip(preds, DATA)])
    assert acc >= 0.9
    ents = preds[0].entities
    assert [(e["value"], e["entity"]) for e in ents] == [("4", "people")]
    assert 0 < ents[0]["confidence_entity"] <= 1


def test_save_load_round_trip_gives_identical_predictions(checkpoint, tmp_path):
    m = _fit(checkpoint, epochs=3)
    texts = [d[0] for d in DATA] + ["", "🙂", "x" * 5000]
    before = m.predict(texts)
    path = m.save(tmp_path / "model.safetensors")
    m2 = IntentEntityModel.load(path)
    after = m2.predict(texts)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a.intent_probs, b.intent_probs)
        assert a.entities == b.entities
    assert m2.intents == m.intents and m2.tags == m.tags


def test_single_intent_no_entities_and_one_example(checkpoint):
    m = _fit(checkpoint, data=[("hello there", "greet", [])], epochs=2)
    p = m.predict(["hi"])[0]
    assert m.intents == ["greet"] and p.intent_probs.shape == (1,) and p.entities == []


def test_same_seed_gives_bit_identical_weights(checkpoint):
    a = _fit(checkpoint, epochs=2)
    b = _fit(checkpoint, epochs=2)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    for k in a.heads:
        assert np.array_equal(a.heads[k], b.heads[k]), k


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="freeze_layers"):
        FinetuneConfig(freeze_layers=-1)

"""A tiny trained model shared by the served-model tests (2-layer encoder, toy restaurant data)."""
import pytest

from slm360_rasa.config import FinetuneConfig
from slm360_rasa.nano.checkpoint import save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.model import init_params
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.train.finetune import finetune

SMALL = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)

DATA = [
    ("book a table for 4 people", "book", [{"start": 17, "end": 18, "entity": "people"}]),
    ("reserve a table for 2", "book", [{"start": 20, "end": 21, "entity": "people"}]),
    ("i need a table for 6 tonight", "book", [{"start": 19, "end": 20, "entity": "people"}]),
    ("table for 3 please", "book", [{"start": 10, "end": 11, "entity": "people"}]),
    ("can i book for 5 people tomorrow", "book", [{"start": 15, "end": 16, "entity": "people"}]),
    ("when do you open", "hours", []),
    ("what are your opening hours", "hours", []),
    ("are you open on sunday", "hours", []),
    ("what time do you close", "hours", []),
    ("how late are you open", "hours", []),
    ("show me the menu", "menu", []),
    ("what dishes do you serve", "menu", []),
    ("do you have vegan food", "menu", []),
    ("can i see the menu please", "menu", []),
    ("which desserts do you have", "menu", []),
]


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A seeded random 2-layer encoder checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, init_params(SMALL, seed=0), SMALL, NanoTokenizer.load().sha256)


@pytest.fixture(scope="session")
def trained(small_checkpoint, tmp_path_factory):
    """(model, path): fine-tuned on DATA (intents, one entity type, Fisher stored) and saved."""
    cfg = FinetuneConfig(epochs=4, batch_size=4, learning_rate=2e-3, holdout_fraction=0.2)
    model = finetune([d[0] for d in DATA], [d[1] for d in DATA], [d[2] for d in DATA], cfg,
                     checkpoint=str(small_checkpoint), progress=False)
    return model, model.save(tmp_path_factory.mktemp("model") / "model.safetensors")

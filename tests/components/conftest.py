"""Shared fixtures for the Rasa component tests: a small seeded checkpoint and a tiny bot."""
import asyncio
import os

import pytest

os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")

NLU = """version: "3.1"
nlu:
- intent: book_table
  examples: |
    - book a table for [4](people) people
    - reserve a table for [2](people)
    - i need a table for [6](people) tonight
    - table for [3](people) please
    - can i book for [5](people) people tomorrow
    - get me a table for [8](people)
- intent: opening_hours
  examples: |
    - when do you open
    - what are your opening hours
    - are you open on sunday
    - what time do you close
    - how late are you open
    - opening times please
- intent: menu
  examples: |
    - show me the menu
    - what dishes do you serve
    - do you have vegan food
    - can i see the menu please
    - what is on the menu today
    - which desserts do you have
"""


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A 2-layer seeded encoder checkpoint: fast to fine-tune, same tokenizer as the real one."""
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer

    cfg = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    return save_checkpoint(path, init_params(cfg, seed=0), cfg, NanoTokenizer.load().sha256)


@pytest.fixture(scope="session")
def tiny_nlu(tmp_path_factory):
    """A three-intent NLU file with one entity type."""
    path = tmp_path_factory.mktemp("data") / "nlu.yml"
    path.write_text(NLU, encoding="utf-8")
    return path


def write_config(tmp_path, checkpoint, **extra):
    """config.yml with WhitespaceTokenizer -> SLM360Classifier (small checkpoint) -> EntitySynonymMapper."""
    keys = {"epochs": 30, "learning_rate": 2e-3, "batch_size": 6, "checkpoint": str(checkpoint), **extra}
    lines = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    text = ("recipe: default.v1\nlanguage: en\nassistant_id: slm360-test\npipeline:\n"
            "  - name: WhitespaceTokenizer\n  - name: slm360_rasa.SLM360Classifier\n" + lines +
            "  - name: EntitySynonymMapper\npolicies: []\n")
    path = tmp_path / "config.yml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, small_checkpoint, tiny_nlu):
    """A Rasa model archive trained with `rasa.model_training.train_nlu` (once per session)."""
    from rasa.model_training import train_nlu

    tmp = tmp_path_factory.mktemp("bot")
    model = train_nlu(str(write_config(tmp, small_checkpoint)), str(tiny_nlu), str(tmp / "models"))
    assert model, "training produced no model"
    return model


def parse(agent, text):
    """`agent.parse_message(text)` run to completion. Rasa installs uvloop's policy, which has
    no implicit event loop: make one per call."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(agent.parse_message(text))
    finally:
        loop.close()

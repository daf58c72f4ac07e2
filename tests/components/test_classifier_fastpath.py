"""SLM360Classifier's pattern fast path through real Rasa: train_nlu, Agent.parse_message, the
persisted fastpath.json, the three modes, and that an exact hit never runs the encoder."""
import json
import logging
import tarfile

import pytest

pytest.importorskip("rasa")

from tests.components.conftest import NLU, parse, write_config  # noqa: E402

RESOURCE = "train_slm360_rasa.SLM360Classifier1"
# Rules the fast path should learn: a pure regex (4 opening_hours examples), a pure lookup
# (5 menu examples) and an impure regex ("do you" is in opening_hours and menu examples).
RULES = r"""- regex: hours_words
  examples: |
    - \b(open|close)\b
- regex: do_you
  examples: |
    - \bdo you\b
- lookup: menu_words
  examples: |
    - menu
    - dishes
    - desserts
"""


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory, small_checkpoint):
    """A hybrid-mode model of the tiny bot plus rules; few epochs: the tests are about the fast path."""
    from rasa.model_training import train_nlu

    tmp = tmp_path_factory.mktemp("fpbot")
    nlu = tmp / "nlu.yml"
    nlu.write_text(NLU + RULES, encoding="utf-8")
    model = train_nlu(str(write_config(tmp, small_checkpoint, epochs=2)), str(nlu), str(tmp / "models"))
    assert model, "training produced no model"
    return model


@pytest.fixture(scope="module")
def agent(fp_model):
    from rasa.core.agent import Agent

    return Agent.load(fp_model)


@pytest.fixture
def predict_calls(monkeypatch):
    """Every list of texts handed to the encoder's `predict`, in order."""
    from slm360_rasa.model import IntentEntityModel

    calls = []
    real = IntentEntityModel.predict

    def counting(self, texts):
        calls.append(list(texts))
        return real(self, texts)

    monkeypatch.setattr(IntentEntityModel, "predict", counting)
    return calls




def _component(model_path, tmp_path, **overrides):
    """The trained SLM360Classifier loaded straight from the archive, with config overrides."""
    from rasa.engine.graph import ExecutionContext
    from rasa.engine.storage.local_model_storage import LocalModelStorage
    from rasa.engine.storage.resource import Resource

    from slm360_rasa.components.classifier import SLM360Classifier

    storage, metadata = LocalModelStorage.from_model_archive(tmp_path / "storage", model_path)
    config = {**SLM360Classifier.get_default_config(), **overrides}
    return SLM360Classifier.load(config, storage, Resource(RESOURCE), ExecutionContext(metadata.train_schema))


def _messages(*texts):
    from rasa.shared.nlu.training_data.message import Message

    return [Message(data={"text": t}) for t in texts]


def test_exact_example_with_other_case_and_punctuation_skips_the_encoder(agent, predict_calls):
    text = "BOOK a Table, for 4 people!!"  # training example: "book a table for [4](people) people"
    out = parse(agent, text)
    assert predict_calls == []
    assert out["intent"] == {"name": "book_table", "confidence": 1.0}
    assert out["intent_ranking"][0] == {"name": "book_table", "confidence": 1.0}
    assert len(out["intent_ranking"]) == 3 and sum(r["confidence"] for r in out["intent_ranking"]) == 1.0
    (ent,) = out["entities"]
    # 18, not the training example's 17: the comma shifts the caller's text by one.
    assert (ent["start"], ent["end"], ent["value"], ent["entity"]) == (18, 19, "4", "people")
    assert ent["extractor"] == "SLM360Classifier" and ent["confidence_entity"] == 1.0


def test_other_text_goes_through_the_encoder(agent, predict_calls):
    out = parse(agent, "could you reserve a table for 7 tonight")
    assert predict_calls == [["could you reserve a table for 7 tonight"]]
    assert out["intent"]["name"] in {"book_table", "opening_hours", "menu"}


def test_hybrid_batches_misses_into_one_encoder_call(fp_model, tmp_path, predict_calls):
    clf = _component(fp_model, tmp_path)
    assert predict_calls == [["warm up the encoder"]]  # load compiles the serving path once
    predict_calls.clear()
    msgs = clf.process(_messages("what time do you close?", "anything else", "", "When do you OPEN"))
    assert predict_calls == [["anything else", ""]]
    assert [m.get("intent")["name"] for m in msgs][0::3] == ["opening_hours", "opening_hours"]
    assert msgs[2].get("intent") == {"name": None, "confidence": 0.0}


def test_semantic_mode_does_not_use_the_fast_path(fp_model, tmp_path, predict_calls):
    clf = _component(fp_model, tmp_path, mode="semantic")
    predict_calls.clear()  # the warm-up at load
    (msg,) = clf.process(_messages("book a table for 4 people"))
    assert predict_calls == [["book a table for 4 people"]]
    # Two epochs on a random 2-layer encoder: nowhere near the fast path's certainty.
    assert msg.get("intent")["confidence"] < 1.0


def test_pattern_mode_never_runs_the_encoder(fp_model, tmp_path, predict_calls):
    clf = _component(fp_model, tmp_path, mode="pattern")
    predict_calls.clear()  # the warm-up at load
    exact, rule, lookup, miss = clf.process(_messages(
        "Show me the MENU!", "are you open late on friday", "any desserts tonight", "play some jazz"))
    assert predict_calls == []
    assert exact.get("intent") == {"name": "menu", "confidence": 1.0}
    # Learned rules: confidence = (support + 1) / (support + 2); hours_words matched 4 examples.
    assert rule.get("intent")["name"] == "opening_hours"
    assert rule.get("intent")["confidence"] == pytest.approx(5 / 6)
    assert lookup.get("intent")["name"] == "menu"
    assert miss.get("intent") == {"name": None, "confidence": 0.0} and miss.get("intent_ranking") == []


def test_hybrid_rule_hit_still_runs_the_encoder(fp_model, tmp_path, predict_calls):
    clf = _component(fp_model, tmp_path)
    predict_calls.clear()  # the warm-up at load
    (msg,) = clf.process(_messages("are you open late on friday"))
    assert predict_calls == [["are you open late on friday"]]
    assert msg.get("intent")["name"] == "opening_hours"


def test_fastpath_json_is_in_the_archive(fp_model):
    with tarfile.open(fp_model) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(f"{RESOURCE}/fastpath.json")]
        data = json.load(tar.extractfile(member))
    assert data["format"] == "slm360-fastpath"
    assert "book a table for 4 people" in data["exact"]
    assert data["exact"]["book a table for 4 people"]["entities"] == [[17, 18, "people", {}]]
    rules = {r["name"]: r for r in data["rules"]}
    assert set(rules) == {"hours_words", "menu_words"}  # "do_you" names two intents: rejected
    assert (rules["hours_words"]["intent"], rules["hours_words"]["support"]) == ("opening_hours", 4)
    assert data["stats"]["regex_impure"] == 1


def _rewrite_archive(src, dst, tmp_path, change):
    with tarfile.open(src) as tar:
        tar.extractall(tmp_path / "x")
    (path,) = (tmp_path / "x").glob(f"**/{RESOURCE}/fastpath.json")
    change(path)
    with tarfile.open(dst, "w:gz") as tar:
        for p in (tmp_path / "x").iterdir():
            tar.add(p, arcname=p.name)
    return str(dst)


def test_old_model_without_fastpath_json_still_parses(fp_model, tmp_path, caplog, predict_calls):
    from rasa.core.agent import Agent

    old = _rewrite_archive(fp_model, tmp_path / "old.tar.gz", tmp_path, lambda p: p.unlink())
    with caplog.at_level(logging.WARNING, logger="slm360_rasa"):
        agent = Agent.load(old)
    assert "fastpath.json" in caplog.text
    predict_calls.clear()  # the warm-up at load
    out = parse(agent, "book a table for 4 people")
    assert len(predict_calls) == 1 and out["intent"]["name"] in {"book_table", "opening_hours", "menu"}


def test_corrupt_fastpath_json_fails_naming_the_file(fp_model, tmp_path):
    from rasa.core.agent import Agent

    bad = _rewrite_archive(fp_model, tmp_path / "bad.tar.gz", tmp_path,
                           lambda p: p.write_text('{"format": "slm360-fastpath", "vers', encoding="utf-8"))
    with pytest.raises(Exception) as err:
        Agent.load(bad)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert "fastpath.json" in " ".join(chain)


def test_invalid_mode_names_the_key():
    from slm360_rasa.components.classifier import SLM360Classifier

    with pytest.raises(ValueError, match="mode"):
        SLM360Classifier.create({**SLM360Classifier.get_default_config(), "mode": "fast"}, None, None, None)


def test_patterns_for_intents_the_model_lacks_are_dropped_at_load(fp_model, tmp_path, predict_calls, caplog):
    """A hand-edited fastpath.json naming an unknown intent: warned about once at load, and
    such a text goes to the encoder instead of answering with an intent the model lacks."""
    from rasa.engine.graph import ExecutionContext
    from rasa.engine.storage.local_model_storage import LocalModelStorage
    from rasa.engine.storage.resource import Resource

    from slm360_rasa.components.classifier import FASTPATH_FILE, SLM360Classifier

    storage, metadata = LocalModelStorage.from_model_archive(tmp_path / "storage", fp_model)
    path = tmp_path / "storage" / RESOURCE / FASTPATH_FILE
    d = json.loads(path.read_text(encoding="utf-8"))
    d["exact"]["hello there"] = {"intent": "greet", "support": 1, "entities": None}  # not an intent of the model
    path.write_text(json.dumps(d), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        clf = SLM360Classifier.load(SLM360Classifier.get_default_config(), storage, Resource(RESOURCE),
                                    ExecutionContext(metadata.train_schema))
    assert "1 fast-path pattern(s)" in caplog.text and "hello there" not in clf._fastpath.exact
    predict_calls.clear()  # the warm-up at load
    (msg,) = clf.process(_messages("Hello there!"))
    assert predict_calls == [["Hello there!"]]
    assert msg.get("intent")["name"] in {"book_table", "opening_hours", "menu"}
"""SLM360Classifier through real Rasa: train_nlu, Agent.parse_message, persistence, bad input."""
import glob
import tarfile

import pytest

pytest.importorskip("rasa")

BAD = ["", "   ", "x" * 10_000, "🙂🚀🎉", "ctrl\x00\x01\x1b[31m", "你好，我想订一张桌子", "مرحبا", "Привет"]


from tests.components.conftest import parse, write_config as _config  # noqa: E402


@pytest.fixture(scope="module")
def agent(trained):
    from rasa.core.agent import Agent

    return Agent.load(trained)




def test_parse_has_diet_shaped_output(agent):
    out = parse(agent, "book a table for 4 people")
    assert out["intent"]["name"] == "book_table"
    assert 0 < out["intent"]["confidence"] <= 1
    ranking = out["intent_ranking"]
    assert [r["name"] for r in ranking][0] == "book_table" and len(ranking) == 3
    assert abs(sum(r["confidence"] for r in ranking) - 1) < 1e-4
    ents = [e for e in out["entities"] if e["entity"] == "people"]
    assert ents and ents[0]["value"] == "4" and ents[0]["extractor"] == "SLM360Classifier"
    assert {"start", "end", "value", "entity", "confidence_entity", "extractor"} <= set(ents[0])


@pytest.mark.parametrize("text", BAD)
def test_bad_input_gives_a_valid_parse(agent, text):
    out = parse(agent, text)
    if text.strip():
        assert out["intent"]["name"] in {"book_table", "opening_hours", "menu"}
    assert isinstance(out["entities"], list)


@pytest.mark.parametrize("text", ["", "   ", "\x00\x01\x02"])
def test_empty_text_gets_no_intent_like_diet(agent, text):
    out = parse(agent, text)
    assert out["intent"] == {"name": None, "confidence": 0.0}
    assert out["intent_ranking"] == [] and out["entities"] == []


def test_model_archive_holds_safetensors_and_no_pickle(trained):
    with tarfile.open(trained) as tar:
        names = tar.getnames()
    ours = [n for n in names if n.endswith("slm360_classifier.safetensors")]
    assert len(ours) == 1
    assert not any(n.endswith((".pkl", ".pickle")) for n in names if "SLM360" in n)


def test_corrupt_model_fails_with_the_file_name(tmp_path, trained):
    from rasa.core.agent import Agent

    with tarfile.open(trained) as tar:
        tar.extractall(tmp_path / "x")
    target = glob.glob(str(tmp_path / "x" / "**" / "slm360_classifier.safetensors"), recursive=True)[0]
    with open(target, "r+b") as f:
        f.truncate(100)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for p in (tmp_path / "x").iterdir():
            tar.add(p, arcname=p.name)
    with pytest.raises(Exception) as err:
        Agent.load(str(bad))
    assert "slm360_classifier.safetensors" in "".join(str(e) for e in _chain(err.value))


def _chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def test_invalid_config_names_the_key(tmp_path, small_checkpoint, tiny_nlu):
    from rasa.model_training import train_nlu

    with pytest.raises(Exception) as err:
        train_nlu(str(_config(tmp_path, small_checkpoint, precision="int3")), str(tiny_nlu), str(tmp_path / "m"))
    assert "precision" in "".join(str(e) for e in _chain(err.value))


@pytest.mark.parametrize("key,value", [("replay_ratio", "lots"), ("replay_ratio", 0), ("ewc_lambda", True),
                                       ("learning_rate", None), ("max_forgetting", "two points")])
def test_bad_training_keys_are_named_without_training(key, value):
    from slm360_rasa.components.classifier import SLM360Classifier

    config = {**SLM360Classifier.get_default_config(), key: value}
    with pytest.raises(ValueError, match=f"SLM360Classifier: invalid configuration: {key} must be"):
        SLM360Classifier(config, None, None, None)


def test_rasa_finetune_continues_from_the_previous_model(tmp_path, trained, small_checkpoint, tiny_nlu):
    from rasa.core.agent import Agent
    from rasa.model_training import train_nlu

    # Same config as the `trained` fixture: Rasa refuses to finetune across config changes.
    cfg = _config(tmp_path, small_checkpoint)
    model = train_nlu(str(cfg), str(tiny_nlu), str(tmp_path / "models"), model_to_finetune=trained,
                      finetuning_epoch_fraction=0.2)
    assert model and model != trained
    out = parse(Agent.load(model), "book a table for 4 people")
    assert out["intent"]["name"] == "book_table"


def test_rasa_does_not_warn_that_the_pipeline_lacks_an_entity_extractor():
    import warnings

    from rasa.graph_components.validators.default_recipe_validator import DefaultV1RecipeValidator
    from rasa.nlu.tokenizers.whitespace_tokenizer import WhitespaceTokenizer
    from rasa.shared.nlu.training_data.message import Message
    from rasa.shared.nlu.training_data.training_data import TrainingData

    from slm360_rasa.components.classifier import SLM360Classifier

    data = TrainingData([Message(data={"text": "table for 4", "intent": "book",
                                       "entities": [{"start": 10, "end": 11, "value": "4", "entity": "people"}]})])

    def messages(components):
        validator = DefaultV1RecipeValidator.__new__(DefaultV1RecipeValidator)
        validator._component_types = set(components)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validator._warn_if_some_training_data_is_unused(data)
        return " ".join(str(w.message) for w in caught)

    # The check is live (it fires without an extractor) and counts SLM360Classifier as one.
    assert "does not include an entity extractor" in messages({WhitespaceTokenizer})
    assert "does not include an entity extractor" not in messages({WhitespaceTokenizer, SLM360Classifier})

"""Model metadata schema (model/schema.py): every key is required, typed, and named when wrong."""
import pytest

from slm360_rasa.model import IntentEntityModel
from slm360_rasa.model.schema import SCHEMA
from slm360_rasa.nano.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# For each key: values of the wrong type or out of range. A number where an object or list is
# expected is the case that used to surface as "TypeError: 'int' object is not iterable".
BAD = {
    "kind": [7, "slm360-nano"],
    "version": ["1", 2, True],
    "precision": ["int8", 4],
    "max_length": [2, 513, 12.5, "128"],
    "intents": [3, ["a", 1], "book"],
    "entity_types": [3, ["b", "a"], [None]],
    "tags": [3, [1]],
    "temperature": [0, -1.0, "1", None, True],
    "background_logit": ["high", True, [1.0]],
    "calibration": [3, [], "x"],
    "finetune": [3, {"epochs": 0}, {"not_a_key": 1}],
    "history": [3, [1, 2], {"epoch": 1}],
    "holdout": [3, {"texts": []}, {"texts": [1], "intents": ["a"], "entities": [[]]}],
    "replay": [3, [], {"texts": ["a"], "intents": ["b"], "entities": [[[0, 1]]]}],
    "fisher": [3, {"format": "raw", "names": []}, {"format": "log2-q4-g32", "names": "x"}],
    "continual": [3, ["accepted"], {}],
}


def _rewrite(path, tmp_path, extra):
    ck = load_checkpoint(path)
    return save_checkpoint(tmp_path / "edited.safetensors", ck.tensors, ck.config, ck.tokenizer_sha256,
                           extra=extra)


def test_every_schema_key_has_bad_values_under_test():
    assert sorted(BAD) == sorted(SCHEMA)


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_a_missing_key_is_named(trained, tmp_path, key):
    _, path = trained
    extra = dict(load_checkpoint(path).extra)
    del extra[key]
    bad = _rewrite(path, tmp_path, extra)
    match = "not an SLM360 intent/entity model" if key == "kind" else rf"missing key\(s\) \['{key}'\]"
    with pytest.raises(CheckpointError, match=match) as err:
        IntentEntityModel.load(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("key,value", [(k, v) for k in sorted(BAD) for v in BAD[k]])
def test_a_wrong_typed_key_is_named(trained, tmp_path, key, value):
    _, path = trained
    bad = _rewrite(path, tmp_path, {**load_checkpoint(path).extra, key: value})
    for training in (False, True):
        with pytest.raises(CheckpointError) as err:
            IntentEntityModel.load(bad, training=training)
        msg = str(err.value)
        assert str(bad) in msg
        assert f"'{key}'" in msg or (key == "kind" and "not an SLM360 intent/entity model" in msg), msg


def test_an_extra_key_is_named(trained, tmp_path):
    _, path = trained
    bad = _rewrite(path, tmp_path, {**load_checkpoint(path).extra, "surprise": 1})
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['surprise'\]"):
        IntentEntityModel.load(bad)


def test_tags_must_follow_the_entity_types(trained, tmp_path):
    _, path = trained
    extra = load_checkpoint(path).extra
    bad = _rewrite(path, tmp_path, {**extra, "tags": extra["tags"][:-1]})
    with pytest.raises(CheckpointError, match="'tags'"):
        IntentEntityModel.load(bad)


def test_a_fisher_that_names_a_missing_tensor_is_refused_by_the_training_load(trained, tmp_path):
    _, path = trained
    extra = load_checkpoint(path).extra
    bad = _rewrite(path, tmp_path, {**extra, "fisher": {**extra["fisher"], "names": ["layers.9.wq"]}})
    IntentEntityModel.load(bad)  # serving never reads the Fisher
    with pytest.raises(CheckpointError, match="layers.9.wq"):
        IntentEntityModel.load(bad, training=True)


def test_a_pretrained_encoder_checkpoint_is_not_a_model(small_checkpoint):
    with pytest.raises(CheckpointError, match="not an SLM360 intent/entity model"):
        IntentEntityModel.load(small_checkpoint)

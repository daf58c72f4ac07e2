"""`rasa train --finetune` with SLM360Classifier: replay + EWC + the validation guard, through
`rasa.model_training.train_nlu`, and byte-identical retraining with the same seed."""
import hashlib
import os
import tarfile
import warnings

import numpy as np
import pytest

pytest.importorskip("rasa")

from tests.components.conftest import NLU, write_config  # noqa: E402

MODEL_FILE = "slm360_classifier.safetensors"
HOLDOUT = {"holdout_fraction": 0.34}  # 2 of the 6 examples per intent: a guard set of 6


@pytest.fixture(scope="module", autouse=True)
def no_training_cache():
    # Rasa's training cache keys on config + data + fingerprint_addon, not on our code: a
    # cached result could hide what this code does. Size 0 turns the cache off.
    old = os.environ.get("RASA_MAX_CACHE_SIZE")
    os.environ["RASA_MAX_CACHE_SIZE"] = "0"
    yield
    if old is None:
        os.environ.pop("RASA_MAX_CACHE_SIZE", None)
    else:
        os.environ["RASA_MAX_CACHE_SIZE"] = old


def _train(tmp, checkpoint, nlu, **kw):
    from rasa.model_training import train_nlu

    model = train_nlu(str(write_config(tmp, checkpoint, **HOLDOUT)), str(nlu), str(tmp / "models"), **kw)
    assert model, "training produced no model"
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_checkpoint, tiny_nlu):
    """A model archive trained once, the starting point of every finetune here."""
    return _train(tmp_path_factory.mktemp("base"), small_checkpoint, tiny_nlu)


@pytest.fixture(scope="module")
def swapped_nlu(tmp_path_factory):
    """The tiny bot with book_table and opening_hours examples swapped: a harmful update."""
    text = NLU.replace("intent: book_table", "intent: @tmp").replace("intent: opening_hours", "intent: book_table")
    path = tmp_path_factory.mktemp("swapped") / "nlu.yml"
    path.write_text(text.replace("intent: @tmp", "intent: opening_hours"), encoding="utf-8")
    return path


def _member(archive, name):
    with tarfile.open(archive) as tar:
        found = [m for m in tar.getmembers() if m.name.endswith(name)]
        return tar.extractfile(found[0]).read() if found else None


def _model(archive, tmp_path):
    from safetensors.numpy import load_file

    from slm360_rasa.nano.checkpoint import load_checkpoint

    path = tmp_path / f"{abs(hash(str(archive)))}.safetensors"
    path.write_bytes(_member(archive, MODEL_FILE))
    return load_file(str(path)), load_checkpoint(path).extra


def test_new_keys_have_defaults_and_are_validated(tmp_path, small_checkpoint, tiny_nlu):
    from rasa.model_training import train_nlu

    from slm360_rasa.components.classifier import SLM360Classifier

    d = SLM360Classifier.get_default_config()
    assert (d["holdout_fraction"], d["holdout_max"], d["replay_size"], d["ewc_lambda"], d["max_forgetting"]) == \
        (0.1, 500, 1000, 3e-4, 0.02)
    with pytest.raises(Exception) as err:
        train_nlu(str(write_config(tmp_path, small_checkpoint, max_forgetting=5)), str(tiny_nlu), str(tmp_path / "m"))
    assert "max_forgetting" in str(err.value) + str(err.value.__cause__)


def test_max_forgetting_environment_override(monkeypatch):
    from slm360_rasa.components.classifier import MAX_FORGETTING_ENV, _max_forgetting_override

    monkeypatch.delenv(MAX_FORGETTING_ENV, raising=False)
    assert _max_forgetting_override(0.02) == 0.02
    for value, expected in [("0.1", 0.1), ("off", None), ("NONE", None), ("  ", 0.02)]:
        monkeypatch.setenv(MAX_FORGETTING_ENV, value)
        assert _max_forgetting_override(0.02) == expected
    for bad in ("lots", "1.5", "-0.1", "nan"):
        monkeypatch.setenv(MAX_FORGETTING_ENV, bad)
        with pytest.raises(ValueError, match=MAX_FORGETTING_ENV):
            _max_forgetting_override(0.02)


def test_same_seed_gives_byte_identical_weights_through_rasa(tmp_path, base, small_checkpoint, tiny_nlu):
    again = _train(tmp_path, small_checkpoint, tiny_nlu)
    digest = [hashlib.sha256(_member(a, MODEL_FILE)).hexdigest() for a in (base, again)]
    assert digest[0] == digest[1]


def test_finetune_keeps_a_benign_update(tmp_path, base, small_checkpoint, tiny_nlu):
    model = _train(tmp_path, small_checkpoint, tiny_nlu, model_to_finetune=base, finetuning_epoch_fraction=0.1)
    (old, old_meta), (new, meta) = _model(base, tmp_path), _model(model, tmp_path)
    report = meta["continual"][-1]
    assert report["accepted"] is True and report["guard"] == "holdout" and report["n_guard"] == 6
    assert report["epochs"] == 3  # ceil(30 * 0.1): Rasa's scaled epochs
    assert not np.array_equal(old["layers.1.wq.q4"], new["layers.1.wq.q4"])
    # The old held-out examples stay held out, so the guard measures unseen text next time too.
    assert set(old_meta["holdout"]["texts"]) <= set(meta["holdout"]["texts"])
    assert not set(old_meta["holdout"]["texts"]) & set(meta["replay"]["texts"])


def test_finetune_refuses_a_harmful_update_and_keeps_the_weights(tmp_path, base, small_checkpoint, swapped_nlu):
    with pytest.warns(UserWarning, match="max_forgetting") as record:
        model = _train(tmp_path, small_checkpoint, swapped_nlu, model_to_finetune=base,
                       finetuning_epoch_fraction=1.0)
    message = next(str(w.message) for w in record if "max_forgetting" in str(w.message))
    assert "REFUSED" in message and "SLM360_MAX_FORGETTING" in message and "points" in message
    (old, _), (new, meta) = _model(base, tmp_path), _model(model, tmp_path)
    assert old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in old)
    report = meta["continual"][-1]
    assert report["accepted"] is False and report["drop"] > 0.02
    # The fast path's table (if the pipeline has one) stays with the previous weights too.
    assert _member(model, "fastpath.json") == _member(base, "fastpath.json")


def test_environment_override_accepts_the_harmful_update(tmp_path, base, small_checkpoint, swapped_nlu, monkeypatch):
    monkeypatch.setenv("SLM360_MAX_FORGETTING", "off")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = _train(tmp_path, small_checkpoint, swapped_nlu, model_to_finetune=base,
                       finetuning_epoch_fraction=1.0)
    assert not [w for w in record if "REFUSED" in str(w.message)]
    report = _model(model, tmp_path)[1]["continual"][-1]
    assert report["accepted"] is True and report["max_forgetting"] is None and report["drop"] > 0.02

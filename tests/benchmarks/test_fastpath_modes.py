"""Smoke runs of benchmarks.fastpath_modes on a tiny model and dataset made here."""
import json
import tarfile
from pathlib import Path

import pytest

from benchmarks import fastpath_modes

TRAIN = {"book": ["book a table for 4", "reserve a table", "table for two please", "get me a table"],
         "hours": ["when do you open", "what time do you close", "are you open on sunday", "opening hours"]}
# Two test messages are training texts in other case/punctuation (fast-path hits), two are new.
TEST = [("Book a table, for 4!", "book"), ("WHEN do you open?", "hours"), ("any free tables tonight", "book"),
        ("how late are you around", "hours")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(bare model path, dataset folder): a 2-layer model fitted for one epoch on TRAIN."""
    from slm360_rasa.config import FinetuneConfig
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer
    from slm360_rasa.train.continual import remember
    from slm360_rasa.train.trainer import Trainer, start_model

    tmp = tmp_path_factory.mktemp("fpbench")
    cfg = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    ckpt = save_checkpoint(tmp / "small.safetensors", init_params(cfg, seed=0), cfg, NanoTokenizer.load().sha256)
    texts = [t for ts in TRAIN.values() for t in ts]
    intents = [i for i, ts in TRAIN.items() for _ in ts]
    train_cfg = FinetuneConfig(epochs=1, batch_size=4)
    model, params = start_model(train_cfg, checkpoint=str(ckpt))
    trainer = Trainer(model, train_cfg, params)
    trainer.fit(texts, intents, [[] for _ in texts], progress=False)
    remember(trainer)
    bare = model.save(tmp / "bare" / "slm360_classifier.safetensors")
    ds = tmp / "toy"
    ds.mkdir()
    with open(ds / "train.jsonl", "w") as f:
        for t, i in zip(texts, intents):
            f.write(json.dumps({"text": t, "intent": i, "entities": []}) + "\n")
    with open(ds / "test.jsonl", "w") as f:
        for t, i in TEST:
            f.write(json.dumps({"text": t, "intent": i, "entities": []}) + "\n")
    return Path(bare), ds


def _run(tmp_path, model, ds, *extra):
    assert fastpath_modes.main(["--model", str(model), "--dataset", str(ds), "--warmup", "1", "--no-progress",
                    "--out-dir", str(tmp_path / "out"), *extra]) == 0
    res = json.loads((tmp_path / "out" / "fastpath_modes_toy.json").read_text())
    md = (tmp_path / "out" / "fastpath_modes_toy.md").read_text()
    return res, md


def test_bare_model_without_fastpath_json_rebuilds_it(tmp_path, tiny, capsys):
    res, md = _run(tmp_path, *tiny)
    assert "rebuilt from train.jsonl" in res["fastpath_source"] and "rebuilt" in capsys.readouterr().out
    hybrid, semantic, pattern = (res["modes"][m] for m in ("hybrid", "semantic", "pattern"))
    assert hybrid["hit_rate"] == hybrid["encoder_skip_rate"] == 0.5
    assert semantic["hit_rate"] == 0.0 and semantic["encoder_skip_rate"] == 0.0
    # Patterns answer the two exact texts right and nothing else.
    assert pattern["accuracy"] == 0.5 and pattern["no_intent_rate"] == 0.5
    assert hybrid["accuracy"] >= semantic["accuracy"]
    for m in res["modes"].values():
        assert 0 < m["p50_ms"] <= m["p99_ms"] and m["n"] == len(TEST)
    assert pattern["hit_p50_ms"] is not None and semantic["hit_p50_ms"] is None
    assert "| mode | accuracy |" in md and "| hybrid |" in md and res["machine"]["cores"] >= 1


def test_archive_fastpath_json_is_used(tmp_path, tiny):
    from slm360_rasa.model.fastpath import FastPath

    bare, ds = tiny
    # A fast path that knows a text train.jsonl does not: proof the archive's copy is read.
    fp = FastPath.build(["any free tables tonight"], ["book"])
    comp = tmp_path / "arch" / "components" / "train_slm360_rasa.SLM360Classifier1"
    comp.mkdir(parents=True)
    (comp / "slm360_classifier.safetensors").write_bytes(bare.read_bytes())
    (comp / "fastpath.json").write_text(json.dumps(fp.to_dict()))
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "arch" / "components", arcname="components")
    res, _ = _run(tmp_path, archive, ds, "--modes", "pattern")
    assert res["fastpath_source"] == "archive" and list(res["modes"]) == ["pattern"]
    assert res["modes"]["pattern"]["hit_rate"] == 0.25 and res["modes"]["pattern"]["accuracy"] == 0.25


def test_limit_samples_the_test_set(tmp_path, tiny):
    res, _ = _run(tmp_path, *tiny, "--limit", "2", "--modes", "semantic")
    assert res["n_test"] == 2 and res["modes"]["semantic"]["n"] == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model.tar.gz"], "model not found"),
    (["--dataset", "/nonexistent/ds"], "test.jsonl not found"),
])
def test_bad_input_exits_with_a_message_naming_it(tmp_path, tiny, args, message):
    bare, ds = tiny
    argv = {"--model": str(bare), "--dataset": str(ds)}
    argv.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as err:
        fastpath_modes.main([x for kv in argv.items() for x in kv] + ["--out-dir", str(tmp_path)])
    assert message in str(err.value)


def test_archive_without_our_model_is_refused(tmp_path, tiny):
    (tmp_path / "other.txt").write_text("not a model")
    archive = tmp_path / "diet.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "other.txt", arcname="components/x/other.txt")
    with pytest.raises(SystemExit) as err:
        fastpath_modes.main(["--model", str(archive), "--dataset", str(tiny[1]), "--out-dir", str(tmp_path)])
    assert "holds no slm360_classifier.safetensors" in str(err.value)


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as err:
        fastpath_modes.main(["--help"])
    assert err.value.code == 0 and "--model" in capsys.readouterr().out

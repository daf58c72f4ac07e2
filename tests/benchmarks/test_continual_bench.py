"""Smoke run of benchmarks.continual on a tiny dataset and a 2-layer checkpoint made here."""
import json
import subprocess
import sys

import pytest

from benchmarks import CompareError
from benchmarks import continual as CB
from benchmarks import continual_report as CR
from benchmarks.datasets import Example
from benchmarks.monitor import repo_env

SCRIPT = [sys.executable, "-m", "benchmarks.continual"]
ENV = {**repo_env(), "RASA_TELEMETRY_ENABLED": "false"}

PHRASES = {"book": "book a table for {n} people tonight", "hours": "are you open at {n} o'clock",
           "menu": "show me dish number {n} on the menu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer

    tmp = tmp_path_factory.mktemp("continual")
    cfg = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    ckpt = save_checkpoint(tmp / "small.safetensors", init_params(cfg, seed=0), cfg, NanoTokenizer.load().sha256)
    folder = tmp / "data" / "tiny"
    folder.mkdir(parents=True)
    for split, numbers in (("train", range(2, 42)), ("test", range(50, 56))):
        rows = [{"text": p.format(n=n), "intent": i, "entities": []} for i, p in PHRASES.items() for n in numbers]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp, ckpt


def CB_select(variants):
    return CR.select_lambda(variants)


def _run(tmp, ckpt):
    cmd = [*SCRIPT, "--data-dir", str(tmp / "data"), "--dataset", "tiny", "--checkpoint", str(ckpt),
           "--epochs", "2", "--ewc-lambda", "1", "--ewc-lambda", "100", "--replay-ratio", "all",
           "--replay-ratio", "0.25", "--work-dir", str(tmp / "work"),
           "--out-dir", str(tmp / "out"), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def test_continual_experiment_reports_every_variant_and_resumes(setup):
    tmp, ckpt = setup
    run = _run(tmp, ckpt)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp / "out" / "continual_tiny.json").read_text())
    s = r["split"]
    assert s["half_a"] == s["half_b"] == 60 and s["b_train"] + s["b_heldout"] == 60 and s["test"] == 18
    assert s["a_heldout"] > 0 and s["b_heldout"] > 0
    plain, *ewc = r["variants"]
    assert plain["variant"] == "plain" and plain["n_replay"] == 0 and plain["guard"]["max_forgetting"] is None
    assert [(v["ewc_lambda"], v["replay_ratio"]) for v in ewc] == [(1.0, None), (100.0, None), (1.0, 0.25),
                                                                     (100.0, 0.25)]
    assert all(v["n_replay"] > 0 for v in ewc)
    for v in ewc:  # the whole buffer every epoch, or a quarter as many as the new examples
        want = v["n_replay"] if v["replay_ratio"] is None else min(v["n_replay"], -(-s["b_train"] // 4))
        assert v["replay_per_epoch"] == want
    assert all(v["epochs"] == 1 for v in r["variants"])  # round(2 x 0.5)
    for v in r["variants"]:
        assert v["forgetting_a"] == pytest.approx(r["half_a_model"]["accuracy"]["a_heldout"] - v["after"]["a_heldout"])
    md = (tmp / "out" / "continual_tiny.md").read_text()
    assert "| plain |" in md and "| ewc_replay | 100 |" in md and "(ratio 0.25)" in md
    assert r["selection"] == CB_select(r["variants"]) and "Chosen on the held-out sets" in md
    again = _run(tmp, ckpt)
    assert again.returncode == 0 and "half-A model exists, reused" in again.stderr


def test_skewed_protocol_keeps_every_intent_and_all_of_the_focus_ones(setup):
    tmp, ckpt = setup
    cmd = [*SCRIPT, "--data-dir", str(tmp / "data"), "--dataset", "tiny", "--checkpoint", str(ckpt),
           "--epochs", "2", "--ewc-lambda", "0", "--work-dir", str(tmp / "work"), "--out-dir", str(tmp / "out"),
           "--no-progress", "--protocol", "skewed", "--focus-share", "0.34", "--skew-rest", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp / "out" / "continual_tiny_skewed.json").read_text())
    assert r["protocol"] == "skewed" and len(r["skew"]["focus_intents"]) == 1  # round(0.34 x 3 intents)
    s = r["split"]
    assert s["half_b"] == 20 + 2 * 3 and s["b_train"] + s["b_heldout"] == s["half_b"]
    assert [v["ewc_lambda"] for v in r["variants"]] == [None, 0.0]
    assert "Protocol: skewed update" in (tmp / "out" / "continual_tiny_skewed.md").read_text()


def test_skew_update_is_seeded():
    rows = [Example(f"text {i}", f"intent{i % 10}") for i in range(200)]
    a, fa = CB.skew_update(rows, 42, 0.2, 2)
    b, fb = CB.skew_update(rows, 42, 0.2, 2)
    assert fa == fb and [r.text for r in a] == [r.text for r in b] and len(fa) == 2
    assert len(a) == 2 * 20 + 8 * 2 and {r.intent for r in a} == {f"intent{k}" for k in range(10)}
    assert CB.skew_update(rows, 7, 0.2, 2)[1] != fa or CB.skew_update(rows, 8, 0.2, 2)[1] != fa


def test_help_and_bad_arguments():
    out = subprocess.run([*SCRIPT, "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0 and "forgetting" in out.stdout.lower()
    bad = subprocess.run([*SCRIPT, "--ewc-lambda", "-1"], capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode != 0 and "--ewc-lambda" in bad.stderr
    for ratio in ("none", "0", "-2"):
        bad = subprocess.run([*SCRIPT, "--replay-ratio", ratio], capture_output=True, text=True, timeout=120, env=ENV)
        assert bad.returncode != 0 and "--replay-ratio" in bad.stderr, ratio


@pytest.mark.slow
def test_diet_anchor_runs_the_same_protocol_through_rasa(setup):
    pytest.importorskip("rasa")
    tmp, ckpt = setup
    cmd = [*SCRIPT, "--data-dir", str(tmp / "data"), "--dataset", "tiny", "--checkpoint", str(ckpt),
           "--epochs", "2", "--work-dir", str(tmp / "work-diet"), "--out-dir", str(tmp / "out-diet"), "--no-progress",
           "--systems", "slm360,diet", "--diet-epochs", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp / "out-diet" / "continual_tiny.json").read_text())
    d = r["diet"]
    # DIET trains on half A less the examples SLM360 held out, so A held-out is unseen by both.
    assert d["n_half_a_trained"] == r["split"]["half_a"] - r["split"]["a_heldout"]
    for phase in ("before", "after"):
        assert set(d[phase]) == {"a_heldout", "b_heldout", "test"}
        assert all(0 <= v <= 1 for v in d[phase].values())
    assert d["forgetting_a"] == pytest.approx(d["before"]["a_heldout"] - d["after"]["a_heldout"])
    assert d["train_s"] > 0 and d["finetune_s"] > 0 and d["epochs"] == 1
    assert "DIET `--finetune` (anchor)" in (tmp / "out-diet" / "continual_tiny.md").read_text()
    # The hours-long DIET trainings run (and are saved) before the minutes-long SLM360 updates.
    assert run.stderr.index("DIET finetune_b: rasa train nlu") < run.stderr.index("plain: updating")

    # The other protocol shares half A: DIET's half-A model is reused, only the update runs.
    skewed = subprocess.run(cmd + ["--protocol", "skewed", "--focus-share", "0.34", "--skew-rest", "3"],
                            capture_output=True, text=True, timeout=900, env=ENV)
    assert skewed.returncode == 0, skewed.stderr[-3000:]
    assert "DIET half_a: trained in an earlier run, reused" in skewed.stderr
    assert "DIET finetune_b: rasa train nlu --finetune" in skewed.stderr
    ds = json.loads((tmp / "out-diet" / "continual_tiny_skewed.json").read_text())["diet"]
    # Same half-A model, evaluated again (B held-out is another set under this protocol).
    assert ds["train_s"] == d["train_s"] and ds["before"]["a_heldout"] == d["before"]["a_heldout"]
    assert ds["before"]["test"] == d["before"]["test"]


def _variant(name, lam, a_after, b_after, accepted=True, a_before=0.90, ratio=None):
    return {"variant": name, "ewc_lambda": lam, "replay_ratio": ratio, "accepted": accepted,
            "after": {"a_heldout": a_after, "b_heldout": b_after, "test": 0.5},
            "forgetting_a": round(a_before - a_after, 6)}


def test_lambda_is_chosen_on_held_out_sets_and_checked_against_the_target():
    plain = _variant("plain", None, 0.86, 0.95)  # forgets 4 points
    variants = [plain, _variant("ewc_replay", 0.01, 0.87, 0.95),
                _variant("ewc_replay", 0.1, 0.89, 0.945),  # forgets 1 point, B 0.5 below plain
                _variant("ewc_replay", 1.0, 0.90, 0.93),  # forgets nothing but learns 2 points less
                _variant("ewc_replay", 10.0, 0.90, 0.95, accepted=False)]  # refused by the guard
    sel = CR.select_lambda(variants)
    assert sel["ewc_lambda"] == 0.1 and sel["target_met"] is True and sel["b_heldout_gap"] == pytest.approx(0.005)
    sel = CR.select_lambda([plain, _variant("ewc_replay", 0.01, 0.87, 0.95)])
    assert sel["ewc_lambda"] == 0.01 and sel["target_met"] is False and "more than half" in sel["why"]
    sel = CR.select_lambda([plain, _variant("ewc_replay", 1.0, 0.90, 0.93)])
    assert sel["ewc_lambda"] is None and sel["target_met"] is False
    gaining = _variant("plain", None, 0.91, 0.95)  # plain finetuning gained on A: nothing to halve
    sel = CR.select_lambda([gaining, _variant("ewc_replay", 0.1, 0.90, 0.95)])
    assert sel["target_met"] is None and "forgot nothing" in sel["why"]
    assert CR.select_lambda([plain]) is None
    # Ties on forgetting go to the smaller lambda, then the smaller replay ratio (whole buffer last).
    sel = CR.select_lambda([plain, _variant("ewc_replay", 0.1, 0.89, 0.95),
                            _variant("ewc_replay", 0.1, 0.89, 0.95, ratio=0.5),
                            _variant("ewc_replay", 0.1, 0.89, 0.95, ratio=0.25)])
    assert (sel["ewc_lambda"], sel["replay_ratio"], sel["target_met"]) == (0.1, 0.25, True)


def test_runs_of_several_seeds_are_pooled_and_the_target_is_checked_on_the_means(setup):
    tmp, ckpt = setup
    out = tmp / "seeds"
    for seed in ("42", "7"):
        cmd = [*SCRIPT, "--data-dir", str(tmp / "data"), "--dataset", "tiny", "--checkpoint",
               str(ckpt), "--epochs", "2", "--ewc-lambda", "1", "--seed", seed, "--work-dir", str(tmp / "work"),
               "--out-dir", str(out), "--no-progress"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "across 2 seeds" in run.stderr
    one, two = (json.loads((out / name).read_text()) for name in ("continual_tiny.json", "continual_tiny_seed7.json"))
    assert (one["seed"], two["seed"]) == (42, 7)
    assert one["split"]["a_heldout"] > 0 and one["split"]["b_heldout"] > 0
    s = json.loads((out / "continual_tiny_across_seeds.json").read_text())
    assert s["seeds"] == [7, 42]
    assert [(v["variant"], v["ewc_lambda"]) for v in s["variants"]] == [("plain", None), ("ewc_replay", 1.0)]
    for pooled, a, b in zip(s["variants"], two["variants"], one["variants"]):
        assert pooled["forgetting_a"] == pytest.approx((a["forgetting_a"] + b["forgetting_a"]) / 2, abs=1e-6)
        assert pooled["after"]["b_heldout"] == pytest.approx((a["after"]["b_heldout"] + b["after"]["b_heldout"]) / 2,
                                                             abs=1e-6)
        assert [p["seed"] for p in pooled["per_seed"]] == [7, 42]
    assert s["selection"] == CB_select(s["variants"])
    md = (out / "continual_tiny_across_seeds.md").read_text()
    assert "2 seeds" in md and "| plain |" in md and "On the means" in md


def test_pooling_refuses_runs_of_different_recipes(tmp_path):
    def run(seed, epochs):
        v = {"variant": "plain", "ewc_lambda": None, "replay_ratio": None, "epochs": 1, "accepted": True,
             "seconds": 1.0, "forgetting_a": 0.0, "gain_b": 0.0,
             "after": {"a_heldout": 0.5, "b_heldout": 0.5, "test": 0.5}}
        return {"schema": "slm360-continual/1", "protocol": "iid", "seed": seed, "b_heldout_share": 0.1,
                "split": {}, "half_a_model": {"epochs": epochs, "accuracy": v["after"]}, "variants": [v]}

    (tmp_path / "continual_x.json").write_text(json.dumps(run(42, 10)))
    assert CR.seed_summary(tmp_path, "x", "iid", False) is None  # one seed: nothing to pool
    (tmp_path / "continual_x_seed1.json").write_text(json.dumps(run(1, 5)))
    (tmp_path / "continual_x_skewed_seed2.json").write_text(json.dumps(run(2, 10)))  # other protocol: ignored
    with pytest.raises(CompareError, match=r"seeds \[1, 42\] differ in epochs"):
        CR.seed_summary(tmp_path, "x", "iid", False)
    (tmp_path / "continual_x_seed1.json").write_text(json.dumps(run(1, 10)))
    s = CR.seed_summary(tmp_path, "x", "iid", False)
    assert s["seeds"] == [1, 42] and (tmp_path / "continual_x_across_seeds.md").is_file()

"""benchmarks.compare and the modules it drives (datasets, rasa_data, systems, monitor, metrics,
store, diet_chunks) and benchmarks.report: YAML writer, metrics, process monitor, report, end to end."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import CompareError, diet_chunks, monitor, plots, rasa_data, run_results, store, systems
from benchmarks import compare as C
from benchmarks import datasets as D
from benchmarks import metrics as M
from benchmarks import report as R

os.environ.setdefault("RASA_TELEMETRY_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

BASELINE_DIET = ROOT.parent / "shared" / "baselines" / "diet_default.yml"


def _env():
    """The environment of a `python -m benchmarks.<script>` child: the repository on PYTHONPATH."""
    return {**monitor.repo_env(), "RASA_TELEMETRY_ENABLED": "false"}


# ---------------------------------------------------------------------------- YAML writer

def _ex(text, intent, *ents):
    """An Example whose entities are given as (value, label), located with str.index."""
    return D.Example(text, intent, sorted((text.index(v), text.index(v) + len(v), lab) for v, lab in ents))


TRICKY = [
    _ex("book a table for 4 people", "book", ("4", "people")),
    _ex("book [a] table (for) 4 [x](y) now", "book", ("4", "people")),
    _ex("[x](y) {z} ]( [", "weird"),
    _ex("[4](people) is literal here", "weird", ("literal", "where")),
    _ex("[[][]", "weird", ("[", "br")),
    _ex("a[b c", "weird", ("a[b", "x.y")),
    _ex("(a) [b {c}", "weird", ("(a)", "p"), ("[b", "q"), ("{c}", "r")),
    _ex("call me at 5:30", "time", ("5:30", "t:ime")),
    _ex("  leading and trailing \n", "spaces"),
    _ex("\nline\nbreak\ttab\x00ctl \u2028 🙂", "spaces"),
    _ex(" ent at start ", "spaces", ("ent", "pos")),
    _ex('quote " and \\ back # hash - dash', "atis_flight#atis_airfare"),
    _ex("x", "reverted_card_payment?", ("x", "k")),
    _ex("Привет, 你好 (hi)", "greet", ("你好", "lang")),
]


def _key(e):
    return e.text, e.intent, tuple(e.entities)


def test_annotate_uses_the_markdown_entity_syntax():
    assert rasa_data.annotate(D.Example("book a table for 4 people", "book", [(17, 18, "people")])) == \
        "book a table for [4](people) people"
    assert rasa_data.annotate(D.Example("at 5:30", "t", [(3, 7, "a:b")])) == 'at [5:30]{"entity": "a:b"}'


def test_yaml_round_trips_through_rasa_load_data(tmp_path):
    pytest.importorskip("rasa")
    path = rasa_data.write_nlu_yaml(TRICKY, tmp_path / "nlu.yml")
    got = rasa_data.read_back(path)
    assert sorted(map(_key, got)) == sorted(map(_key, TRICKY))
    assert rasa_data.verify_round_trip(path, TRICKY) == len(TRICKY)


def test_yaml_round_trips_random_texts_with_brackets(tmp_path):
    """Seeded random texts over an alphabet of the characters Rasa's format gives meaning to."""
    pytest.importorskip("rasa")
    rng = random.Random(0)
    alphabet = "ab [](){}:,\"'\\#-|>"
    examples = []
    for i in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ents, pos = [], 0
        while pos < len(text) and rng.random() < 0.6:
            s = rng.randint(pos, len(text) - 1)
            e = rng.randint(s + 1, min(len(text), s + 6))
            if "]" not in text[s:e]:
                ents.append((s, e, rng.choice(["a", "b.c", "d_e"])))
            pos = e + 1
        examples.append(D.Example(text, f"intent{i % 5}", ents))
    path = rasa_data.write_nlu_yaml(examples, tmp_path / "nlu.yml")
    want = {_key(e) for e in examples}
    assert {_key(e) for e in rasa_data.read_back(path)} == want


def test_rasa_drops_duplicates_and_verify_counts_distinct(tmp_path):
    pytest.importorskip("rasa")
    exs = [D.Example("hi there", "greet"), D.Example("hi there", "greet"), D.Example("bye", "bye")]
    path = rasa_data.write_nlu_yaml(exs, tmp_path / "nlu.yml")
    assert rasa_data.verify_round_trip(path, exs) == 2


@pytest.mark.parametrize("example, message", [
    (D.Example("abc", "x", [(0, 2, "a"), (1, 3, "b")]), "overlapping"),
    (D.Example("a]b c", "x", [(0, 3, "a")]), "contains ']'"),
    (D.Example("", "x"), "empty text"),
])
def test_unrepresentable_examples_are_refused(example, message):
    with pytest.raises(CompareError, match=message):
        rasa_data.nlu_yaml([example], "train.jsonl")


@pytest.mark.parametrize("intent, message", [("faq/ask", "retrieval"), ("nlu_fallback", "reserved"),
                                             (" padded", "whitespace")])
def test_bad_intent_names_are_refused(intent, message):
    with pytest.raises(CompareError, match=message):
        rasa_data.nlu_yaml([D.Example("hello", intent)], "train.jsonl")


def test_load_jsonl_names_file_and_line_of_bad_input(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "hi", "intent": "greet", "entities": []}\n'
                    '{"text": "go home", "intent": "nav", "entities": [{"start": 3, "end": 7, "entity": "p", "value": "hom"}]}\n')
    with pytest.raises(CompareError, match=r"train.jsonl:2: entity value 'hom'"):
        D.load_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(CompareError, match=r"train.jsonl:1: not valid JSON"):
        D.load_jsonl(path)


# ---------------------------------------------------------------------------- configs


def _pipeline(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())["pipeline"]


@pytest.mark.skipif(not BASELINE_DIET.is_file(), reason="../shared/baselines not available")
def test_diet_config_is_the_baseline_pipeline():
    assert _pipeline(BENCH / "configs" / "diet.yml") == _pipeline(BASELINE_DIET)


@pytest.mark.parametrize("system, key, value", [("diet_batch128", "batch_size", [64, 128]),
                                                 ("diet_io", "BILOU_flag", False)])
def test_each_diet_variant_differs_from_the_default_in_one_key_only(system, key, value):
    default, variant = _pipeline(BENCH / "configs" / "diet.yml"), _pipeline(BENCH / "configs" / f"{system}.yml")
    diet = next(c for c in variant if c["name"] == "DIETClassifier")
    popped = diet.pop(key)
    assert popped == value and type(popped) is type(value)  # `BILOU_flag: 0` would not be `false`
    assert variant == default
    assert system in systems.SYSTEMS and system in systems.CHUNKABLE and system in systems.DIET_VARIANT_CHANGE


def test_slm360_pipelines_have_the_agreed_components():
    names = [c["name"] for c in _pipeline(BENCH / "configs" / "slm360.yml")]
    assert names == ["WhitespaceTokenizer", systems.CLASSIFIER, "EntitySynonymMapper", "FallbackClassifier"]
    fb = _pipeline(BENCH / "configs" / "slm360.yml")[-1]
    assert fb["threshold"] == 0.3 and fb["ambiguity_threshold"] == 0.1
    feat = _pipeline(BENCH / "configs" / "featurizer_diet.yml")
    assert [c["name"] for c in feat] == ["WhitespaceTokenizer", systems.FEATURIZER, "DIETClassifier",
                                        "EntitySynonymMapper", "FallbackClassifier"]
    assert feat[2]["epochs"] == 100 and feat[2]["constrain_similarities"] is True


def test_build_config_applies_quick_epochs_then_overrides(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    ckpt.write_bytes(b"x")
    sets = systems.parse_sets(["epochs=5", f"checkpoint={ckpt}"], "--slm360-set")
    systems.resolve_checkpoint(sets, "--slm360-set")
    cfg, applied = systems.build_config("slm360", True, sets, {}, {})
    comp = next(c for c in cfg["pipeline"] if c["name"] == systems.CLASSIFIER)
    assert comp["epochs"] == 5 and comp["checkpoint"] == str(ckpt.resolve())
    cfg, _ = systems.build_config("diet", True, {}, {}, {})
    diet = next(c for c in cfg["pipeline"] if c["name"] == "DIETClassifier")
    assert diet["epochs"] == systems.QUICK_EPOCHS["diet_epochs"]
    cfg, _ = systems.build_config("featurizer_diet", False, sets, {}, {})
    assert next(c for c in cfg["pipeline"] if c["name"] == systems.FEATURIZER)["checkpoint"] == str(ckpt.resolve())
    assert systems.needs_pretrained(systems.build_config("slm360", False, {}, {}, {})[0]) == [systems.CLASSIFIER]


def test_sets_are_validated():
    assert systems.parse_sets(["epochs=2", "precision=f32", "entity_recognition=false"], "--x") == \
        {"epochs": 2, "precision": "f32", "entity_recognition": False}
    with pytest.raises(CompareError, match="expected key=value"):
        systems.parse_sets(["epochs"], "--slm360-set")
    keys = systems.classifier_keys()
    assert {"epochs", "checkpoint", "precision"} <= keys
    with pytest.raises(CompareError, match="unknown SLM360Classifier key"):
        systems.check_keys({"epoch": 2}, keys, "SLM360Classifier", "--slm360-set")
    featurizer = systems.component_keys(ROOT / "slm360_rasa/components/featurizer.py", "SLM360Featurizer")
    assert {"checkpoint", "precision", "max_length", "pooling"} <= featurizer
    systems.check_keys({"alias": "x"}, featurizer, "SLM360Featurizer", "--featurizer-set", extra=("alias",))


def test_quick_subsample_is_seeded_and_sized():
    train = [D.Example(f"t{i}", f"i{i % 12}") for i in range(240)]
    test = [D.Example(f"s{i}", f"i{i % 12}") for i in range(120)]
    ds = D.Dataset("d", Path("."), train, test, [D.Example(f"o{i}", "oos") for i in range(50)], {}, {})
    a, b = D.quick_subsample(ds), D.quick_subsample(ds)
    assert [e.text for e in a.train] == [e.text for e in b.train]
    assert len({e.intent for e in a.train}) == 8 and len(a.train) == 80
    assert len(a.test) == 40 and {e.intent for e in a.test} <= {e.intent for e in a.train}
    assert len(a.oos) == 20
    lim = D.limit_test(a, 7)
    assert len(lim.test) == 7 and len(lim.oos) == 7 and lim.train == a.train


# ---------------------------------------------------------------------------- metrics


def test_macro_f1_known_answer():
    # a: P = R = 1/2 -> F1 0.5; b: P 2/3, R 1 -> 0.8; c: never predicted -> 0.
    assert M.macro_f1(list("aabbc"), list("abbba")) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert M.macro_f1(["a", "b"], ["a", None]) == pytest.approx((1 + 0 + 0) / 3)  # None is its own wrong label


def test_entity_micro_f1_known_answer():
    gold = [[(0, 3, "A"), (4, 7, "B")], [(1, 2, "C")], []]
    pred = [[(0, 3, "A"), (4, 7, "A")], [], [(0, 1, "C"), (0, 1, "C")]]  # duplicate counts once
    r = M.entity_micro_f1(gold, pred)
    assert (r["tp"], r["n_gold"], r["n_pred"]) == (1, 3, 3)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(1 / 3)
    assert M.entity_micro_f1([[(0, 1, "x")]], [[(0, 2, "x")]])["f1"] == 0.0  # span must match exactly
    assert M.entity_micro_f1([[]], [[]])["f1"] != M.entity_micro_f1([[]], [[]])["f1"]  # nan: nothing to measure


def test_ece_known_answers():
    # Bin of 0.95: accuracy 1/2 -> gap 0.45; bin of 0.55: accuracy 1 -> gap 0.45; ECE = 0.45.
    assert M.expected_calibration_error([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 1]) == pytest.approx(0.45)
    assert M.expected_calibration_error([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)
    # Weighted by bin size: 3 messages at 0.9 all right (gap 0.1), 1 at 0.3 wrong (gap 0.3).
    assert M.expected_calibration_error([0.9, 0.9, 0.9, 0.3], [1, 1, 1, 0]) == pytest.approx(0.75 * 0.1 + 0.25 * 0.3)


def test_reliability_bins_edges():
    bins = M.reliability_bins([0.0, 1 / 15, 0.2, 1.0, 0.5], [1, 1, 1, 1, 0])
    assert len(bins) == 15
    assert bins[0]["n"] == 2  # 0 and exactly 1/15 (bins are (lo, hi])
    assert bins[2]["n"] == 1  # 0.2 = 3/15 falls in (2/15, 3/15]
    assert bins[14]["n"] == 1 and bins[7]["n"] == 1


def test_top_non_fallback_and_oos_recall():
    parse = {"intent": {"name": "nlu_fallback", "confidence": 0.3},
             "intent_ranking": [{"name": "nlu_fallback", "confidence": 0.3}, {"name": "book", "confidence": 0.25},
                                {"name": "menu", "confidence": 0.2}]}
    assert M.top_non_fallback(parse) == ("book", 0.25)
    assert M.top_non_fallback({"intent": {"name": "menu", "confidence": 0.9}}) == ("menu", 0.9)
    assert M.top_non_fallback({}) == (None, 0.0)
    assert M.oos_recall(["nlu_fallback", "a", "nlu_fallback", "nlu_fallback"]) == 0.75


def test_bits_round_trip():
    flags = [True, False, False, True]
    assert M.str_to_bits(M.bits_to_str(flags)) == flags
    with pytest.raises(ValueError):
        M.str_to_bits("01x")


def _raw(intent, conf, ranking, ents=(), lat=1.0):
    return {"intent": intent, "confidence": conf, "ranking": ranking, "entities": [list(e) for e in ents],
            "latency_ms": lat}


def test_mcnemar_p_matches_the_binomial_test():
    from scipy.stats import binomtest

    for a_only, b_only in [(90, 124), (3, 17), (0, 6), (40, 40), (1500, 1620)]:
        assert M.mcnemar_p(a_only, b_only) == pytest.approx(binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-9)
    assert M.mcnemar_p(0, 0) == 1.0


def test_paired_accuracy_difference():
    rng = random.Random(3)
    a = [rng.random() < 0.85 for _ in range(2000)]
    b = [x or rng.random() < 0.4 for x in a]  # b fixes some of a's errors and breaks none
    r = M.paired_accuracy_difference(a, b, seed=1)
    want = (sum(b) - sum(a)) / len(a)
    assert r["difference"] == pytest.approx(want) and r["a_only"] == 0 and r["b_only"] == sum(b) - sum(a)
    assert 0 < r["ci95_low"] < want < r["ci95_high"] and r["mcnemar_p"] < 1e-6
    assert M.paired_accuracy_difference(a, b, seed=1) == r  # seeded: the report does not move between runs
    same = M.paired_accuracy_difference(a, a)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0 and same["mcnemar_p"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        M.paired_accuracy_difference(a, b[:-1])


def test_summarize_counts_fallback_as_the_baselines_do():
    test = [D.Example("a", "book", [(0, 1, "x")]), D.Example("b", "menu"), D.Example("c", "menu"),
            D.Example("d", "hours")]
    oos = [D.Example("o1", "oos"), D.Example("o2", "oos")]
    ds = D.Dataset("d", Path("."), test, test, oos, {}, {})
    fb = "nlu_fallback"
    raw = {"results": [
        _raw("book", 0.9, [["book", 0.9], ["menu", 0.1]], [(0, 1, "x")], 1.0),
        _raw(fb, 0.3, [[fb, 0.3], ["menu", 0.25], ["book", 0.2]], (), 2.0),  # right after un-fallback
        _raw("book", 0.6, [["book", 0.6], ["menu", 0.4]], (), 3.0),          # wrong
        _raw(fb, 0.3, [[fb, 0.3], ["book", 0.28]], (), 4.0),                 # wrong either way
        _raw(fb, 0.3, [[fb, 0.3], ["book", 0.2]], (), 5.0),                  # OOS caught
        _raw("menu", 0.7, [["menu", 0.7]], (), 6.0),                         # OOS missed
    ]}
    m, pm, oos_pm, rel = M.summarize(ds, raw)
    assert m["accuracy"] == 0.5 and m["accuracy_after_fallback"] == 0.25
    assert m["fallback_rate_in_scope"] == 0.5 and m["oos_recall"] == 0.5 and m["n_oos"] == 2
    assert m["entity_micro_f1"] == 1.0
    assert m["parse_p50_ms"] == 2.5  # in-scope messages only
    assert pm["correct"] == "1100" and pm["fallback"] == "0101"
    assert [pm["labels"][i] for i in pm["pred"]] == ["book", "menu", "book", "book"]
    assert pm["confidence"] == [0.9, 0.25, 0.6, 0.28]
    assert oos_pm["fallback"] == "10" and len(oos_pm["latency_ms"]) == 2
    assert m["ece"] == pytest.approx(M.expected_calibration_error(pm["confidence"], M.str_to_bits(pm["correct"])), abs=1e-6)
    assert sum(b["n"] for b in rel) == 4


def test_validation_splits_are_parsed_after_test_and_recorded():
    test = [D.Example("a", "book"), D.Example("b", "menu")]
    oos = [D.Example("o", "oos")]
    valid = [D.Example("v1", "book"), D.Example("v2", "menu"), D.Example("v3", "menu")]
    oos_valid = [D.Example("ov1", "oos"), D.Example("ov2", "oos")]
    ds = D.Dataset("d", Path("."), test, test, oos, {}, {}, valid=valid, oos_valid=oos_valid)
    assert [len(x) for x in D.eval_splits(ds)] == [2, 1, 3, 2]
    fb = "nlu_fallback"
    raw = {"results": [_raw("book", 0.9, [["book", 0.9]]), _raw("menu", 0.8, [["menu", 0.8]]),
                       _raw(fb, 0.3, [[fb, 0.3], ["book", 0.2]]),
                       _raw("book", 0.7, [["book", 0.7]]), _raw("book", 0.6, [["book", 0.6]]),
                       _raw(fb, 0.3, [[fb, 0.3], ["menu", 0.25]]),
                       _raw("menu", 0.5, [["menu", 0.5]]), _raw(fb, 0.3, [[fb, 0.3], ["book", 0.1]])]}
    m, _, oos_pm, _ = M.summarize(ds, raw)
    assert m["accuracy"] == 1.0 and m["oos_recall"] == 1.0 and len(oos_pm["confidence"]) == 1
    v = M.summarize_valid(ds, raw)
    assert v["valid_per_message"]["pred"] == ["book", "book", "menu"]
    assert v["valid_per_message"]["confidence"] == [0.7, 0.6, 0.25]
    assert v["valid_per_message"]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert v["oos_valid_per_message"]["confidence"] == [0.5, 0.1]
    assert M.summarize_valid(D.Dataset("d", Path("."), test, test, None, {}, {}), {"results": raw["results"][:2]}) == {}


def test_fallback_threshold_is_the_highest_recall_within_the_accuracy_budget():
    # In-scope: 10 messages, 9 right; the wrong one has the lowest confidence.
    conf = [0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]
    correct = [False] + [True] * 9
    oos = [0.1, 0.3, 0.45, 0.55, 0.65]
    # Dropping the wrong message costs nothing; one right one costs 0.1 > 0.01 budget.
    best = M.choose_fallback_threshold(conf, correct, oos, max_accuracy_drop=0.01)
    assert 0.3 < best["threshold"] <= 0.4 and best["accuracy"] == 0.9 and best["oos_recall"] == 0.4
    loose = M.choose_fallback_threshold(conf, correct, oos, max_accuracy_drop=0.1)
    assert 0.45 < loose["threshold"] <= 0.5 and loose["accuracy"] == pytest.approx(0.8) and loose["oos_recall"] == 0.6
    applied = M.fallback_outcome(conf, correct, oos, best["threshold"])
    assert applied["oos_recall"] == best["oos_recall"] and applied["fallback_rate_in_scope"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="out-of-scope"):
        M.choose_fallback_threshold(conf, correct, [])


# ---------------------------------------------------------------------------- process monitor


def test_run_monitored_sees_peak_rss_and_return_code(tmp_path):
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5); raise SystemExit(3)"
    r = monitor.run_monitored([sys.executable, "-c", code], tmp_path / "log", _env(), tmp_path)
    assert r["rc"] == 3 and not r["timed_out"]
    assert r["peak_rss_mb"] >= 200 and r["ru_maxrss_mb"] >= 200
    r = monitor.run_monitored([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "log2", _env(),
                              tmp_path, timeout_s=1)
    assert r["timed_out"] and r["rc"] != 0 and r["wall_s"] < 20


def test_a_training_killed_by_sigkill_is_reported_as_likely_out_of_memory(tmp_path):
    # What the kernel's OOM killer does to a training process: SIGKILL, Rasa's log cut mid-epoch.
    code = "import os, signal; b = bytearray(50 * 2**20); b[::4096] = b'x' * len(b[::4096]); os.kill(os.getpid(), 9)"
    r = monitor.run_monitored([sys.executable, "-c", code], tmp_path / "log", _env(), tmp_path)
    assert r["rc"] == -9 and not r["timed_out"]
    why = monitor.failure_reason(r)
    assert why.startswith("killed by SIGKILL with a peak RSS of") and "most likely out of memory" in why
    assert monitor.failure_reason({"rc": -9, "timed_out": True}) == "timed out (--train-timeout)"
    assert r["pid"] > 0 and monitor.kernel_oom_line(None) is None
    assert monitor.oom_kill_line({"rc": -9, "timed_out": True, "pid": r["pid"]}) is None  # our own timeout kill
    assert monitor.oom_kill_line({"rc": 1, "pid": r["pid"]}) is None
    assert monitor.failure_reason({"rc": 1, "timed_out": False}) == "rc=1"
    assert monitor.failure_reason({"rc": 0, "timed_out": False}) == "rasa exited 0 but wrote no model archive"


def test_the_kernels_oom_line_names_the_killed_training(monkeypatch):
    log = ("[60109.3] oom-kill:constraint=CONSTRAINT_NONE,task=python,pid=15540,uid=0\n"
           "[60109.3] Out of memory: Killed process 15540 (python) total-vm:29714332kB, anon-rss:24319824kB\n"
           "[60111.4] oom_reaper: reaped process 15540 (python)\n")
    monkeypatch.setattr(monitor.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=log))
    want = "Out of memory: Killed process 15540 (python) total-vm:29714332kB, anon-rss:24319824kB"
    assert monitor.kernel_oom_line(15540) == want
    assert monitor.kernel_oom_line(1554) is None  # another process's kill is not this one's
    run = {"rc": -9, "timed_out": False, "peak_rss_mb": 23750.0, "pid": 15540}
    why = monitor.failure_reason(run, monitor.oom_kill_line(run))
    assert "out of memory, the kernel says: Out of memory: Killed process 15540 (python)" in why


def test_sigterm_ends_the_training_process_tree(tmp_path):
    """`kill` of compare.py (SIGTERM) also ends the Rasa process it started in its own session."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    driver = ("import os, signal, sys; from pathlib import Path; from benchmarks import monitor; "
              "signal.signal(signal.SIGTERM, monitor.exit_on_sigterm); "
              f"monitor.run_monitored([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'log')!r}), "
              f"dict(os.environ), Path({str(tmp_path)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", driver], env=_env())
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(50):
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the monitored child outlived compare.py's SIGTERM")


def test_run_monitored_counts_other_processes_cpu(tmp_path):
    """A process burning CPU beside the monitored one shows up in other_cpu_s."""
    burn = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 1.5: pass"])
    try:
        r = monitor.run_monitored([sys.executable, "-c", "import time; time.sleep(2.5)"], tmp_path / "log", _env(),
                                  tmp_path)
    finally:
        burn.wait()
    assert r["rc"] == 0 and r["other_cpu_s"] >= 1.0 and r["cpu_s"] < 0.5


# ---------------------------------------------------------------------------- CLI and report


@pytest.mark.parametrize("script", ["compare", "report", "continual", "bench_encoder", "eval_embeddings",
                                    "fastpath_modes", "serve_load", "serve_memory", "parity", "_rasa_eval"])
def test_help(script):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout


def test_cli_names_bad_input(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks.compare", *args], capture_output=True, text=True,
                              env=_env(), timeout=120)

    r = run("--systems", "diet,bert", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "bert" in r.stderr and "slm360" in r.stderr
    r = run("--datasets", "nope", "--data-dir", str(tmp_path), "--systems", "diet")
    assert r.returncode == 2 and "dataset 'nope' not found" in r.stderr
    r = run("--data-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--data-dir" in r.stderr
    r = run("--slm360-set", f"checkpoint={tmp_path / 'none.safetensors'}", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "none.safetensors" in r.stderr
    r = run("--env", "NUMBA_NUM_THREADS", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--env 'NUMBA_NUM_THREADS': expected NAME=VALUE" in r.stderr


def _fake_result(dataset, system, acc, wall, p50, rss, mb, status="ok", other_cpu=0.0):
    n = 4
    return {"schema": C.SCHEMA, "dataset": dataset, "system": system, "status": status, "quick": False,
            "started": "2026-11-21T00:00:00+00:00", "loadavg": {"start": [0.1, 0, 0], "end": [0.2, 0, 0]},
            "machine": {"cpu": "Test CPU", "cores_logical": 2, "cores_usable": 2, "ram_gb": 24, "python": "3.10",
                        "rasa": "3.6.21", "tensorflow": "2.12.0", "numba": "0.68.1"},
            "error": "rasa train nlu failed (rc=1)" if status != "ok" else None,
            "metrics": {"accuracy": acc, "macro_f1": acc, "entity_micro_f1": None, "oos_recall": None,
                        "accuracy_after_fallback": acc, "fallback_rate_in_scope": 0.0, "ece": 0.05,
                        "train_wall_s": wall, "train_cpu_s": wall, "train_other_cpu_s": other_cpu,
                        "parse_p50_ms": p50, "parse_p99_ms": p50 * 2,
                        "train_peak_rss_mb": rss * 2, "serve_peak_rss_mb": rss, "model_mb": mb, "load_s": 1.0},
            "per_message": {"latency_ms": [p50] * n, "confidence": [0.9, 0.8, 0.7, 0.6], "correct": "1101"}}


def test_report_chooses_the_oos_threshold_on_valid_and_applies_it_to_test():
    r = _fake_result("clinc150", "slm360", 0.75, 10, 2, 500, 3)
    r["oos_per_message"] = {"confidence": [0.65, 0.3, 0.95]}
    r["valid_per_message"] = {"gold": ["a", "a", "b", "b"], "pred": ["a", "b", "b", "b"],
                              "confidence": [0.9, 0.2, 0.8, 0.7]}
    r["oos_valid_per_message"] = {"confidence": [0.1, 0.55, 0.75]}
    o = R.oos_at_valid_threshold(r)
    # On valid: dropping the wrong 0.2 is free, 0.7 would cost 25 points: threshold in (0.55, 0.7].
    assert 0.55 < o["threshold"] <= 0.7 and o["valid"]["oos_recall"] == pytest.approx(2 / 3)
    # On test (correct "1101", confidence 0.9 0.8 0.7 0.6): 0.6 falls back, 0.7 stays.
    assert o["test"]["accuracy"] == 0.5 and o["test_accuracy_without_fallback"] == 0.75
    assert o["test"]["oos_recall"] == pytest.approx(1 / 3)
    table = "\n".join(R.oos_threshold_table({("clinc150", "slm360"): r}, ["clinc150"], ["slm360"]))
    assert "| clinc150 |" in table and "0.3333" in table
    assert R.oos_at_valid_threshold(_fake_result("banking77", "diet", 0.9, 1, 1, 1, 1)) is None


def test_report_marks_missing_runs_and_missed_targets(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in [_fake_result("banking77", "diet", 0.90, 4000, 3.8, 1060, 49.7, other_cpu=2000.0),
              _fake_result("banking77", "slm360", 0.88, 1000, 2.0, 700, 3.9, other_cpu=10.0),
              _fake_result("snips", "diet", 0.97, 3000, 3.0, 1000, 40.0, other_cpu=None),
              _fake_result("atis", "slm360", 0, 0, 0, 0, 0, status="train_failed")]:
        (runs / f"{r['dataset']}__{r['system']}.json").write_text(json.dumps(r))
    out = tmp_path / "RESULTS.md"
    assert R.main(["--results-dir", str(runs), "--out", str(out), "--no-plots"]) == 0
    md = out.read_text()
    assert "| snips | 0.9700 | not run |" in md
    assert "failed (train_failed)" in md and "| clinc150 | not run | not run |" in md
    assert "training at least 3x faster than DIET: met on banking77 (4.00x faster" in md
    assert "model archive at least 4x smaller than DIET's: met on banking77 (12.7x smaller" in md
    # The fake runs answer the same messages "1101": a zero difference, McNemar p = 1.
    assert "MISSED** on banking77 (SLM360 0.8800 vs DIET 0.9000; +0.00 pts, 95% CI +0.00 to +0.00, McNemar p = 1)" in md
    assert "| banking77 | +0.00 | +0.00 to +0.00 | 0 / 0 | 1 |" in md and "| snips | not run | - |" in md
    # Each dataset left out of a target says which side is missing and why.
    assert ("Not measured on snips (SLM360 not run); atis (DIET not run, SLM360 failed (train_failed)); "
            "clinc150 (DIET not run, SLM360 not run)") in md
    assert md.count("_Machine: Test CPU, 2 cores") >= 5  # beside every table family
    assert "| banking77 | 4000.0 | 1000.0 | 0.25 |" in md  # train wall and SLM360/DIET ratio
    # 2000 CPU-s of 4000 s x 2 cores: flagged; 10 of 2000 is below the 5 % line; None: unknown.
    assert "- banking77 / DIET: other processes used 2000 CPU-s during training (25% of the machine)" in md
    assert "banking77 / SLM360: other" not in md
    assert "- snips / DIET: not recorded whether other processes shared the machine" in md


def _report_of(tmp_path, results) -> str:
    """RESULTS.md (no plots) of `results`, each saved as compare.py saves a run."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in results:
        (runs / f"{r['dataset']}__{r['system']}.json").write_text(json.dumps(r))
    out = tmp_path / "RESULTS.md"
    assert R.main(["--results-dir", str(runs), "--out", str(out), "--no-plots"]) == 0
    return out.read_text()


def _atis_default_oom():
    oom = _fake_result("atis", "diet", 0, 0, 0, 0, 0, status="train_failed")
    oom["error"] = "rasa train nlu failed (killed by SIGKILL ...: out of memory, the kernel says: ...)"
    oom["oom_kill"] = "Out of memory: Killed process 15540 (python) total-vm:29714332kB"
    return oom


def _incomplete(dataset, system, chunk_walls, plan):
    r = _fake_result(dataset, system, 0, 0, 0, 0, 0, status="train_incomplete")
    r["train"] = {"chunks": [{"wall_s": w} for w in chunk_walls], "incomplete": True}
    r["train_chunks"] = {"epochs": plan}
    return r


def test_report_compares_with_the_batch_capped_diet_only_where_the_default_failed(tmp_path):
    md = _report_of(tmp_path, [_atis_default_oom(), _fake_result("atis", "diet_batch128", 0.90, 6000, 20.0, 900, 40.0),
                               _fake_result("atis", "slm360", 0.95, 300, 3.0, 700, 5.0),
                               _fake_result("snips", "diet", 0.96, 3000, 15.0, 900, 40.0),
                               _fake_result("snips", "diet_batch128", 0.99, 3000, 15.0, 900, 40.0),
                               _fake_result("snips", "slm360", 0.98, 300, 3.0, 700, 5.0)])
    assert "> Where the default DIET could not train (atis: see the targets and Failed runs)" in md
    assert "**DIET batch<=128**, the same pipeline with DIETClassifier `batch_size: [64, 128]`" in md
    assert "DIET IO tags" not in md
    # ATIS against the capped DIET, saying why; SNIPS against the default although the capped one ran too.
    assert ("met on snips (SLM360 0.9800 vs DIET 0.9600; +0.00 pts" in md
            and "atis (against DIET batch<=128, the default DIET failed (out of memory): SLM360 0.9500 vs DIET 0.9000"
            in md)
    assert "| atis | failed (out of memory) | 0.9000 | 0.9500 | +0.0500 |" in md
    assert "| snips | 0.9600 | 0.9900 | 0.9800 | +0.0200 |" in md
    assert "| atis | failed (out of memory) | 6000.0 | 300.0 | 0.05 |" in md


def test_report_names_a_capped_diet_still_training_where_the_default_failed(tmp_path):
    md = _report_of(tmp_path, [_atis_default_oom(), _incomplete("atis", "diet_batch128", [3963.3, 3856.4], [15] * 6 + [10]),
                               _fake_result("atis", "slm360", 0.95, 300, 3.0, 700, 5.0)])
    assert "atis (DIET failed (out of memory), DIET batch<=128 incomplete (2/7 chunks, 7,820 s))" in md
    assert "| atis | failed (out of memory) | incomplete (2/7 chunks, 7,820 s) | 0.9500 | - |" in md


def test_report_compares_with_the_first_diet_variant_that_finished_and_names_its_change(tmp_path):
    md = _report_of(tmp_path, [_atis_default_oom(), _incomplete("atis", "diet_batch128", [3963.3, 3856.4], [15] * 6 + [10]),
                               _incomplete("snips", "diet", [900.0], [5] * 20),
                               _fake_result("atis", "diet_io", 0.91, 2000, 20.0, 900, 40.0),
                               _fake_result("atis", "slm360", 0.95, 300, 3.0, 700, 5.0),
                               _fake_result("snips", "diet_io", 0.97, 5000, 15.0, 900, 40.0),
                               _fake_result("snips", "slm360", 0.98, 300, 3.0, 700, 5.0)])
    assert ("> Where the default DIET could not train (snips, atis: see the targets and Failed runs), SLM360 is "
            "compared with **DIET IO tags**, the same pipeline with DIETClassifier `BILOU_flag: false`") in md
    assert "batch_size: [64, 128]` instead" not in md  # the capped DIET never finished: not a baseline
    assert "atis (against DIET IO tags, the default DIET failed (out of memory): SLM360 0.9500 vs DIET 0.9100" in md
    assert "snips (against DIET IO tags, the default DIET incomplete (1/20 chunks, 900 s): SLM360 0.9800 vs DIET 0.9700" in md
    assert "| atis | failed (out of memory) | incomplete (2/7 chunks, 7,820 s) | 0.9100 | 0.9500 | +0.0400 |" in md


def test_machine_line_warns_only_about_a_dataset_whose_pair_ran_on_two_machines():
    runs = {(d, s): _fake_result(d, s, 0.9, 100, 3.0, 700, 5.0) for d in ("atis", "banking77") for s in ("diet", "slm360")}
    for s in ("diet", "slm360"):
        runs[("atis", s)]["machine"]["cpu"] = "Other CPU"
    failed = _fake_result("banking77", "diet_io", 0, 0, 0, 0, 0, status="train_failed")
    failed["machine"]["cpu"] = "Third CPU"  # a failed run gives no ratio: listed, never a reason to warn
    runs[("banking77", "diet_io")] = failed
    line = R.machine_line(runs, ["atis", "banking77"], ["diet", "diet_io", "slm360"])
    assert line.startswith("_Machines: ")
    assert all(f"{part}, 2 cores" in line for part in ("banking77 on Test CPU", "atis on Other CPU", "banking77 on Third CPU"))
    assert "Each dataset's finished runs share one machine, so the ratios within a dataset hold" in line
    assert "not meaningful" not in line
    runs[("banking77", "slm360")]["machine"]["cpu"] = "Other CPU"
    line = R.machine_line(runs, ["atis", "banking77"], ["diet", "diet_io", "slm360"])
    assert "**banking77: the systems ran on different machines, so their ratios are not meaningful.**" in line
    assert R.machine_line(runs, ["atis"], ["diet", "slm360"]).startswith("_Machine: Other CPU, 2 cores")


def test_paired_accuracy_needs_the_same_test_messages():
    diet = _fake_result("snips", "diet", 0.75, 10, 2, 500, 3)
    slm = _fake_result("snips", "slm360", 1.0, 10, 2, 500, 3)
    for r in (diet, slm):
        r["per_message"]["gold"] = ["a", "b", "c", "d"]
    slm["per_message"]["correct"] = "1111"
    pair = R.paired_accuracy({("snips", "diet"): diet, ("snips", "slm360"): slm}, "snips")
    assert pair["difference"] == 0.25 and (pair["a_only"], pair["b_only"]) == (0, 1)
    slm["per_message"]["gold"] = ["a", "b", "d", "c"]
    assert R.paired_accuracy({("snips", "diet"): diet, ("snips", "slm360"): slm}, "snips") == "different test messages"


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    runs.mkdir()
    for r in [_fake_result("snips", "diet", 0.97, 3000, 3.0, 1000, 40.0),
              _fake_result("snips", "slm360", 0.98, 300, 2.0, 600, 4.0)]:
        (runs / f"{r['dataset']}__{r['system']}.json").write_text(json.dumps(r))
    assert R.main(["--results-dir", str(runs)]) == 0
    for name in ("accuracy", "latency", "train_time", "memory", "calibration"):
        assert (runs / "plots" / f"{name}.png").stat().st_size > 1000
    assert "![Parse latency](plots/latency.png)" in (runs / "RESULTS.md").read_text()


def test_plots_label_a_missing_value_with_the_runs_status():
    results = {("atis", "diet"): _atis_default_oom(), ("atis", "diet_batch128"): _incomplete("atis", "diet_batch128", [1.0], [1, 1]),
               ("atis", "diet_io"): _fake_result("atis", "diet_io", 0, 0, 0, 0, 0, status="eval_failed")}
    assert [plots.plot_status(results, "atis", s) for s in ("diet", "diet_batch128", "diet_io", "slm360")] == [
        "out of memory", "incomplete", "failed", "not run"]


def test_report_without_results_folder_says_so(tmp_path, capsys):
    assert R.main(["--results-dir", str(tmp_path / "none"), "--no-plots"]) == 2
    assert "run benchmarks/compare.py first" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end


def _tiny_dataset(folder: Path) -> None:
    def ex(text, intent, ents=()):
        out = []
        for value, label in ents:
            s = text.index(value)
            out.append({"start": s, "end": s + len(value), "entity": label, "value": value})
        return {"text": text, "intent": intent, "entities": out}

    train = ([ex(f"book a table for {n} people", "book", [(str(n), "people")]) for n in range(2, 9)]
             + [ex(f"reserve (please) [a] table for {n}", "book", [(str(n), "people")]) for n in range(2, 5)]
             + [ex(t, "hours") for t in ["when do you open", "what are your opening hours", "are you open on sunday",
                                         "what time do you close", "how late are you open (today)", "[hours] please"]]
             + [ex(t, "menu") for t in ["show me the menu", "what dishes do you serve", "do you have vegan food",
                                        "can i see the menu please", "what is on the menu today", "which desserts"]])
    test = [ex("book a table for 3 people", "book", [("3", "people")]), ex("table for 9 please", "book", [("9", "people")]),
            ex("when do you close", "hours"), ex("show the menu (today)", "menu"), ex("what food do you have", "menu")]
    folder.mkdir(parents=True)
    for name, rows in [("train", train), ("test", test)]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.slow
def test_quick_end_to_end_slm360_and_diet_then_report(tmp_path):
    pytest.importorskip("rasa")
    from slm360_rasa.nano.checkpoint import save_checkpoint
    from slm360_rasa.nano.config import NanoConfig
    from slm360_rasa.nano.model import init_params
    from slm360_rasa.nano.tokenizer import NanoTokenizer

    cfg = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    ckpt = save_checkpoint(tmp_path / "small.safetensors", init_params(cfg, seed=0), cfg, NanoTokenizer.load().sha256)
    _tiny_dataset(tmp_path / "data" / "tiny")
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, "-m", "benchmarks.compare", "--quick", "--data-dir", str(tmp_path / "data"),
           "--datasets", "tiny", "--systems", "slm360,diet", "--results-dir", str(results), "--work-dir", str(work),
           "--slm360-set", f"checkpoint={ckpt}",
           # The smallest DIET that still runs the whole path: on 2 busy cores TensorFlow's graph
           # building dominates, and it shrinks with the model. The real runs use the default pipeline.
           "--diet-set", "epochs=2", "--diet-set", "number_of_transformer_layers=0",
           "--diet-set", "entity_recognition=false",
           # Two 1-epoch runs, the second through rasa's --finetune: the chunked path for real.
           "--diet-chunk-epochs", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    for system in ("slm360", "diet"):
        r = json.loads((results / f"tiny__{system}.json").read_text())
        assert r["status"] == "ok" and r["quick"] is True and r["schema"] == C.SCHEMA
        m = r["metrics"]
        for key in ("accuracy", "macro_f1", "entity_micro_f1", "ece", "fallback_rate_in_scope", "accuracy_after_fallback",
                    "parse_p50_ms", "parse_p99_ms", "train_wall_s", "train_peak_rss_mb", "serve_peak_rss_mb",
                    "model_mb", "load_s"):
            assert m[key] is not None, key
        assert m["oos_recall"] is None and m["n_test"] == 5
        assert 0 <= m["accuracy"] <= 1 and m["train_peak_rss_mb"] > 100 and m["model_mb"] > 0
        assert len(r["per_message"]["latency_ms"]) == 5 and len(r["per_message"]["correct"]) == 5
        assert r["machine"]["cpu"] and r["machine"]["rasa"] == "3.6.21"
        assert r["data"]["n_train"] == 22 and r["data"]["n_entity_types"] == 1
        assert Path(r["archive"]).is_file() and r["archive"].endswith(f"tiny__{system}.tar.gz")
        assert "pipeline" in r["config"]["yaml"]
    diet = json.loads((results / "tiny__diet.json").read_text())
    chunks = diet["train"]["chunks"]
    assert diet["train_chunks"]["epochs"] == [1, 1] and len(chunks) == 2
    assert "--finetune" not in chunks[0]["cmd"] and "--finetune" in chunks[1]["cmd"]
    assert diet["train"]["wall_s"] == pytest.approx(sum(c["wall_s"] for c in chunks), abs=0.01)
    slm = json.loads((results / "tiny__slm360.json").read_text())
    assert "train_chunks" not in slm and "chunks" not in slm["train"]
    assert slm["config"]["overrides"][systems.CLASSIFIER]["checkpoint"] == str(ckpt)
    assert slm["config"]["overrides"][systems.CLASSIFIER]["epochs"] == systems.QUICK_EPOCHS["slm360_epochs"]

    # --resume (the default) skips finished pairs without starting Rasa.
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert again.returncode == 0 and again.stderr.count("skipped") == 2

    # --reeval parses again with the saved model: training figures kept, the re-run listed.
    before = json.loads((results / "tiny__slm360.json").read_text())
    cmd_reeval = list(cmd) + ["--reeval"]
    cmd_reeval[cmd_reeval.index("--systems") + 1] = "slm360"
    reeval = subprocess.run(cmd_reeval, capture_output=True, text=True, env=_env(), timeout=300)
    assert reeval.returncode == 0, reeval.stderr[-3000:]
    after = json.loads((results / "tiny__slm360.json").read_text())
    assert after["status"] == "ok" and after["train"] == before["train"] and after["started"] == before["started"]
    assert len(after["reevaluations"]) == 1
    assert after["reevaluations"][0]["previous"]["accuracy"] == before["metrics"]["accuracy"]
    assert after["metrics"]["train_wall_s"] == before["metrics"]["train_wall_s"]
    assert len(after["per_message"]["latency_ms"]) == 5

    out = results / "RESULTS.md"
    rep = subprocess.run([sys.executable, "-m", "benchmarks.report", "--results-dir", str(results)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = out.read_text()
    assert "DIET" in md and "SLM360" in md and "QUICK MODE" in md
    assert "| tiny |" in md and "| snips | not run | not run |" in md
    assert (results / "plots" / "latency.png").is_file()


@pytest.mark.slow
def test_training_failure_is_saved_with_rc_and_log_tail(tmp_path):
    pytest.importorskip("rasa")
    import argparse

    _tiny_dataset(tmp_path / "data" / "tiny")
    ds = D.load_dataset(tmp_path / "data", "tiny")
    cfg, applied = systems.build_config("slm360", True, {}, {}, {})
    cfg["pipeline"][1]["name"] = "NoSuchComponent"
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), train_timeout=300, eval_timeout=None, quick=True, env={},
                              diet_chunk_epochs=None, max_chunks=None)
    out = tmp_path / "results" / "tiny__slm360.json"
    r = C.run_pair(ds, "slm360", cfg, applied, args, {"cpu": "test"}, out)
    saved = json.loads(out.read_text())
    assert r["status"] == saved["status"] == "train_failed"
    assert saved["train"]["rc"] == 1 and "NoSuchComponent" in saved["log_tail"]
    assert "rc=1" in saved["error"] and "metrics" not in saved


def test_an_interrupted_chunked_training_records_the_saved_chunks(tmp_path, monkeypatch):
    pytest.importorskip("rasa")
    import argparse

    _tiny_dataset(tmp_path / "data" / "tiny")
    ds = D.load_dataset(tmp_path / "data", "tiny")
    cfg, applied = systems.build_config("diet", True, {}, {"epochs": 3}, {})
    calls = []

    def fake_run(cmd, log_path, env, cwd, timeout_s=None):
        calls.append(cmd)
        if len(calls) == 2:
            raise SystemExit(143)  # what compare.py's SIGTERM handler raises mid-chunk
        out = Path(cmd[cmd.index("--out") + 1]) / cmd[cmd.index("--fixed-model-name") + 1]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"model")
        return {"cmd": cmd, "rc": 0, "timed_out": False, "wall_s": 5.0, "cpu_s": 9.0, "other_cpu_s": 0.0,
                "peak_rss_mb": 100.0, "log": str(log_path)}

    monkeypatch.setattr(monitor, "run_monitored", fake_run)
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), train_timeout=None, eval_timeout=None, quick=True,
                              env={}, diet_chunk_epochs=1, max_chunks=None)
    out = tmp_path / "results" / "tiny__diet.json"
    with pytest.raises(SystemExit):
        C.run_pair(ds, "diet", cfg, applied, args, {"cpu": "test"}, out)
    saved = json.loads(out.read_text())
    assert saved["status"] == "train_incomplete" and len(saved["train"]["chunks"]) == 1
    assert saved["error"] == "interrupted during chunk 2/3; 1 chunk(s) saved: run the same command again to continue"
    assert (run_results.cell({("tiny", "diet"): saved}, "tiny", "diet", "accuracy", ".4f")
            == "incomplete (1/3 chunks, 5 s)")


def test_saved_results_name_no_directory_of_this_machine():
    root = str(store.ROOT)
    value = {"archive": f"{root}/runs/m.tar.gz", "data": f"{store.ROOT.parent}/shared/datasets/atis",
             "log_tail": f"warning in {root}/.venv/lib/x.py:100 while reading {store.ROOT.parent}/shared/a.jsonl",
             "n": [1, f"{root}/b"], "other": "/usr/lib/python3",
             # not a path of this machine: the same letters inside another path stay as they are
             "tmp": f"see /tmp/x{store.ROOT.parent}/y and /tmp{root}/z"}
    assert store.portable(value) == {"archive": "runs/m.tar.gz", "data": "../shared/datasets/atis",
                                  "log_tail": "warning in .venv/lib/x.py:100 while reading ../shared/a.jsonl",
                                  "n": [1, "b"], "other": "/usr/lib/python3",
                                  "tmp": f"see /tmp/x{store.ROOT.parent}/y and /tmp{root}/z"}


def test_a_checkout_in_tmp_leaves_other_tmp_paths_absolute(monkeypatch):
    monkeypatch.setattr(store, "ROOT", Path("/tmp/ci"))
    monkeypatch.setattr(store, "SHARED", Path("/tmp/shared"))
    assert store.portable({"ckpt": "/tmp/pytest-of-x/small.safetensors", "log": "/tmp/ci/runs/a.log",
                        "data": "/tmp/shared/datasets/atis", "text": "read /tmp/other/x and /tmp/shared/y"}) == {
        "ckpt": "/tmp/pytest-of-x/small.safetensors", "log": "runs/a.log", "data": "../shared/datasets/atis",
        "text": "read /tmp/other/x and ../shared/y"}


def test_chunk_plan_splits_diet_epochs_only():
    cfg = {"pipeline": [{"name": "WhitespaceTokenizer"}, {"name": systems.DIET, "epochs": 100}]}
    assert diet_chunks.chunk_plan(cfg, "diet", 25) == [25, 25, 25, 25]
    assert diet_chunks.chunk_plan(cfg, "diet", 30) == [30, 30, 30, 10]
    assert diet_chunks.chunk_plan(cfg, "diet", 100) is None and diet_chunks.chunk_plan(cfg, "diet", None) is None
    assert diet_chunks.chunk_plan(cfg, "slm360", 25) is None  # its --finetune is continual learning, not resumption
    # DIET's default 300 epochs where the config leaves them out
    assert diet_chunks.chunk_plan({"pipeline": [{"name": systems.DIET}]}, "diet", 100) == [100, 100, 100]


def test_interrupted_chunked_training_resumes_at_the_next_chunk(tmp_path, monkeypatch):
    """A sitting that dies in chunk 2 keeps chunk 1; the next run starts at chunk 2 from chunk 1's model."""
    import argparse

    _tiny_dataset(tmp_path / "data" / "tiny")
    ds = D.load_dataset(tmp_path / "data", "tiny")
    cfg = {"pipeline": [{"name": "WhitespaceTokenizer"}, {"name": systems.DIET, "epochs": 6}]}
    calls = []

    def fake_train(cmd, log_path, env, cwd, timeout_s=None):
        calls.append(list(cmd))
        out = Path(cmd[cmd.index("--out") + 1]) / cmd[cmd.index("--fixed-model-name") + 1]
        fail = fail_at is not None and out.name == f"chunk{fail_at}.tar.gz"
        if not fail:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"model " + out.name.encode())
        log_path.write_text("log")
        return {"cmd": cmd, "rc": 1 if fail else 0, "timed_out": False, "wall_s": 10.0, "cpu_s": 15.0,
                "peak_rss_mb": 500.0 + len(calls), "log": str(log_path)}

    def fake_eval(ds_, archive, work, env, args, result, train, out_path, load_start):
        result.update(status="ok", evaluated=archive.read_bytes().decode(),
                      metrics={"accuracy": 1.0, "parse_p50_ms": 1.0, "serve_peak_rss_mb": 1.0})
        return C._finish(result, out_path, load_start)

    monkeypatch.setattr(monitor, "run_monitored", fake_train)
    monkeypatch.setattr(C, "evaluate_archive", fake_eval)
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), train_timeout=None, eval_timeout=None, quick=False,
                              env={}, diet_chunk_epochs=2, max_chunks=None)
    out = tmp_path / "results" / "tiny__diet.json"
    fail_at = 1
    r = C.run_pair(ds, "diet", cfg, {}, args, {"cpu": "test"}, out)
    assert r["status"] == "train_failed" and len(calls) == 2
    assert "--finetune" not in calls[0] and calls[1][calls[1].index("--finetune") + 1].endswith("chunk0.tar.gz")

    fail_at, calls[:] = None, []
    args.max_chunks = 1  # one chunk per sitting: saved as incomplete, resumable
    r = C.run_pair(ds, "diet", cfg, {}, args, {"cpu": "test"}, out)
    assert r["status"] == "train_incomplete" and "2/3" in r["error"] and len(calls) == 1
    assert json.loads(out.read_text())["status"] == "train_incomplete"

    args.max_chunks = None
    r = C.run_pair(ds, "diet", cfg, {}, args, {"cpu": "test"}, out)
    assert r["status"] == "ok" and r["evaluated"] == "model chunk2.tar.gz"
    assert [c[c.index("--fixed-model-name") + 1] for c in calls] == ["chunk1.tar.gz", "chunk2.tar.gz"]
    assert calls[0][calls[0].index("--finetune") + 1].endswith("chunk0.tar.gz")
    assert calls[0][calls[0].index("--epoch-fraction") + 1] == "1.0"
    assert r["train"]["wall_s"] == 30.0 and r["train"]["cpu_s"] == 45.0 and len(r["train"]["chunks"]) == 3
    assert yaml.safe_load((tmp_path / "work" / "tiny__diet" / "config_chunk.yml").read_text())["pipeline"][1]["epochs"] == 2

    # Another config (or data) is a new run: nothing of the old chunks is reused.
    cfg["pipeline"][1]["epochs"] = 4
    calls[:] = []
    C.run_pair(ds, "diet", cfg, {}, args, {"cpu": "test"}, out)
    assert [c[c.index("--fixed-model-name") + 1] for c in calls] == ["chunk0.tar.gz", "chunk1.tar.gz"]

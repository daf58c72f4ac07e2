"""The pattern fast path (model/fastpath.py): pattern learning, arbitration, JSON, bad input."""
import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slm360_rasa.model.fastpath import (EXACT_CONFIDENCE, FORMAT_NAME, FORMAT_VERSION, FastPath, FastPathConfig,
                                        FastPathHit, arbitrate)
from slm360_rasa.model.normalize import normalize

BAD = ["", "   ", "x" * 10_000, "🙂🚀🎉", "ctrl\x00\x01\x1b[31m", "你好，我想订一张桌子", "مرحبا", "Привет",
       "\u0301\u0301", "\ud800", None, 42]

INTENTS = ["book", "greet", "hours"]


# ---------------------------------------------------------------------- exact patterns

def _entity(text, value, label, **extra):
    s = text.index(value)
    return {"start": s, "end": s + len(value), "value": value, "entity": label, **extra}


def test_exact_hit_maps_entities_to_the_callers_text():
    t = "Book a table for 4 people!"
    fp = FastPath.build([t, "hi"], ["book", "greet"], [[_entity(t, "4", "people", role="guests")], []])
    text = "  BOOK a table, for 4 PEOPLE??"
    hit = fp.match(text)
    assert hit.intent == "book" and hit.source == "exact" and hit.confidence == EXACT_CONFIDENCE
    (e,) = hit.entities
    assert (e["start"], e["end"], e["value"], e["entity"], e["role"]) == (20, 21, "4", "people", "guests")
    assert text[e["start"]:e["end"]] == "4"
    assert fp.match("hi!").entities == []


def test_exact_entity_offsets_survive_casefold_growth_before_the_entity():
    t = "Straße nach Berlin"
    fp = FastPath.build([t], ["route"], [[_entity(t, "Berlin", "city")]])
    text = "STRASSE nach berlin"  # 'SS' is two characters where the training text had one
    (e,) = fp.match(text).entities
    assert text[e["start"]:e["end"]] == e["value"] == "berlin"


def test_entity_span_with_trailing_punctuation_keeps_only_the_word():
    t = "fly to Paris, now"
    fp = FastPath.build([t], ["fly"], [[{"start": 7, "end": 13, "entity": "city"}]])  # "Paris,"
    (e,) = fp.match("Fly to PARIS now").entities
    assert e["value"] == "PARIS"


def test_same_text_under_two_intents_is_not_a_pattern():
    fp = FastPath.build(["Book it", "book it!", "hello"], ["book", "cancel", "greet"])
    assert fp.match("book it") is None
    assert fp.stats["exact_ambiguous"] == 1 and fp.stats["exact"] == 1
    assert fp.match("Hello").intent == "greet"


def test_disagreeing_entity_annotations_drop_the_entities_not_the_intent():
    a, b = "table for 4", "Table for 4!"
    fp = FastPath.build([a, b], ["book", "book"], [[_entity(a, "4", "people")], []])
    hit = fp.match("table for 4")
    assert hit.intent == "book" and hit.entities is None
    assert fp.stats["exact_entities_disagree"] == 1


def test_texts_without_readable_characters_are_no_pattern():
    fp = FastPath.build(["?!", "...", "hi"], ["a", "b", "greet"])
    assert set(fp.exact) == {"hi"}
    assert fp.match("") is None and fp.match("??") is None


# ---------------------------------------------------------------------- regex / lookup patterns

TEXTS = ["what time do you open", "when do you open today", "book a table", "reserve a table for two",
         "table by the window", "what time do you close"]
LABELS = ["hours", "hours", "book", "book", "book", "hours"]


def test_regex_that_identifies_an_intent_becomes_a_pattern_with_its_support():
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "opening", "pattern": r"\b(open|close)\b"}])
    (rule,) = fp.rules
    assert (rule.intent, rule.support, rule.precision) == ("hours", 3, 1.0)
    hit = fp.match("Are you open on Sunday")
    assert hit.source == "regex" and hit.intent == "hours" and hit.pattern == "opening"
    assert hit.confidence == pytest.approx((3 + 1) / (3 + 2))
    assert hit.entities is None


def test_impure_or_unsupported_regexes_are_rejected():
    fp = FastPath.build(TEXTS, LABELS, regexes=[
        {"name": "what", "pattern": r"\bwhat\b|\btable\b"},  # matches both intents
        {"name": "window", "pattern": "window"},  # one example is no evidence (min_support 2)
    ])
    assert fp.rules == [] and fp.stats["regex_impure"] == 2
    assert fp.match("a table by the window please") is None


def test_min_precision_below_one_accepts_a_mostly_pure_regex():
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "t", "pattern": "table|open"}],
                        config=FastPathConfig(min_precision=0.6))
    (rule,) = fp.rules
    assert (rule.intent, rule.support, rule.correct) == ("book", 5, 3)


def test_invalid_regex_is_skipped_with_a_warning_naming_it(caplog):
    with caplog.at_level(logging.WARNING, logger="slm360_rasa"):
        fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "broken_zip", "pattern": "([0-9]"},
                                                    {"name": "no_pattern"}])
    assert fp.rules == [] and fp.stats["regex_invalid"] == 2
    assert "broken_zip" in caplog.text and "no_pattern" in caplog.text


def test_lookup_table_matches_whole_normalised_tokens():
    lookups = [{"name": "reservation_words", "elements": ["Table", "reserve"]}]
    fp = FastPath.build(TEXTS, LABELS, lookups=lookups)
    (rule,) = fp.rules
    assert (rule.source, rule.intent, rule.support) == ("lookup", "book", 3)
    assert fp.match("TABLE, please").intent == "book"
    assert fp.match("vegetables please") is None  # "table" inside a word is no match


def test_impure_lookup_is_rejected_and_newline_elements_are_read():
    fp = FastPath.build(TEXTS, LABELS, lookups=[{"name": "what", "elements": "what\ntable\n"},
                                                {"name": "empty", "elements": []}])
    assert fp.rules == [] and fp.stats["lookup_impure"] == 1 and fp.stats["lookup_empty"] == 1


def test_rules_naming_different_intents_abstain():
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "open", "pattern": "open"},
                                                {"name": "table", "pattern": "table"}])
    assert len(fp.rules) == 2
    assert fp.match("is the table open") is None
    assert fp.match("open now").intent == "hours"


def test_exact_match_takes_precedence_over_rules():
    fp = FastPath.build(TEXTS + ["table open"], LABELS + ["hours"], regexes=[{"name": "t", "pattern": "table"}])
    assert fp.rules == []  # "table" now also matches an hours example: impure
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "t", "pattern": "table"}])
    assert fp.match("Book a table!").source == "exact"


# ---------------------------------------------------------------------- arbitration

EXACT = FastPathHit("book", "exact", 1.0, [], "book a table")
REGEX = FastPathHit("book", "regex", 0.8, None, "tables")
SEM_GREET = np.array([0.05, 0.9, 0.05])
SEM_UNSURE = np.array([0.3, 0.45, 0.25])


def test_semantic_mode_never_uses_patterns():
    out = arbitrate(EXACT, SEM_GREET, INTENTS, "semantic")
    np.testing.assert_array_equal(out, SEM_GREET)
    assert arbitrate(EXACT, None, INTENTS, "semantic") is None


def test_pattern_mode_answers_only_from_patterns():
    assert arbitrate(None, SEM_GREET, INTENTS, "pattern") is None
    np.testing.assert_allclose(arbitrate(EXACT, SEM_GREET, INTENTS, "pattern"), [1, 0, 0])
    np.testing.assert_allclose(arbitrate(REGEX, None, INTENTS, "pattern"), [0.8, 0.1, 0.1])


def test_hybrid_exact_hit_wins_at_full_confidence():
    np.testing.assert_allclose(arbitrate(EXACT, SEM_GREET, INTENTS, "hybrid"), [1, 0, 0])
    np.testing.assert_allclose(arbitrate(EXACT, None, INTENTS, "hybrid"), [1, 0, 0])


def test_hybrid_without_hit_is_semantic():
    np.testing.assert_array_equal(arbitrate(None, SEM_UNSURE, INTENTS, "hybrid"), SEM_UNSURE)
    assert arbitrate(None, None, INTENTS, "hybrid") is None
    foreign = FastPathHit("unknown_intent", "exact", 1.0, [], "x")
    np.testing.assert_array_equal(arbitrate(foreign, SEM_UNSURE, INTENTS, "hybrid"), SEM_UNSURE)


def test_hybrid_regex_never_overrules_a_more_confident_encoder():
    np.testing.assert_array_equal(arbitrate(REGEX, SEM_GREET, INTENTS, "hybrid"), SEM_GREET)


def test_hybrid_regex_decides_when_the_encoder_is_unsure():
    out = arbitrate(REGEX, SEM_UNSURE, INTENTS, "hybrid")
    np.testing.assert_allclose(out, 0.2 * SEM_UNSURE + [0.8, 0, 0])
    assert int(np.argmax(out)) == 0 and out.sum() == pytest.approx(1)


def test_hybrid_regex_agreeing_with_the_encoder_raises_its_confidence():
    sem = np.array([0.6, 0.3, 0.1])
    out = arbitrate(REGEX, sem, INTENTS, "hybrid")
    assert int(np.argmax(out)) == 0 and out[0] > sem[0]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.001, 1.0), min_size=3, max_size=3), st.floats(0.01, 1.0), st.integers(0, 2))
def test_hybrid_rule_never_weakens_a_confident_or_agreeing_answer(raw, w, k):
    sem = np.array(raw) / np.sum(raw)
    hit = FastPathHit(INTENTS[k], "regex", w, None, "r")
    out = arbitrate(hit, sem, INTENTS, "hybrid")
    assert out.sum() == pytest.approx(1) and (out >= 0).all()
    j = int(np.argmax(sem))
    if sem[j] >= w and j != k:
        np.testing.assert_array_equal(out, sem)  # confident encoder: untouched
    else:
        assert int(np.argmax(out)) == k or out[k] == pytest.approx(out.max())
        assert out[k] >= sem[k]


def test_arbitrate_rejects_unknown_mode_and_misshaped_probabilities():
    with pytest.raises(ValueError, match="mode"):
        arbitrate(None, SEM_UNSURE, INTENTS, "fast")
    with pytest.raises(ValueError, match="shape"):
        arbitrate(None, np.ones(2) / 2, INTENTS, "hybrid")


# ---------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "rules"}, "mode"), ({"min_support": 0}, "min_support"), ({"min_support": True}, "min_support"),
    ({"min_precision": 0.5}, "min_precision"), ({"min_precision": float("nan")}, "min_precision"),
    ({"pattern_weight": 0}, "pattern_weight"), ({"pattern_weight": 1.5}, "pattern_weight"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FastPathConfig(**kwargs)


def test_pattern_weight_scales_rule_confidence():
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "o", "pattern": "open|close"}],
                        config=FastPathConfig(pattern_weight=0.5))
    assert fp.match("open?").confidence == pytest.approx(0.5 * 4 / 5)


# ---------------------------------------------------------------------- persistence

def _rich_fastpath():
    t = "Book a table for 4 people"
    return FastPath.build([t, "hi", "Hi!"] + TEXTS, ["book", "greet", "greet"] + LABELS,
                          [[_entity(t, "4", "people")], [], []] + [[]] * len(TEXTS),
                          regexes=[{"name": "o", "pattern": r"\bopen\b"}],
                          lookups=[{"name": "res", "elements": ["reserve", "table"]}])


def test_json_round_trip_matches_the_same():
    fp = _rich_fastpath()
    back = FastPath.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert back.to_dict() == fp.to_dict()
    for text in ["BOOK a table for 4 people!", "hi", "open now?", "a table", "nothing here", ""]:
        assert back.match(text) == fp.match(text)
    assert back.config == fp.config and back.stats == fp.stats


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="rasa-model"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(config={"mode": "x"}), "mode"),
    (lambda d: d.update(config={"speed": 1}), "speed"),
    (lambda d: d.update(exact=[]), "exact"),
    (lambda d: d["exact"]["hi"].update(intent=""), "intent"),
    (lambda d: d["exact"]["book a table for 4 people"].update(entities=[[0, 99, "people", {}]]), "entity"),
    (lambda d: d.update(rules="none"), "rules"),
    (lambda d: d["rules"][0].update(expression="([0-9]"), "invalid regular expression"),
    (lambda d: d["rules"][0].update(correct=5, support=2), "correct"),
    (lambda d: d["rules"][1].update(elements=[]), "elements"),
])
def test_corrupt_dict_raises_value_error_naming_the_problem(mutate, message):
    d = json.loads(json.dumps(_rich_fastpath().to_dict()))
    assert [r["source"] for r in d["rules"]] == ["regex", "lookup"]
    mutate(d)
    with pytest.raises(ValueError, match=message):
        FastPath.from_dict(d)


@pytest.mark.parametrize("obj", [None, [], "fastpath", 3])
def test_non_object_raises_value_error(obj):
    with pytest.raises(ValueError, match="JSON object"):
        FastPath.from_dict(obj)


def test_to_dict_records_format_and_rule_statistics():
    d = _rich_fastpath().to_dict()
    assert d["format"] == FORMAT_NAME and d["version"] == FORMAT_VERSION
    rx = d["rules"][0]
    assert (rx["name"], rx["intent"], rx["support"], rx["precision"]) == ("o", "hours", 2, 1.0)


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text", BAD)
def test_bad_input_never_raises(text):
    fp = _rich_fastpath()
    hit = fp.match(text)
    assert hit is None or hit.intent in {"book", "greet", "hours"}
    normalize(text)
    for mode in ("hybrid", "semantic", "pattern"):
        arbitrate(hit, SEM_UNSURE, INTENTS, mode)


def test_build_skips_unusable_examples():
    fp = FastPath.build(BAD + ["hi"], ["x"] * len(BAD) + ["greet"],
                        [[{"start": "a"}]] * len(BAD) + [[{"start": 0, "end": 99, "entity": "e"}]])
    assert fp.match("hi").intent == "greet"
    assert fp.match("x" * 10_000).intent == "x"
    with pytest.raises(ValueError, match="length"):
        FastPath.build(["a"], [])


def test_empty_fast_path_matches_nothing():
    assert FastPath().match("hello") is None and len(FastPath()) == 0


def test_needs_encoder_per_mode():
    from slm360_rasa.model.fastpath import needs_encoder

    unknown_entities = FastPathHit("book", "exact", 1.0, None, "x")
    assert needs_encoder(EXACT, "semantic", True) and not needs_encoder(None, "pattern", True)
    assert not needs_encoder(EXACT, "hybrid", True)
    assert needs_encoder(REGEX, "hybrid", False) and needs_encoder(None, "hybrid", False)
    assert needs_encoder(unknown_entities, "hybrid", True) and not needs_encoder(unknown_entities, "hybrid", False)
    with pytest.raises(ValueError, match="mode"):
        needs_encoder(None, "fast", True)


def test_restrict_drops_patterns_of_other_intents():
    fp = FastPath.build(TEXTS, LABELS, regexes=[{"name": "opening", "pattern": r"\b(open|close)\b"}])
    n_hours = sum(p.intent == "hours" for p in fp.exact.values()) + 1  # + the regex
    assert fp.match("when do you open on sunday please") is not None
    assert fp.restrict([i for i in set(LABELS) if i != "hours"]) == n_hours
    assert all(p.intent != "hours" for p in fp.exact.values()) and not fp.rules
    assert fp.match("when do you open on sunday please") is None
    assert fp.restrict(set(LABELS)) == 0

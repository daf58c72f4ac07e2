"""`Examples` (model/examples.py): building, JSON round trip, and `from_json` refusing malformed input."""
import json

import pytest

from slm360_rasa.model.examples import Examples


def test_examples_round_trip_json_and_drop_extra_entity_keys():
    ex = Examples.build(["book 4", "hi"], ["book", "greet"],
                        [[{"start": 5, "end": 6, "entity": "n", "value": "4", "extractor": "x"}], []])
    assert ex.entities[0] == [{"start": 5, "end": 6, "entity": "n"}]
    back = Examples.from_json(ex.to_json())
    assert back == ex and len(back + ex) == 4 and back.subset([1]).texts == ["hi"]
    # Through real JSON text too (what a model file stores).
    assert Examples.from_json(json.loads(json.dumps(ex.to_json()))) == ex
    assert Examples.from_json(Examples().to_json()) == Examples()
    assert Examples.build(["a"], ["x"]).entities == [[]]
    with pytest.raises(ValueError, match="differ in length"):
        Examples(["a"], [], [])


GOOD = {"texts": ["book 4", "hi"], "intents": ["book", "greet"], "entities": [[[5, 6, "n"]], []]}


@pytest.mark.parametrize("bad, message", [
    # wrong keys
    ([], "expected an object"),
    ({"texts": [], "intents": []}, "expected an object"),
    ({**GOOD, "extra": 1}, "expected an object"),
    # texts / intents not lists of strings
    ({**GOOD, "texts": ["book 4", 7]}, "'texts' must be a list of strings"),
    ({**GOOD, "texts": "book 4"}, "'texts' must be a list of strings"),
    ({**GOOD, "intents": ["book", None]}, "'intents' must be a list of strings"),
    # bad entity triples
    ({**GOOD, "entities": [[[5, 6]], []]}, "triples"),
    ({**GOOD, "entities": [[[5, "6", "n"]], []]}, "triples"),
    ({**GOOD, "entities": [[[5, 6, 7]], []]}, "triples"),
    ({**GOOD, "entities": [[[5.0, 6, "n"]], []]}, "triples"),
    ({**GOOD, "entities": [[[True, 6, "n"]], []]}, "triples"),
    ({**GOOD, "entities": [[{"start": 5, "end": 6, "entity": "n"}], []]}, "triples"),
    ({**GOOD, "entities": [[5, 6, "n"], []]}, "triples"),
    ({**GOOD, "entities": None}, "triples"),
    # well-typed but of different lengths
    ({**GOOD, "entities": [[]]}, "differ in length"),
    ({**GOOD, "intents": ["book"]}, "differ in length"),
])
def test_from_json_refuses_malformed_input(bad, message):
    assert Examples.from_json(GOOD).texts == GOOD["texts"]  # the base case is valid
    with pytest.raises(ValueError, match=message):
        Examples.from_json(bad)

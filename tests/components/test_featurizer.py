"""SLM360Featurizer (components/featurizer.py): shapes, token alignment, bad input, config, Rasa end to end."""
import asyncio
import textwrap

import numpy as np
import pytest

pytest.importorskip("rasa")

from rasa.engine.graph import ExecutionContext, GraphSchema  # noqa: E402
from rasa.engine.recipes.default_recipe import DefaultV1Recipe  # noqa: E402
from rasa.nlu.tokenizers.whitespace_tokenizer import WhitespaceTokenizer  # noqa: E402
from rasa.shared.exceptions import InvalidConfigException  # noqa: E402
from rasa.shared.nlu.constants import ACTION_NAME, ACTION_TEXT, INTENT, RESPONSE, TEXT  # noqa: E402
from rasa.shared.nlu.training_data.message import Message  # noqa: E402
from rasa.shared.nlu.training_data.training_data import TrainingData  # noqa: E402

from slm360_rasa.components.featurizer import SLM360Featurizer, align_to_tokens  # noqa: E402
from slm360_rasa.nano import NanoConfig  # noqa: E402
from slm360_rasa.nano.checkpoint import save_checkpoint  # noqa: E402
from slm360_rasa.nano.model import init_params  # noqa: E402
from slm360_rasa.nano.tokenizer import NanoTokenizer  # noqa: E402

# Small but full-width (dim 256) so feature shapes are the real ones; the shipped
# tokenizer fixes vocab_size at 8,192.
SMALL = NanoConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=682)
DIM = SMALL.dim
# Every word of this sentence is split into several WordPieces by the shipped tokenizer.
MULTI_PIECE = "Unbelievably overbooked: flambéed tiramisu!"
BAD = [
    "",
    "   ",
    "🙂🚀🎉",
    "emoji 🙂 inside words🚀",
    "x" * 10_000,
    "word " * 2_000,
    "ctrl\x00\x01\x07\x1b[31m chars\x7f",
    "你好，我想订一张桌子",
    "مرحبا كيف حالك",
    "Привет, как дела?",
    "a\u0301\u0301\u0301 e\u0301",
    "[CLS] [SEP] [PAD] [UNK]",
    "\ud800 lone surrogate",
]


@pytest.fixture(scope="session")
def tokenizer():
    return NanoTokenizer.load()


@pytest.fixture(scope="session")
def nano256(tmp_path_factory, tokenizer):
    """A seeded random 2-layer checkpoint of width 256, written once per test session."""
    path = tmp_path_factory.mktemp("slm360") / "small.safetensors"
    params = init_params(SMALL, seed=0)
    for name in params:  # larger than init scale so the layers visibly mix tokens
        if not name.endswith("norm"):
            params[name] *= 4
    return save_checkpoint(path, params, SMALL, tokenizer.sha256)


def make_featurizer(checkpoint, **overrides):
    """An SLM360Featurizer as Rasa's graph would create it, reading `checkpoint` (None = pretrained)."""
    path = None if checkpoint is None else str(checkpoint)
    config = {**SLM360Featurizer.get_default_config(), "checkpoint": path, **overrides}
    return SLM360Featurizer.create(
        config, model_storage=None, resource=None, execution_context=ExecutionContext(GraphSchema({}), node_name="slm")
    )


@pytest.fixture(scope="module")
def featurizer(nano256):
    return make_featurizer(nano256)



@pytest.fixture(scope="module")
def whitespace():
    return WhitespaceTokenizer(WhitespaceTokenizer.get_default_config())


def tokenized(whitespace, *texts, **extra):
    messages = [Message(data={TEXT: t, **extra}) for t in texts]
    whitespace.process(messages)
    return messages


def dense(message, attribute=TEXT):
    seq, sent = message.get_dense_features(attribute)
    return (None if seq is None else seq.features), (None if sent is None else sent.features)


# ---------------------------------------------------------------------------- shapes + values


def test_feature_shapes_and_origin(featurizer, whitespace):
    (msg,) = tokenized(whitespace, "book a table for four tonight")
    featurizer.process([msg])
    seq, sent = dense(msg)
    assert seq.shape == (6, DIM) and sent.shape == (1, DIM)
    assert seq.dtype == np.float32 and sent.dtype == np.float32
    assert np.all(np.isfinite(seq)) and np.all(np.isfinite(sent))
    assert np.all(np.abs(seq).sum(axis=1) > 0)  # every word is covered by some WordPiece
    assert {f.origin for f in msg.features} == {"slm"}  # node name, since alias is None


def test_alias_names_the_features(nano256, whitespace):
    (msg,) = tokenized(whitespace, "hello there")
    make_featurizer(nano256, alias="nano_features").process([msg])
    assert {f.origin for f in msg.features} == {"nano_features"}


def test_alignment_matches_a_direct_computation(featurizer, whitespace):
    (msg,) = tokenized(whitespace, MULTI_PIECE)
    tokens = msg.get("text_tokens")
    featurizer.process([msg])
    seq, sent = dense(msg)

    ts = featurizer.encoder.token_states([MULTI_PIECE])[0]
    pieces = [(i, int(a), int(b)) for i, (a, b) in enumerate(ts.offsets) if 0 < i < len(ts.ids) - 1]
    expected = []
    for tok in tokens:
        rows = [ts.states[i] for i, a, b in pieces if a < tok.end and b > tok.start]
        assert len(rows) >= 2, f"test premise: {tok.text!r} should split into several WordPieces"
        expected.append(np.mean(rows, axis=0))
    np.testing.assert_allclose(seq, np.stack(expected), rtol=1e-5, atol=1e-6)
    # The sentence feature is the encoder's own mean pool, [CLS] and [SEP] included.
    np.testing.assert_allclose(sent, featurizer.encoder.encode([MULTI_PIECE]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sent[0], ts.states.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_align_to_tokens_on_synthetic_spans():
    # 5 encoder tokens: [CLS] "ab" "##cd" "ef" [SEP]; the specials carry real-looking
    # offsets here to prove they are excluded by position, not by their (0, 0) offsets.
    states = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    offsets = np.array([[0, 2], [0, 2], [2, 4], [5, 7], [5, 7]])
    spans = np.array([
        [0, 4],  # "abcd": pieces 1 and 2
        [5, 7],  # "ef": piece 3 only
        [1, 6],  # straddles: pieces 1, 2 and 3
        [8, 9],  # beyond the encoded text (truncated): zeros
        [4, 4],  # zero width: zeros
    ])
    out = align_to_tokens(states, offsets, spans)
    assert out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], states[1:3].mean(axis=0))
    np.testing.assert_allclose(out[1], states[3])
    np.testing.assert_allclose(out[2], states[1:4].mean(axis=0))
    np.testing.assert_array_equal(out[3:], 0)


def test_truncated_tokens_get_zero_vectors(nano256, whitespace):
    fz = make_featurizer(nano256, max_length=8)  # room for 6 WordPieces
    text = "one two three four five six seven eight nine ten"
    (msg,) = tokenized(whitespace, text)
    fz.process([msg])
    seq, sent = dense(msg)
    assert seq.shape == (10, DIM) and sent.shape == (1, DIM)
    covered = np.abs(seq).sum(axis=1) > 0
    assert covered[:6].all() and not covered[6:].any()


def test_precision_key_reaches_the_encoder(nano256, whitespace):
    fz = make_featurizer(nano256, precision="f32")
    assert fz.encoder.precision == "f32"
    assert fz.encoder is fz.encoder  # loaded once, then reused
    (msg,) = tokenized(whitespace, "a table for two")
    fz.process([msg])
    assert dense(msg)[0].shape == (4, DIM)


# ---------------------------------------------------------------------------- batching + attributes


def test_one_encoder_call_per_process_call(featurizer, whitespace, monkeypatch):
    calls = []
    original = featurizer.encoder.token_states
    monkeypatch.setattr(featurizer.encoder, "token_states", lambda texts: calls.append(list(texts)) or original(texts))
    messages = tokenized(whitespace, "hi", "book a table", "what time do you open", "bye")
    action = Message(data={ACTION_TEXT: "we open at noon"})
    whitespace.process([action])
    featurizer.process(messages + [action])
    assert calls == [["hi", "book a table", "what time do you open", "bye", "we open at noon"]]
    assert dense(action, ACTION_TEXT)[0].shape == (4, DIM)


def test_training_data_featurizes_text_response_and_action_text(featurizer, whitespace):
    examples = [
        Message(data={TEXT: "book a table for two", INTENT: "book_table"}),
        Message(data={TEXT: "what is on the menu", INTENT: "faq/menu", RESPONSE: "pasta and pizza"}),
        Message(data={ACTION_NAME: "utter_greet"}),  # no text: nothing to featurize
        Message(data={ACTION_TEXT: "hello, how can I help"}),
    ]
    data = TrainingData(training_examples=examples)
    whitespace.process_training_data(data)
    featurizer.process_training_data(data)
    book, menu, action_name, action_text = data.training_examples
    assert dense(book)[0].shape == (5, DIM)
    assert dense(menu)[0].shape == (5, DIM) and dense(menu, RESPONSE)[0].shape == (3, DIM)
    assert dense(action_text, ACTION_TEXT)[0].shape == (5, DIM)  # "hello" "how" "can" "I" "help"
    assert dense(action_name, ACTION_NAME) == (None, None) and not action_name.features
    # Training and inference produce the same vectors for the same text.
    (again,) = tokenized(whitespace, "book a table for two")
    featurizer.process([again])
    # (Batches are packed differently, so float sums may differ in the last bits.)
    np.testing.assert_allclose(dense(again)[0], dense(book)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_do_not_crash(featurizer, whitespace):
    messages = tokenized(whitespace, *BAD)
    featurizer.process(messages)
    for text, msg in zip(BAD, messages):
        seq, sent = dense(msg)
        if not text:
            assert seq is None and sent is None  # nothing to featurize, like LanguageModelFeaturizer
            continue
        n_tokens = len(msg.get("text_tokens"))
        assert seq.shape == (n_tokens, DIM), repr(text[:20])
        assert sent.shape == (1, DIM) and np.all(np.isfinite(seq)) and np.all(np.isfinite(sent))


def test_message_without_tokens_or_text_is_skipped(featurizer):
    no_tokens = Message(data={TEXT: "never tokenized"})
    intent_only = Message(data={INTENT: "greet"})
    featurizer.process([no_tokens, intent_only])
    assert not no_tokens.features and not intent_only.features
    featurizer.process([])  # an empty batch is a no-op


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value",
    [
        ("precision", "int8"),
        ("precision", None),
        ("max_length", 2),
        ("max_length", 513),
        ("max_length", "512"),
        ("max_length", True),
        ("pooling", "max"),
        ("pooling", "cls"),
        ("checkpoint", ""),
        ("checkpoint", 42),
    ],
)
def test_invalid_config_names_the_key_and_allowed_values(nano256, key, value):
    config = {**SLM360Featurizer.get_default_config(), "checkpoint": str(nano256), key: value}
    with pytest.raises(InvalidConfigException, match=f"'{key}'") as err:
        SLM360Featurizer(config)
    assert repr(value) in str(err.value)


def test_missing_checkpoint_file_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(InvalidConfigException, match="nope.safetensors"):
        make_featurizer(missing)


def test_default_checkpoint_is_the_shipped_pretrained_one(nano256, monkeypatch):
    import slm360_rasa.nano.assets as assets

    monkeypatch.setattr(assets, "pretrained_checkpoint_path", lambda: nano256)
    fz = make_featurizer(None)
    assert fz.encoder.config == SMALL


def test_fingerprint_follows_the_checkpoint_bytes(tmp_path, nano256):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(nano256.read_bytes())
    config = {**SLM360Featurizer.get_default_config(), "checkpoint": str(copy)}
    before = SLM360Featurizer.fingerprint_addon(config)
    assert before == SLM360Featurizer.fingerprint_addon(config)
    copy.write_bytes(copy.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one weight changed
    assert SLM360Featurizer.fingerprint_addon(config) != before


def test_rasa_finds_the_component_by_its_config_name():
    registered = DefaultV1Recipe._from_registry("slm360_rasa.SLM360Featurizer")
    assert registered.clazz is SLM360Featurizer
    assert registered.types == {DefaultV1Recipe.ComponentType.MESSAGE_FEATURIZER}
    assert not registered.is_trainable


# ---------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_pipeline_trains_and_parses_with_diet(tmp_path, nano256, tiny_nlu):
    """WhitespaceTokenizer -> SLM360Featurizer -> DIET through `rasa train nlu` and Agent.parse_message."""
    from rasa.core.agent import Agent
    from rasa.model_training import train_nlu

    config = tmp_path / "config.yml"
    config.write_text(textwrap.dedent(f"""\
        recipe: default.v1
        assistant_id: slm360_featurizer_test
        language: en
        pipeline:
          - name: WhitespaceTokenizer
          - name: slm360_rasa.SLM360Featurizer
            checkpoint: {nano256}
          # Eager mode and no transformer skip TensorFlow's graph tracing, which took
          # ~75% of this test's time; the features still flow through DIET's layers.
          - name: DIETClassifier
            epochs: 2
            run_eagerly: true
            number_of_transformer_layers: 0
            constrain_similarities: true
        """))
    model_path = train_nlu(str(config), str(tiny_nlu), str(tmp_path / "models"))
    assert model_path is not None

    agent = Agent.load(model_path)
    intents = {"book_table", "opening_hours", "menu"}  # those of the tiny_nlu fixture (conftest.py)
    parsed = asyncio.run(agent.parse_message("could I book a table for 4 people"))
    assert parsed["text"] == "could I book a table for 4 people"
    assert parsed["intent"]["name"] in intents
    assert 0.0 <= parsed["intent"]["confidence"] <= 1.0
    ranking = parsed["intent_ranking"]
    assert {r["name"] for r in ranking} == intents
    assert ranking[0]["name"] == parsed["intent"]["name"]
    assert isinstance(parsed["entities"], list)
    assert all(e["extractor"] == "DIETClassifier" and e["entity"] == "people" for e in parsed["entities"])
    # Odd input passes through the whole graph too.
    for text in ["", "🙂", "x" * 10_000]:
        assert "intent" in asyncio.run(agent.parse_message(text))

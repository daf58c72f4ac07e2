"""Encoder (nano/runtime.py): parity with the numpy reference on real text, bad input, checkpoints."""
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm360_rasa.nano import Encoder, NanoConfig
from slm360_rasa.nano import model as M
from slm360_rasa.nano.checkpoint import CheckpointError, save_checkpoint
from slm360_rasa.nano.tokenizer import NanoTokenizer

SMALL = NanoConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
UTTERANCES = [
    "book a table for two at seven tonight",
    "What's the weather like in Paris tomorrow?",
    "I lost my card, can you block it",
    "play some jazz",
    "hi",
]
BAD = ["", "   ", "\t\n", "x" * 10_000, "🙂🚀 emoji only 🎉", "ctrl\x00\x01\x07\x1b[31m chars\x7f",
       "你好，我想订一张桌子", "مرحبا كيف حالك", "Привет, как дела?", "\ud800 lone surrogate", "a\u0301\u0301\u0301"]


@pytest.fixture(scope="module")
def tok():
    return NanoTokenizer.load()


@pytest.fixture(scope="module")
def params():
    p = M.init_params(SMALL, seed=0)
    for n in p:  # larger than init scale so layers actually mix tokens
        if not n.endswith("norm"):
            p[n] *= 4
    return p


@pytest.fixture(scope="module")
def encoders(tok, params):
    return {prec: Encoder.from_params(params, SMALL, precision=prec, tokenizer=tok) for prec in ("f32", "int4")}


def test_f32_matches_reference_on_real_utterances(tok, params, encoders):
    b = tok.encode_batch(UTTERANCES, max_length=SMALL.max_seq_len)
    ref_h, ref_p = M.encode(params, b.ids.astype(np.int64), b.mask, SMALL)
    got = encoders["f32"].encode(UTTERANCES)
    assert got.shape == (5, 64) and got.dtype == np.float32
    assert np.abs(got - ref_p).max() <= 1e-4
    states = encoders["f32"].token_states(UTTERANCES)
    for i, s in enumerate(states):
        n = int(b.lengths[i])
        assert s.states.shape == (n, 64)
        assert np.abs(s.states - ref_h[i, :n]).max() <= 1e-4


def test_token_states_offsets_point_into_the_text(encoders):
    text = "Fly from Boston to Denver"
    s = encoders["int4"].token_states([text])[0]
    words = {text[a:b].lower() for a, b in s.offsets if b > a}
    assert {"boston", "denver"} <= words
    assert tuple(s.offsets[0]) == (0, 0) and tuple(s.offsets[-1]) == (0, 0)  # [CLS], [SEP]


def test_batch_order_and_batching_do_not_change_results(tok, params):
    enc = Encoder.from_params(params, SMALL, precision="int4", tokenizer=tok, batch_tokens=64)
    many = enc.encode(UTTERANCES * 7)
    one_by_one = np.concatenate([enc.encode([u]) for u in UTTERANCES])
    np.testing.assert_allclose(many[:5], one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(many[:5], many[5:10])


@pytest.mark.parametrize("precision", ["f32", "int4"])
def test_bad_input_gives_valid_embeddings(encoders, precision):
    out = encoders[precision].encode(BAD)
    assert out.shape == (len(BAD), 64)
    assert np.all(np.isfinite(out))


def test_overlong_input_is_truncated_with_a_warning(encoders, caplog):
    with caplog.at_level(logging.WARNING, logger="slm360_rasa"):
        s = encoders["int4"].token_states(["word " * 5000])[0]
    assert s.truncated and len(s.ids) == SMALL.max_seq_len
    assert any("truncat" in r.getMessage().lower() for r in caplog.records)


def test_rejects_a_bare_string(encoders):
    with pytest.raises(TypeError, match="list of texts"):
        encoders["int4"].encode("hello")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_property_arbitrary_unicode(encoders, texts):
    out = encoders["int4"].encode(texts)
    assert out.shape == (len(texts), 64) and np.all(np.isfinite(out))


def test_checkpoint_round_trip_float_and_int4(tmp_path, tok, params, encoders):
    path = save_checkpoint(tmp_path / "m.safetensors", params, SMALL, tok.sha256)
    for prec in ("f32", "int4"):
        enc = Encoder.from_checkpoint(path, precision=prec, tokenizer=tok)
        np.testing.assert_array_equal(enc.encode(UTTERANCES), encoders[prec].encode(UTTERANCES))
    # A stored INT4 checkpoint runs its own codes bit-identically to on-the-fly quantization.
    from slm360_rasa.nano.quant import quantize_params

    q4, _ = quantize_params(params)
    qpath = save_checkpoint(tmp_path / "q.safetensors", q4, SMALL, tok.sha256)
    enc = Encoder.from_checkpoint(qpath, precision="int4", tokenizer=tok)
    np.testing.assert_array_equal(enc.encode(UTTERANCES), encoders["int4"].encode(UTTERANCES))
    assert enc.weight_bytes == encoders["int4"].weight_bytes
    # The same file served in f32 runs its dequantized weights: parity with the reference on them.
    from slm360_rasa.nano.quant import float_params

    deq = float_params(q4, SMALL)
    b = tok.encode_batch(UTTERANCES, max_length=SMALL.max_seq_len)
    _, ref = M.encode(deq, b.ids.astype(np.int64), b.mask, SMALL)
    got = Encoder.from_checkpoint(qpath, precision="f32", tokenizer=tok).encode(UTTERANCES)
    assert np.abs(got - ref).max() <= 1e-4


def test_corrupt_checkpoint_fails_with_the_file_name(tmp_path, tok):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        Encoder.from_checkpoint(bad, tokenizer=tok)


def test_default_config_weight_sizes(tok):
    f32 = Encoder.random(precision="f32", tokenizer=tok)
    q4 = Encoder.random(precision="int4", tokenizer=tok)
    assert f32.weight_bytes == 4 * NanoConfig().n_params  # about 25.7 MB
    assert q4.weight_bytes <= 4_000_000  # seed card: 4 MB
    assert f32.weight_bytes / q4.weight_bytes > 6.5
    worst = max(e.rel_rmse for e in q4.quant_errors.values())
    assert worst < 0.15

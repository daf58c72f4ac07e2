"""Tests for slm360_rasa.nano.tokenizer: the shipped asset, batch encoding, offsets, truncation, training."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.tokenizer import (
    ASSET_PATH,
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    NanoTokenizer,
    TokenizerError,
    main,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> NanoTokenizer:
    return NanoTokenizer.load()


def check_invariants(tok: NanoTokenizer, texts, batch, max_length=512):
    """Structural invariants every TokenBatch must satisfy, whatever the input."""
    B = len(texts)
    T = batch.ids.shape[1]
    assert batch.ids.shape == (B, T) and batch.ids.dtype == np.int32
    assert batch.mask.shape == (B, T) and batch.mask.dtype == np.int32
    assert batch.offsets.shape == (B, T, 2) and batch.offsets.dtype == np.int32
    assert batch.lengths.shape == (B,) and batch.lengths.dtype == np.int32
    assert batch.truncated.shape == (B,) and batch.truncated.dtype == np.bool_
    assert T == batch.lengths.max()
    assert (batch.lengths >= 2).all() and (batch.lengths <= max_length).all()
    assert (batch.mask.sum(axis=1) == batch.lengths).all()
    assert ((batch.ids >= 0) & (batch.ids < tok.vocab_size)).all()
    for i, text in enumerate(texts):
        L = batch.lengths[i]
        assert (batch.mask[i, :L] == 1).all() and (batch.mask[i, L:] == 0).all()
        assert batch.ids[i, 0] == CLS_ID and batch.ids[i, L - 1] == SEP_ID
        assert (batch.ids[i, L:] == PAD_ID).all()
        # Inside a row only [UNK] (id 1) may appear among the special ids.
        assert not np.isin(batch.ids[i, 1 : L - 1], [PAD_ID, CLS_ID, SEP_ID, MASK_ID]).any()
        starts, ends = batch.offsets[i, :, 0], batch.offsets[i, :, 1]
        assert (0 <= starts).all() and (starts <= ends).all() and (ends <= len(text)).all()
        assert tuple(batch.offsets[i, 0]) == (0, 0) and tuple(batch.offsets[i, L - 1]) == (0, 0)
        assert (batch.offsets[i, L:] == 0).all()
        # Content offsets never go backwards.
        assert (np.diff(starts[1 : L - 1]) >= 0).all()


# --------------------------------------------------------------------------- the asset


def test_asset_vocab_and_special_ids(tok):
    assert tok.vocab_size == 8192 == NanoConfig().vocab_size
    assert tok.pad_id == 0 == NanoConfig().pad_id
    for i, name in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
        assert tok.token_to_id(name) == i
        assert tok.id_to_token(i) == name
    assert tok.path == ASSET_PATH


def test_asset_sha256_is_hash_of_file_bytes(tok):
    assert tok.sha256 == hashlib.sha256(ASSET_PATH.read_bytes()).hexdigest()
    assert len(tok.sha256) == 64


def test_asset_pipeline_is_bert_style():
    spec = json.loads(ASSET_PATH.read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "WordPiece"
    assert spec["model"]["continuing_subword_prefix"] == "##"
    assert spec["normalizer"]["type"] == "BertNormalizer"
    assert spec["normalizer"]["lowercase"] and spec["normalizer"]["strip_accents"]
    assert spec["pre_tokenizer"]["type"] == "BertPreTokenizer"
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    assert spec["decoder"]["type"] == "WordPiece"
    assert spec["truncation"] is None and spec["padding"] is None


# --------------------------------------------------------------------------- encoding


def test_encode_shapes_padding_and_mask(tok):
    texts = ["hello", "book a table for two at seven tonight please", ""]
    b = tok.encode_batch(texts)
    check_invariants(tok, texts, b)
    assert len(b) == 3
    assert b.lengths[2] == 2  # [CLS] [SEP]
    assert b.lengths[1] > b.lengths[0] > 2
    assert b.ids.shape[1] == b.lengths[1]
    assert not b.truncated.any()
    # Padding must not change a row: encoding alone equals the batch row.
    for i, t in enumerate(texts):
        one = tok.encode(t)
        L = b.lengths[i]
        assert one.ids.shape == (1, L)
        np.testing.assert_array_equal(one.ids[0], b.ids[i, :L])
        np.testing.assert_array_equal(one.offsets[0], b.offsets[i, :L])


def test_known_words_are_single_tokens_and_lowercased(tok):
    b = tok.encode("Book a FLIGHT")
    pieces = [tok.id_to_token(i) for i in b.ids[0, 1:-1]]
    assert pieces == ["book", "a", "flight"]
    assert tok.decode(b.ids[0]) == "book a flight"


def test_empty_batch(tok):
    b = tok.encode_batch([])
    assert b.ids.shape == (0, 0) and b.offsets.shape == (0, 0, 2) and len(b) == 0


def _surface_matches(tok, text, batch, row=0):
    """Every non-[UNK] content token's surface equals its offset span of the original text (normalised)."""
    L = batch.lengths[row]
    checked = 0
    for j in range(1, L - 1):
        token = tok.id_to_token(batch.ids[row, j])
        s, e = batch.offsets[row, j]
        span = text[s:e]
        if token == "[UNK]":
            continue
        piece = token[2:] if token.startswith("##") else token
        folded = "".join(c for c in unicodedata.normalize("NFD", span.lower()) if unicodedata.category(c) != "Mn")
        assert folded == piece, (text, j, token, span)
        checked += 1
    return checked


@pytest.mark.parametrize(
    "text",
    [
        "what's the weather in Berlin tomorrow?",
        "🎉🎉 party at Zoë's café tonight 🎉",
        "transfer\x00\x07 money\t\tto   savings\u200b account",
        "unbelievably uncharacteristically",
        "Crème brûlée for 👩‍👩‍👧 please",
    ],
)
def test_offsets_map_back_to_original_text(tok, text):
    b = tok.encode(text)
    check_invariants(tok, [text], b)
    assert _surface_matches(tok, text, b) >= 2


def test_offsets_after_emoji_are_code_point_offsets(tok):
    text = "😀😀 hello"  # 2 astral code points; UTF-16 or UTF-8 offsets would be off by 2 or 6
    b = tok.encode(text)
    spans = [text[s:e] for s, e in b.offsets[0, 1 : b.lengths[0] - 1]]
    assert spans[-1] == "hello"
    assert tuple(b.offsets[0, b.lengths[0] - 2]) == (3, 8)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\t\n  \r\n",
        "\u00a0\u3000",
        "a" * 10_000,
        "word " * 2_000,
        "😀" * 50,
        "\x00\x01\x02\x1b[31m",
        "\ufffd\ud7ff\U0010ffff",
        "我想订一张去北京的机票",
        "أريد حجز رحلة إلى القاهرة",
        "Я хочу забронировать столик",
        "e\u0301\u0301\u0301",
        "broken \ud800 surrogate \udfff here",
    ],
)
def test_hostile_inputs_never_raise(tok, text):
    b = tok.encode(text)
    check_invariants(tok, [text], b)
    if not text.strip():
        assert b.lengths[0] == 2


def test_empty_and_whitespace_are_cls_sep(tok):
    b = tok.encode_batch(["", "   ", "\n\t"])
    assert (b.lengths == 2).all()
    np.testing.assert_array_equal(b.ids, [[CLS_ID, SEP_ID]] * 3)


def test_special_token_strings_in_user_text_are_plain_text(tok):
    text = "[CLS] pay [PAD] the [SEP] bill [MASK]"
    b = tok.encode(text)
    check_invariants(tok, [text], b)
    L = b.lengths[0]
    assert L > 2 + 7  # brackets and names are split into ordinary pieces
    assert "pay" in [text[s:e] for s, e in b.offsets[0, 1 : L - 1]]


def test_chinese_chars_are_split(tok):
    text = "北京机票"
    b = tok.encode(text)
    # handle_chinese_chars isolates each CJK character, so each gets its own span.
    spans = [text[s:e] for s, e in b.offsets[0, 1 : b.lengths[0] - 1]]
    assert spans == list(text)


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_cls_and_sep_and_warns(tok, caplog):
    text = " ".join(["flight"] * 30)
    with caplog.at_level(logging.WARNING, logger="slm360_rasa"):
        b = tok.encode_batch([text, "hi"], max_length=10)
    check_invariants(tok, [text, "hi"], b, max_length=10)
    assert b.lengths.tolist() == [10, 3]
    assert b.truncated.tolist() == [True, False]
    assert b.ids[0, 0] == CLS_ID and b.ids[0, 9] == SEP_ID
    assert (b.ids[0, 1:9] == tok.token_to_id("flight")).all()
    assert tuple(b.offsets[0, 9]) == (0, 0)
    assert tuple(b.offsets[0, 8]) == (7 * 7, 7 * 7 + 6)  # 8th "flight"
    records = [r for r in caplog.records if r.name.startswith("slm360_rasa") and r.levelno == logging.WARNING]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "22 token(s) dropped" in msg  # 30 words + 2 specials - 10 kept
    assert text[:40] in msg


def test_truncation_matches_tokenizers_own_truncation(tok):
    """Our truncation is the same as tokenizers' enable_truncation with the [CLS] $A [SEP] template."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(ASSET_PATH))
    rng = random.Random(0)
    words = ["book", "unbelievable", "flights", "😀", "zürich", "x1y2z3", "to", "我"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(50)]
    for max_length in (2, 3, 7, 16, 64):
        ref.enable_truncation(max_length)
        expected = [e.ids for e in ref.encode_batch(texts)]
        b = tok.encode_batch(texts, max_length=max_length)
        got = [b.ids[i, : b.lengths[i]].tolist() for i in range(len(texts))]
        assert got == expected, max_length


def test_default_max_length_is_model_max(tok):
    b = tok.encode("word " * 2_000)
    assert b.lengths[0] == NanoConfig().max_seq_len and b.truncated[0]


def test_no_warning_when_not_truncated(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="slm360_rasa"):
        tok.encode_batch(["a short one", "another"], max_length=16)
    assert not [r for r in caplog.records if r.name.startswith("slm360_rasa")]


# --------------------------------------------------------------------------- bad arguments


def test_non_str_item_raises_type_error_naming_index(tok):
    with pytest.raises(TypeError, match=r"item 2 is int"):
        tok.encode_batch(["ok", "fine", 7])
    with pytest.raises(TypeError, match=r"item 0 is NoneType"):
        tok.encode_batch([None])
    with pytest.raises(TypeError, match=r"item 1 is bytes"):
        tok.encode_batch(["ok", b"bytes"])


def test_single_str_to_encode_batch_is_rejected(tok):
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("hello")
    with pytest.raises(TypeError, match="got list"):
        tok.encode(["hello"])


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5, None, True])
def test_bad_max_length(tok, bad):
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["hello"], max_length=bad)


def test_load_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        NanoTokenizer.load(missing)


def test_load_garbage_file_names_path(tmp_path):
    bad = tmp_path / "garbage.json"
    bad.write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="garbage.json"):
        NanoTokenizer.load(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerError, match="binary.json"):
        NanoTokenizer.load(binary)


def test_load_rejects_wrong_special_ids(tmp_path):
    spec = json.loads(ASSET_PATH.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["[PAD]"], vocab["[UNK]"] = vocab["[UNK]"], vocab["[PAD]"]
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    p = tmp_path / "swapped.json"
    p.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"swapped.json.*\[PAD\] to id 1"):
        NanoTokenizer.load(p)


# --------------------------------------------------------------------------- property test


# st.text() practically never yields lone surrogates, but a str decoded with
# errors="surrogateescape" can carry them, so a second strategy mixes them in.
_WITH_SURROGATES = st.lists(
    st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)), max_size=50
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.one_of(st.text(max_size=200), _WITH_SURROGATES), min_size=1, max_size=4),
    max_length=st.integers(2, 64),
)
def test_property_invariants_on_arbitrary_unicode(tok, texts, max_length):
    logging.getLogger("slm360_rasa.nano.tokenizer").disabled = True  # truncation warnings are expected noise here
    try:
        b = tok.encode_batch(texts, max_length=max_length)
    finally:
        logging.getLogger("slm360_rasa.nano.tokenizer").disabled = False
    check_invariants(tok, texts, b, max_length=max_length)
    for i in range(len(texts)):
        assert b.truncated[i] == (len(tok.encode(texts[i], max_length=10_000).ids[0]) > max_length)


# --------------------------------------------------------------------------- training


def _small_corpus(path, n_lines=3000, seed=0):
    rng = random.Random(seed)
    stems = ["book", "flight", "table", "weather", "play", "music", "transfer", "money", "alarm", "remind"]
    suffixes = ["", "s", "ing", "ed", "er", "able"]
    extra = ["zürich", "café", "北京", "привет", "😀", "مرحبا", "2024", "o'clock"]
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(stems) + rng.choice(suffixes) for _ in range(rng.randint(1, 8))]
        if rng.random() < 0.2:
            words.append(rng.choice(extra))
        lines.append(" ".join(w.capitalize() if rng.random() < 0.3 else w for w in words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_training_is_reproducible_and_exact_size(tmp_path):
    corpus = _small_corpus(tmp_path / "corpus.txt")
    a = train_tokenizer(corpus, tmp_path / "a" / "tokenizer.json", vocab_size=120, min_frequency=2)
    b = train_tokenizer(corpus, tmp_path / "b" / "tokenizer.json", vocab_size=120, min_frequency=2)
    assert a.read_bytes() == b.read_bytes()
    t = NanoTokenizer.load(a)
    assert t.vocab_size == 120
    for i, name in enumerate(SPECIAL_TOKENS):
        assert t.token_to_id(name) == i
    check_invariants(t, ["booking flights", "Zürich"], t.encode_batch(["booking flights", "Zürich"]))
    # No temporary file is left beside the output.
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == ["tokenizer.json"]


def test_training_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "t.json")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a b\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="lower --vocab-size"):
        train_tokenizer(tiny, tmp_path / "t.json", vocab_size=500)
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer(tiny, tmp_path / "t.json", vocab_size=3)


def test_cli_trains_and_reports(tmp_path, capsys):
    corpus = _small_corpus(tmp_path / "corpus.txt", n_lines=500)
    out = tmp_path / "cli.json"
    assert main(["--corpus", str(corpus), "--out", str(out), "--vocab-size", "80"]) == 0
    printed = capsys.readouterr().out
    assert NanoTokenizer.load(out).sha256 in printed and "vocab_size=80" in printed


def test_cli_missing_corpus_names_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLM360_CORPUS", str(tmp_path / "absent.txt"))
    assert main(["--out", str(tmp_path / "x.json")]) == 2
    assert "absent.txt" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--corpus" in capsys.readouterr().out

"""Served heads (model/heads.py): the BILOU tag set, decoding tag probabilities into entity spans,
softmax and the numba head matmul.

(Named test_model_heads.py, not test_heads.py: test folders have no __init__.py, so test file
basenames must be unique across tests/, and tests/train/test_heads.py exists.)"""
import numpy as np
import pytest

from slm360_rasa.model import heads as Hd
from slm360_rasa.nano.tokenizer import NanoTokenizer


def test_tag_names_are_outside_then_bilou_per_sorted_type():
    assert Hd.tag_names([]) == [Hd.OUTSIDE]
    assert Hd.tag_names(["time", "people"]) == ["O", "B-people", "I-people", "L-people", "U-people",
                                               "B-time", "I-time", "L-time", "U-time"]


def _probs(tags, names, p=0.9):
    """(T, n_tags) probabilities putting `p` on each token's named tag and the rest spread evenly."""
    out = np.full((len(names), len(tags)), (1 - p) / (len(tags) - 1))
    for i, name in enumerate(names):
        out[i, tags.index(name)] = p
    return out


def test_decode_opens_and_closes_spans_by_tag():
    text = "aa bb cc dd ee ff"
    # [CLS], six words, [SEP]: special tokens have empty offsets and are skipped whatever their tag.
    offsets = np.array([(0, 0), (0, 2), (3, 5), (6, 8), (9, 11), (12, 14), (15, 17), (0, 0)])
    tags = Hd.tag_names(["x", "y"])
    names = ["U-x", "B-x", "L-x", "U-y", "O", "I-x", "I-y", "B-y"]
    probs = _probs(tags, names)
    probs[5, tags.index("I-x")] = 0.7  # confidence = mean over the span's tokens
    out = Hd.decode_bilou(text, offsets, probs, tags)
    # "aa bb": B..L; "cc": U; "ee" then "ff": an I- opens a span, a change of type closes it.
    assert [(e["start"], e["end"], e["value"], e["entity"]) for e in out] == [
        (0, 5, "aa bb", "x"), (6, 8, "cc", "y"), (12, 14, "ee", "x"), (15, 17, "ff", "y")]
    assert [e["confidence_entity"] for e in out] == pytest.approx([0.9, 0.9, 0.7, 0.9])
    assert Hd.decode_bilou(text, offsets, _probs(tags, ["O"] * 8), tags) == []


def test_decode_snaps_partial_words_and_tolerates_bad_sequences():
    tok = NanoTokenizer.load()
    text = "fly to zuccherificio"
    tags = Hd.tag_names(["city"])
    b = tok.encode(text)
    n = int(b.lengths[0])
    probs = np.zeros((n, len(tags)))
    probs[:, 0] = 1.0
    # Only the first word piece of the last word is tagged, with an I- (no B-) tag.
    first_piece = next(i for i in range(n) if b.offsets[0][i][0] == 7)
    probs[first_piece] = 0
    probs[first_piece, tags.index("I-city")] = 1.0
    out = Hd.decode_bilou(text, b.offsets[0][:n], probs, tags)
    assert [(e["value"], e["entity"]) for e in out] == [("zuccherificio", "city")]


def test_softmax_rows_sum_to_one_without_overflow():
    z = np.array([[1000.0, 999.0, 0.0], [0.0, 0.0, 0.0]])
    p = Hd.softmax(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=1e-12)
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-9)


def test_serving_head_is_the_linear_map():
    """linear_head_predict (numba, one thread) = x @ W.T + b, in float32."""
    rng = np.random.default_rng(3)
    p = {f"{Hd.INTENT}.weight": (rng.standard_normal((77, 256)) * 0.02).astype(np.float32),
         f"{Hd.INTENT}.bias": rng.standard_normal(77).astype(np.float32)}
    for n in (1, 19):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        got = Hd.linear_head_predict(x, p, Hd.INTENT)
        assert got.shape == (n, 77) and got.dtype == np.float32
        ref = x.astype(np.float64) @ p[f"{Hd.INTENT}.weight"].T.astype(np.float64) + p[f"{Hd.INTENT}.bias"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

"""Training heads (train/heads.py): softmax cross-entropy gradient, BILOU labels (decoded back by the
served decoder), and the served head computing what the training head does.

The served decoder alone is tested in tests/model/test_model_heads.py."""
import numpy as np
import pytest

from slm360_rasa.model import heads as Hd
from slm360_rasa.nano.tokenizer import NanoTokenizer
from slm360_rasa.train import heads as H


def test_linear_softmax_xent_gradient():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5))
    p = {"h.weight": rng.standard_normal((4, 5)), "h.bias": rng.standard_normal(4)}
    y = np.array([0, 3, H.IGNORE, 1, 2, 3])

    def loss():
        return H.softmax_xent(H.linear_head_forward(x, p, "h"), y, 0.1)[0]

    _, _, dl = H.softmax_xent(H.linear_head_forward(x, p, "h"), y, 0.1)
    dx, g = H.linear_head_backward(x, dl, p, "h")
    assert np.all(dx[2] == 0)  # ignored row
    eps = 1e-6
    for arr, grad in ((x, dx), (p["h.weight"], g["h.weight"]), (p["h.bias"], g["h.bias"])):
        for idx in [(0,) * arr.ndim, tuple(s - 1 for s in arr.shape)]:
            old = arr[idx]
            arr[idx] = old + eps
            fp = loss()
            arr[idx] = old - eps
            fm = loss()
            arr[idx] = old
            assert grad[idx] == pytest.approx((fp - fm) / (2 * eps), rel=1e-5, abs=1e-9)


def test_bilou_round_trip_with_wordpieces():
    tok = NanoTokenizer.load()
    text = "book a table for 4 people at Trattoria Zuccherificio tomorrow"
    ents = [{"start": 17, "end": 18, "entity": "people"},
            {"start": 29, "end": 52, "entity": "restaurant"},
            {"start": 53, "end": 61, "entity": "time"}]
    tags = Hd.tag_names(["people", "restaurant", "time"])
    index = {t: i for i, t in enumerate(tags)}
    b = tok.encode(text)
    n = int(b.lengths[0])
    labels = H.bilou_labels(b.offsets[0], n, ents, index, n)
    assert labels[0] == H.IGNORE and labels[n - 1] == H.IGNORE  # [CLS], [SEP]
    names = [tags[i] for i in labels[1:n - 1]]
    assert names.count("U-people") == 1 and names.count("B-restaurant") == 1 and names.count("L-restaurant") == 1
    probs = np.full((n, len(tags)), 0.01)
    for i, lab in enumerate(labels):
        probs[i, lab if lab != H.IGNORE else 0] = 0.9
    out = Hd.decode_bilou(text, b.offsets[0][:n], probs, tags)
    assert [(e["start"], e["end"], e["entity"], e["value"]) for e in out] == [
        (17, 18, "people", "4"), (29, 52, "restaurant", "Trattoria Zuccherificio"), (53, 61, "time", "tomorrow")]
    assert all(e["confidence_entity"] == pytest.approx(0.9) for e in out)


def test_serving_head_equals_training_head():
    """linear_head_predict (numba, no BLAS threads) computes what linear_head_forward does."""
    rng = np.random.default_rng(3)
    p = H.init_linear(77, 256, seed=1, name="head.intent")
    p["head.intent.bias"][:] = rng.standard_normal(77).astype(np.float32)
    for n in (1, 19):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        got = Hd.linear_head_predict(x, p, "head.intent")
        assert got.shape == (n, 77) and got.dtype == np.float32
        np.testing.assert_allclose(got, H.linear_head_forward(x, p, "head.intent"), rtol=1e-5, atol=1e-5)

"""The files shipped in nano/assets: tokenizer + pretrained checkpoint, consistent and loadable."""
import numpy as np
import pytest

from slm360_rasa.nano import Encoder, NanoConfig
from slm360_rasa.nano.assets import pretrained_checkpoint_path
from slm360_rasa.nano.checkpoint import load_checkpoint
from slm360_rasa.nano.tokenizer import NanoTokenizer

UTTERANCES = [
    "book a table for two at seven tonight", "what's the weather like in paris tomorrow",
    "i lost my card, can you block it", "play some jazz from the sixties", "how do i reset my pin",
    "transfer 200 euros to my savings account", "set an alarm for 6 am", "is the museum open on mondays",
    "cancel my subscription please", "why was my payment declined", "find flights from boston to denver",
    "add milk to my shopping list", "who wrote the lord of the rings", "turn off the living room lights",
    "what time does the pharmacy close", "i want to change my delivery address", "tell me a joke",
    "how much is a taxi to the airport", "my package arrived damaged", "remind me to call mom at noon",
    "which restaurants near me serve vegan food", "what is the exchange rate for yen", "hi there",
    "can i get a refund for this order", "rate this book five stars", "show me movies playing tonight",
    "how long is the flight to tokyo", "thanks, that's all", "i need help with my account", "goodbye",
]


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(pretrained_checkpoint_path())


def test_checkpoint_metadata_matches_the_shipped_tokenizer(ckpt):
    tok = NanoTokenizer.load()
    assert ckpt.tokenizer_sha256 == tok.sha256
    assert ckpt.config == NanoConfig()
    assert ckpt.extra["kind"] == "release"
    assert ckpt.tensors["tok_embeddings"].dtype == np.float16
    assert "layers.5.w2.q4" in ckpt.tensors and "distill.proj.weight" not in ckpt.tensors
    assert pretrained_checkpoint_path().stat().st_size < 20_000_000


def test_pretrained_int4_agrees_with_f32():
    f32 = Encoder.pretrained(precision="f32").encode(UTTERANCES)
    q4 = Encoder.pretrained(precision="int4").encode(UTTERANCES)
    cos = np.sum(f32 * q4, 1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(q4, axis=1))
    assert cos.mean() >= 0.99
    assert Encoder.pretrained().weight_bytes <= 4_000_000


def test_pretrained_embeddings_carry_meaning():
    enc = Encoder.pretrained()
    v = enc.encode(["i lost my card", "my card is missing", "play some jazz music"])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert v[0] @ v[1] > v[0] @ v[2]

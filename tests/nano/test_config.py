"""NanoConfig: seed defaults, parameter count, validation messages, dict round-trip."""
import pytest

from slm360_rasa.nano.config import ConfigError, NanoConfig


def test_seed_defaults_and_parameter_count():
    c = NanoConfig()
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == (
        8192, 256, 6, 8, 4, 682, 512)
    assert c.head_dim == 32 and c.kv_dim == 128
    # 8192*256 embedding + 6 * (2*256 norms + 2*256*256 + 2*128*256 + 3*682*256) + 256 final norm
    assert c.n_params == 6_422_784
    assert round(c.n_params / 1e6, 1) == 6.4


@pytest.mark.parametrize("kw,field", [
    ({"dim": 0}, "dim"),
    ({"n_layers": -1}, "n_layers"),
    ({"vocab_size": 3.5}, "vocab_size"),
    ({"n_heads": 7}, "n_heads"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"pad_id": 9000}, "pad_id"),
    ({"dim": 24, "n_heads": 8, "n_kv_heads": 4}, "even"),
])
def test_validation_names_the_bad_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        NanoConfig(**kw)


def test_dict_round_trip_and_unknown_keys():
    c = NanoConfig(n_layers=2)
    assert NanoConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown key.*'n_experts'"):
        NanoConfig.from_dict({**c.to_dict(), "n_experts": 4})

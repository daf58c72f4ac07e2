"""Shared value checks (slm360_rasa/checks.py)."""
import math

import numpy as np
import pytest

from slm360_rasa.checks import check_choice, check_int, check_number, dataclass_from_dict, is_int, is_number
from slm360_rasa.nano.config import ConfigError, NanoConfig


def test_bools_are_neither_integers_nor_numbers():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(np.float32(0.5)) and not is_number(False) and not is_number("1")


@pytest.mark.parametrize("lo,hi,text", [(1, None, "a positive integer"), (0, None, "an integer >= 0"),
                                        (3, 512, r"an integer in \[3, 512\]"), (None, None, "an integer")])
def test_check_int_names_the_range(lo, hi, text):
    assert check_int("n", 5, lo, hi) == 5
    with pytest.raises(ValueError, match=f"n must be {text}, got True"):
        check_int("n", True, lo, hi)


def test_check_number_bounds_and_optional():
    assert check_number("x", 0.5, 0, 1) == 0.5 and check_number("x", None, optional=True) is None
    for bad in (0.0, 1.5, math.nan, math.inf, "0.5", None):
        with pytest.raises(ValueError, match="x must be in \\(0, 1\\]"):
            check_number("x", bad, 0, 1, lo_open=True)
    with pytest.raises(ConfigError, match="or null"):
        check_number("x", -1, 0, optional=True, error=ConfigError)


def test_check_choice_and_the_unknown_key_policy():
    assert check_choice("p", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"p must be one of \['a', 'b'\], got 'c'"):
        check_choice("p", "c", ("a", "b"))
    with pytest.raises(ConfigError, match=r"NanoConfig: unknown key\(s\) \['n_experts'\]"):
        dataclass_from_dict(NanoConfig, {"n_experts": 8}, "NanoConfig", error=ConfigError)
    with pytest.raises(ValueError, match="must be a mapping"):
        dataclass_from_dict(NanoConfig, [1], "NanoConfig")

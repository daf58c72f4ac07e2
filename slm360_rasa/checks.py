"""Shared value checks and the one unknown-key policy of every config dataclass.

`bool` is a subclass of `int` in Python, so `isinstance(True, int)` holds and a YAML
`epochs: yes` would pass a naive check; every integer and number check here excludes it.
Messages name the setting, the range allowed and the value given, because they reach
users through config.yml and model files.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping, Optional, Type, TypeVar

import numpy as np

T = TypeVar("T")


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite-or-not real number (Python or numpy int/float), not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _int_range(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    if lo == 1:
        return "a positive integer"
    if lo is not None:
        return f"an integer >= {lo}"
    if hi is not None:
        return f"an integer <= {hi}"
    return "an integer"


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None,
              error: Type[Exception] = ValueError) -> int:
    """`v` as an int if it is an integer in [lo, hi] (either bound optional), else `error`
    saying "`name` must be <range>, got <v>"."""
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise error(f"{name} must be {_int_range(lo, hi)}, got {v!r}")
    return int(v)


def check_number(name: str, v: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, optional: bool = False, what: str = "",
                 error: Type[Exception] = ValueError) -> Optional[float]:
    """`v` as a float if it is a number in the interval (bounds open or closed as given;
    infinite bounds mean "finite"), None if `optional` and `v` is None, else `error` naming
    `name`, the interval and `v`. `what` adds a hint on the unit after the interval."""
    if v is None and optional:
        return None
    ok = is_number(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        if math.isinf(lo) and math.isinf(hi):
            span = "a finite number"
        elif math.isinf(hi):
            span = f"a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        hint = f" {what}" if what else ""
        none = " or null" if optional else ""
        raise error(f"{name} must be {span}{hint}{none}, got {v!r}")
    return float(v)


def check_choice(name: str, v: Any, choices, error: Type[Exception] = ValueError) -> Any:
    """`v` if it is one of `choices`, else `error` listing them."""
    if v not in choices:
        raise error(f"{name} must be one of {list(choices)}, got {v!r}")
    return v


def dataclass_from_dict(cls: Type[T], d: Mapping[str, Any], where: str, error: Type[Exception] = ValueError) -> T:
    """`cls(**d)` for a dataclass, with THE unknown-key policy of the package: a key the
    dataclass does not have is an error naming it and the known keys (a typo in config.yml
    or a file written by another version must not be silently ignored)."""
    if not isinstance(d, Mapping):
        raise error(f"{where} must be a mapping, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**d)

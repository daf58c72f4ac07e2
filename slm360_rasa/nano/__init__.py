"""SLM360 Nano engine: numpy + numba + tokenizers only (never imports Rasa).

    from slm360_rasa.nano import Encoder
    enc = Encoder.pretrained()          # INT4
    enc.encode(["hello there"])          # (1, 256) float32

`Encoder` and `TokenStates` are imported on first access: reading a config, a checkpoint
or the tokenizer does not pull in numba and its LLVM (about 50 MB of memory).
"""
from .config import ConfigError, NanoConfig

_LAZY = {"Encoder": "runtime", "TokenStates": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "Encoder", "NanoConfig", "TokenStates"]

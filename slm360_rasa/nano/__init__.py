"""SLM360 Nano engine: numpy + numba + tokenizers only (never imports Rasa).

    from slm360_rasa.nano import Encoder
    enc = Encoder.pretrained()          # INT4
    enc.encode(["hello there"])          # (1, 256) float32
"""
from .config import ConfigError, NanoConfig
from .runtime import Encoder, TokenStates

__all__ = ["ConfigError", "Encoder", "NanoConfig", "TokenStates"]

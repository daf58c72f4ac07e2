"""`NanoConfig`: the SLM360 Nano architecture as one typed, validated dataclass.

The defaults are the binding seed spec (vocab 8,192, dim 256, 6 layers, GQA 8/4 heads,
SwiGLU 256 -> 682 -> 256, RoPE, RMSNorm, max length 512). The config is saved as JSON
beside the weights, so a checkpoint always states the shape of the model it holds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

from ..checks import check_int, check_number, dataclass_from_dict

# Weights an encoder can run with (nano/runtime.py): 4-bit group-wise codes or float32.
PRECISIONS = ("int4", "f32")
# Sequence length bounds, [CLS] and [SEP] included: the seed spec's maximum, and the
# shortest sequence that still holds one real token.
MAX_SEQ_LEN = 512
MIN_SEQ_LEN = 3


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class NanoConfig:
    """Architecture of an SLM360 Nano encoder (docs/DESIGN.md, "The encoder")."""

    vocab_size: int = 8192  # WordPiece vocabulary, shipped as nano/assets/tokenizer.json
    dim: int = 256  # model width
    n_layers: int = 6  # encoder blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 4  # key/value heads (GQA: each serves n_heads // n_kv_heads queries)
    hidden_dim: int = 682  # SwiGLU inner width (about 8/3 * dim, as in LLaMA)
    max_seq_len: int = MAX_SEQ_LEN  # longer inputs are truncated with a warning
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    pad_id: int = 0  # id of [PAD] in the tokenizer

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            check_int(f"NanoConfig.{name}", getattr(self, name), lo=1, error=ConfigError)
        for name in ("norm_eps", "rope_theta"):
            check_number(f"NanoConfig.{name}", getattr(self, name), 0, lo_open=True, error=ConfigError)
        if self.dim % self.n_heads:
            raise ConfigError(
                f"NanoConfig.dim ({self.dim}) must be divisible by NanoConfig.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"NanoConfig.n_kv_heads ({self.n_kv_heads}) must divide NanoConfig.n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"NanoConfig.dim / n_heads = {self.head_dim} must be even: RoPE rotates pairs of dimensions"
            )
        check_int("NanoConfig.pad_id", self.pad_id, lo=0, hi=self.vocab_size - 1, error=ConfigError)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Total width of the key (or value) projection."""
        return self.n_kv_heads * self.head_dim

    def param_shapes(self) -> Dict[str, tuple]:
        """Name -> shape of every parameter, in llama2.c naming; linear weights are (out, in)."""
        shapes: Dict[str, tuple] = {"tok_embeddings": (self.vocab_size, self.dim)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention_norm"] = (self.dim,)
            shapes[p + "wq"] = (self.dim, self.dim)
            shapes[p + "wk"] = (self.kv_dim, self.dim)
            shapes[p + "wv"] = (self.kv_dim, self.dim)
            shapes[p + "wo"] = (self.dim, self.dim)
            shapes[p + "ffn_norm"] = (self.dim,)
            shapes[p + "w1"] = (self.hidden_dim, self.dim)
            shapes[p + "w2"] = (self.dim, self.hidden_dim)
            shapes[p + "w3"] = (self.hidden_dim, self.dim)
        shapes["norm"] = (self.dim,)
        return shapes

    @property
    def n_params(self) -> int:
        """Total number of parameters."""
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict, JSON-serialisable."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NanoConfig":
        """Build from a dict; unknown keys are an error (they signal a foreign or newer file)."""
        return dataclass_from_dict(cls, d, "NanoConfig", error=ConfigError)

"""`Encoder`: SLM360 Nano inference through the numba kernels, f32 or INT4.

    from slm360_rasa.nano import Encoder
    enc = Encoder.pretrained()                 # INT4, the shipped checkpoint
    vecs = enc.encode(["book a table for two"])  # (1, 256) float32
    states = enc.token_states(["hi there"])     # token vectors + character offsets

Texts are tokenized, sorted by length and packed (no padding) into chunks of at most
`batch_tokens` tokens; all activation buffers are allocated once and grown only when a
larger chunk arrives. A lock serialises calls, because the buffers are shared.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numba
import numpy as np

from .config import PRECISIONS, NanoConfig
from .kernels import EncoderWeights, LinearStack, Scratch, encoder_forward, repack_q4
from .model import Params, init_params, rope_cos_sin
from .quant import CODES_SUFFIX, Q4Tensor, QuantError, float_params, padded_width, q4_from_tensors, quantize_q4

logger = logging.getLogger(__name__)


@dataclass
class TokenStates:
    """Token-level output for one text: states (T, C), ids (T,), char offsets (T, 2) into the text."""

    states: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    truncated: bool


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


class Encoder:
    """SLM360 Nano encoder running on the numba kernels."""

    def __init__(self, config: NanoConfig, tokenizer=None, precision: str = "int4",
                 params: Optional[Params] = None, q4_tensors: Optional[Dict[str, np.ndarray]] = None,
                 batch_tokens: int = 4096, max_length: Optional[int] = None,
                 parallel_min_tokens: int = 64):
        """Build from float parameters (`params`) or from stored INT4 tensors (`q4_tensors`).

        Prefer the constructors `random`, `from_checkpoint` and `pretrained`.
        With `precision="int4"` and float params, weights are quantized here and the error of
        each matrix is kept in `quant_errors`. With `q4_tensors`, precision "f32" runs the
        dequantized weights (useful to separate quantization error from kernel error).
        Inputs of fewer than `parallel_min_tokens` tokens run on one thread: a single short
        utterance gains little from two, and an OpenMP barrier waiting on a core that another
        process holds can cost tens of milliseconds (results are identical either way).
        """
        self.config = config
        self.precision = _check_precision(precision)
        if tokenizer is None:
            from .tokenizer import NanoTokenizer

            tokenizer = NanoTokenizer.load()
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.max_length = min(max_length or config.max_seq_len, config.max_seq_len)
        if batch_tokens < self.max_length:
            raise ValueError(f"batch_tokens ({batch_tokens}) must be >= max_length ({self.max_length})")
        self.batch_tokens = int(batch_tokens)
        if parallel_min_tokens < 0:
            raise ValueError(f"parallel_min_tokens must be >= 0, got {parallel_min_tokens}")
        self.parallel_min_tokens = int(parallel_min_tokens)
        self.quant_errors: Dict[str, QuantError] = {}
        if (params is None) == (q4_tensors is None):
            raise ValueError("pass exactly one of params (float weights) or q4_tensors (INT4 weights)")
        if q4_tensors is not None and precision == "f32":
            params, q4_tensors = float_params(q4_tensors, config), None
        arrays = self._pack(params, q4_tensors)
        cos, sin = rope_cos_sin(config.max_seq_len, config.head_dim, config.rope_theta, np.float32)
        self.weights = EncoderWeights.make(
            quantized=self.precision == "int4", n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
            hidden_width=self.hidden_width, eps=config.norm_eps, cos=cos, sin=sin, **arrays)
        self._lock = threading.Lock()
        self._scratch = Scratch.allocate(0, 0, config.dim, config.dim + 2 * config.kv_dim, self.hidden_width)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def random(cls, config: Optional[NanoConfig] = None, seed: int = 0, precision: str = "int4",
               tokenizer=None, **kw) -> "Encoder":
        """A randomly initialised encoder (seeded), e.g. for tests and as a sanity baseline."""
        config = config or NanoConfig()
        return cls(config, tokenizer=tokenizer, precision=precision, params=init_params(config, seed), **kw)

    @classmethod
    def from_params(cls, params: Params, config: NanoConfig, precision: str = "int4", tokenizer=None,
                    **kw) -> "Encoder":
        """An encoder from float parameters (for example right after training)."""
        return cls(config, tokenizer=tokenizer, precision=precision, params=params, **kw)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], precision: str = "int4", tokenizer=None,
                        **kw) -> "Encoder":
        """Load a checkpoint written by `nano.checkpoint.save_checkpoint` (float or INT4 tensors)."""
        from .checkpoint import load_checkpoint
        from .tokenizer import NanoTokenizer

        tokenizer = tokenizer or NanoTokenizer.load()
        ckpt = load_checkpoint(path, expected_tokenizer_sha256=tokenizer.sha256)
        has_q4 = any(name.endswith(CODES_SUFFIX) for name in ckpt.tensors)
        # INT4 runs the stored codes when present (no re-quantization at load); f32 runs the
        # master weights, or the dequantized INT4 weights when a file holds only those.
        if has_q4 and precision == "int4":
            return cls(ckpt.config, tokenizer=tokenizer, precision=precision, q4_tensors=ckpt.tensors, **kw)
        params = float_params(ckpt.tensors, ckpt.config)
        return cls(ckpt.config, tokenizer=tokenizer, precision=precision, params=params, **kw)

    @classmethod
    def pretrained(cls, precision: str = "int4", **kw) -> "Encoder":
        """The checkpoint shipped in the package (nano/assets), INT4 by default."""
        from .assets import pretrained_checkpoint_path

        return cls.from_checkpoint(pretrained_checkpoint_path(), precision=precision, **kw)

    # ------------------------------------------------------------------ weight packing

    def _pack(self, params: Optional[Params], q4: Optional[Dict[str, np.ndarray]]) -> Dict[str, object]:
        """The arrays of `EncoderWeights` for this precision; sets hidden_width, quant_errors, weight_bytes."""
        cfg = self.config
        L, C, H = cfg.n_layers, cfg.dim, cfg.hidden_dim
        quantized = self.precision == "int4"
        # Q4 needs the hidden width padded to whole groups for w2's input; f32 does not.
        Hw = padded_width(H) if quantized else H
        self.hidden_width = Hw

        stored: List[Q4Tensor] = []

        def matrix_q4(name: str, in_features: int) -> Q4Tensor:
            if q4 is not None:
                t = q4_from_tensors(q4, name, in_features)
            else:
                t, self.quant_errors[name] = quantize_q4(params[name])
            stored.append(t)
            return t

        def norm(name: str) -> np.ndarray:
            src = params if params is not None else q4
            if name not in src:
                raise ValueError(f"weights are missing tensor {name!r}")
            return np.ascontiguousarray(src[name], dtype=np.float32)

        def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
            out = np.zeros((rows,) + a.shape[1:], a.dtype)
            out[: a.shape[0]] = a
            return out

        norms = dict(attn_norm=np.stack([norm(f"layers.{i}.attention_norm") for i in range(L)]),  # (L, C)
                     ffn_norm=np.stack([norm(f"layers.{i}.ffn_norm") for i in range(L)]),  # (L, C)
                     final_norm=norm("norm"))
        norm_bytes = 4 * sum(a.size for a in norms.values())
        # Empty stacks for the precision not run keep their rank, so both share one compiled forward.
        no_f32 = np.zeros((L, 0, 0), np.float32)
        no_codes, no_scales = np.zeros((L, 0, 0, 0), np.uint8), np.zeros((L, 0, 0, 0), np.float32)

        if quantized:
            emb = matrix_q4("tok_embeddings", C)
            qkv, wo, w13, w2 = [], [], [], []
            for i in range(L):
                p = f"layers.{i}."
                parts = [matrix_q4(p + n, C) for n in ("wq", "wk", "wv")]
                qkv.append(parts)
                wo.append(matrix_q4(p + "wo", C))
                w1, w3 = matrix_q4(p + "w1", C), matrix_q4(p + "w3", C)
                # Zero rows (code Q4_ZERO, scale 0) extend w1/w3 to the padded hidden width.
                w13.append([Q4Tensor(pad_rows(t.codes, Hw) | np.uint8(0x88) * (np.arange(Hw) >= H)[:, None],
                                     pad_rows(t.scales, Hw), C) for t in (w1, w3)])
                w2.append(matrix_q4(p + "w2", H))

            def stack(groups) -> LinearStack:
                # Planar Q4 rows -> the VNNI tiled layout of kernels.matmul_q8q4 (see kernels.repack_q4).
                tiled = [repack_q4(np.concatenate([t.codes for t in g]), np.concatenate([t.scales for t in g]))
                         for g in groups]
                codes = np.stack([c for c, _ in tiled])  # (L, T, K/QK, 512) uint8
                scales = np.stack([s for _, s in tiled])  # (L, T, K/QK, Q4_TILE) float32
                return LinearStack(no_f32, codes, scales)

            self.weight_bytes_stored = sum(t.nbytes for t in stored) + norm_bytes
            return dict(emb_f32=np.zeros((0, 0), np.float32), emb_codes=emb.codes,
                        emb_scales=emb.scales.astype(np.float32), **norms,
                        wqkv=stack(qkv), wo=stack([[t] for t in wo]), w13=stack(w13), w2=stack([[t] for t in w2]))

        f32 = lambda name: np.ascontiguousarray(params[name], dtype=np.float32)  # noqa: E731

        def stack_f32(parts) -> LinearStack:
            # (L, sum of the parts' rows, K): the parts of one layer's map, concatenated by output.
            return LinearStack(np.stack([np.concatenate([f32(f"layers.{i}.{n}") for n in parts]) for i in range(L)]),
                               no_codes, no_scales)

        self.weight_bytes_stored = 4 * sum(int(np.prod(s)) for s in cfg.param_shapes().values())
        return dict(emb_f32=f32("tok_embeddings"), emb_codes=np.zeros((0, 0), np.uint8),
                    emb_scales=np.zeros((0, 0), np.float32), **norms,
                    wqkv=stack_f32(("wq", "wk", "wv")), wo=stack_f32(("wo",)), w13=stack_f32(("w1", "w3")),
                    w2=stack_f32(("w2",)))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored for this precision (INT4: codes + f16 scales)."""
        return int(self.weight_bytes_stored)

    # ------------------------------------------------------------------ buffers + forward

    def _ensure_capacity(self, n_tokens: int, n_seqs: int) -> None:
        s, cfg = self._scratch, self.config
        if n_tokens > s.n_tokens:
            s = Scratch.allocate(max(n_tokens, 2 * s.n_tokens, 64), s.n_seqs, cfg.dim, cfg.dim + 2 * cfg.kv_dim,
                                 self.hidden_width)
        if n_seqs > s.n_seqs:
            s = s._replace(pooled=np.empty((max(n_seqs, 2 * s.n_seqs, 16), cfg.dim), np.float32))
        self._scratch = s

    def forward_packed(self, ids: np.ndarray, lengths: np.ndarray):
        """Run packed token ids (N,) of sequences with `lengths` (B,).

        Returns (token_states (N, C), pooled (B, C)) as *views of internal buffers*: copy
        them before the next call. Callers normally use `encode` / `token_states`.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        N, B = int(ids.shape[0]), int(lengths.shape[0])
        if lengths.sum() != N or (B and lengths.min() < 1):
            raise ValueError("lengths must be positive and sum to the number of ids")
        if B and lengths.max() > self.config.max_seq_len:
            raise ValueError(f"a sequence is longer than max_seq_len={self.config.max_seq_len}; truncate first")
        if N and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        starts = np.zeros(B + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
        positions = np.arange(N, dtype=np.int64) - np.repeat(starts[:-1], lengths)
        self._ensure_capacity(N, B)
        scratch = self._scratch.head(N, B)
        serial = N < self.parallel_min_tokens
        if serial:
            threads = numba.get_num_threads()
            numba.set_num_threads(1)  # thread-local in numba: other callers are unaffected
        try:
            encoder_forward(ids, starts, positions, self.weights, scratch, numba.get_num_threads() == 1)
        finally:
            if serial:
                numba.set_num_threads(threads)
        return scratch.xn, scratch.pooled

    def _chunks(self, lengths: np.ndarray):
        """Index groups, sorted by length, each holding at most batch_tokens tokens."""
        order = np.argsort(lengths, kind="stable")
        group: List[int] = []
        total = 0
        for i in order:
            n = int(lengths[i])
            if group and total + n > self.batch_tokens:
                yield group
                group, total = [], 0
            group.append(int(i))
            total += n
        if group:
            yield group

    def _tokenize(self, texts: Sequence[str]):
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string (wrap it: [text])")
        return self.tokenizer.encode_batch(list(texts), max_length=self.max_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled sentence embeddings (n, dim) float32 for a list of texts."""
        batch = self._tokenize(texts)
        out = np.empty((len(batch.lengths), self.config.dim), np.float32)
        with self._lock:
            for group in self._chunks(batch.lengths):
                ids = np.concatenate([batch.ids[i, : batch.lengths[i]] for i in group])
                _, pooled = self.forward_packed(ids, batch.lengths[group])
                out[group] = pooled
        return out

    def token_states(self, texts: Sequence[str]) -> List[TokenStates]:
        """Per text: final token states (T, dim) with ids and character offsets (specials at (0, 0))."""
        batch = self._tokenize(texts)
        result: List[Optional[TokenStates]] = [None] * len(batch.lengths)
        with self._lock:
            for group in self._chunks(batch.lengths):
                ids = np.concatenate([batch.ids[i, : batch.lengths[i]] for i in group])
                hidden, _ = self.forward_packed(ids, batch.lengths[group])
                start = 0
                for i in group:
                    n = int(batch.lengths[i])
                    result[i] = TokenStates(
                        states=hidden[start:start + n].copy(),
                        ids=batch.ids[i, :n].copy(),
                        offsets=batch.offsets[i, :n].copy(),
                        truncated=bool(batch.truncated[i]),
                    )
                    start += n
        return result  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Encoder(precision={self.precision!r}, params={self.config.n_params:,}, "
                f"weight_bytes={self.weight_bytes:,})")

"""Numba kernels for SLM360 Nano inference (f32 and INT4). Plain arrays in, plain arrays out.

Tokens of a batch are *packed*: row n of every activation matrix is one real token, and
sequence b owns rows starts[b]:starts[b + 1]. Linear layers therefore never touch padding,
and only attention and pooling look at sequence boundaries.

Conventions (as llama2.c's `matmul`): weights are (out, in) row-major; only the outer loop
of a kernel is parallel (`prange`); every output element is computed by one thread in a
fixed order, so results do not depend on the number of threads.

Modules, by concern:

    layout       block, tile and chunk sizes (the Q4 format constants come from nano/quant.py)
    _ir          LLVM IR builders for the hot loops (explicit 16-lane vectors, stack scratch)
    q8xq4        INT4 path: block_q8 activations x VNNI-tiled Q4 weights, Q4 embedding
    f32          float32 matmuls (encoder and serving heads), f32 embedding
    elementwise  RMSNorm, RoPE, attention, SwiGLU, residual + norm, mean pooling
    forward      the EncoderWeights / Scratch bundles and `encoder_forward`
"""
from .elementwise import add_norm, attention, fast_exp, mean_pool, rmsnorm, rope_inplace, silu_mul
from .f32 import embed_f32, linear_serial, matmul_f32
from .forward import EncoderWeights, LinearStack, Scratch, encoder_forward
from ._ir import HAS_VNNI
from .layout import ATT_TILE, Q4_TILE, Q4_TOKEN_CHUNK, QK, SERIAL_ROWS
from .q8xq4 import dequant_row_q4, embed_q4, matmul_q8q4, quantize_q8, repack_q4

__all__ = [
    "ATT_TILE", "EncoderWeights", "HAS_VNNI", "LinearStack", "Q4_TILE", "Q4_TOKEN_CHUNK", "QK", "SERIAL_ROWS",
    "Scratch", "add_norm", "attention", "dequant_row_q4", "embed_f32", "embed_q4", "encoder_forward", "fast_exp",
    "linear_serial", "matmul_f32", "matmul_q8q4", "mean_pool", "quantize_q8", "repack_q4", "rmsnorm",
    "rope_inplace", "silu_mul",
]

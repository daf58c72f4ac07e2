"""Layout constants shared by the kernels: block sizes, tiles and chunks.

The Q4 block format itself (QK, the zero code) is defined in `nano/quant.py` and only
imported here; everything else is a choice of the kernels (tile and chunk sizes, vector
width), documented where it is used.
"""
import numpy as np

from ..quant import QK
from ..quant import Q4_ZERO as _Q4_ZERO_CODE

HALF_QK = QK // 2  # code bytes per Q4 block (two 4-bit codes per byte)
# As a float: the kernels subtract it from float codes, and numba freezes a global's type.
Q4_ZERO = float(_Q4_ZERO_CODE)

# f32 path
ROW_TILE = 4  # f32: weight rows multiplied together (4 accumulators per token)
TOKEN_CHUNK = 64  # tokens per f32 pass; keeps the x chunk in L1/L2
SERIAL_ROWS = 128  # below this many tokens, element-wise kernels do not fork threads

# Explicit-vector micro-kernels (kernels/_ir.py)
Q4_TILE = 32  # INT4: weight rows per tile (two 16-lane halves in _q8q4_4x32)
MK_WIDTH = Q4_TILE  # columns of _rank1_4x32's accumulator rows
MK_LANES = 16  # float32 lanes per explicit vector in _rank1_4x32 (one zmm register)

# Attention
ATT_TILE = MK_WIDTH  # attention: keys / head dimensions per micro-kernel call (see _attention_job)
ATT_TILE_U = np.uint64(ATT_TILE)  # the same, unsigned (see _attention_job)
ATT_ACC_SIZE = 4 * ATT_TILE  # stack floats for its accumulators

# INT4 path (kernels/q8xq4.py)
Q4_TOKEN_CHUNK = 64  # INT4: tokens per (token chunk, tile) job of matmul_q8q4
Q4_ACC_SIZE = 4 * Q4_TILE  # stack floats for the micro-kernel accumulators
Q8_MAX = 127.0  # largest |xq|
VNNI_QUAD = 4  # inputs per int32 lane of vpdpbusd
Q4_BLOCK_BYTES_T = Q4_TILE * QK // 2  # 512 code bytes per (tile, block)

"""Numba kernels for SLM360 Nano inference (f32 and INT4). Plain arrays in, plain arrays out.

Tokens of a batch are *packed*: row n of every activation matrix is one real token, and
sequence b owns rows starts[b]:starts[b + 1]. Linear layers therefore never touch padding,
and only attention and pooling look at sequence boundaries.

Conventions (as llama2.c's `matmul`): weights are (out, in) row-major; only the outer loop
of a kernel is parallel (`prange`); every output element is computed by one thread in a
fixed order, so results do not depend on the number of threads.

INT4 path: Q8 activations x Q4 weights
--------------------------------------
quant.py stores a matrix W (M, K) planar, ggml q4_0 nibble order: codes (M, K/2) uint8
where byte 16b + j of a row holds weight 32b + j (low nibble) and 32b + 16 + j (high
nibble), scales (M, K/QK) f16, weight = (code - 8) * scale. `repack_q4` (run once at load
by the runtime) retiles the same 4-bit codes for integer dot products, and each INT4
matmul first quantizes its input to 8 bits per block of 32 (`quantize_q8`, ggml's
q4_0 x q8_0 scheme): the products are then exact int32 sums, 64 multiply-adds per
AVX512-VNNI instruction (vpdpbusd) with no per-weight dequantization, scaled to float once
per block. The byte layout, the nibble order and the arithmetic are documented at
`repack_q4` below. Measured at 12 tokens: 1.5-2.6x faster than dequantizing the weights to
float32 and multiplying in FMA (the previous kernel), at an extra relative error of about
0.2 % per matmul (block_q8 rounding).

numba/LLVM notes that shaped this code: SLP vectorization is off in numba, so only
innermost loops vectorize, and only 256 bits wide on Cascade Lake; 32-wide inner loops
with a constant trip count get fully unrolled into scalar code. The hot loops are
therefore explicit 16-lane LLVM IR (`_q8q4_4x32`, `_q8_block`, and `_rank1_4x32` for
attention); scratch arrays are stack allocas (`_stack_f32`) so LLVM knows they alias
nothing and keeps accumulators in registers.

The token embedding table keeps the planar layout (rows are gathered, not multiplied).
"""
import math

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

QK = 32  # must equal quant.QK
HALF_QK = QK // 2
Q4_ZERO = 8.0
ROW_TILE = 4  # f32: weight rows multiplied together (4 accumulators per token)
TOKEN_CHUNK = 64  # tokens per f32 pass; keeps the x chunk in L1/L2
SERIAL_ROWS = 128  # below this many tokens, element-wise kernels do not fork threads
Q4_TILE = 32  # INT4: weight rows per tile (two 16-lane halves in _q8q4_4x32)
MK_WIDTH = Q4_TILE  # columns of _rank1_4x32's accumulator rows
MK_LANES = 16  # float32 lanes per explicit vector in _rank1_4x32 (one zmm register)
ATT_TILE = MK_WIDTH  # attention: keys / head dimensions per micro-kernel call (see _attention_job)
ATT_TILE_U = np.uint64(ATT_TILE)  # the same, unsigned (see _attention_job)
ATT_ACC_SIZE = 4 * ATT_TILE  # stack floats for its accumulators
Q4_TOKEN_CHUNK = 64  # INT4: tokens per (token chunk, tile) job of matmul_q8q4
Q4_ACC_SIZE = 4 * Q4_TILE  # stack floats for the micro-kernel accumulators


@intrinsic
def _i32_as_f32(typingctx, i):
    """Reinterpret the bits of an int32 as a float32 (an LLVM bitcast: free, vectorizable)."""
    if not isinstance(i, types.Integer) or i.bitwidth != 32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(i), codegen


# exp(x) = 2^n * e^g with n = round(x log2 e), g = x - n ln 2 in [-ln2/2, ln2/2]; e^g by
# its Taylor series to g^7 (truncation error < 3e-9 relative, below float32's 6e-8), 2^n
# by writing n + 127 into the exponent bits. Plain float/int arithmetic, so LLVM
# vectorizes loops that call it (math.exp stays a scalar libm call without Intel's SVML).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two: n * _LN2_HI is exact in float32
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MAX = np.float32(88.0)  # e^88 < float32 max; 2^127 is the largest scale we build
_EXP_MIN = np.float32(-87.0)  # e^-87 > smallest normal float32; below it we flush to ~0


@njit(cache=True, fastmath=True, inline="always")
def fast_exp(x):
    """float32 e^x within 4e-7 relative error for x in [-87, 88] (clamped outside), vectorizable."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    g = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * g + np.float32(1.0 / 720.0)
    p = p * g + np.float32(1.0 / 120.0)
    p = p * g + np.float32(1.0 / 24.0)
    p = p * g + np.float32(1.0 / 6.0)
    p = p * g + np.float32(0.5)
    p = p * g + np.float32(1.0)
    p = p * g + np.float32(1.0)
    return p * _i32_as_f32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(cache=True, fastmath=True)
def dequant_row_q4(codes_row, scales_row, out_row):
    """Unpack one Q4 row: codes (in_p/2,) uint8, scales (in_p/QK,) f32 -> out (in_p,) f32."""
    for b in range(scales_row.shape[0]):
        d = scales_row[b]
        cb = b * HALF_QK
        ob = b * QK
        for j in range(HALF_QK):
            byte = codes_row[cb + j]
            out_row[ob + j] = (np.float32(byte & 15) - Q4_ZERO) * d
            out_row[ob + j + HALF_QK] = (np.float32(byte >> 4) - Q4_ZERO) * d


@njit(cache=True, fastmath=True)
def _tile_dot(x, w, n_rows, c0, c1, m0, out):
    """out[n, m0 + r] = x[n] . w[r] for n in [c0, c1), r < n_rows; w is (ROW_TILE, K).

    Full tiles use 4 tokens x 4 rows = 16 independent accumulators: with fewer, the loop
    waits on FMA latency instead of issuing two FMAs per cycle.
    """
    K = x.shape[1]
    n = c0
    if n_rows == ROW_TILE:
        while n + 4 <= c1:
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for k in range(K):
                w0 = w[0, k]
                w1 = w[1, k]
                w2 = w[2, k]
                w3 = w[3, k]
                x0 = x[n, k]
                x1 = x[n + 1, k]
                x2 = x[n + 2, k]
                x3 = x[n + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
                a20 += x2 * w0
                a21 += x2 * w1
                a22 += x2 * w2
                a23 += x2 * w3
                a30 += x3 * w0
                a31 += x3 * w1
                a32 += x3 * w2
                a33 += x3 * w3
            out[n, m0] = a00
            out[n, m0 + 1] = a01
            out[n, m0 + 2] = a02
            out[n, m0 + 3] = a03
            out[n + 1, m0] = a10
            out[n + 1, m0 + 1] = a11
            out[n + 1, m0 + 2] = a12
            out[n + 1, m0 + 3] = a13
            out[n + 2, m0] = a20
            out[n + 2, m0 + 1] = a21
            out[n + 2, m0 + 2] = a22
            out[n + 2, m0 + 3] = a23
            out[n + 3, m0] = a30
            out[n + 3, m0 + 1] = a31
            out[n + 3, m0 + 2] = a32
            out[n + 3, m0 + 3] = a33
            n += 4
    for r in range(n_rows):
        for t in range(n, c1):
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[t, k] * w[r, k]
            out[t, m0 + r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def matmul_f32(x, w, out):
    """out (N, M) = x (N, K) @ w.T, w (M, K) float32."""
    N = x.shape[0]
    M = w.shape[0]
    n_tiles = (M + ROW_TILE - 1) // ROW_TILE
    for c0 in range(0, N, TOKEN_CHUNK):
        c1 = min(N, c0 + TOKEN_CHUNK)
        for t in prange(n_tiles):
            m0 = t * ROW_TILE
            _tile_dot(x, w[m0:m0 + ROW_TILE], min(ROW_TILE, M - m0), c0, c1, m0, out)


@intrinsic
def _rank1_4x32(typingctx, acc, w, w_row, w_col, kn, x, n0, n1, n2, n3, x_col):
    """acc[i, r] += sum over k < kn of x[n_i, x_col + k] * w[w_row + k, w_col + r] for i < 4, r < 32.

    The micro-kernel of attention (scores and weighted values), LLVM IR on <16 x float>
    vectors. Why not a numba loop: numba's LLVM targets Cascade Lake with a preferred vector
    width of 256 bits, so its vectorizer never uses the 512-bit registers. Explicit 16-lane
    vectors are lowered to zmm FMAs where AVX-512 exists (measured 1.3-1.45x faster than the
    numba loop, when this kernel ran the INT4 matmuls) and split into ymm or xmm halves elsewhere, with the same result: every lane
    sums its k terms in order 0..kn-1, exactly as the scalar loop did (outputs bit-identical).

    acc: (4, 32) float32 (rows may be strided); w rows w_row.. and x rows n0..n3 must be
    contiguous along the 32 columns / the kn inputs. The 8 accumulators (4 rows x 2 halves)
    stay in registers for the whole k loop; acc is read once before and written once after.
    """
    if not (isinstance(acc, types.Array) and isinstance(w, types.Array) and isinstance(x, types.Array)):
        return None
    ints = (w_row, w_col, kn, n0, n1, n2, n3, x_col)
    if not all(isinstance(t, types.Integer) for t in ints):
        return None

    def codegen(context, builder, sig, args):
        acc_v, w_v, w_row_v, w_col_v, kn_v, x_v, n0_v, n1_v, n2_v, n3_v, x_col_v = args
        vty = ir.VectorType(ir.FloatType(), MK_LANES)
        vpt = vty.as_pointer()
        i64 = ir.IntType(64)
        halves = MK_WIDTH // MK_LANES

        def as_i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)

        def item(ai, array, inds):
            return cgutils.get_item_pointer(context, builder, sig.args[ai], array, inds)

        acc_a = context.make_array(sig.args[0])(context, builder, acc_v)
        w_a = context.make_array(sig.args[1])(context, builder, w_v)
        x_a = context.make_array(sig.args[5])(context, builder, x_v)
        four = ir.Constant(i64, 4)  # bytes per float32: strides are in bytes
        acc_stride = builder.sdiv(builder.extract_value(acc_a.strides, 0), four)
        w_stride = builder.sdiv(builder.extract_value(w_a.strides, 0), four)
        acc0 = item(0, acc_a, [ir.Constant(i64, 0), ir.Constant(i64, 0)])
        w0 = item(1, w_a, [as_i64(2), as_i64(3)])
        xs = [item(5, x_a, [as_i64(6 + i), as_i64(10)]) for i in range(4)]
        slots = [builder.bitcast(builder.gep(acc0, [builder.add(builder.mul(ir.Constant(i64, i), acc_stride),
                                                                ir.Constant(i64, h * MK_LANES))]), vpt)
                 for i in range(4) for h in range(halves)]
        init = [builder.load(p, align=4) for p in slots]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                             f"llvm.fma.v{MK_LANES}f32")
        splat = ir.Constant(ir.VectorType(ir.IntType(32), MK_LANES), [0] * MK_LANES)
        undef = ir.Constant(vty, ir.Undefined)
        n_k = as_i64(4)
        entry = builder.basic_block
        loop = builder.append_basic_block("rank1.loop")
        done = builder.append_basic_block("rank1.done")
        builder.cbranch(builder.icmp_signed(">", n_k, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for v in init:
            phi = builder.phi(vty)
            phi.add_incoming(v, entry)
            accs.append(phi)
        w_row_ptr = builder.gep(w0, [builder.mul(k, w_stride)])
        ws = [builder.load(builder.bitcast(builder.gep(w_row_ptr, [ir.Constant(i64, h * MK_LANES)]), vpt), align=4)
              for h in range(halves)]
        new = []
        for i in range(4):
            xv = builder.load(builder.gep(xs[i], [k]))
            xb = builder.shuffle_vector(builder.insert_element(undef, xv, ir.Constant(ir.IntType(32), 0)), undef, splat)
            new += [builder.call(fma, [xb, ws[h], accs[i * halves + h]]) for h in range(halves)]
        k1 = builder.add(k, ir.Constant(i64, 1))
        k.add_incoming(k1, loop)
        for phi, v in zip(accs, new):
            phi.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", k1, n_k), loop, done)

        builder.position_at_end(done)
        outs = []
        for v0, v1 in zip(init, new):  # all phis first: LLVM wants them at the top of the block
            phi = builder.phi(vty)
            phi.add_incoming(v0, entry)
            phi.add_incoming(v1, loop)
            outs.append(phi)
        for p, v in zip(slots, outs):
            builder.store(v, p, align=4)
        return context.get_dummy_value()

    return types.void(acc, w, w_row, w_col, kn, x, n0, n1, n2, n3, x_col), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to `n` float32 on the stack (n must be a literal int).

    Scratch for the INT4 matmul's and attention's micro-kernel accumulators. Unlike np.empty
    (heap, opaque to LLVM), an alloca provably aliases nothing else, so LLVM needs no runtime
    overlap checks around the loops that copy it.
    """
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=size)

    return types.CPointer(types.float32)(n), codegen


# ---------------------------------------------------------------------- Q8 x Q4 (INT4 path)
#
# Activations: block_q8 (as ggml's block_q8_0). Before each INT4 matmul, every token's
# input row is quantized in blocks of QK = 32 along the input, like the weights:
#
#     xs[n, g]    float32  d = max |x[n, 32 g : 32 g + 32]| * float32(1/127)   (0 for a zero block)
#     xq[n, k]    int8     x[n, k] / d rounded half to even, in [-127, 127]
#     xsum8[n, g] int32    Q4_ZERO * sum of block g's xq (the weights' zero-point term)
#
# so x[n, k] ~ xq[n, k] * xs[n, k // 32] with an error of at most d / 2 per element.
#
# Weights: tiled for VNNI (`repack_q4`). vpdpbusd multiplies 4 adjacent unsigned bytes of
# one operand with 4 signed bytes of the other and adds the 4 products to an int32 lane.
# Lanes run across 16 output rows, each lane's 4 bytes are 4 consecutive inputs (a
# "k-quad"); the activation quad is broadcast to all lanes. Per tile of Q4_TILE = 32 rows
# and block g the codes are 512 bytes, [jp][h][r][q] (jp < 4, h < 2, r < 16, q < 4):
#
#     byte codes_t[t, g, 128 jp + 64 h + 4 r + q]
#         low nibble  = code of row 32 t + 16 h + r, input 32 g + 4 (2 jp)     + q
#         high nibble = code of row 32 t + 16 h + r, input 32 g + 4 (2 jp + 1) + q
#     scales_t[t, g, r] float32 = scale of row 32 t + r, block g
#
# so one 64-byte load is two zmm of codes (mask / shift) for quads 2 jp and 2 jp + 1 of 16
# rows. Codes stay 4-bit (0..15, unsigned, as stored): with w = (c - 8) d_w,
#
#     out[n, m] = sum_g d_w[m, g] xs[n, g] (sum_k c[m, k] xq[n, k] - 8 sum_k xq[n, k])
#
# where the inner sum is exact int32 arithmetic (|.| <= 32 * 15 * 127). Rows past M are
# padding: code 8, scale 0. The integer part does not depend on the instruction set: where
# the CPU has no AVX512-VNNI the same sums come from a generic widening multiply-add
# (`_dpbusd`), and the float epilogue is the same IR, so results are identical.

Q8_MAX = 127.0  # largest |xq|
VNNI_QUAD = 4  # inputs per int32 lane of vpdpbusd
Q4_BLOCK_BYTES_T = Q4_TILE * QK // 2  # 512 code bytes per (tile, block)


def _host_has_vnni() -> bool:
    """Whether numba compiles for a CPU with AVX512-VNNI (host CPU unless NUMBA_CPU_NAME is set)."""
    from numba.core import config as nconfig

    if nconfig.CPU_NAME:  # a fixed target (portable caches): trust only its explicit features
        return "+avx512vnni" in (nconfig.CPU_FEATURES or "")
    from llvmlite import binding as llvm

    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx512vnni", False)) and bool(feats.get("avx512bw", False))


HAS_VNNI = int(_host_has_vnni())  # an int: numba passes int globals to intrinsics as literals


@intrinsic
def _q8_block(typingctx, x, xq, xs, xsum8, n, g):
    """block_q8 of x[n, 32 g : 32 g + 32] into xq[n, same], xs[n, g], xsum8[n, g].

    LLVM IR on two 16-lane halves: |x| max-reduced, x * (127 / amax) rounded half to even
    (llvm.rint: one vrndscaleps, exact), converted and truncated to int8, the codes summed.
    A numba loop of 32 was fully unrolled into scalar code (1.9 ns per element, measured).
    x (N, K) float32, xq (N, K) int8 with contiguous rows; xs (N, G) float32, xsum8 (N, G) int32.
    """
    if not all(isinstance(a, types.Array) for a in (x, xq, xs, xsum8)):
        return None
    if not (isinstance(n, types.Integer) and isinstance(g, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i64, i32, f32 = ir.IntType(64), ir.IntType(32), ir.FloatType()
        lanes = MK_LANES
        f32v = ir.VectorType(f32, lanes)
        i32v = ir.VectorType(i32, lanes)
        i8v = ir.VectorType(ir.IntType(8), lanes)
        mod = builder.module

        def fn(name, ret, argtys):
            return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, argtys), name)

        arrs = [context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4)]
        n64 = context.cast(builder, args[4], sig.args[4], types.int64)
        g64 = context.cast(builder, args[5], sig.args[5], types.int64)
        k0 = builder.mul(g64, ir.Constant(i64, QK))
        xp = builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[0], arrs[0], [n64, k0]),
                             f32v.as_pointer())
        qp = builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[1], arrs[1], [n64, k0]),
                             i8v.as_pointer())
        halves = [builder.load(builder.gep(xp, [ir.Constant(i64, h)]), align=4) for h in range(QK // lanes)]
        fabs = fn(f"llvm.fabs.v{lanes}f32", f32v, [f32v])
        fmax = fn(f"llvm.maxnum.v{lanes}f32", f32v, [f32v, f32v])
        rmax = fn(f"llvm.vector.reduce.fmax.v{lanes}f32", f32, [f32v])
        rint = fn(f"llvm.rint.v{lanes}f32", f32v, [f32v])
        radd = fn(f"llvm.vector.reduce.add.v{lanes}i32", i32, [i32v])
        amax = builder.call(rmax, [builder.call(fmax, [builder.call(fabs, [halves[0]]),
                                                       builder.call(fabs, [halves[1]])])])
        positive = builder.fcmp_ordered(">", amax, ir.Constant(f32, 0.0))
        inv = builder.select(positive, builder.fdiv(ir.Constant(f32, Q8_MAX), amax), ir.Constant(f32, 0.0))
        undef = ir.Constant(f32v, ir.Undefined)
        inv_v = builder.shuffle_vector(builder.insert_element(undef, inv, ir.Constant(i32, 0)), undef,
                                       ir.Constant(i32v, [0] * lanes))
        total = ir.Constant(i32v, [0] * lanes)
        for h, v in enumerate(halves):
            q = builder.fptosi(builder.call(rint, [builder.fmul(v, inv_v)]), i32v)
            builder.store(builder.trunc(q, i8v), builder.gep(qp, [ir.Constant(i64, h)]), align=1)
            total = builder.add(total, q)
        s = builder.mul(builder.call(radd, [total]), ir.Constant(i32, int(Q4_ZERO)))
        # d = amax * (1/127), a multiplication: numba's fastmath pass marks every float
        # instruction, including ours, so a division by 127 would be rewritten anyway.
        builder.store(builder.fmul(amax, ir.Constant(f32, float(np.float32(1.0 / Q8_MAX)))),
                      cgutils.get_item_pointer(context, builder, sig.args[2], arrs[2], [n64, g64]))
        builder.store(s, cgutils.get_item_pointer(context, builder, sig.args[3], arrs[3], [n64, g64]))
        return context.get_dummy_value()

    return types.void(x, xq, xs, xsum8, n, g), codegen


@njit(cache=True, fastmath=True)
def _quantize_q8_row(x, xq, xs, xsum8, n):
    """block_q8 of row n of x (see above) into xq[n], xs[n], xsum8[n]."""
    for g in range(x.shape[1] // QK):
        _q8_block(x, xq, xs, xsum8, n, g)


@njit(parallel=True, cache=True, fastmath=True)
def quantize_q8(x, xq, xs, xsum8):
    """Quantize activations x (N, K) f32 to block_q8: xq (N, K) int8, xs / xsum8 (N, K/QK)."""
    for n in prange(x.shape[0]):
        _quantize_q8_row(x, xq, xs, xsum8, n)


@njit(cache=True, fastmath=True)
def quantize_q8_serial(x, xq, xs, xsum8):
    """quantize_q8 on this thread (short inputs: no parallel region)."""
    for n in range(x.shape[0]):
        _quantize_q8_row(x, xq, xs, xsum8, n)


def repack_q4(codes, scales):
    """Planar Q4 (quant.py) -> the VNNI tiled layout above; pure numpy, once at load.

    codes (M, K/2) uint8, scales (M, K/QK) -> codes (T, K/QK, 512) uint8 and scales
    (T, K/QK, Q4_TILE) float32 with T = ceil(M / Q4_TILE); padding rows are code 8, scale 0.
    """
    M, half_k = codes.shape
    G = scales.shape[1]
    if half_k != G * HALF_QK:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} disagree (QK={QK})")
    T = (M + Q4_TILE - 1) // Q4_TILE
    c = np.full((T * Q4_TILE, G, HALF_QK), 0x88, np.uint8)
    c[:M] = codes.reshape(M, G, HALF_QK)
    # ggml nibble order -> one code per input: block byte j holds inputs j and j + 16.
    full = np.concatenate([c & 15, c >> 4], axis=2)  # (T*32, G, QK) codes 0..15
    full = full.reshape(T, 2, 16, G, 4, 2, VNNI_QUAD)  # (t, h, r, g, jp, nibble, q)
    full = full.transpose(0, 3, 4, 1, 2, 6, 5)  # (t, g, jp, h, r, q, nibble)
    packed = (full[..., 0] | (full[..., 1] << 4)).astype(np.uint8)  # (t, g, jp, h, r, q)
    codes_t = np.ascontiguousarray(packed.reshape(T, G, Q4_BLOCK_BYTES_T))
    s = np.zeros((T * Q4_TILE, G), np.float32)
    s[:M] = scales
    scales_t = np.ascontiguousarray(s.reshape(T, Q4_TILE, G).transpose(0, 2, 1))
    return codes_t, scales_t


def _dpbusd(builder, acc, w8, a32, hardware):
    """acc (<16 x i32>) += per lane, the sum of 4 products u8(w8 bytes) * s8(a32 bytes).

    `hardware`: one vpdpbusd (AVX512-VNNI). Else the same exact integer sums by widening
    (u8 x s8 fits int16; pairs and quads are summed in int32), which LLVM lowers to
    pmaddubsw / pmaddwd-like code on other x86 CPUs and to plain vector code elsewhere.
    """
    i32v = ir.VectorType(ir.IntType(32), MK_LANES)
    if hardware:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32v, [i32v, i32v, i32v]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(w8, i32v), a32])
    n = MK_LANES * VNNI_QUAD
    i16v = ir.VectorType(ir.IntType(16), n)
    a8 = builder.bitcast(a32, ir.VectorType(ir.IntType(8), n))
    prod = builder.mul(builder.zext(w8, i16v), builder.sext(a8, i16v))  # (64,) int16, exact
    undef16 = ir.Constant(i16v, ir.Undefined)
    even = builder.shuffle_vector(prod, undef16, ir.Constant(ir.VectorType(ir.IntType(32), n // 2),
                                                              list(range(0, n, 2))))
    odd = builder.shuffle_vector(prod, undef16, ir.Constant(ir.VectorType(ir.IntType(32), n // 2),
                                                             list(range(1, n, 2))))
    i32w = ir.VectorType(ir.IntType(32), n // 2)
    pairs = builder.add(builder.sext(even, i32w), builder.sext(odd, i32w))  # (32,) int32
    undef32 = ir.Constant(i32w, ir.Undefined)
    sel = ir.VectorType(ir.IntType(32), MK_LANES)
    lo = builder.shuffle_vector(pairs, undef32, ir.Constant(sel, list(range(0, n // 2, 2))))
    hi = builder.shuffle_vector(pairs, undef32, ir.Constant(sel, list(range(1, n // 2, 2))))
    return builder.add(acc, builder.add(lo, hi))


@intrinsic
def _q8q4_4x32(typingctx, acc, codes, scales, t, xq, xs, xsum8, n0, n1, n2, n3, ntok, hardware):
    """acc[i, r] = sum over all blocks g of row (32 t + r) . token n_i, for i < 4, r < 32.

    The micro-kernel of `matmul_q8q4`, LLVM IR on 16-lane vectors (see `_rank1_4x32` for
    why not numba loops). Per block g: 8 loads of 64 code bytes, each split into the
    codes of two k-quads for 16 rows; 4 tokens x 2 row halves x 8 quads = 64 `_dpbusd`
    into 8 int32 accumulators; then per token and half, the zero-point term is subtracted,
    the int32 sum converted to float and FMA'd with d_w * xs into 8 float accumulators that
    stay in registers over all blocks. `hardware` (literal 0/1) selects vpdpbusd.
    `ntok` (literal 1..4) computes only the first ntok tokens (rows 0..ntok-1 of acc): a
    tail of 1-3 tokens then costs 1-3 tokens' work, not 4 (a 13-token utterance wasted 3 of
    its 16 token slots). Each token's sums are the same whatever ntok is.

    codes (T, G, 512) uint8, scales (T, G, 32) float32 (C-contiguous); xq (N, K) int8,
    xs / xsum8 (N, G) with contiguous rows; acc (4, 32) float32 C-contiguous, overwritten.
    """
    arrays = (acc, codes, scales, xq, xs, xsum8)
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    if not all(isinstance(v, types.Integer) for v in (t, n0, n1, n2, n3)):
        return None
    if not isinstance(hardware, types.IntegerLiteral):
        return None
    if not (isinstance(ntok, types.IntegerLiteral) and 1 <= ntok.literal_value <= 4):
        return None
    hw = bool(hardware.literal_value)
    n_tok = ntok.literal_value

    def codegen(context, builder, sig, args):
        acc_v, codes_v, scales_v, t_v, xq_v, xs_v, xsum_v = args[:7]
        i64, i32, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(8)
        lanes = MK_LANES
        f32v = ir.VectorType(ir.FloatType(), lanes)
        i32v = ir.VectorType(i32, lanes)
        i8v = ir.VectorType(i8, lanes * VNNI_QUAD)
        halves = Q4_TILE // lanes
        quads_per_block = QK // VNNI_QUAD  # 8

        def as_i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)

        def arr(i):
            return context.make_array(sig.args[i])(context, builder, args[i])

        def item(i, a, inds):
            return cgutils.get_item_pointer(context, builder, sig.args[i], a, inds)

        zero = ir.Constant(i64, 0)
        c_a, s_a, x_a, xs_a, xm_a, acc_a = arr(1), arr(2), arr(4), arr(5), arr(6), arr(0)
        n_blocks = builder.extract_value(c_a.shape, 1)
        t64 = as_i64(3)
        c_base = builder.bitcast(item(1, c_a, [t64, zero, zero]), i8v.as_pointer())  # 64-byte units
        s_base = builder.bitcast(item(2, s_a, [t64, zero, zero]), f32v.as_pointer())  # 16-float units
        ns = [as_i64(7 + i) for i in range(n_tok)]
        x_rows = [builder.bitcast(item(4, x_a, [n, zero]), i32.as_pointer()) for n in ns]  # k-quads
        xs_rows = [item(5, xs_a, [n, zero]) for n in ns]
        xm_rows = [item(6, xm_a, [n, zero]) for n in ns]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32v, [f32v, f32v, f32v]),
                                             f"llvm.fma.v{lanes}f32")
        undef_i = ir.Constant(i32v, ir.Undefined)
        undef_f = ir.Constant(f32v, ir.Undefined)
        splat0 = ir.Constant(i32v, [0] * lanes)
        low4 = ir.Constant(i8v, [15] * (lanes * VNNI_QUAD))
        shift4 = ir.Constant(i8v, [4] * (lanes * VNNI_QUAD))

        def bcast(v, undef):
            return builder.shuffle_vector(builder.insert_element(undef, v, ir.Constant(i32, 0)), undef, splat0)

        entry = builder.basic_block
        loop = builder.append_basic_block("q8q4.loop")
        done = builder.append_basic_block("q8q4.done")
        builder.cbranch(builder.icmp_signed(">", n_blocks, zero), loop, done)

        builder.position_at_end(loop)
        g = builder.phi(i64)
        g.add_incoming(zero, entry)
        facc = []
        for _ in range(n_tok * halves):
            phi = builder.phi(f32v)
            phi.add_incoming(ir.Constant(f32v, [0.0] * lanes), entry)
            facc.append(phi)
        cg = builder.gep(c_base, [builder.mul(g, ir.Constant(i64, quads_per_block // 2 * halves))])
        q0 = builder.mul(g, ir.Constant(i64, quads_per_block))
        iacc = [ir.Constant(i32v, [0] * lanes)] * (n_tok * halves)
        for jp in range(quads_per_block // 2):
            ws = []
            for h in range(halves):
                v = builder.load(builder.gep(cg, [ir.Constant(i64, jp * halves + h)]), align=1)
                ws.append((builder.and_(v, low4), builder.lshr(v, shift4)))
            for i in range(n_tok):
                a_lo = bcast(builder.load(builder.gep(x_rows[i], [builder.add(q0, ir.Constant(i64, 2 * jp))]),
                                          align=4), undef_i)
                a_hi = bcast(builder.load(builder.gep(x_rows[i], [builder.add(q0, ir.Constant(i64, 2 * jp + 1))]),
                                          align=4), undef_i)
                for h in range(halves):
                    j = i * halves + h
                    iacc[j] = _dpbusd(builder, iacc[j], ws[h][0], a_lo, hw)
                    iacc[j] = _dpbusd(builder, iacc[j], ws[h][1], a_hi, hw)
        sw = [builder.load(builder.gep(s_base, [builder.add(builder.mul(g, ir.Constant(i64, halves)),
                                                            ir.Constant(i64, h))]), align=4)
              for h in range(halves)]
        new = []
        for i in range(n_tok):
            xs_b = bcast(builder.load(builder.gep(xs_rows[i], [g])), undef_f)
            zp = bcast(builder.load(builder.gep(xm_rows[i], [g])), undef_i)
            for h in range(halves):
                j = i * halves + h
                dot = builder.sitofp(builder.sub(iacc[j], zp), f32v)
                new.append(builder.call(fma, [dot, builder.fmul(sw[h], xs_b), facc[j]]))
        g1 = builder.add(g, ir.Constant(i64, 1))
        g.add_incoming(g1, loop)
        for phi, v in zip(facc, new):
            phi.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", g1, n_blocks), loop, done)

        builder.position_at_end(done)
        outs = []
        for v in new:
            phi = builder.phi(f32v)
            phi.add_incoming(ir.Constant(f32v, [0.0] * lanes), entry)
            phi.add_incoming(v, loop)
            outs.append(phi)
        acc0 = builder.bitcast(item(0, acc_a, [zero, zero]), f32v.as_pointer())
        for j, v in enumerate(outs):
            builder.store(v, builder.gep(acc0, [ir.Constant(i64, j)]), align=4)
        return context.get_dummy_value()

    return types.void(acc, codes, scales, t, xq, xs, xsum8, n0, n1, n2, n3, ntok, hardware), codegen


@njit(cache=True, fastmath=True)
def _q8q4_tile(xq, xs, xsum8, codes, scales, t, c0, c1, out):
    """out[c0:c1, t*Q4_TILE : +Q4_TILE] for one tile (see matmul_q8q4)."""
    M = out.shape[1]
    m0_u = np.uint64(t * Q4_TILE)  # unsigned: no wraparound checks, so the copies vectorize
    rows_u = np.uint64(min(Q4_TILE, M - t * Q4_TILE))
    acc = carray(_stack_f32(Q4_ACC_SIZE), (4, Q4_TILE))  # 4 tokens x 32 rows
    n = c0
    while n < c1:
        nt = min(4, c1 - n)
        # A tail of 1-3 tokens runs a micro-kernel of that many tokens (ntok is a literal, so
        # each variant is its own code); the unused token indices repeat the last one.
        n1, n2, n3 = min(n + 1, c1 - 1), min(n + 2, c1 - 1), min(n + 3, c1 - 1)
        if nt == 4:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 4, HAS_VNNI)
        elif nt == 3:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 3, HAS_VNNI)
        elif nt == 2:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 2, HAS_VNNI)
        else:
            _q8q4_4x32(acc, codes, scales, t, xq, xs, xsum8, n, n1, n2, n3, 1, HAS_VNNI)
        for i in range(nt):
            for r in range(rows_u):
                out[n + i, m0_u + r] = acc[i, r]
        n += nt


@njit(parallel=True, cache=True, fastmath=True)
def matmul_q8q4(xq, xs, xsum8, codes, scales, out):
    """out (N, M) = x @ W.T for block_q8 activations (quantize_q8) and tiled Q4 weights.

    codes (T, K/QK, 512) uint8 and scales (T, K/QK, Q4_TILE) float32 from `repack_q4`;
    one parallel loop over (token chunk, tile) jobs.
    """
    N, K = xq.shape
    if codes.shape[0] and (codes.shape[1] * QK != K or xs.shape[1] * QK != K):
        raise ValueError("matmul_q8q4: activations and the tiled Q4 weights disagree on the input width")
    # Many small jobs rather than a few whole tiles (wo and w2 have only 8): a thread that
    # starts late delays the barrier by one job, not by a quarter of the matmul.
    T = codes.shape[0]
    n_chunks = (N + Q4_TOKEN_CHUNK - 1) // Q4_TOKEN_CHUNK
    for job in prange(n_chunks * T):
        c = job // T
        c0 = c * Q4_TOKEN_CHUNK
        _q8q4_tile(xq, xs, xsum8, codes, scales, job - c * T, c0, min(N, c0 + Q4_TOKEN_CHUNK), out)


@njit(cache=True, fastmath=True)
def matmul_q8q4_serial(xq, xs, xsum8, codes, scales, out):
    """`matmul_q8q4` on the calling thread, for a caller that runs numba on one thread:
    entering a parallel region costs a few microseconds even then, 24 times per utterance."""
    N, K = xq.shape
    if codes.shape[0] and (codes.shape[1] * QK != K or xs.shape[1] * QK != K):
        raise ValueError("matmul_q8q4: activations and the tiled Q4 weights disagree on the input width")
    for c0 in range(0, N, Q4_TOKEN_CHUNK):
        for t in range(codes.shape[0]):
            _q8q4_tile(xq, xs, xsum8, codes, scales, t, c0, min(N, c0 + Q4_TOKEN_CHUNK), out)


@njit(parallel=True, cache=True, fastmath=True)
def embed_f32(ids, table, out):
    """out[n] = table[ids[n]]."""
    for n in prange(ids.shape[0]):
        out[n, :] = table[ids[n]]


@njit(parallel=True, cache=True, fastmath=True)
def embed_q4(ids, codes, scales, out):
    """out[n] = dequant(table row ids[n])."""
    for n in prange(ids.shape[0]):
        dequant_row_q4(codes[ids[n]], scales[ids[n]], out[n])


@njit(cache=True, fastmath=True)
def _rmsnorm_row(x, w, eps, out, n):
    C = x.shape[1]
    ss = np.float32(0.0)
    for c in range(C):
        ss += x[n, c] * x[n, c]
    r = np.float32(1.0 / math.sqrt(ss / C + eps))
    for c in range(C):
        out[n, c] = x[n, c] * r * w[c]


@njit(parallel=True, cache=True, fastmath=True)
def rmsnorm(x, w, eps, out):
    """out[n] = x[n] / sqrt(mean(x[n]^2) + eps) * w."""
    for n in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, n)


@njit(cache=True, fastmath=True)
def rmsnorm_serial(x, w, eps, out):
    """`rmsnorm` on the calling thread (short inputs: a parallel region costs more than the work)."""
    for n in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, n)


@njit(cache=True, fastmath=True)
def _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n):
    half = head_dim // 2
    p = positions[n]
    for h in range(n_rot_heads):
        o = h * head_dim
        for i in range(half):
            c = cos[p, i]
            s = sin[p, i]
            x0 = qkv[n, o + 2 * i]
            x1 = qkv[n, o + 2 * i + 1]
            qkv[n, o + 2 * i] = x0 * c - x1 * s
            qkv[n, o + 2 * i + 1] = x0 * s + x1 * c


@njit(parallel=True, cache=True, fastmath=True)
def rope_inplace(qkv, positions, cos, sin, n_rot_heads, head_dim):
    """Rotate adjacent pairs of the first n_rot_heads heads of each row (q then k) by position."""
    for n in prange(qkv.shape[0]):
        _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n)


@njit(cache=True, fastmath=True)
def rope_serial(qkv, positions, cos, sin, n_rot_heads, head_dim):
    """`rope_inplace` on the calling thread."""
    for n in range(qkv.shape[0]):
        _rope_row(qkv, positions, cos, sin, n_rot_heads, head_dim, n)


@njit(cache=True)
def _attention_scratch(T, head_dim):
    """Scratch of `_attention_job` for sequences of up to T tokens: q (T4, D), kt (D, Tp),
    v (T, Dp) zero-initialised (its padding columns are never written), p (T4, Tp)."""
    Tp = (T + ATT_TILE - 1) // ATT_TILE * ATT_TILE
    Dp = (head_dim + ATT_TILE - 1) // ATT_TILE * ATT_TILE
    T4 = (T + 3) // 4 * 4
    return (np.empty((T4, head_dim), np.float32), np.empty((head_dim, Tp), np.float32),
            np.zeros((max(T, 1), Dp), np.float32), np.empty((T4, Tp), np.float32))


@njit(cache=True, fastmath=True, error_model="numpy")
def _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q, kt, v, p):
    """Attention of one (sequence, query head) pair; see `attention`.

    Both products (scores = Q K^T and out = P V) run the micro-kernel of the INT4 matmul,
    `_rank1_4x32`: 4 query rows x ATT_TILE columns of accumulators, one broadcast per row and
    one ATT_TILE-wide FMA row per step of the reduction. The columns (keys for the scores,
    head dimensions for the output) are zero-padded to multiples of ATT_TILE, so the work is
    whole vectors whatever the sequence length; with plain loops a 12-token sequence spent
    its time entering 12-wide loops (runtime alias and trip-count checks), not multiplying.
    Padded keys get scores that are never read, padded dimensions outputs never stored.
    q, kt, v, p: scratch from `_attention_scratch` for at least this sequence's length,
    reused across jobs (one allocation per call rather than four per head: at 13 tokens
    the allocations were a fifth of the time); the padding this job reads is zeroed here.
    """
    C = n_heads * head_dim
    kvd = n_kv_heads * head_dim
    rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    b = job // n_heads
    h = job - b * n_heads
    s0 = starts[b]
    T = starts[b + 1] - s0
    qo = h * head_dim
    ko = C + (h // rep) * head_dim
    vo = C + kvd + (h // rep) * head_dim
    Tp = (T + ATT_TILE - 1) // ATT_TILE * ATT_TILE  # keys, padded
    Dp = (head_dim + ATT_TILE - 1) // ATT_TILE * ATT_TILE  # head dimensions, padded
    T4 = (T + 3) // 4 * 4  # query rows, padded to the micro-kernel's 4
    # Row views (1-D, contiguous) rather than 2-D indexing: the copies then vectorize.
    for j in range(T):
        src = qkv[s0 + j]
        qr = q[j]
        vr = v[j]
        for d in range(head_dim):
            qr[d] = src[qo + d] * scale
        for d in range(head_dim):
            vr[d] = src[vo + d]
        for d in range(head_dim):
            kt[d, j] = src[ko + d]
    for j in range(T, T4):
        q[j, :] = 0.0
    for d in range(head_dim):
        ktr = kt[d]
        for j in range(T, Tp):
            ktr[j] = 0.0
    acc = carray(_stack_f32(ATT_ACC_SIZE), (4, ATT_TILE))
    for i0 in range(0, T4, 4):
        # Scores of queries i0..i0+3 against keys j0..j0+ATT_TILE-1. Every score sums its
        # dimensions in order 0..D-1: results do not depend on the batch.
        for j0 in range(0, Tp, ATT_TILE):
            # Unsigned column index j0u + r (both uint64): numba then adds no negative-index
            # wraparound, which would turn the row copy into a scatter (as in _q8q4_tile).
            j0u = np.uint64(j0)
            for i in range(4):
                for r in range(ATT_TILE):
                    acc[i, r] = 0.0
            _rank1_4x32(acc, kt, 0, j0, head_dim, q, i0, i0 + 1, i0 + 2, i0 + 3, 0)
            for i in range(4):
                for r in range(ATT_TILE_U):
                    p[i0 + i, j0u + r] = acc[i, r]
        # Softmax over the T real keys of each of the 4 rows (padding rows are harmless).
        for i in range(i0, i0 + 4):
            row = p[i]
            mx = row[0]
            for j in range(1, T):
                mx = max(mx, row[j])
            for j in range(T):
                row[j] = fast_exp(row[j] - mx)
            tot = np.float32(0.0)
            for j in range(T):
                tot += row[j]
            inv = np.float32(1.0) / tot
            for j in range(T):
                row[j] *= inv
        # out rows i0..i0+3 = P V, ATT_TILE head dimensions at a time.
        for d0 in range(0, Dp, ATT_TILE):
            for i in range(4):
                for r in range(ATT_TILE):
                    acc[i, r] = 0.0
            _rank1_4x32(acc, v, 0, d0, T, p, i0, i0 + 1, i0 + 2, i0 + 3, 0)
            for i in range(min(4, T - i0)):
                for r in range(min(ATT_TILE, head_dim - d0)):
                    out[s0 + i0 + i, qo + d0 + r] = acc[i, r]


@njit(cache=True)
def _longest(starts):
    longest = 0
    for b in range(starts.shape[0] - 1):
        longest = max(longest, starts[b + 1] - starts[b])
    return longest


@njit(parallel=True, cache=True, fastmath=True)
def attention(qkv, starts, n_heads, n_kv_heads, head_dim, out):
    """Bidirectional GQA within each packed sequence.

    qkv (N, C + 2 * KV * D): columns [q | k | v]; out (N, C). Query head h reads KV head
    h // (n_heads // n_kv_heads).

    Each (sequence, head) pair is one job (`_attention_job`): its scaled queries, keys
    (transposed) and values are copied into padded scratch and both products run the
    micro-kernel `_rank1_4x32`. Every score sums its dimensions in order 0..D-1, so results
    do not depend on the batch a sequence is packed into. Each job allocates its own
    scratch, sized for its sequence (jobs run on any thread).
    """
    for job in prange((starts.shape[0] - 1) * n_heads):
        b = job // n_heads
        q, kt, v, p = _attention_scratch(starts[b + 1] - starts[b], head_dim)
        _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q, kt, v, p)


@njit(cache=True, fastmath=True)
def attention_serial(qkv, starts, n_heads, n_kv_heads, head_dim, out):
    """`attention` on the calling thread, with one scratch for all its jobs."""
    q, kt, v, p = _attention_scratch(_longest(starts), head_dim)
    for job in range((starts.shape[0] - 1) * n_heads):
        _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job, q, kt, v, p)


# error_model="numpy": a float division by zero gives inf instead of raising, so numba drops
# the per-element zero check that otherwise keeps this loop scalar (1 + e^-a is never 0).
@njit(cache=True, fastmath=True, error_model="numpy")
def _silu_row(h13, hidden_width, out, n):
    for j in range(hidden_width):
        a = h13[n, j]
        out[n, j] = a / (np.float32(1.0) + fast_exp(-a)) * h13[n, hidden_width + j]


@njit(parallel=True, cache=True, fastmath=True)
def silu_mul(h13, hidden_width, out):
    """out[n, j] = silu(h13[n, j]) * h13[n, hidden_width + j] (the SwiGLU gate)."""
    for n in prange(h13.shape[0]):
        _silu_row(h13, hidden_width, out, n)


@njit(cache=True, fastmath=True)
def silu_mul_serial(h13, hidden_width, out):
    """`silu_mul` on the calling thread."""
    for n in range(h13.shape[0]):
        _silu_row(h13, hidden_width, out, n)


@njit(cache=True, fastmath=True)
def _add_norm_row(x, y, w, eps, out, n):
    for c in range(x.shape[1]):
        x[n, c] += y[n, c]
    _rmsnorm_row(x, w, eps, out, n)


@njit(parallel=True, cache=True, fastmath=True)
def add_norm(x, y, w, eps, out):
    """x += y (the residual), then out = rmsnorm(x) * w, in one pass over each row."""
    for n in prange(x.shape[0]):
        _add_norm_row(x, y, w, eps, out, n)


@njit(cache=True, fastmath=True)
def add_norm_serial(x, y, w, eps, out):
    """`add_norm` on the calling thread."""
    for n in range(x.shape[0]):
        _add_norm_row(x, y, w, eps, out, n)


@njit(parallel=True, cache=True, fastmath=True)
def mean_pool(h, starts, out):
    """out[b] = mean of h rows starts[b]:starts[b + 1]."""
    for b in prange(starts.shape[0] - 1):
        s0 = starts[b]
        s1 = starts[b + 1]
        out[b, :] = 0.0
        for n in range(s0, s1):
            for c in range(h.shape[1]):
                out[b, c] += h[n, c]
        inv = np.float32(1.0) / max(s1 - s0, 1)
        for c in range(h.shape[1]):
            out[b, c] *= inv



@njit(cache=True, fastmath=True)
def linear_serial(x, w, b, out):
    """out (N, M) = x (N, K) @ w (M, K).T + b (M,), on the calling thread.

    For the small prediction heads at serving time: numpy's matmul there goes to OpenBLAS,
    whose worker threads, once woken, compete with the encoder and with other processes
    for the cores (measured: a (1, 256) x (256, 77) head took 1.5 ms at P50 under load
    instead of 0.02 ms).
    """
    N, M = x.shape[0], w.shape[0]
    for m0 in range(0, M, ROW_TILE):  # matmul_f32's tiles, on this thread
        _tile_dot(x, w[m0:m0 + ROW_TILE], min(ROW_TILE, M - m0), 0, N, m0, out)
    for n in range(N):
        for m in range(M):
            out[n, m] += b[m]


@njit(cache=True, fastmath=True)
def _linear(x, quantized, wf, wc, ws, layer, out, xq, xs, xsum8, serial, one_thread):
    """One layer's linear map: f32 weights, or block_q8(x) times the tiled Q4 weights.

    xq / xs / xsum8 are scratch for the quantized input, at least (N, K) / (N, K/QK).
    `serial`: quantize on this thread; `one_thread` (numba runs one thread): multiply on it too.
    """
    if quantized:
        K = x.shape[1]
        G = K // QK
        q, s, m = xq[:, :K], xs[:, :G], xsum8[:, :G]
        if serial:
            quantize_q8_serial(x, q, s, m)
        else:
            quantize_q8(x, q, s, m)
        if one_thread:
            matmul_q8q4_serial(q, s, m, wc[layer], ws[layer], out)
        else:
            matmul_q8q4(q, s, m, wc[layer], ws[layer], out)
    else:
        matmul_f32(x, wf[layer], out)


@njit(cache=True, fastmath=True)
def encoder_forward(ids, starts, positions, quantized, emb_f, emb_c, emb_s,
                    attn_norm, ffn_norm, final_norm,
                    wqkv_f, wqkv_c, wqkv_s, wo_f, wo_c, wo_s,
                    w13_f, w13_c, w13_s, w2_f, w2_c, w2_s,
                    cos, sin, n_heads, n_kv_heads, hidden_width, eps,
                    x, xn, qkv, att, proj, h13, gate, pooled, xq, xs, xsum8, one_thread=False):
    """The whole encoder on packed tokens; leaves token states in `xn` and means in `pooled`.

    Weight stacks are indexed by layer: wqkv (L, C + 2 KV D, C) is [wq; wk; wv],
    w13 (L, 2 Hw, C) is [w1; w3] with Hw = hidden_width (padded for Q4), w2 (L, C, Hw).
    With quantized=True the *_c (uint8 codes) and *_s (f32 scales) stacks are used, in
    the tiled layout of `repack_q4` (L, T, K/QK, 512) / (L, T, K/QK, 32), except emb_c/emb_s
    which stay planar; else the *_f (float32) ones; the unused set may be empty.
    Buffers x, xn, att, proj (N, C), qkv (N, C + 2 KV D), h13 (N, 2 Hw), gate (N, Hw),
    pooled (B, C), and for INT4 the block_q8 scratch xq (N, >= max(C, Hw)) int8, xs and
    xsum8 (N, >= max(C, Hw) / QK) are overwritten. `one_thread` (the caller runs numba on
    one thread) runs attention and the INT4 matmuls without parallel regions, which on one
    thread are pure scheduling overhead.
    """
    head_dim = x.shape[1] // n_heads
    # Short inputs (one utterance) run the element-wise kernels on this thread: they take
    # a few microseconds, less than a parallel region costs; only matmuls and attention fork.
    serial = x.shape[0] < SERIAL_ROWS
    if quantized:
        embed_q4(ids, emb_c, emb_s, x)
    else:
        embed_f32(ids, emb_f, x)
    n_layers = attn_norm.shape[0]
    for layer in range(n_layers):
        if layer == 0:
            if serial:
                rmsnorm_serial(x, attn_norm[0], eps, xn)
            else:
                rmsnorm(x, attn_norm[0], eps, xn)
        _linear(xn, quantized, wqkv_f, wqkv_c, wqkv_s, layer, qkv, xq, xs, xsum8, serial, one_thread)
        if serial:
            rope_serial(qkv, positions, cos, sin, n_heads + n_kv_heads, head_dim)
        else:
            rope_inplace(qkv, positions, cos, sin, n_heads + n_kv_heads, head_dim)
        if one_thread:
            attention_serial(qkv, starts, n_heads, n_kv_heads, head_dim, att)
        else:
            attention(qkv, starts, n_heads, n_kv_heads, head_dim, att)
        _linear(att, quantized, wo_f, wo_c, wo_s, layer, proj, xq, xs, xsum8, serial, one_thread)
        if serial:
            add_norm_serial(x, proj, ffn_norm[layer], eps, xn)
        else:
            add_norm(x, proj, ffn_norm[layer], eps, xn)
        _linear(xn, quantized, w13_f, w13_c, w13_s, layer, h13, xq, xs, xsum8, serial, one_thread)
        if serial:
            silu_mul_serial(h13, hidden_width, gate)
        else:
            silu_mul(h13, hidden_width, gate)
        _linear(gate, quantized, w2_f, w2_c, w2_s, layer, proj, xq, xs, xsum8, serial, one_thread)
        # The residual add of this block fused with the next block's input norm.
        w_next = attn_norm[layer + 1] if layer + 1 < n_layers else final_norm
        if serial:
            add_norm_serial(x, proj, w_next, eps, xn)
        else:
            add_norm(x, proj, w_next, eps, xn)
    mean_pool(xn, starts, pooled)

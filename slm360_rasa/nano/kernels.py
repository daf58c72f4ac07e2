"""Numba kernels for SLM360 Nano inference (f32 and INT4). Plain arrays in, plain arrays out.

Tokens of a batch are *packed*: row n of every activation matrix is one real token, and
sequence b owns rows starts[b]:starts[b + 1]. Linear layers therefore never touch padding,
and only attention and pooling look at sequence boundaries.

Conventions (as llama2.c's `matmul`): weights are (out, in) row-major; only the outer loop
of a kernel is parallel (`prange`); every output element is computed by one thread in a
fixed order, so results do not depend on the number of threads.

INT4 weights: tiled layout
--------------------------
quant.py stores a matrix W (M, K) planar, ggml q4_0 nibble order: codes (M, K/2) uint8
where byte 16b + j of a row holds weight 32b + j (low nibble) and 32b + 16 + j (high
nibble), scales (M, K/QK) f16, weight = (code - 8) * scale. `repack_q4` (run once at
load by the runtime) transposes this into tiles of Q4_TILE = 32 rows:

    codes_t  (T, K/2,  32) uint8    codes_t[t, i, r]  = codes[32 t + r, i]
    scales_t (T, K/QK, 32) float32  scales_t[t, b, r] = scales[32 t + r, b]

T = ceil(M / 32); rows past M are zero weights (code 0x88, scale 0). Bytes and nibbles are
untouched (still 4 bits per weight); only the row index moved innermost, as in ggml's
interleaved q4_0x8 repacks. Why: SIMD lanes then run across 32 output rows, so

- dequantizing k-pair i of a tile is a contiguous 32-byte load, two nibble splits and an
  FMA with the scale *vector* scales_t[t, i // 16] (no per-block broadcast, no gather);
- the product is the classic rank-1-update micro-kernel (`_rank1_4x32`): for each k,
  broadcast x[n..n+3, k] and FMA with the 32 dequantized weights into 4 x 32 accumulators
  that live in 8 zmm registers for the whole k loop (no horizontal reductions).

`matmul_q4` dequantizes Q4_KCHUNK inputs of a tile at a time into an f32 stack buffer
(Q4_KCHUNK x 32, in L1) and reuses it for all tokens of a Q4_TOKEN_CHUNK, so unpacking
costs once per chunk, not once per token. numba/LLVM notes that shaped this code (SLP
vectorization is off in numba, so only innermost loops vectorize, and only 256 bits wide
on Cascade Lake: the FMA micro-kernel is therefore explicit 512-bit IR): the 32-wide inner
loops must keep a constant trip count with enough work per iteration that LLVM does not
fully unroll them before vectorizing; scratch arrays are stack allocas (`_stack_f32`) so
LLVM knows they alias nothing (no runtime overlap checks; accumulators promoted to
registers). The two hot loops, dequantization (`_dequant_q4_block`) and the FMA
micro-kernel (`_rank1_4x32`), are explicit 16-lane LLVM IR instead of numba loops.

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
Q4_TILE = 32  # INT4: weight rows per tile = the micro-kernel's columns
MK_WIDTH = Q4_TILE  # columns of _rank1_4x32's accumulator rows
MK_LANES = 16  # float32 lanes per explicit vector in _rank1_4x32 (one zmm register)
ATT_TILE = MK_WIDTH  # attention: keys / head dimensions per micro-kernel call (see _attention_job)
ATT_TILE_U = np.uint64(ATT_TILE)  # the same, unsigned (see _attention_job)
ATT_ACC_SIZE = 4 * ATT_TILE  # stack floats for its accumulators
Q4_KCHUNK = 128  # INT4: inputs dequantized at a time (multiple of QK); x Q4_TILE f32 = 16 KiB
Q4_TOKEN_CHUNK = 64  # INT4: tokens per job (one dequantization of a tile chunk serves them all)
Q4_WT_SIZE = Q4_KCHUNK * Q4_TILE  # stack floats for a dequantized chunk
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

    The micro-kernel of the INT4 matmul and of attention, written as LLVM IR on <16 x float>
    vectors. Why not a numba loop: numba's LLVM targets Cascade Lake with a preferred vector
    width of 256 bits, so its vectorizer never uses the 512-bit registers. Explicit 16-lane
    vectors are lowered to zmm FMAs where AVX-512 exists (measured 1.3-1.45x faster on the
    w13 matmul) and split into ymm or xmm halves elsewhere, with the same result: every lane
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
def _dequant_q4_block(typingctx, codes, scales, t, blk, wt, row0):
    """wt[row0 + i, r] = weight i of block `blk` of row r of tile t, for i < QK, r < 32.

    One Q4 block of a tile in the layout of `repack_q4`: byte j (< HALF_QK) of each row holds
    weights j (low nibble) and j + 16 (high nibble); weight = (code - 8) * scale. Written as
    LLVM IR on 16-lane vectors for the same reason as `_rank1_4x32` (numba's vectorizer stops
    at 256 bits): per byte row, two 16-byte loads, nibble masks, zero-extension and
    conversion to float, one FMA with the block's scales each (code * d + (-8 d), exact in
    float32 like the scalar loop it replaces), four 16-float stores.
    """
    if not (isinstance(codes, types.Array) and isinstance(scales, types.Array) and isinstance(wt, types.Array)):
        return None
    if not all(isinstance(x, types.Integer) for x in (t, blk, row0)):
        return None

    def codegen(context, builder, sig, args):
        codes_v, scales_v, t_v, blk_v, wt_v, row0_v = args
        lanes = MK_LANES
        halves = MK_WIDTH // lanes
        i64 = ir.IntType(64)
        f32v = ir.VectorType(ir.FloatType(), lanes)
        i8v = ir.VectorType(ir.IntType(8), lanes)
        i32v = ir.VectorType(ir.IntType(32), lanes)

        def as_i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)

        c_a = context.make_array(sig.args[0])(context, builder, codes_v)
        s_a = context.make_array(sig.args[1])(context, builder, scales_v)
        w_a = context.make_array(sig.args[4])(context, builder, wt_v)
        t64, blk64, row64 = as_i64(2), as_i64(3), as_i64(5)
        zero = ir.Constant(i64, 0)
        sp = cgutils.get_item_pointer(context, builder, sig.args[1], s_a, [t64, blk64, zero])
        d = [builder.load(builder.bitcast(builder.gep(sp, [ir.Constant(i64, h * lanes)]), f32v.as_pointer()), align=4)
             for h in range(halves)]
        off = [builder.fmul(x, ir.Constant(f32v, [-Q4_ZERO] * lanes)) for x in d]
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32v, [f32v, f32v, f32v]),
                                             f"llvm.fma.v{lanes}f32")
        mask = ir.Constant(i8v, [15] * lanes)
        four = ir.Constant(i8v, [4] * lanes)
        first = builder.mul(blk64, ir.Constant(i64, HALF_QK))
        for j in range(HALF_QK):
            cp = cgutils.get_item_pointer(context, builder, sig.args[0], c_a,
                                          [t64, builder.add(first, ir.Constant(i64, j)), zero])
            lo_row = cgutils.get_item_pointer(context, builder, sig.args[4], w_a,
                                              [builder.add(row64, ir.Constant(i64, j)), zero])
            hi_row = cgutils.get_item_pointer(context, builder, sig.args[4], w_a,
                                              [builder.add(row64, ir.Constant(i64, HALF_QK + j)), zero])
            for h in range(halves):
                byte = builder.load(builder.bitcast(builder.gep(cp, [ir.Constant(i64, h * lanes)]), i8v.as_pointer()),
                                    align=1)
                for nib, dst in ((builder.and_(byte, mask), lo_row), (builder.lshr(byte, four), hi_row)):
                    val = builder.uitofp(builder.zext(nib, i32v), f32v)
                    w = builder.call(fma, [val, d[h], off[h]])
                    builder.store(w, builder.bitcast(builder.gep(dst, [ir.Constant(i64, h * lanes)]),
                                                     f32v.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(codes, scales, t, blk, wt, row0), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to `n` float32 on the stack (n must be a literal int).

    Scratch for the INT4 kernel. Unlike np.empty (heap, opaque to LLVM), an alloca provably
    aliases nothing else, so LLVM needs no runtime overlap checks around the dequantization
    loop and keeps the micro-kernel's accumulators in vector registers for the whole k loop.
    """
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=size)

    return types.CPointer(types.float32)(n), codegen


def repack_q4(codes, scales):
    """Planar Q4 (quant.py) -> the tiled layout of `matmul_q4`; pure numpy, once at load.

    codes (M, K/2) uint8, scales (M, K/QK) -> codes (T, K/2, Q4_TILE) uint8 and scales
    (T, K/QK, Q4_TILE) float32 with T = ceil(M / Q4_TILE); padding rows get code 0x88 and
    scale 0 (weight 0).
    """
    M, half_k = codes.shape
    n_blocks = scales.shape[1]
    if half_k != n_blocks * HALF_QK:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} disagree (QK={QK})")
    T = (M + Q4_TILE - 1) // Q4_TILE
    c = np.full((T * Q4_TILE, half_k), 0x88, np.uint8)
    c[:M] = codes
    s = np.zeros((T * Q4_TILE, n_blocks), np.float32)
    s[:M] = scales
    c = np.ascontiguousarray(c.reshape(T, Q4_TILE, half_k).transpose(0, 2, 1))
    s = np.ascontiguousarray(s.reshape(T, Q4_TILE, n_blocks).transpose(0, 2, 1))
    return c, s


@njit(cache=True, fastmath=True)
def _q4_tile(x, codes, scales, t, c0, c1, out):
    """out[c0:c1, t*Q4_TILE : +Q4_TILE] for one tile of the repacked layout (see matmul_q4)."""
    K = x.shape[1]
    M = out.shape[1]
    m0 = t * Q4_TILE
    # Unsigned column indices: numba adds no negative-index wraparound to them, so the copy
    # loops between `acc` and `out` stay contiguous vector moves (not gathers/scatters).
    m0_u = np.uint64(m0)
    rows_u = np.uint64(min(Q4_TILE, M - m0))
    wt = carray(_stack_f32(Q4_WT_SIZE), (Q4_KCHUNK, Q4_TILE))  # w.T chunk, f32
    acc = carray(_stack_f32(Q4_ACC_SIZE), (4, Q4_TILE))  # 4 tokens x 32 rows
    for kc0 in range(0, K, Q4_KCHUNK):
        kn = min(Q4_KCHUNK, K - kc0)
        # Dequantize inputs kc0:kc0+kn of the tile's 32 rows. Lanes run across rows, so the
        # scale is a contiguous vector (no broadcast per block).
        b0 = kc0 // QK
        for bb in range(kn // QK):
            _dequant_q4_block(codes, scales, t, b0 + bb, wt, bb * QK)
        # 4 tokens at a time: acc[i, :] += x[n + i, k] * wt[k, :], a rank-1 update per k
        # (`_rank1_4x32`: 2 weight loads + 4 broadcasts feed 8 zmm FMAs; 6 tokens x 32
        # rows measured slower as a numba loop).
        n = c0
        while n < c1:
            nt = min(4, c1 - n)
            if kc0 == 0:
                for i in range(4):
                    for r in range(Q4_TILE):
                        acc[i, r] = 0.0
            else:
                for i in range(nt):
                    for r in range(rows_u):
                        acc[i, r] = out[n + i, m0_u + r]
            # The micro-kernel always fills 4 accumulator rows: a tail of 1-3 tokens repeats
            # its last token in the spare rows, which are not stored.
            n1 = min(n + 1, c1 - 1)
            n2 = min(n + 2, c1 - 1)
            n3 = min(n + 3, c1 - 1)
            _rank1_4x32(acc, wt, 0, 0, kn, x, n, n1, n2, n3, kc0)
            for i in range(nt):
                for r in range(rows_u):
                    out[n + i, m0_u + r] = acc[i, r]
            n += nt


@njit(parallel=True, cache=True, fastmath=True)
def matmul_q4(x, codes, scales, out):
    """out (N, M) = x (N, K) @ W.T for W in the tiled Q4 layout of `repack_q4`.

    codes (T, K/2, Q4_TILE) uint8, scales (T, K/QK, Q4_TILE) float32; tiles are parallel.
    """
    N, K = x.shape
    if codes.shape[0] and (2 * codes.shape[1] != K or scales.shape[1] * QK != K):
        raise ValueError("matmul_q4: x and the tiled Q4 weights disagree on the input width")
    # One parallel loop over (token chunk, tile) jobs: a batch gives the threads many small
    # jobs instead of a few whole tiles (wo and w2 have only 8), so a thread that starts
    # late or is preempted delays the barrier by one job, not by a quarter of the matmul.
    T = codes.shape[0]
    n_chunks = (N + Q4_TOKEN_CHUNK - 1) // Q4_TOKEN_CHUNK
    for job in prange(n_chunks * T):
        c = job // T
        c0 = c * Q4_TOKEN_CHUNK
        _q4_tile(x, codes, scales, job - c * T, c0, min(N, c0 + Q4_TOKEN_CHUNK), out)


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


@njit(cache=True, fastmath=True, error_model="numpy")
def _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job):
    """Attention of one (sequence, query head) pair; see `attention`.

    Both products (scores = Q K^T and out = P V) run the micro-kernel of the INT4 matmul,
    `_rank1_4x32`: 4 query rows x ATT_TILE columns of accumulators, one broadcast per row and
    one ATT_TILE-wide FMA row per step of the reduction. The columns (keys for the scores,
    head dimensions for the output) are zero-padded to multiples of ATT_TILE, so the work is
    whole vectors whatever the sequence length; with plain loops a 12-token sequence spent
    its time entering 12-wide loops (runtime alias and trip-count checks), not multiplying.
    Padded keys get scores that are never read, padded dimensions outputs never stored.
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
    q = np.zeros((T4, head_dim), np.float32)
    kt = np.zeros((head_dim, Tp), np.float32)
    v = np.zeros((T, Dp), np.float32)
    for j in range(T):
        for d in range(head_dim):
            q[j, d] = qkv[s0 + j, qo + d] * scale
            kt[d, j] = qkv[s0 + j, ko + d]
            v[j, d] = qkv[s0 + j, vo + d]
    p = np.empty((T4, Tp), np.float32)
    acc = carray(_stack_f32(ATT_ACC_SIZE), (4, ATT_TILE))
    for i0 in range(0, T4, 4):
        # Scores of queries i0..i0+3 against keys j0..j0+ATT_TILE-1. Every score sums its
        # dimensions in order 0..D-1: results do not depend on the batch.
        for j0 in range(0, Tp, ATT_TILE):
            # Unsigned column index j0u + r (both uint64): numba then adds no negative-index
            # wraparound, which would turn the row copy into a scatter (as in _q4_tile).
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
            mx = p[i, 0]
            for j in range(1, T):
                mx = max(mx, p[i, j])
            for j in range(T):
                p[i, j] = fast_exp(p[i, j] - mx)
            tot = np.float32(0.0)
            for j in range(T):
                tot += p[i, j]
            inv = np.float32(1.0) / tot
            for j in range(T):
                p[i, j] *= inv
        # out rows i0..i0+3 = P V, ATT_TILE head dimensions at a time.
        for d0 in range(0, Dp, ATT_TILE):
            for i in range(4):
                for r in range(ATT_TILE):
                    acc[i, r] = 0.0
            _rank1_4x32(acc, v, 0, d0, T, p, i0, i0 + 1, i0 + 2, i0 + 3, 0)
            for i in range(min(4, T - i0)):
                for r in range(min(ATT_TILE, head_dim - d0)):
                    out[s0 + i0 + i, qo + d0 + r] = acc[i, r]


@njit(parallel=True, cache=True, fastmath=True)
def attention(qkv, starts, n_heads, n_kv_heads, head_dim, out):
    """Bidirectional GQA within each packed sequence.

    qkv (N, C + 2 * KV * D): columns [q | k | v]; out (N, C). Query head h reads KV head
    h // (n_heads // n_kv_heads).

    Each (sequence, head) pair is one job (`_attention_job`): its scaled queries, keys
    (transposed) and values are copied into padded scratch and both products run the
    micro-kernel `_rank1_4x32`. Every score sums its dimensions in order 0..D-1, so results
    do not depend on the batch a sequence is packed into.
    """
    for job in prange((starts.shape[0] - 1) * n_heads):
        _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job)


@njit(cache=True, fastmath=True)
def attention_serial(qkv, starts, n_heads, n_kv_heads, head_dim, out):
    """`attention` on the calling thread."""
    for job in range((starts.shape[0] - 1) * n_heads):
        _attention_job(qkv, starts, n_heads, n_kv_heads, head_dim, out, job)


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
def _linear(x, quantized, wf, wc, ws, layer, out):
    """One layer's linear map from the f32 or the Q4 weight stack."""
    if quantized:
        matmul_q4(x, wc[layer], ws[layer], out)
    else:
        matmul_f32(x, wf[layer], out)


@njit(cache=True, fastmath=True)
def encoder_forward(ids, starts, positions, quantized, emb_f, emb_c, emb_s,
                    attn_norm, ffn_norm, final_norm,
                    wqkv_f, wqkv_c, wqkv_s, wo_f, wo_c, wo_s,
                    w13_f, w13_c, w13_s, w2_f, w2_c, w2_s,
                    cos, sin, n_heads, n_kv_heads, hidden_width, eps,
                    x, xn, qkv, att, proj, h13, gate, pooled, one_thread=False):
    """The whole encoder on packed tokens; leaves token states in `xn` and means in `pooled`.

    Weight stacks are indexed by layer: wqkv (L, C + 2 KV D, C) is [wq; wk; wv],
    w13 (L, 2 Hw, C) is [w1; w3] with Hw = hidden_width (padded for Q4), w2 (L, C, Hw).
    With quantized=True the *_c (uint8 codes) and *_s (f32 scales) stacks are used, in
    the tiled layout of `repack_q4` (L, T, K/2, 32) / (L, T, K/QK, 32), except emb_c/emb_s
    which stay planar; else the *_f (float32) ones; the unused set may be empty.
    Buffers x, xn, att, proj (N, C), qkv (N, C + 2 KV D), h13 (N, 2 Hw), gate (N, Hw),
    pooled (B, C) are overwritten. `one_thread` (the caller runs numba on one thread) runs
    attention without a parallel region, which on one thread is pure scheduling overhead.
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
        _linear(xn, quantized, wqkv_f, wqkv_c, wqkv_s, layer, qkv)
        if serial:
            rope_serial(qkv, positions, cos, sin, n_heads + n_kv_heads, head_dim)
        else:
            rope_inplace(qkv, positions, cos, sin, n_heads + n_kv_heads, head_dim)
        if one_thread:
            attention_serial(qkv, starts, n_heads, n_kv_heads, head_dim, att)
        else:
            attention(qkv, starts, n_heads, n_kv_heads, head_dim, att)
        _linear(att, quantized, wo_f, wo_c, wo_s, layer, proj)
        if serial:
            add_norm_serial(x, proj, ffn_norm[layer], eps, xn)
        else:
            add_norm(x, proj, ffn_norm[layer], eps, xn)
        _linear(xn, quantized, w13_f, w13_c, w13_s, layer, h13)
        if serial:
            silu_mul_serial(h13, hidden_width, gate)
        else:
            silu_mul(h13, hidden_width, gate)
        _linear(gate, quantized, w2_f, w2_c, w2_s, layer, proj)
        # The residual add of this block fused with the next block's input norm.
        w_next = attn_norm[layer + 1] if layer + 1 < n_layers else final_norm
        if serial:
            add_norm_serial(x, proj, w_next, eps, xn)
        else:
            add_norm(x, proj, w_next, eps, xn)
    mean_pool(xn, starts, pooled)

"""kernels/forward.py: bundles built from a checkpoint run the reference model (nano/model.py)."""
import dataclasses
import subprocess
import sys

import numba
import numpy as np
import pytest

from slm360_rasa.nano import model as M
from slm360_rasa.nano import quant as Q
from slm360_rasa.nano.checkpoint import save_checkpoint
from slm360_rasa.nano.config import NanoConfig
from slm360_rasa.nano.kernels import SERIAL_ROWS, EncoderWeights, LinearStack, Scratch, encoder_forward
from slm360_rasa.nano.runtime import Encoder

TOL = 1e-4  # as tests/nano/test_kernels.py
CFG = NanoConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=160)


class _VocabOnly:
    """Stands in for the tokenizer: the tests feed token ids directly."""

    vocab_size = 40
    sha256 = "ab" * 32


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(4)
    p = M.init_params(CFG, seed=4)
    for n in p:
        if n.endswith("norm"):  # not exactly 1: see the block_q8 ties note in test_kernels.py
            p[n] = (1 + 0.2 * rng.standard_normal(p[n].shape)).astype(np.float32)
        else:
            p[n] *= 5  # larger weights make the comparison meaningful
    return p


def _inputs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, CFG.vocab_size, size=n) for n in lengths]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    padded = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(padded)
    for b, s in enumerate(seqs):
        padded[b, :len(s)] = s
        mask[b, :len(s)] = 1
    return np.concatenate(seqs).astype(np.int64), starts, positions, padded, mask


def _run(weights, ids, starts, positions, one_thread=False):
    """encoder_forward on fresh scratch; (token states, pooled) copies."""
    s = Scratch.allocate(len(ids), len(starts) - 1, CFG.dim, CFG.dim + 2 * CFG.kv_dim, weights.hidden_width)
    encoder_forward(ids, starts, positions, weights, s, one_thread)
    return s.xn.copy(), s.pooled.copy()


def _reference(params, padded, mask, lengths):
    h, pooled, _ = M.forward(params, padded, mask, CFG)
    return np.concatenate([h[b, :n] for b, n in enumerate(lengths)]), pooled


def _q8_round(x):
    """numpy block_q8 round trip along the last axis (zero-padded to whole blocks), float32."""
    k = x.shape[-1]
    kp = -(-k // 32) * 32
    xp = np.zeros(x.shape[:-1] + (kp,), np.float32)
    xp[..., :k] = x
    b = xp.reshape(x.shape[:-1] + (kp // 32, 32))
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.rint(b * inv) * (amax * np.float32(1 / 127))).reshape(xp.shape)[..., :k]


LENGTHS = [6, 2, 9, 1]


def test_f32_bundle_from_a_checkpoint_matches_the_reference(tmp_path, params):
    path = save_checkpoint(tmp_path / "f.safetensors", params, CFG, _VocabOnly.sha256)
    w = Encoder.from_checkpoint(path, precision="f32", tokenizer=_VocabOnly()).weights
    assert isinstance(w, EncoderWeights) and isinstance(w.wqkv, LinearStack) and not w.quantized
    assert w.wqkv.f32.shape == (CFG.n_layers, CFG.dim + 2 * CFG.kv_dim, CFG.dim) and w.wqkv.codes.size == 0
    ids, starts, positions, padded, mask = _inputs(LENGTHS)
    hidden, pooled = _run(w, ids, starts, positions)
    ref_h, ref_p = _reference(params, padded, mask, LENGTHS)
    assert np.abs(hidden - ref_h).max() <= TOL
    assert np.abs(pooled - ref_p).max() <= TOL


def test_int4_bundle_from_a_stored_int4_checkpoint_matches_the_reference(tmp_path, params, monkeypatch):
    """The stored codes, tiled into the bundle, against the reference on the dequantized
    weights with every linear input rounded to block_q8 (as the INT4 kernels do)."""
    q4, _ = Q.quantize_params(params)
    path = save_checkpoint(tmp_path / "q.safetensors", q4, CFG, _VocabOnly.sha256)
    w = Encoder.from_checkpoint(path, precision="int4", tokenizer=_VocabOnly()).weights
    assert w.quantized and w.wqkv.f32.size == 0 and w.hidden_width % Q.QK == 0
    ids, starts, positions, padded, mask = _inputs(LENGTHS)
    hidden, pooled = _run(w, ids, starts, positions)
    mm = M._mm
    monkeypatch.setattr(M, "_mm", lambda x, wt: mm(_q8_round(x), wt))
    ref_h, ref_p = _reference(Q.float_params(q4, CFG), padded, mask, LENGTHS)
    assert np.abs(hidden - ref_h).max() <= TOL
    assert np.abs(pooled - ref_p).max() <= TOL


@pytest.mark.parametrize("precision", ["f32", "int4"])
@pytest.mark.parametrize("lengths", [[40, 3, 150, 17, 1], [5, 3]])
def test_one_thread_and_parallel_forward_give_the_same_bits(params, precision, lengths):
    """Batches above and below SERIAL_ROWS, with every kernel serial (one_thread, one numba
    thread) and with parallel regions on all threads."""
    w = Encoder.from_params(params, CFG, precision=precision, tokenizer=_VocabOnly()).weights
    ids, starts, positions, _, _ = _inputs(lengths, seed=1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        parallel = _run(w, ids, starts, positions)
        numba.set_num_threads(1)
        serial = _run(w, ids, starts, positions, one_thread=True)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_int4_packing_does_not_change_the_bits(params):
    """In a batch of SERIAL_ROWS or more tokens (parallel element-wise kernels) each sequence
    gets the bits it gets alone on one thread. Only INT4: the f32 matmul's 4-token tiles and
    its tail loop round differently, so there a token's bits depend on its row in the batch."""
    w = Encoder.from_params(params, CFG, precision="int4", tokenizer=_VocabOnly()).weights
    lengths = [40, 3, 150, 17, 1]
    ids, starts, positions, _, _ = _inputs(lengths, seed=1)
    assert len(ids) >= SERIAL_ROWS
    hidden, pooled = _run(w, ids, starts, positions)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        for b, n in enumerate(lengths):
            s0, s1 = starts[b], starts[b + 1]
            h1, p1 = _run(w, ids[s0:s1], np.array([0, n], np.int64), positions[s0:s1], one_thread=True)
            np.testing.assert_array_equal(h1, hidden[s0:s1])
            np.testing.assert_array_equal(p1[0], pooled[b])
    finally:
        numba.set_num_threads(before)


def test_scratch_head_views_the_first_rows():
    s = Scratch.allocate(10, 3, 32, 64, 40)
    assert s.n_tokens == 10 and s.n_seqs == 3 and s.xq.dtype == np.int8 and s.xs.shape == (10, 40 // Q.QK)
    h = s.head(4, 2)
    assert all(np.shares_memory(a, b) for a, b in zip(h, s))
    assert h.x.shape == (4, 32) and h.h13.shape == (4, 80) and h.pooled.shape == (2, 32)


def test_a_fresh_process_loads_the_forward_from_numba_s_cache(params):
    """Bundles keep `encoder_forward` cacheable: a second process must not recompile it
    (a dispatcher or a dynamic global in an argument would silently disable the cache)."""
    Encoder.from_params(params, CFG, precision="int4", tokenizer=_VocabOnly()).forward_packed(
        np.array([1, 2, 3], np.int64), np.array([3], np.int64))  # compiled and cached by now
    code = (
        "import numpy as np\n"
        "from slm360_rasa.nano.config import NanoConfig\n"
        "from slm360_rasa.nano.kernels import encoder_forward\n"
        "from slm360_rasa.nano.runtime import Encoder\n"
        "class T:\n    vocab_size = 40\n    sha256 = 'ab' * 32\n"
        f"cfg = NanoConfig(**{dataclasses.asdict(CFG)!r})\n"
        "enc = Encoder.random(cfg, seed=1, tokenizer=T())\n"
        "enc.forward_packed(np.array([1, 2], np.int64), np.array([2], np.int64))\n"
        "s = encoder_forward.stats\n"
        "print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    hits, misses = map(int, out.stdout.split()[-2:])
    assert (hits, misses) == (1, 0), out.stderr

"""Tests for slm360_rasa.nano.checkpoint: round trip, strict validation, no pickle."""
from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import slm360_rasa.nano.checkpoint as ckmod
from slm360_rasa.nano.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    validate_params,
)
from slm360_rasa.nano.config import ConfigError, NanoConfig
from slm360_rasa.nano.model import init_params

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
TINY = NanoConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=32)


@pytest.fixture
def params():
    return init_params(TINY, seed=3)


@pytest.fixture
def saved(tmp_path, params):
    extra = {"steps": 1200, "loss": [1.5, 0.75], "note": "tiny ünïcode", "nested": {"a": None, "b": True}}
    path = save_checkpoint(tmp_path / "model.safetensors", params, TINY, SHA_A, extra=extra)
    return path, extra


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    """A hand-made safetensors file: u64 header length, JSON header, data."""
    raw = json.dumps(header).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _meta(**overrides):
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(TINY.to_dict()),
        "tokenizer_sha256": SHA_A,
        "extra": "{}",
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_identical(saved, params):
    path, extra = saved
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint)
    assert ck.config == TINY
    assert ck.tokenizer_sha256 == SHA_A
    assert ck.extra == extra
    assert ck.path == path
    assert set(ck.tensors) == set(params)
    for name, arr in params.items():
        got = ck.tensors[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes(), name
    validate_params(ck.tensors, ck.config)


def test_round_trip_mixed_dtypes_and_non_contiguous(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 6)).astype(np.float32)
    tensors = {
        "f32_transposed": base.T,  # not C-contiguous
        "f16": rng.standard_normal((5,)).astype(np.float16),
        "u8_packed": rng.integers(0, 256, (4, 16), dtype=np.uint8),
        "i32": np.arange(-3, 9, dtype=np.int32).reshape(3, 4),
        "big_endian": np.arange(4, dtype=">f4"),
        "scalar_like": np.zeros((0, 3), np.float32),
    }
    path = save_checkpoint(tmp_path / "mixed.safetensors", tensors, TINY, SHA_B)
    ck = load_checkpoint(path, expected_tokenizer_sha256=SHA_B)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(ck.tensors[name], arr)
        assert ck.tensors[name].dtype == arr.dtype.newbyteorder("=")
    assert ck.extra == {}


def test_metadata_is_plain_json_strings(saved):
    path, _ = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "slm360-nano" and meta["format_version"] == "1"
    assert NanoConfig.from_dict(json.loads(meta["config"])) == TINY
    assert meta["tokenizer_sha256"] == SHA_A
    assert json.loads(meta["extra"])["steps"] == 1200


def test_save_is_deterministic_and_leaves_no_temp_files(tmp_path, params):
    a = save_checkpoint(tmp_path / "a.safetensors", params, TINY, SHA_A, extra={"x": 1, "y": 2})
    b = save_checkpoint(tmp_path / "b.safetensors", params, TINY, SHA_A, extra={"y": 2, "x": 1})
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_interrupted_save_keeps_old_file(tmp_path, params, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", params, TINY, SHA_A)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, params, TINY, SHA_B)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_argument_errors(tmp_path, params):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        save_checkpoint(p, params, TINY, "abc")
    with pytest.raises(TypeError, match="NanoConfig"):
        save_checkpoint(p, params, TINY.to_dict(), SHA_A)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(p, params, TINY, SHA_A, extra={"arr": np.zeros(2)})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(p, params, TINY, SHA_A, extra={"loss": float("nan")})
    with pytest.raises(TypeError, match="'w' is list"):
        save_checkpoint(p, {"w": [1.0, 2.0]}, TINY, SHA_A)
    with pytest.raises(TypeError, match="'o' has dtype object"):
        save_checkpoint(p, {"o": np.array([None])}, TINY, SHA_A)
    assert not p.exists()


# --------------------------------------------------------------------------- bad files


def _expect_error(path, *fragments, **kwargs):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, **kwargs)
    msg = str(exc.value)
    assert path.name in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "ghost.safetensors", "does not exist")


def test_directory_instead_of_file(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    _expect_error(d, "not a regular file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _expect_error(p, "empty")


def test_shorter_than_length_field(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    _expect_error(p, "too short")


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.02])
def test_truncated_file(saved, keep):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[: max(9, int(len(raw) * keep))])
    _expect_error(path, "truncated")


def test_truncated_inside_data_names_tensor(saved):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    msg = _expect_error(path, "truncated", "tensor")
    assert "'norm'" in msg or "layers." in msg or "tok_embeddings" in msg


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _expect_error(p, "not a safetensors file")


def test_json_file_renamed(tmp_path):
    p = tmp_path / "config.safetensors"
    p.write_text(json.dumps(TINY.to_dict()), encoding="utf-8")
    _expect_error(p, "safetensors")


def test_corrupt_header_json(tmp_path):
    p = tmp_path / "badjson.safetensors"
    raw = b'{"__metadata__": {"format": '
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _expect_error(p, "corrupt safetensors header")


def test_header_not_an_object(tmp_path):
    _expect_error(_write_raw(tmp_path / "list.safetensors", [1, 2]), "JSON object")  # type: ignore[arg-type]


def test_data_offsets_beyond_file(tmp_path):
    header = {"__metadata__": _meta(), "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    p = _write_raw(tmp_path / "short_data.safetensors", header, b"\0" * 8)
    _expect_error(p, "truncated", "'w'")


def test_data_offsets_inconsistent_with_shape(tmp_path):
    header = {"__metadata__": _meta(), "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    p = _write_raw(tmp_path / "badspan.safetensors", header, b"\0" * 16)
    _expect_error(p, "needs 16 bytes", "'w'")


def test_hostile_shape_does_not_overflow(tmp_path):
    # 2**33 * 2**33 elements wraps to 0 in int64 arithmetic, which would "match" an empty span.
    header = {"__metadata__": _meta(), "w": {"dtype": "F32", "shape": [2**33, 2**33], "data_offsets": [0, 0]}}
    _expect_error(_write_raw(tmp_path / "huge.safetensors", header), "corrupt safetensors header", "'w'")


def test_unknown_dtype(tmp_path):
    header = {"__metadata__": _meta(), "w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}
    _expect_error(_write_raw(tmp_path / "q4.safetensors", header, b"\0"), "unsupported dtype", "'Q4'")


def test_foreign_safetensors_file(tmp_path):
    p = tmp_path / "foreign.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(p))
    _expect_error(p, "not an SLM360 Nano checkpoint")


def test_foreign_metadata(tmp_path):
    p = tmp_path / "hf.safetensors"
    save_file({"weight": np.ones((2, 2), np.float32)}, str(p), metadata={"format": "pt"})
    _expect_error(p, "not an SLM360 Nano checkpoint", "'pt'")


def test_wrong_version(tmp_path):
    p = tmp_path / "v99.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(format_version="99"))
    _expect_error(p, "version 99", f"reads version {FORMAT_VERSION}", "newer")


def test_non_integer_version(tmp_path):
    p = tmp_path / "vx.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(format_version="one"))
    _expect_error(p, "format_version", "'one'")


def test_missing_config(tmp_path):
    p = tmp_path / "nocfg.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(config=None))
    _expect_error(p, "'config'")


def test_invalid_config_wraps_config_error(tmp_path):
    bad = dict(TINY.to_dict(), n_kv_heads=3)
    p = tmp_path / "badcfg.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(config=json.dumps(bad)))
    _expect_error(p, "invalid model config", "n_kv_heads")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(p)
    assert isinstance(exc.value.__cause__, ConfigError)


def test_unknown_config_field(tmp_path):
    bad = dict(TINY.to_dict(), n_experts=8)
    p = tmp_path / "newcfg.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(config=json.dumps(bad)))
    _expect_error(p, "invalid model config", "n_experts")


def test_config_not_json(tmp_path):
    p = tmp_path / "cfgtext.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(config="dim=256"))
    _expect_error(p, "'config' metadata is not valid JSON")


def test_extra_not_an_object(tmp_path):
    p = tmp_path / "extra.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(p), metadata=_meta(extra="[1, 2]"))
    _expect_error(p, "'extra'", "JSON object")


def test_tokenizer_mismatch(saved):
    path, _ = saved
    msg = _expect_error(path, "different tokenizer", SHA_A, SHA_B, expected_tokenizer_sha256=SHA_B)
    assert msg.index(SHA_A) != msg.index(SHA_B)
    assert load_checkpoint(path, expected_tokenizer_sha256=SHA_A).tokenizer_sha256 == SHA_A


# --------------------------------------------------------------------------- no pickle


def test_module_does_not_import_pickle():
    tree = ast.parse(Path(ckmod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "torch"}
    assert "allow_pickle" not in Path(ckmod.__file__).read_text(encoding="utf-8")


def test_pickle_file_fails_cleanly_without_unpickling(tmp_path, monkeypatch):
    import pickle  # only to prove the loader never calls it

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint loader must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    # Protocol-4 pickle of {"w": 1}, written as bytes so the test itself never pickles.
    crafted = b"\x80\x04\x95\x0a\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94K\x01s."
    p = tmp_path / "evil.safetensors"
    p.write_bytes(crafted)
    _expect_error(p, "safetensors")


def test_loading_valid_file_never_unpickles(saved, monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint loader must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    path, _ = saved
    assert load_checkpoint(path).config == TINY


# --------------------------------------------------------------------------- validate_params


def test_validate_params_accepts_f32_and_f16(params):
    validate_params(params, TINY)
    validate_params({k: v.astype(np.float16) for k, v in params.items()}, TINY)


def test_validate_params_reports_every_problem(params):
    bad = dict(params)
    del bad["layers.1.wq"]
    del bad["norm"]
    bad["head.weight"] = np.zeros((3, 16), np.float32)
    bad["layers.0.w1"] = np.zeros((16, 24), np.float32)  # transposed
    bad["layers.0.wk"] = bad["layers.0.wk"].astype(np.int32)
    nan = bad["layers.1.w2"].copy()
    nan[0, 0] = np.nan
    bad["layers.1.w2"] = nan
    with pytest.raises(CheckpointError) as exc:
        validate_params(bad, TINY, source="m.safetensors")
    msg = str(exc.value)
    assert msg.startswith("m.safetensors")
    assert "missing tensors ['layers.1.wq', 'norm']" in msg
    assert "unexpected tensors ['head.weight']" in msg
    assert "layers.0.w1 has shape (16, 24), config needs (24, 16)" in msg
    assert "layers.0.wk has dtype int32" in msg
    assert "layers.1.w2 contains NaN or inf" in msg


def test_validate_params_against_other_config(params):
    with pytest.raises(CheckpointError, match="tok_embeddings has shape"):
        validate_params(params, NanoConfig(vocab_size=128, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24))


def test_validate_params_quantized_is_skipped():
    validate_params({"anything": np.zeros(1, np.uint8)}, TINY, quantized=True)

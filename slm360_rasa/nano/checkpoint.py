"""SLM360 Nano checkpoints: one safetensors file with JSON metadata, strictly validated on load.

File layout (the safetensors format, https://github.com/huggingface/safetensors):

    bytes [0, 8)        N: little-endian uint64, length of the JSON header
    bytes [8, 8 + N)    JSON header: {"__metadata__": {str: str}, name: {dtype, shape, data_offsets}}
    bytes [8 + N, end)  raw tensor data; data_offsets are relative to byte 8 + N

Our `__metadata__` (safetensors only allows str -> str, so structured values are JSON text):

    format            "slm360-nano"                    (FORMAT_NAME)
    format_version    "1"                              (FORMAT_VERSION)
    config            JSON of NanoConfig.to_dict()
    tokenizer_sha256  sha256 hex of the tokenizer.json the weights were trained with
    extra             JSON object, free-form (training steps, quantization, notes)

No pickle is involved anywhere: tensors are raw bytes, everything else is JSON. The loader
parses the header itself before handing the file to safetensors, so a truncated, corrupt or
foreign file fails with a `CheckpointError` that names the file and the problem instead of
a low-level parse error.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np

from ..fileio import atomic_writer
from .config import ConfigError, NanoConfig

FORMAT_NAME = "slm360-nano"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

_HEADER_LEN_BYTES = 8  # safetensors: u64 little-endian header length
# safetensors itself refuses headers above 100 MB; a larger length means a foreign file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype tag -> bytes per element, for the numpy dtypes the format supports.
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_SAVEABLE_KINDS = {"b", "u", "i", "f"}  # numpy dtype kinds that safetensors can store
_MASTER_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint file or its contents is invalid; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by name, the model config and the provenance metadata."""

    tensors: Dict[str, np.ndarray]
    config: NanoConfig
    tokenizer_sha256: str
    extra: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


# ---------------------------------------------------------------------------- save


def save_checkpoint(
    path: PathLike,
    tensors: Mapping[str, np.ndarray],
    config: NanoConfig,
    tokenizer_sha256: str,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write `tensors` plus metadata to a safetensors file at `path`; returns the path.

    The bytes come from `safetensors.numpy.save`; only the header is re-serialised with
    sorted metadata keys (see `_canonical_header`). Tensors are stored as given
    (C-contiguous, native-byte-order copies are made where needed); any dtype
    safetensors supports is accepted (f32, f16, u8, i32, ...). `extra` must be
    JSON-serialisable. Identical inputs give byte-identical files. The file is written to
    a temporary sibling and moved into place with os.replace, so an interrupted save
    leaves either the old file or none, never a half-written one. Parent folders are
    created.
    """
    from safetensors.numpy import save

    out = Path(path)
    if not isinstance(config, NanoConfig):
        raise TypeError(f"save_checkpoint: config must be a NanoConfig, got {type(config).__name__}")
    if not isinstance(tokenizer_sha256, str) or not _SHA256_RE.match(tokenizer_sha256):
        raise ValueError(
            f"save_checkpoint: tokenizer_sha256 must be a 64-character lowercase sha256 hex digest "
            f"(NanoTokenizer.sha256), got {tokenizer_sha256!r}"
        )
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"save_checkpoint: extra must be a dict or None, got {type(extra).__name__}")
    try:
        extra_json = json.dumps(extra, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"save_checkpoint: extra must be JSON-serialisable (str/int/float/bool/None/list/dict, "
            f"finite floats): {exc}"
        ) from exc

    arrays: Dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"save_checkpoint: tensor names must be non-empty str, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"save_checkpoint: tensor {name!r} is {type(value).__name__}, not numpy.ndarray; "
                f"convert it with np.asarray"
            )
        if value.dtype.kind not in _SAVEABLE_KINDS:
            raise TypeError(
                f"save_checkpoint: tensor {name!r} has dtype {value.dtype}, which safetensors cannot store; "
                f"use a bool, integer or float dtype"
            )
        # safetensors writes the raw buffer, so it needs C order and native byte order.
        arrays[name] = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False))

    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "tokenizer_sha256": tokenizer_sha256,
        "extra": extra_json,
    }

    raw = save(arrays, metadata=metadata)
    header_len = struct.unpack("<Q", raw[:_HEADER_LEN_BYTES])[0]
    header_bytes = _canonical_header(raw[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    with atomic_writer(out) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        f.write(memoryview(raw)[_HEADER_LEN_BYTES + header_len :])
    return out


def _canonical_header(header: bytes) -> bytes:
    """Re-serialise a safetensors header with `__metadata__` keys sorted, space-padded to 8 bytes.

    safetensors emits the metadata map in Rust HashMap order, which is randomly seeded per
    process; sorting it makes identical inputs give byte-identical files, so a released
    checkpoint's sha256 is reproducible. The padding keeps the data section 8-byte aligned,
    as safetensors itself does.
    """
    parsed = json.loads(header.decode("utf-8"))
    canonical: Dict[str, Any] = {}
    if "__metadata__" in parsed:
        canonical["__metadata__"] = dict(sorted(parsed.pop("__metadata__").items()))
    canonical.update(parsed)  # tensors keep safetensors' own (deterministic) order
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-(_HEADER_LEN_BYTES + len(text)) % 8)


# ---------------------------------------------------------------------------- load


def _read_header(path: Path) -> Dict[str, Any]:
    """Parse and sanity-check the safetensors header of `path` without trusting it."""
    size = path.stat().st_size
    name = str(path)
    if size == 0:
        raise CheckpointError(f"{name}: the file is empty (0 bytes), not a safetensors checkpoint")
    if size < _HEADER_LEN_BYTES:
        raise CheckpointError(
            f"{name}: only {size} bytes, too short for a safetensors file (the 8-byte header length alone "
            f"is missing); the file is truncated or not a checkpoint"
        )
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(_HEADER_LEN_BYTES))
        if header_len == 0 or header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{name}: not a safetensors file (its first 8 bytes give an implausible header length "
                f"of {header_len} bytes)"
            )
        if _HEADER_LEN_BYTES + header_len > size:
            raise CheckpointError(
                f"{name}: truncated or not a safetensors file: the header claims {header_len} bytes but "
                f"the file has only {size - _HEADER_LEN_BYTES} bytes after the length field"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: corrupt safetensors header, not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header: expected a JSON object, got {type(header).__name__}")

    data_len = size - _HEADER_LEN_BYTES - header_len
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(
                f"{name}: corrupt safetensors header: entry {tname!r} lacks dtype/shape/data_offsets"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise CheckpointError(f"{name}: tensor {tname!r} has unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{name}: corrupt safetensors header: bad shape or data_offsets for {tname!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{name}: corrupt safetensors header: data_offsets {offsets} of {tname!r}")
        if end > data_len:
            raise CheckpointError(
                f"{name}: truncated: tensor {tname!r} needs bytes up to {end} of the data section, "
                f"but the file holds only {data_len}"
            )
        expected = _DTYPE_SIZES[dtype] * math.prod(shape)  # Python ints: a hostile shape cannot overflow
        if end - begin != expected:
            raise CheckpointError(
                f"{name}: corrupt safetensors header: tensor {tname!r} ({dtype}, shape {shape}) needs "
                f"{expected} bytes but data_offsets span {end - begin}"
            )
    return header


def load_checkpoint(path: PathLike, expected_tokenizer_sha256: Optional[str] = None,
                    select: Optional[Callable[[str], bool]] = None) -> Checkpoint:
    """Load and validate an SLM360 Nano checkpoint written by `save_checkpoint`.

    Raises CheckpointError (a ValueError) naming the file when it is missing, empty,
    truncated, corrupt, a foreign safetensors file, of another format version, has an
    invalid config, or - if `expected_tokenizer_sha256` is given - was trained with a
    different tokenizer. Tensor shapes are not checked here; see `validate_params`.
    With `select`, only the tensors whose name it accepts are read from the file (serving
    leaves out what only training needs).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    p = Path(path)
    name = str(p)
    if not p.exists():
        raise CheckpointError(f"{name}: checkpoint file does not exist; check the path")
    if not p.is_file():
        raise CheckpointError(f"{name}: is not a regular file; pass the path of a .safetensors checkpoint")

    header = _read_header(p)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "format" not in meta:
        raise CheckpointError(
            f"{name}: not an SLM360 Nano checkpoint: it is a safetensors file without the "
            f"'format' metadata that save_checkpoint writes (a foreign model file?)"
        )
    if meta["format"] != FORMAT_NAME:
        raise CheckpointError(
            f"{name}: not an SLM360 Nano checkpoint: its format is {meta['format']!r}, expected {FORMAT_NAME!r}"
        )
    version_text = meta.get("format_version")
    try:
        version = int(version_text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{name}: SLM360 Nano checkpoint with missing or non-integer format_version {version_text!r}"
        ) from None
    if version != FORMAT_VERSION:
        newer = " (written by a newer slm360-rasa; upgrade the package)" if version > FORMAT_VERSION else ""
        raise CheckpointError(
            f"{name}: checkpoint format version {version}, but this code reads version {FORMAT_VERSION}{newer}"
        )

    for key in ("config", "tokenizer_sha256"):
        if key not in meta:
            raise CheckpointError(f"{name}: SLM360 Nano checkpoint is missing the {key!r} metadata entry")
    try:
        config = NanoConfig.from_dict(json.loads(meta["config"]))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: the 'config' metadata is not valid JSON ({exc})") from exc
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{name}: invalid model config in checkpoint: {exc}") from exc

    try:
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{name}: the 'extra' metadata is not valid JSON ({exc})") from exc
    if not isinstance(extra, dict):
        raise CheckpointError(f"{name}: the 'extra' metadata must be a JSON object, got {type(extra).__name__}")

    file_sha = meta["tokenizer_sha256"]
    if expected_tokenizer_sha256 is not None and file_sha != expected_tokenizer_sha256:
        raise CheckpointError(
            f"{name}: the checkpoint was trained with a different tokenizer: it records tokenizer "
            f"sha256 {file_sha}, but the tokenizer in use has sha256 {expected_tokenizer_sha256}; load "
            f"the tokenizer.json it was trained with, or retrain the checkpoint"
        )

    try:
        if select is None:
            tensors = load_file(str(p))
        else:
            with safe_open(str(p), framework="np") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys() if select(k)}
    except Exception as exc:  # safetensors raises its own SafetensorError; keep the cause attached
        raise CheckpointError(f"{name}: safetensors could not read the tensor data: {exc}") from exc
    return Checkpoint(tensors=tensors, config=config, tokenizer_sha256=file_sha, extra=extra, path=p)


# ---------------------------------------------------------------------------- validation


def validate_params(
    tensors: Mapping[str, np.ndarray],
    config: NanoConfig,
    quantized: bool = False,
    source: str = "checkpoint",
) -> None:
    """Check that `tensors` hold exactly the float master weights `config.param_shapes()` names.

    Every problem is collected into one CheckpointError: missing names, unexpected names,
    shape mismatches, dtypes other than float32/float16, and non-finite values. `source`
    (e.g. the file name) starts the message. With `quantized=True` nothing is checked here:
    INT4 tensors are validated by `nano.quant`.
    """
    if quantized:
        return
    expected = config.param_shapes()
    problems = []
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected)
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for n, shape in expected.items():
        if n not in tensors:
            continue
        t = tensors[n]
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{n} has shape {tuple(t.shape)}, config needs {tuple(shape)}")
        if t.dtype not in _MASTER_DTYPES:
            problems.append(f"{n} has dtype {t.dtype}, expected float32 or float16")
        elif not np.isfinite(t).all():
            problems.append(f"{n} contains NaN or inf")
    if problems:
        raise CheckpointError(f"{source}: parameters do not match the config: " + "; ".join(problems))

"""Small file helpers shared by every layer: atomic writes, streamed sha256, the default file mode.

One copy of each, so that a checkpoint, a tokenizer, a cached teacher file and a benchmark
result are written the same way: never a half-written file under the final name (a crash
or Ctrl-C leaves either the old file or the new one), and with the permissions `open()`
would have given, not mkstemp's 0600.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

# Read size of `file_sha256`: large enough that hashing a 30 MB checkpoint makes few calls,
# small enough that it never holds the file in memory.
HASH_CHUNK_BYTES = 1 << 20


def default_file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` only when the block ends without error.

    Writes go to a temporary sibling (same directory, so `os.replace` is atomic), which is
    flushed, fsynced, given `default_file_mode()` and moved into place; on any exception the
    temporary file is removed and `path` is left as it was. Parent directories are created.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(p.parent), prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; our files are shared
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_writer`); returns the path."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically in `encoding` (see `atomic_writer`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def file_sha256(path: PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in HASH_CHUNK_BYTES chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()

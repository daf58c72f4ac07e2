"""File helpers (slm360_rasa/fileio.py): atomic writes never leave a half file; streamed sha256."""
import hashlib
import os
import stat

import pytest

from slm360_rasa.fileio import atomic_write_bytes, atomic_write_text, atomic_writer, default_file_mode, file_sha256


def test_atomic_write_creates_parents_and_gives_the_umask_mode(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b.txt", "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    assert stat.S_IMODE(os.stat(p).st_mode) == default_file_mode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = atomic_write_bytes(tmp_path / "f.bin", b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(p) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_file_sha256_streams_large_files(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    p = atomic_write_bytes(tmp_path / "big.bin", data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()

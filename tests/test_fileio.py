"""Tests for minidress.fileio: atomic writes and hashing."""

import os

import numpy as np
import pytest

from minidress.fileio import atomic_open, atomic_write_bytes


def _leftovers(directory):
    """Sorted names of everything in directory (temp files would show up here)."""
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_bytes_creates_parents_and_content(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(target, b"hello")
    assert target.read_bytes() == b"hello"
    atomic_write_bytes(target, b"second")  # overwrite
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == ["file.bin"]


def test_atomic_write_bytes_rejects_str(tmp_path):
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "x", "text")
    assert _leftovers(tmp_path) == []


def test_atomic_open_failure_keeps_original_and_removes_temp(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target) as f:
            f.write(b"partial new cont")
            raise RuntimeError("boom")  # crash mid-write
    assert target.read_bytes() == b"original"
    assert _leftovers(tmp_path) == ["ckpt.bin"]


def test_atomic_write_bytes_failure_in_replace(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"original")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"original"
    assert _leftovers(tmp_path) == ["ckpt.bin"]


def test_atomic_open_failure_without_existing_file(tmp_path):
    target = tmp_path / "new.bin"
    with pytest.raises(KeyError):
        with atomic_open(target) as f:
            f.write(b"x")
            raise KeyError("interrupted")
    assert _leftovers(tmp_path) == []


def test_atomic_open_with_np_savez(tmp_path):
    target = tmp_path / "arrays.npz"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    with atomic_open(target) as f:
        np.savez(f, w=w)
    with np.load(target) as z:
        np.testing.assert_array_equal(z["w"], w)


def test_atomic_open_text_mode_and_bad_mode(tmp_path):
    with atomic_open(tmp_path / "t.txt", "w") as f:
        f.write("héllo\n")
    assert (tmp_path / "t.txt").read_text() == "héllo\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "t.txt", "rb"):
            pass



"""Versioned ``.npz`` archives with JSON metadata and a sha256, written atomically.

One archive format serves every file minidress keeps (training checkpoints now; the DRESS
store and golden vectors use the same reader and writer). An archive holds:

* the arrays, by name;
* ``__meta__``: UTF-8 JSON (as a uint8 array) with at least ``kind``, ``format_version`` and
  ``minidress_version``;
* ``__sha256__``: the sha256 of every other entry (name, dtype, shape and bytes, in sorted name
  order), so a flipped bit anywhere is caught on load, not discovered as a wrong number later.

Files are read with ``allow_pickle=False``: an archive can never run code.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from . import __version__
from .fileio import atomic_open

CHECKPOINT_KIND = "minidress.checkpoint"
CHECKPOINT_VERSION = 1


class ArchiveError(ValueError):
    """A file is not a valid minidress archive (corrupt, truncated, tampered or wrong kind)."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_archive(path, arrays: dict[str, np.ndarray], meta: dict, kind: str, version: int) -> Path:
    """Write ``arrays`` and ``meta`` to ``path`` (a temporary file, then a rename).

    Parameters
    ----------
    arrays : dict of name -> ndarray; names must not start with ``__``
    meta : JSON-serialisable dict
    kind, version : what the file is, and the version of its layout
    """
    bad = [k for k in arrays if k.startswith("__")]
    if bad:
        raise ValueError(f"array names starting with '__' are reserved, got {bad}")
    meta = {**meta, "kind": kind, "format_version": version, "minidress_version": __version__}
    entries = {k: np.asarray(v) for k, v in arrays.items()}
    entries["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    entries["__sha256__"] = np.frombuffer(_digest(entries).encode(), np.uint8)
    path = Path(path)
    with atomic_open(path) as f:
        np.savez(f, **entries)
    return path


def read_archive(path, kind: str, versions) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify an archive written by ``write_archive``.

    Raises
    ------
    FileNotFoundError
        No such file.
    ArchiveError
        Not a readable ``.npz``, missing metadata or checksum, checksum mismatch, another kind of
        file, or a format version not in ``versions``. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such archive: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise ArchiveError(f"{path}: not a readable .npz archive (corrupt or truncated?): {e}") from e
    for key in ("__meta__", "__sha256__"):
        if key not in entries:
            raise ArchiveError(f"{path}: missing {key!r}; not a minidress archive")
    stored = entries.pop("__sha256__").tobytes().decode(errors="replace")
    actual = _digest(entries)
    if stored != actual:
        raise ArchiveError(f"{path}: checksum mismatch (stored sha256 {stored[:16]}..., "
                           f"contents hash to {actual[:16]}...): the file is corrupt or was edited")
    try:
        meta = json.loads(entries.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{path}: metadata is not valid JSON: {e}") from e
    if meta.get("kind") != kind:
        raise ArchiveError(f"{path}: expected a {kind!r} file, got kind {meta.get('kind')!r}")
    if meta.get("format_version") not in versions:
        raise ArchiveError(f"{path}: format_version {meta.get('format_version')!r} is not "
                           f"supported (this minidress reads {sorted(versions)})")
    return entries, meta


def save_checkpoint(path, model, optimizer=None, meta=None) -> Path:
    """Save a model's state (parameters and buffers) and optionally an optimizer's.

    ``meta`` should describe how to rebuild the model (see ``minidress.nn.train.fit``), plus anything
    else worth keeping: epoch, history, seed, options.
    """
    arrays = {f"model/{k}": v for k, v in model.state().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    return write_archive(path, arrays, meta or {}, CHECKPOINT_KIND, CHECKPOINT_VERSION)


def load_checkpoint(path, model=None, optimizer=None) -> dict:
    """Load a checkpoint; copy its state into ``model`` and ``optimizer`` when given.

    Returns
    -------
    meta : dict
        The metadata; ``meta["model_state"]`` and ``meta["optimizer_state"]`` hold the arrays.
    """
    entries, meta = read_archive(path, CHECKPOINT_KIND, {CHECKPOINT_VERSION})
    model_state = {k[6:]: v for k, v in entries.items() if k.startswith("model/")}
    optim_state = {k[6:]: v for k, v in entries.items() if k.startswith("optim/")}
    if model is not None:
        model.load_state(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return {**meta, "model_state": model_state, "optimizer_state": optim_state}

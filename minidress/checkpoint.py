"""Versioned ``.npz`` archives with JSON metadata and a sha256, written atomically.

One archive format serves every file minidress keeps (training checkpoints, the DRESS store and
golden vectors use the same reader and writer). An archive holds:

* the arrays, by name;
* ``__meta__``: UTF-8 JSON (as a uint8 array) with at least ``kind``, ``format_version`` and
  ``minidress_version``;
* ``__sha256__``: the sha256 of every other entry (name, dtype, shape and bytes, in sorted name
  order), so a flipped bit anywhere is caught on load, not discovered as a wrong number later.

Reading trusts nothing in the file (``read_archive``). Before any array is inflated, the zip
directory is checked against named caps (``ArchiveLimits``: members, bytes per member and in
total, compression ratio); each ``.npy`` header (dtype, shape) is parsed and must describe exactly
the bytes its member holds, of a plain dtype (never an object array: an archive can never run
code); the data is then read in bounded chunks. The metadata must be a JSON object of bounded
size and depth. Every failure is an ``ArchiveError`` (a ``ValueError``) with a one-line message
naming the file, what was wrong and what was expected.

A checksum proves the file is what its writer wrote, not that the writer was minidress: anyone can
re-sign edited arrays. So ``load_checkpoint`` also checks the values (finite floats, non-negative
batch-norm variances, rank buffers that are row permutations) and, for ``--resume``, that the
checkpoint belongs to the expected run (``expect_meta``); ``minidress.deploy.store.Store.load``
checks a store against the model its metadata describes.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .fileio import atomic_open

CHECKPOINT_KIND = "minidress.checkpoint"
CHECKPOINT_VERSION = 1

# Format 1 names these kinds "minidress.store" and "minidress.golden" (docs/golden-format.md);
# the move into deploy/ and app/ renamed the constants in the code. Files are written under the
# format's name and read under either, so files written before and after the move both load.
KIND_ALIASES = {"minidress.deploy.store": "minidress.store", "minidress.app.golden": "minidress.golden"}

# Caps on what reading one archive may allocate. The largest file minidress writes (a ResNet or
# MNIST MLP checkpoint with Adam moments) holds a few hundred arrays and a few MB; the caps leave
# room for far larger models while refusing a small file that claims gigabytes.
MAX_MEMBERS = 10_000                 # arrays in one archive
MAX_MEMBER_BYTES = 1 << 30           # one array, uncompressed (1 GiB)
MAX_TOTAL_BYTES = 2 << 30            # all arrays together, uncompressed (2 GiB)
# np.savez stores arrays uncompressed (ratio 1); a deflated member that inflates more than this
# is a compression bomb, refused before it is inflated.
MAX_COMPRESSION_RATIO = 100
MAX_META_BYTES = 16 << 20            # the JSON metadata (a long run's history is ~100 kB)
MAX_META_DEPTH = 32                  # nesting of the JSON metadata (minidress writes 4 levels)
MAX_NDIM = 32                        # dimensions of one array
MAX_HEADER_BYTES = 10_000            # one .npy header (NumPy's own default limit)

# Array dtypes an archive may hold: booleans, numbers and fixed-width strings (the optimizer's
# name). Never objects, whose bytes are a pickle, nor structured or zero-width dtypes.
ALLOWED_DTYPE_KINDS = "biufcSU"

# The metadata that identifies a training run: a checkpoint of another run must not be resumed.
RUN_IDENTITY = ("model", "dataset", "config", "seed")
# JSON types of the checkpoint metadata minidress reads back (training, ``minidress eval``, the
# any-time peers), checked whenever a key is present.
CHECKPOINT_META_TYPES = {"model": dict, "config": dict, "dataset": str, "seed": int,
                         "history": list, "peer": str, "options": dict}
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}

_CHUNK = 1 << 20                     # bytes read from a member at a time
# What the zip and zlib layers raise on a damaged file: a corrupt header can surface as any of
# these (an unknown compression method is a NotImplementedError, an "encrypted" flag a
# RuntimeError, a lying size an EOFError or a bad CRC a BadZipFile).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error,
               NotImplementedError, RuntimeError, OverflowError, KeyError, IndexError)
# What NumPy's .npy header parser raises on a malformed header (a Python literal, tokenized and
# then parsed safely; an unclosed bracket is a tokenize.TokenError, found by the fuzz suite).
_HEADER_ERRORS = (ValueError, TypeError, KeyError, IndexError, SyntaxError, OverflowError,
                  RecursionError, MemoryError, tokenize.TokenError)


class ArchiveError(ValueError):
    """A file is not a valid minidress archive (corrupt, truncated, tampered or wrong kind)."""

    def __init__(self, message):
        # One line, whatever the message embeds (a zipfile or JSON error may span lines).
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on reading one archive; the defaults are the module's ``MAX_*`` constants.

    Pass ``ArchiveLimits(max_member_bytes=...)`` to ``read_archive`` (or ``load_checkpoint``,
    ``Store.load``) to read a larger file, or to refuse smaller ones.
    """
    max_members: int = MAX_MEMBERS
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_compression_ratio: float = MAX_COMPRESSION_RATIO
    max_meta_bytes: int = MAX_META_BYTES
    max_meta_depth: int = MAX_META_DEPTH
    max_ndim: int = MAX_NDIM


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _format_kind(kind: str) -> str:
    """The format's name of ``kind`` (see ``KIND_ALIASES``)."""
    return KIND_ALIASES.get(kind, kind)


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
    meta = {**meta, "kind": _format_kind(kind), "format_version": version,
            "minidress_version": __version__}
    entries = {k: np.asarray(v) for k, v in arrays.items()}
    entries["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    entries["__sha256__"] = np.frombuffer(_digest(entries).encode(), np.uint8)
    path = Path(path)
    with atomic_open(path) as f:
        np.savez(f, **entries)
    return path


def read_archive(path, kind: str, versions, limits: ArchiveLimits | None = None
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify an archive written by ``write_archive``.

    Parameters
    ----------
    path : path of the ``.npz`` file
    kind : the kind of file expected (``KIND_ALIASES`` names are the same kind)
    versions : collection of int, the format versions the caller reads
    limits : ArchiveLimits, optional (default: the module's ``MAX_*`` caps)

    Returns
    -------
    arrays : dict name -> ndarray (writable, owning its data)
    meta : dict, the JSON metadata

    Raises
    ------
    FileNotFoundError
        No such file.
    ArchiveError
        Not a readable ``.npz`` of plain arrays, beyond a cap of ``limits``, missing metadata or
        checksum, checksum mismatch, metadata that is not a JSON object of bounded size and depth,
        another kind of file, or a format version not in ``versions``. One line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such archive: {path}")
    limits = ArchiveLimits() if limits is None else limits
    entries = _read_members(path, limits)
    for key in ("__meta__", "__sha256__"):
        if key not in entries:
            raise ArchiveError(f"{path}: missing {key!r}; not a minidress archive")
        raw = entries[key]
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ArchiveError(f"{path}: {key} must be a 1-D uint8 array (text bytes), got "
                               f"{raw.dtype} of shape {raw.shape}")
    stored = entries.pop("__sha256__").tobytes().decode("ascii", errors="replace")
    actual = _digest(entries)
    if stored != actual:
        raise ArchiveError(f"{path}: checksum mismatch (stored sha256 {stored[:16]}..., "
                           f"contents hash to {actual[:16]}...): the file is corrupt or was edited")
    meta = _parse_meta(path, entries.pop("__meta__"), limits)
    found = meta.get("kind")
    if not isinstance(found, str) or _format_kind(found) != _format_kind(kind):
        raise ArchiveError(f"{path}: expected a {_format_kind(kind)!r} file, got kind {found!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in versions:
        raise ArchiveError(f"{path}: format_version {version!r} is not supported "
                           f"(this minidress reads {sorted(versions)})")
    if not isinstance(meta.get("minidress_version"), str):
        raise ArchiveError(f"{path}: minidress_version must be a string, got "
                           f"{_brief(meta.get('minidress_version'))}")
    return entries, meta


def read_npz(path, limits: ArchiveLimits | None = None) -> dict[str, np.ndarray]:
    """The arrays of any ``.npz`` file (another program's, without checksum or metadata), read
    as safely as an archive: the zip directory checked against ``limits`` first, each header
    parsed before its data, plain dtypes only, bounded reads. Raises ``FileNotFoundError`` or
    ``ArchiveError`` (one line naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return _read_members(path, ArchiveLimits() if limits is None else limits)


def _read_members(path: Path, limits: ArchiveLimits) -> dict[str, np.ndarray]:
    """Every ``<name>.npy`` member as an array, checking the zip directory against ``limits``
    before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_directory(path, infos, limits)
            return {info.filename[:-len(".npy")]: _read_npy(path, zf, info, limits) for info in infos}
    except ArchiveError:
        raise
    except _ZIP_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); "
                           f"expected a zip file of .npy arrays (corrupt or truncated?)") from e


def _check_directory(path: Path, infos, limits: ArchiveLimits) -> None:
    """The zip directory's declared members: count, names, method and sizes, all before reading."""
    if len(infos) > limits.max_members:
        raise ArchiveError(f"{path}: holds {len(infos)} members, more than max_members="
                           f"{limits.max_members}")
    seen, total = set(), 0
    for info in infos:
        name = info.filename
        if name in seen:
            raise ArchiveError(f"{path}: member {name!r} appears twice; expected unique names")
        seen.add(name)
        if not name.endswith(".npy"):
            raise ArchiveError(f"{path}: member {name!r} is not a .npy array; expected only "
                               f"<name>.npy members")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{path}: member {name!r} is encrypted; expected plain members")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArchiveError(f"{path}: member {name!r} uses compression method "
                               f"{info.compress_type}; expected stored (0) or deflate (8)")
        if info.file_size > limits.max_member_bytes:
            raise ArchiveError(f"{path}: member {name!r} declares {info.file_size} bytes, more "
                               f"than max_member_bytes={limits.max_member_bytes}")
        if info.file_size > limits.max_compression_ratio * info.compress_size:
            raise ArchiveError(f"{path}: member {name!r} would inflate {info.compress_size} bytes "
                               f"to {info.file_size}, more than max_compression_ratio="
                               f"{limits.max_compression_ratio} (minidress writes arrays uncompressed)")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ArchiveError(f"{path}: members declare more than max_total_bytes="
                               f"{limits.max_total_bytes} bytes in total")


def _read_npy(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> np.ndarray:
    """One member: its header parsed and checked first, then exactly the bytes it declares."""
    name = info.filename[:-len(".npy")]
    with zf.open(info) as f:
        dtype, shape, fortran = _read_npy_header(path, name, f, limits)
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - f.tell()
        if nbytes != held:
            raise ArchiveError(f"{path}: array {name!r} declares shape {shape} of {dtype} "
                               f"({nbytes} bytes), but its member holds {held} bytes of data")
        out = np.empty(shape, dtype, order="F" if fortran else "C")
        _read_into(f, out.reshape(-1, order="A").view(np.uint8))
    return out


def _read_npy_header(path: Path, name: str, f, limits: ArchiveLimits):
    """``(dtype, shape, fortran_order)`` of a ``.npy`` stream, refusing anything but a plain
    array of at most ``limits.max_ndim`` non-negative dimensions."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, MAX_HEADER_BYTES)
        else:
            raise ValueError(f"format version {version}")
    except _HEADER_ERRORS as e:
        raise ArchiveError(f"{path}: array {name!r} has no readable .npy header ({e}); expected "
                           f"a .npy header of format 1.0 or 2.0") from e
    if (dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.hasobject or dtype.fields is not None
            or dtype.subdtype is not None or dtype.itemsize == 0):
        raise ArchiveError(f"{path}: array {name!r} has dtype {dtype!r}; expected booleans, "
                           f"numbers or fixed-width strings (never objects)")
    if len(shape) > limits.max_ndim or any(d < 0 for d in shape):
        raise ArchiveError(f"{path}: array {name!r} declares shape {shape}; expected at most "
                           f"max_ndim={limits.max_ndim} non-negative dimensions")
    return dtype, shape, fortran


def _read_into(f, buf: np.ndarray) -> None:
    """Fill the byte array ``buf`` from ``f`` in chunks of ``_CHUNK`` bytes (a member never
    inflates more than we asked for at a time)."""
    pos = 0
    while pos < len(buf):
        chunk = f.read(min(_CHUNK, len(buf) - pos))
        if not chunk:
            raise EOFError(f"member ends after {pos} of {len(buf)} bytes")
        buf[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)


def _parse_meta(path: Path, raw: np.ndarray, limits: ArchiveLimits) -> dict:
    """The metadata: a JSON object of at most ``max_meta_bytes`` and ``max_meta_depth`` levels."""
    if raw.size > limits.max_meta_bytes:
        raise ArchiveError(f"{path}: metadata is {raw.size} bytes, more than max_meta_bytes="
                           f"{limits.max_meta_bytes}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSON syntax, or an integer of more digits than Python converts.
        raise ArchiveError(f"{path}: metadata is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise ArchiveError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    if not _within_depth(meta, limits.max_meta_depth):
        raise ArchiveError(f"{path}: metadata is nested deeper than max_meta_depth="
                           f"{limits.max_meta_depth}")
    return meta


def _within_depth(value, limit: int) -> bool:
    """Whether JSON ``value`` nests at most ``limit`` objects/arrays deep (walking no deeper)."""
    if not isinstance(value, (dict, list)):
        return True
    if limit <= 0:
        return False
    children = value.values() if isinstance(value, dict) else value
    return all(_within_depth(v, limit - 1) for v in children)


def _brief(value, width=60) -> str:
    """``repr(value)``, cut to ``width`` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# -- what a checkpoint's arrays must hold -----------------------------------------------------

def check_state_values(arrays: dict[str, np.ndarray]) -> None:
    """Raise ``ArchiveError`` (without a file name) naming the first array whose values no model
    state may hold: a float array with NaN or infinity, a batch-norm ``running_var`` with a
    negative entry, or a rank buffer (``<layer>.ranks``) that is not, row by row, a permutation of
    ``0 .. row_len - 1``. Names may carry a prefix (``model/3.ranks``, ``dense/2.running_var``).

    One check serves checkpoints (``load_checkpoint``) and stores (``Store.validate``).
    """
    for name, a in arrays.items():
        leaf = name.replace("/", ".").rsplit(".", 1)[-1]
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            raise ArchiveError(f"{name} holds NaN or infinite values; expected finite numbers")
        if leaf == "running_var" and a.size and a.min() < 0:
            raise ArchiveError(f"{name} holds a negative variance ({a.min():.4g}); expected a "
                               f"batch-norm variance >= 0")
        if leaf == "ranks":
            _check_ranks(name, a)


def _check_ranks(name: str, ranks: np.ndarray) -> None:
    if ranks.dtype.kind not in "iu" or ranks.ndim != 2:
        raise ArchiveError(f"{name} must be an integer array [rows, row_len], got {ranks.dtype} "
                           f"of shape {ranks.shape}")
    # A mask keeps rank < n per row: ranks that repeat or skip a value keep the wrong count.
    wrong = ~np.all(np.sort(ranks, axis=1) == np.arange(ranks.shape[1]), axis=1)
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise ArchiveError(f"{name} row {row} is not a permutation of 0..{ranks.shape[1] - 1} "
                           f"({int(wrong.sum())} such rows); expected each row to rank every column once")


def _check_optimizer_layout(state: dict, optimizer, model=None) -> None:
    """An optimizer state (``state_dict`` names) must have the layout ``optimizer`` gives it:
    every entry the optimizer holds now (its hyper-parameters, any buffers it has made) of the
    same dtype and shape, and each per-parameter buffer (``<state>/<param>``, not 0-d) of its
    parameter's shape and dtype; ``load_state_dict`` alone would accept either."""
    live = optimizer.state_dict()
    params = {} if model is None else model.parameters()
    for key, a in state.items():
        ref = live.get(key)
        # A string entry names the optimizer; load_state_dict reports a different one best.
        if ref is not None and ref.dtype.kind != "U" and (a.dtype, a.shape) != (ref.dtype, ref.shape):
            raise ArchiveError(f"optim/{key} has {a.dtype} {a.shape}; the optimizer holds "
                               f"{ref.dtype} {ref.shape}")
        param = key.partition("/")[2]
        if not param or model is None:
            continue
        p = params.get(param)
        if p is None:
            raise ArchiveError(f"optim/{key} belongs to no parameter of the model")
        if a.ndim and (a.dtype, a.shape) != (p.dtype, p.shape):
            raise ArchiveError(f"optim/{key} has shape {a.shape} {a.dtype}; its parameter {param} "
                               f"is {p.shape} {p.dtype}")


def save_checkpoint(path, model, optimizer=None, meta=None) -> Path:
    """Save a model's state (parameters and buffers) and optionally an optimizer's.

    ``meta`` should describe how to rebuild the model (see ``minidress.nn.train.fit``), plus anything
    else worth keeping: epoch, history, seed, options.
    """
    arrays = {f"model/{k}": v for k, v in model.state().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    return write_archive(path, arrays, meta or {}, CHECKPOINT_KIND, CHECKPOINT_VERSION)


def load_checkpoint(path, model=None, optimizer=None, *, expect_meta=None, may_differ=(),
                    limits: ArchiveLimits | None = None) -> dict:
    """Load and check a checkpoint; copy its state into ``model`` and ``optimizer`` when given.

    Parameters
    ----------
    path : path of the checkpoint
    model, optimizer : optional; their state is replaced by the checkpoint's
    expect_meta : dict, optional
        The run the checkpoint must belong to (``--resume``). Every ``RUN_IDENTITY`` key it holds
        (``model``, ``dataset``, ``config``, ``seed``) must be in the checkpoint's metadata with
        an equal value (compared as JSON, so tuples equal lists); ``config`` is compared key by
        key over the keys of both. Checked before anything is copied into ``model``.
    may_differ : collection of str
        ``config`` keys that may differ on resume (``minidress.nn.train.RESUMABLE_CHANGES``:
        ``epochs``, ``out``, ...).
    limits : ArchiveLimits, optional (see ``read_archive``)

    Returns
    -------
    meta : dict
        The metadata; ``meta["model_state"]`` and ``meta["optimizer_state"]`` hold the arrays.

    Raises
    ------
    FileNotFoundError
        No such file.
    ArchiveError
        Everything ``read_archive`` refuses; metadata of the wrong JSON type
        (``CHECKPOINT_META_TYPES``); arrays other than ``model/<name>`` and ``optim/<name>``;
        values no state may hold (``check_state_values``); an optimizer state of another layout
        than ``optimizer``'s; a checkpoint of another run (the message lists the differing
        keys); a state that does not fit ``model`` or ``optimizer``. One line naming the file.
    """
    entries, meta = read_archive(path, CHECKPOINT_KIND, {CHECKPOINT_VERSION}, limits)
    for key, kind in CHECKPOINT_META_TYPES.items():
        value = meta.get(key, kind())
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ArchiveError(f"{path}: metadata {key!r} must be a JSON {_JSON_NAMES[kind]}, got "
                               f"{type(value).__name__}")
    unexpected = sorted(k for k in entries if not k.startswith(("model/", "optim/")))
    if unexpected:
        raise ArchiveError(f"{path}: unexpected arrays {unexpected[:5]}; a checkpoint holds only "
                           f"model/<name> and optim/<name>")
    model_state = {k[6:]: v for k, v in entries.items() if k.startswith("model/")}
    optim_state = {k[6:]: v for k, v in entries.items() if k.startswith("optim/")}
    try:
        check_state_values(entries)
        if optimizer is not None:
            _check_optimizer_layout(optim_state, optimizer, model)
    except ArchiveError as e:
        raise ArchiveError(f"{path}: {e}") from None
    if expect_meta is not None:
        _check_same_run(path, meta, expect_meta, set(may_differ))
    try:
        if model is not None:
            model.load_state(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
    except (ValueError, TypeError, KeyError) as e:
        raise ArchiveError(f"{path}: does not fit the model or optimizer it is loaded into: {e}") from e
    return {**meta, "model_state": model_state, "optimizer_state": optim_state}


class _Absent:
    """Stands for a key a metadata dict does not hold (``None`` is a value JSON can hold)."""

    def __repr__(self):
        return "absent"


_ABSENT = _Absent()


def _as_json(value):
    """``value`` as it reads back from a file's JSON: tuples become lists, NumPy scalars numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))


def run_differences(saved: dict, expected: dict, may_differ=()) -> list[tuple[str, object, object]]:
    """``(key, value in saved, value expected)`` for every ``RUN_IDENTITY`` key of ``expected``
    that ``saved`` lacks or holds otherwise; ``config`` compared key by key (``config.<key>``),
    except the keys in ``may_differ``."""
    out = []
    for key in RUN_IDENTITY:
        if key not in expected:
            continue
        want, got = _as_json(expected[key]), saved.get(key, _ABSENT)
        if key == "config" and isinstance(want, dict) and isinstance(got, dict):
            for k in sorted(set(want) | set(got), key=str):
                a, b = got.get(k, _ABSENT), want.get(k, _ABSENT)
                if k not in may_differ and a != b:
                    out.append((f"config.{k}", a, b))
        elif got != want:
            out.append((key, got, want))
    return out


def _check_same_run(path, meta: dict, expected: dict, may_differ) -> None:
    differ = run_differences(meta, expected, may_differ)
    if differ:
        shown = "; ".join(f"{k}: {_brief(a)} there, {_brief(b)} expected" for k, a, b in differ[:4])
        more = f"; and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ArchiveError(f"{path}: a checkpoint of another run: {', '.join(k for k, _, _ in differ)} "
                           f"differ ({shown}{more})")

"""CIFAR-10, read from its published tarball without running any code from it.

What is trusted, and why:

* The tarball ``cifar-10-python.tar.gz`` is the only CIFAR-10 file with a
  published digest (an MD5), so it is the unit of trust: it is checked on
  every load (found in ``data_dir``, in the cache, or just downloaded), and
  the batches are read from those verified bytes in memory. Nothing is
  extracted to disk, so there is no extracted folder that could change
  unnoticed between loads. An extracted ``cifar-10-batches-py/`` folder on
  its own is refused: no digest of a single batch is published.
* The batches are pickles written by Python 2. ``pickle.load`` would call any
  function a pickle names, so a crafted batch could run a shell command.
  ``_BatchUnpickler`` admits only the three globals that a genuine batch
  uses (NumPy's ``_reconstruct``, ``ndarray`` and ``dtype``: the dict, lists,
  ints and byte strings are pickle opcodes, not globals), and even those are
  stand-ins: the arrays are rebuilt here from their type code, shape and raw
  bytes, so NumPy never sees a pickled state. Any other global, and any
  opcode a batch does not use, is refused with a ``DataError`` before it acts.
* The archive is decompressed under ``MAX_DECOMPRESSED_BYTES``, and members
  with absolute or ``..`` paths, links, devices, or names used twice (or as
  both a file and a folder) are refused, since they make it ambiguous which
  bytes a batch name means.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import pickletools
import reprlib
import tarfile
from pathlib import PurePosixPath
from typing import Optional

import numpy as np

from .datasets import Dataset
from .loaders import (
    REGISTRY,
    DataError,
    DataNotFoundError,
    Fetch,
    PathLike,
    _one_line,
    fetch_files,
    gunzip,
    is_gzip,
    search_dirs,
)

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


# ---------------------------------------------------------------------------
# tar archives, in memory
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _tar_errors(source):
    """Turn whatever tarfile raises on a broken archive into one DataError."""
    try:
        yield
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{source}: corrupt tar archive ({_one_line(e)})") from e


def _check_members(members, source) -> dict:
    """{normalised name: member}, refusing members that make a name ambiguous or unsafe."""
    by_name = {}
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts:
            raise DataError(f"{source}: refusing unsafe member path {m.name!r}; expected relative "
                            f"paths without '..'")
        if not (m.isfile() or m.isdir()):  # a link would let one name read another member's bytes
            raise DataError(f"{source}: refusing member {m.name!r}: not a plain file or folder")
        key = str(path)  # "a//b" and "./a/b" both mean "a/b"
        if key in by_name:
            raise DataError(f"{source}: member name {m.name!r} appears twice; expected unique names")
        by_name[key] = m
    files = {k for k, m in by_name.items() if m.isfile()}
    for key in by_name:
        clash = next((str(p) for p in PurePosixPath(key).parents if str(p) in files), None)
        if clash is not None:
            raise DataError(f"{source}: member {key!r} needs {clash!r} as a folder, but the "
                            f"archive also has a file of that name")
    return by_name


def read_tar_members(tar_bytes, wanted, source="<tar>", max_bytes: Optional[int] = None) -> dict:
    """The ``wanted`` regular files of a .tar or .tar.gz held in memory.

    Parameters
    ----------
    tar_bytes : bytes-like
    wanted : iterable of str
        Member names, e.g. "cifar-10-batches-py/data_batch_1".
    source : str or path
        Named in error messages.
    max_bytes : int, optional
        Cap on the uncompressed archive; default ``MAX_DECOMPRESSED_BYTES``.
        Every read below is bounded by the archive held in memory.

    Returns
    -------
    dict
        {name: bytes} for every wanted name.

    Raises
    ------
    DataError
        Corrupt or oversized archive, a refused member (see ``_check_members``),
        or a wanted member that is missing.
    """
    raw = gunzip(tar_bytes, max_bytes, source) if is_gzip(tar_bytes) else bytes(tar_bytes)
    wanted = list(wanted)
    with _tar_errors(source), tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        by_name = _check_members(tar.getmembers(), source)  # reads every header: truncation shows here
        missing = [n for n in wanted if n not in by_name or not by_name[n].isfile()]
        if missing:
            raise DataError(f"{source}: archive has no file {missing}; expected every one of {wanted}")
        return {n: tar.extractfile(by_name[n]).read() for n in wanted}


# ---------------------------------------------------------------------------
# restricted unpickling of CIFAR batches
# ---------------------------------------------------------------------------

def _ascii(value, what: str) -> str:
    """A short ASCII text from a Python 2 string (bytes under encoding="bytes") or a str."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or len(value) > 16:
        raise pickle.UnpicklingError(f"{what} must be a short string, got {type(value).__name__}")
    return value


class _PickledDtype:
    """Stands in for ``numpy.dtype(code, align, copy)`` inside a batch.

    Only the type code and the byte order are kept, and only plain numbers
    (bool, int, unsigned, float) are allowed: no objects, strings or fields.
    """

    def __init__(self, code, align=False, copy=True):
        self.code, self.byteorder = _ascii(code, "dtype code"), "="

    def __setstate__(self, state):
        # NumPy writes (version, byte order, subarray, names, fields, item size, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise pickle.UnpicklingError("dtype state must describe a plain number type")
        self.byteorder = _ascii(state[1], "dtype byte order")

    def to_numpy(self) -> np.dtype:
        try:
            dtype = np.dtype(self.code)
        except (TypeError, ValueError) as e:
            raise pickle.UnpicklingError(f"unknown dtype code {self.code!r}") from e
        if dtype.kind not in "biuf" or self.byteorder not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"dtype {self.code!r} (byte order {self.byteorder!r}) is "
                                         f"not a plain number type")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _PickledArray:
    """Stands in for the empty ndarray of numpy's ``_reconstruct``; ``__setstate__`` fills it."""

    array = None

    def __setstate__(self, state):
        # NumPy writes (version, shape, dtype, is_fortran, raw bytes); very old pickles omit version
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("array state must be (shape, dtype, fortran, bytes)")
        shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and 0 <= n < 2**63 for n in shape)):
            raise pickle.UnpicklingError(f"array shape must be a tuple of sizes, got {reprlib.repr(shape)}")
        if not isinstance(dtype, _PickledDtype):
            raise pickle.UnpicklingError("array state needs a dtype")
        dtype = dtype.to_numpy()  # first: an object array would bring a list instead of bytes
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError(f"array state needs raw bytes, got {type(raw).__name__}")
        expected = math.prod(shape) * dtype.itemsize
        if len(raw) != expected:
            raise pickle.UnpicklingError(f"array of shape {shape} {dtype} needs {expected} bytes, "
                                         f"the pickle has {len(raw)}")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls, shape, code):
    # NumPy pickles every array as _reconstruct(ndarray, (0,), b"b") and then sets its state;
    # asking for anything else (another class, a non-empty shape) is not a genuine batch
    if cls is not _PickledArray or shape != (0,):
        raise pickle.UnpicklingError("_reconstruct must be called as in a NumPy array pickle")
    return _PickledArray()


# Every opcode that Python 2's protocol 2 (the official batches) or Python 3's protocol 4 (a batch
# re-pickled today) uses for a dict of byte strings, lists of ints and strings, and NumPy arrays.
_BATCH_OPCODES = (
    "PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "SHORT_BINUNICODE", "BINUNICODE",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
)


def _refuse_opcode(name: str):
    def refuse(self):
        raise pickle.UnpicklingError(f"opcode {name} is not used by a CIFAR-10 batch")
    return refuse


def _batch_dispatch(overrides: dict) -> dict:
    """Opcode table: the batch opcodes run as pickle runs them (or by ``overrides``), all else refused."""
    names = {ord(op.code): op.name for op in pickletools.opcodes}
    table = {code: _refuse_opcode(names.get(code, f"0x{code:02x}")) for code in range(256)}
    for name in _BATCH_OPCODES:
        code = getattr(pickle, name)[0]
        table[code] = overrides.get(name, pickle._Unpickler.dispatch[code])
    return table


def _check_key(key) -> None:
    # hashing a key nested a million tuples deep overflows the C stack (a crash, not an error)
    if type(key) not in (bytes, str, int):
        raise pickle.UnpicklingError(f"dict keys must be strings or ints, got {type(key).__name__}")


class _BatchUnpickler(pickle._Unpickler):
    """Unpickler that knows only the three NumPy names and the opcodes a CIFAR-10 batch uses.

    Built on the pure-Python unpickler (``pickle._Unpickler``, the same
    class as ``pickle.Unpickler`` but written in Python) because the C one can
    restrict globals (``find_class``) but not opcodes or dict keys, and a
    crafted pickle can crash it outright.
    """

    # Python 2's NumPy, which wrote the official batches, named the module numpy.core.multiarray;
    # NumPy 2 renamed it numpy._core.multiarray, so a batch re-pickled today says that instead.
    GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _PickledArray,
        ("numpy", "dtype"): _PickledDtype,
    }

    def find_class(self, module, name):
        try:
            return self.GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a CIFAR-10 batch holds only NumPy arrays, "
                f"lists, ints and byte strings") from None

    def load_setitem(self):
        _check_key(self.stack[-2])
        pickle._Unpickler.load_setitem(self)

    def load_setitems(self):
        for key in self.stack[0::2]:  # after MARK, self.stack holds key, value, key, value, ...
            _check_key(key)
        pickle._Unpickler.load_setitems(self)

    def load_build(self):
        # BUILD on anything else would set attributes, e.g. on the stand-in functions themselves
        if not isinstance(self.stack[-2], (_PickledDtype, _PickledArray)):
            raise pickle.UnpicklingError("BUILD is only used on NumPy arrays and dtypes")
        pickle._Unpickler.load_build(self)

    dispatch = _batch_dispatch({"SETITEM": load_setitem, "SETITEMS": load_setitems, "BUILD": load_build})


def read_cifar_batch(data: bytes, source="<batch>"):
    """One pickled CIFAR-10 batch -> (uint8 [N, 3, 32, 32], int64 [N]).

    Safe on untrusted input: no function named by the pickle is ever called
    (see ``_BatchUnpickler``), and every failure is a DataError.

    Parameters
    ----------
    data : bytes
        The batch file's bytes, e.g. ``data_batch_1`` from the tarball.
    source : str or path
        Named in error messages.
    """
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # garbage input can make the unpickler raise nearly anything
        raise DataError(f"{source}: not a readable CIFAR-10 batch ({type(e).__name__}: "
                        f"{_one_line(e)})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = [reprlib.repr(k) for k in list(batch)[:8]] if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{source}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = (v.array if isinstance(v, _PickledArray) else v
                    for v in (batch[b"data"], batch[b"labels"]))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: b'data' must be uint8 [N, 3072], got {got}")
    if isinstance(labels, list) and all(type(v) is int and -2**63 <= v < 2**63 for v in labels):
        labels = np.array(labels, np.int64)  # the official batches store a list of ints
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        got = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise DataError(f"{source}: b'labels' must be {len(data)} integers, got {got}")
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"{source}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in C order
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _verified_tarball(data_dir, download, fetch):
    """(path, bytes) of the checksum-verified tarball, explaining when only a folder is there."""
    spec = REGISTRY["cifar10"][0]
    try:
        return fetch_files("cifar10", data_dir, download, fetch)[spec.name]
    except DataNotFoundError as e:
        folders = [str(d) for d in search_dirs("cifar10", data_dir, download) if (d / _CIFAR_DIR).is_dir()]
        if not folders:
            raise
        raise DataNotFoundError(f"{e}. An extracted {_CIFAR_DIR}/ (found in {folders}) is not enough: "
                                f"only the tarball has a published digest") from None


def load_cifar10(data_dir: Optional[PathLike] = None, download: Optional[bool] = None,
                 fetch: Optional[Fetch] = None) -> Dataset:
    """CIFAR-10 (50000 train / 10000 test colour images, 10 classes).

    Parameters
    ----------
    data_dir : path, optional
        Folder holding ``cifar-10-python.tar.gz``. Never written to. When
        given, only this folder is searched (unless ``download=True``).
    download : bool, optional
        Allow the cache ``data_home()/cifar10`` and downloads into it;
        default: only when ``data_dir`` is not given.
    fetch : callable(url) -> bytes, optional

    Returns
    -------
    Dataset
        ``x_*`` float32 [N, 3, 32, 32] in [0, 1], ``y_*`` int64 [N].
        The full training set is about 600 MB as float32.

    Raises
    ------
    DataNotFoundError, ChecksumError, DataError
    """
    path, tar_bytes = _verified_tarball(data_dir, download, fetch)
    names = {split: [f"{_CIFAR_DIR}/{n}" for n in batches]
             for split, batches in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST))}
    members = read_tar_members(tar_bytes, names["train"] + names["test"], source=path)
    arrays = {}
    for split, wanted in names.items():
        batches = [read_cifar_batch(members[n], source=f"{path}:{n}") for n in wanted]
        x = np.concatenate([b[0] for b in batches])
        arrays[f"x_{split}"] = x.astype(np.float32) / np.float32(255.0)
        arrays[f"y_{split}"] = np.concatenate([b[1] for b in batches])
    return Dataset("cifar10", n_classes=10, **arrays)

"""Loaders for data sets stored as files: MNIST, Fashion-MNIST and CIFAR-10.

Where files come from, in order:

1. ``data_dir`` if you pass one (read only: we never write there);
2. the cache ``data_home() / <name>`` (``$MINIDRESS_DATA``, default
   ``~/.cache/minidress``);
3. a download into that cache, only if ``download=True``.

Every downloaded file is checked against the digest in ``REGISTRY`` *before*
it is written, and files found on disk are checked on every load, so a
truncated or tampered file is reported instead of silently training on it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Union

import numpy as np

from ..fileio import atomic_write_bytes
from .datasets import Dataset

Fetch = Callable[[str], bytes]
PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A data file is malformed: bad magic, wrong size, corrupt archive, ..."""


class ChecksumError(DataError):
    """A file's digest does not match the one recorded in ``REGISTRY``."""


@dataclass(frozen=True)
class RemoteFile:
    """One file we know how to fetch and verify.

    ``algorithm`` is any ``hashlib`` name; upstream publishes SHA-256 for
    MNIST but only MD5 for Fashion-MNIST and CIFAR-10, so we record what
    exists rather than inventing digests we never checked.
    """

    name: str
    digest: str
    algorithm: str
    urls: tuple


_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(base, algorithm, digests):
    return tuple(RemoteFile(n, d, algorithm, (base + n,)) for n, d in zip(_IDX_NAMES, digests))


# data set name -> files. Tests monkeypatch entries to point at fabricated files.
REGISTRY: dict = {
    "mnist": _idx_files(_MNIST_BASE, "sha256", (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    )),
    "fashion_mnist": _idx_files(_FASHION_BASE, "md5", (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12e480ee83cd310",
    )),
    "cifar10": (
        RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "md5", (_CIFAR10_URL,)),
    ),
}


def data_home() -> Path:
    """Cache directory: ``$MINIDRESS_DATA`` or ``~/.cache/minidress``."""
    return Path(os.environ.get("MINIDRESS_DATA", "~/.cache/minidress")).expanduser()


# ---------------------------------------------------------------------------
# fetching and verifying
# ---------------------------------------------------------------------------

def default_fetch(url: str, timeout: float = 60.0) -> bytes:
    """Download ``url`` (http(s):// or file://) and return its bytes."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def check_digest(data: bytes, spec: RemoteFile, source) -> None:
    """Raise ChecksumError unless ``data`` hashes to ``spec.digest``.

    ``source`` (a path or URL) goes into the message so the user knows which
    copy is bad.
    """
    got = hashlib.new(spec.algorithm, data).hexdigest()
    if got != spec.digest.lower():
        raise ChecksumError(
            f"checksum mismatch for {spec.name} ({source}): expected {spec.algorithm} "
            f"{spec.digest}, got {got}. The file is truncated, corrupt or not the official "
            f"one; delete it and load again with download=True."
        )


def download_file(spec: RemoteFile, dest_dir: Path, fetch: Optional[Fetch] = None) -> bytes:
    """Fetch ``spec`` from its first working URL, verify it, then save it.

    Nothing is written unless the checksum matches, and the write is atomic,
    so an interrupted download never leaves a half file in the cache.

    Returns
    -------
    bytes
        The verified file contents (so the caller need not read it back).
    """
    fetch = fetch or default_fetch
    errors = []
    for url in spec.urls:
        print(f"minidress: downloading {url}", file=sys.stderr)
        try:
            data = fetch(url)
        except OSError as e:  # URLError, timeouts, missing file:// paths; try the next mirror
            errors.append(f"  {url}: {e}")
            continue
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"fetch({url!r}) must return bytes, got {type(data).__name__}")
        check_digest(data, spec, url)
        atomic_write_bytes(Path(dest_dir) / spec.name, data)
        return bytes(data)
    raise DataError(
        f"could not download {spec.name} from any mirror:\n" + "\n".join(errors)
        + f"\nDownload it by hand and put it in {dest_dir}"
    )


def _read_sha256sums(directory: Path) -> dict:
    """Parse ``directory/SHA256SUMS`` (``sha256sum`` output) into {name: digest}."""
    path = directory / "SHA256SUMS"
    if not path.is_file():
        return {}
    sums = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{line_no}: expected '<sha256>  <name>', got {line!r}")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()  # '*' marks binary mode
    return sums


def _search_dirs(name: str, data_dir) -> list:
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    return dirs + [data_home() / name]


def _read_local(path: Path, spec: RemoteFile) -> bytes:
    """Read a file found on disk, verifying every digest we know for it."""
    data = path.read_bytes()
    if path.name == spec.name:  # registry digests describe the compressed original only
        check_digest(data, spec, path)
    listed = _read_sha256sums(path.parent).get(path.name)
    if listed is not None:
        check_digest(data, RemoteFile(path.name, listed, "sha256", ()), path.parent / "SHA256SUMS")
    return data


def fetch_files(name: str, data_dir=None, download: bool = True,
                fetch: Optional[Fetch] = None) -> dict:
    """Verified contents of every file in ``REGISTRY[name]``.

    Parameters
    ----------
    name : str
        A key of ``REGISTRY``.
    data_dir : path, optional
        Looked at first; never written to.
    download : bool
        Download files found nowhere into ``data_home() / name``.
    fetch : callable(url) -> bytes, optional
        Replaces ``default_fetch`` (tests inject one to stay offline).

    Returns
    -------
    dict
        {registry file name: (path it came from, bytes)}.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(REGISTRY)}")
    dirs = _search_dirs(name, data_dir)
    found, missing = {}, []
    for spec in REGISTRY[name]:
        candidates = [spec.name]
        if spec.name.endswith(".gz"):  # an already-gunzipped copy is fine too
            candidates.append(spec.name[:-3])
        path = next((d / c for d in dirs for c in candidates if (d / c).is_file()), None)
        if path is None:
            missing.append(spec)
        else:
            found[spec.name] = (path, _read_local(path, spec))
    if missing and not download:
        raise FileNotFoundError(
            f"{name}: missing {[s.name for s in missing]}; looked in "
            f"{[str(d) for d in dirs]}. Pass download=True to fetch them into "
            f"{dirs[-1]}, or download by hand from "
            f"{[s.urls[0] for s in missing]} and pass data_dir=<folder>."
        )
    for spec in missing:
        found[spec.name] = (dirs[-1] / spec.name, download_file(spec, dirs[-1], fetch))
    return found


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------

# IDX type code (3rd byte of the magic) -> big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _maybe_gunzip(data: bytes, source) -> bytes:
    if data[:2] != b"\x1f\x8b":  # gzip magic; sniffing beats trusting the file name
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{source}: corrupt gzip stream ({e}); delete the file and download it again") from e


def read_idx(path_or_bytes, source: Optional[str] = None, magic: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not.

    Layout: 2 zero bytes, a type code byte, an ndim byte, ``ndim`` big-endian
    uint32 sizes, then the values in C order. Images are 0x00000803
    (uint8, 3-D), labels 0x00000801 (uint8, 1-D).

    Parameters
    ----------
    path_or_bytes : str, os.PathLike or bytes
    source : str, optional
        Name used in error messages when passing bytes.
    magic : int, optional
        Require exactly this magic number, e.g. 0x00000803 for MNIST images.

    Returns
    -------
    np.ndarray
        Native byte order, shape given by the header, e.g. uint8 [N, 28, 28].
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = bytes(path_or_bytes), source or "<bytes>"
    else:
        source = source or str(path_or_bytes)
        data = Path(path_or_bytes).read_bytes()
    data = _maybe_gunzip(data, source)

    if len(data) < 4:
        raise DataError(f"{source}: IDX header needs 4 bytes, file has {len(data)}")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{source}: bad IDX magic 0x{data[:4].hex()}; expected 0x0000TTNN with type "
            f"TT in {[hex(c) for c in _IDX_DTYPES]} and NN >= 1 dims (e.g. 0x00000803 for images)"
        )
    if magic is not None and int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{source}: bad IDX magic 0x{data[:4].hex()}, expected 0x{magic:08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header needs {header} bytes, file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a garbage header cannot overflow
    actual = len(data) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX file {kind}: header says shape {dims} of {dtype.name} = "
            f"{expected} payload bytes, found {actual}"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def _idx_split(files: dict, images: str, labels: str, n_classes: int = 10):
    """Check an images/labels pair and convert to (float32 [N,1,H,W], int64 [N])."""
    (img_path, img_bytes), (lab_path, lab_bytes) = files[images], files[labels]
    x = read_idx(img_bytes, source=str(img_path), magic=0x00000803)  # uint8 [N, H, W]
    y = read_idx(lab_bytes, source=str(lab_path), magic=0x00000801)  # uint8 [N]
    if len(x) != len(y):
        raise DataError(f"{img_path} has {len(x)} images but {lab_path} has {len(y)} labels")
    if len(y) and y.max() >= n_classes:
        raise DataError(f"{lab_path}: labels must be < {n_classes}, found {int(y.max())}")
    x = (x.astype(np.float32) / np.float32(255.0))[:, None]  # [N, 1, H, W] in [0, 1]
    return x, y.astype(np.int64)


def _load_idx_dataset(name, data_dir, download, fetch) -> Dataset:
    files = fetch_files(name, data_dir, download, fetch)
    tr_img, tr_lab, te_img, te_lab = (s.name for s in REGISTRY[name])
    x_train, y_train = _idx_split(files, tr_img, tr_lab)
    x_test, y_test = _idx_split(files, te_img, te_lab)
    return Dataset(name, x_train, y_train, x_test, y_test, n_classes=10)


def load_mnist(data_dir: Optional[PathLike] = None, download: bool = True,
               fetch: Optional[Fetch] = None) -> Dataset:
    """MNIST handwritten digits (60000 train / 10000 test).

    Parameters
    ----------
    data_dir : path, optional
        Folder holding the four ``*-ubyte.gz`` files (or uncompressed ones).
        If a ``SHA256SUMS`` file sits next to them it is checked too.
    download : bool
        Fetch missing files into ``data_home()/mnist``; if False a missing
        file raises FileNotFoundError.
    fetch : callable(url) -> bytes, optional
        Replacement downloader (tests, proxies).

    Returns
    -------
    Dataset
        ``x_*`` float32 [N, 1, 28, 28] in [0, 1], ``y_*`` int64 [N] in 0..9.
    """
    return _load_idx_dataset("mnist", data_dir, download, fetch)


def load_fashion_mnist(data_dir: Optional[PathLike] = None, download: bool = True,
                       fetch: Optional[Fetch] = None) -> Dataset:
    """Fashion-MNIST (Zalando clothing images); same format and API as :func:`load_mnist`."""
    return _load_idx_dataset("fashion_mnist", data_dir, download, fetch)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def safe_extract(tar_bytes: bytes, dest: Path, source="<tar>") -> None:
    """Unpack a .tar(.gz) into ``dest``, refusing anything that could escape it.

    Only regular files and directories with relative paths free of ".." are
    allowed: a crafted archive could otherwise overwrite files outside
    ``dest`` (absolute paths, "../", or symlinks pointing elsewhere).
    The archive is unpacked into a temporary folder first and moved into
    place at the end, so a failure leaves ``dest`` untouched.
    """
    dest = Path(dest)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: corrupt tar archive ({e})") from e
    with tar:
        try:
            members = tar.getmembers()  # reads every header, so truncation shows up here
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{source}: corrupt tar archive ({e})") from e
        for m in members:
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts or m.name.startswith("\\"):
                raise DataError(f"{source}: refusing unsafe member path {m.name!r}")
            if not (m.isfile() or m.isdir()):  # symlinks / hard links could point anywhere
                raise DataError(f"{source}: refusing member {m.name!r}: not a plain file or folder")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        try:
            for m in members:
                target = tmp / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
            for top in tmp.iterdir():  # move top-level entries into place, replacing stale copies
                final = dest / top.name
                if final.is_dir():
                    shutil.rmtree(final)
                os.replace(top, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cifar_batch(path: Path):
    """One pickled CIFAR batch -> (uint8 [N, 3, 32, 32], int64 [N]).

    Security: unpickling can run arbitrary code. Only load batches that came
    out of the checksum-verified official tarball (or a folder you trust).
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle can raise almost anything on garbage input
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in C order
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_folder(data_dir, download, fetch) -> Path:
    """Find (or build, from the verified tarball) a complete cifar-10-batches-py folder."""
    dirs = _search_dirs("cifar10", data_dir)
    cache = dirs[-1]
    spec = REGISTRY["cifar10"][0]
    wanted = _CIFAR_TRAIN + _CIFAR_TEST
    for d in dirs:
        for folder in (d / _CIFAR_DIR, d):  # accept data_dir pointing at either level
            if all((folder / n).is_file() for n in wanted):
                return folder
    tarball = next((d / spec.name for d in dirs if (d / spec.name).is_file()), None)
    if tarball is not None:
        data = _read_local(tarball, spec)
    elif download:
        # the tarball is kept in the cache so a later corrupt extraction can be redone offline
        data = download_file(spec, cache, fetch)
        tarball = cache / spec.name
    else:
        raise FileNotFoundError(
            f"cifar10: no {_CIFAR_DIR}/ with {list(wanted)} and no {spec.name} in "
            f"{[str(d) for d in dirs]}. Pass download=True, or download {spec.urls[0]} "
            f"by hand and pass data_dir=<folder>."
        )
    safe_extract(data, cache, source=tarball)
    folder = cache / _CIFAR_DIR
    missing = [n for n in wanted if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{tarball}: archive has no {_CIFAR_DIR}/{missing}")
    return folder


def load_cifar10(data_dir: Optional[PathLike] = None, download: bool = True,
                 fetch: Optional[Fetch] = None) -> Dataset:
    """CIFAR-10 (50000 train / 10000 test colour images, 10 classes).

    Parameters
    ----------
    data_dir : path, optional
        Folder holding ``cifar-10-batches-py/`` (or the batches themselves,
        or ``cifar-10-python.tar.gz``). Never written to: the tarball is
        extracted into ``data_home()/cifar10``.
    download : bool
    fetch : callable(url) -> bytes, optional

    Returns
    -------
    Dataset
        ``x_*`` float32 [N, 3, 32, 32] in [0, 1], ``y_*`` int64 [N].
        The full training set is about 600 MB as float32.
    """
    folder = _cifar_folder(data_dir, download, fetch)
    parts = {split: [_read_cifar_batch(folder / n) for n in names]
             for split, names in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST))}
    arrays = {}
    for split, batches in parts.items():
        x = np.concatenate([b[0] for b in batches])
        arrays[f"x_{split}"] = x.astype(np.float32) / np.float32(255.0)
        arrays[f"y_{split}"] = np.concatenate([b[1] for b in batches])
    return Dataset("cifar10", n_classes=10, **arrays)

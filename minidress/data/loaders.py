"""Loaders for data sets stored as files: MNIST and Fashion-MNIST (CIFAR-10 is in ``cifar.py``).

Where files come from:

1. ``data_dir`` if you pass one (read only: we never write there). Then only
   ``data_dir`` is searched, unless you also pass ``download=True``: a wrong
   folder is an error listing the files wanted, never a silent switch to the
   cache or the network;
2. otherwise the cache ``data_home() / <name>`` (``$MINIDRESS_DATA``, default
   ``~/.cache/minidress``);
3. a download into that cache, by default when no ``data_dir`` is given.

What is checked, every time, before a byte is parsed:

* every file, found on disk or downloaded, against the published digest in
  ``REGISTRY``. For MNIST the digest is of the *decompressed* file, so the
  ``.gz`` as published, any faithful re-compression of it (Debian's packages
  re-gzip the files) and the uncompressed file all pass, and a changed byte
  does not. Where only the compressed file's digest is published
  (Fashion-MNIST, CIFAR-10), that exact file is required;
* sizes: no file read or downloaded may exceed ``MAX_FILE_BYTES``, no gzip
  stream may expand past ``MAX_DECOMPRESSED_BYTES`` (it is inflated a piece at
  a time, so a bomb stops at the cap), and an IDX header's declared shape is
  checked against the cap before anything is allocated;
* downloads: at most ``MAX_FILE_BYTES``, within ``DOWNLOAD_DEADLINE_S`` for
  the whole transfer; a short, slow, oversized or wrong download moves on to
  the next mirror, and nothing reaches the cache unless its digest matches.

Every failure is a ``DataError`` (a ``ValueError``) with a one-line message
naming the file, what it holds and what was expected; ``ChecksumError`` and
``DataNotFoundError`` are the two kinds worth telling apart. The caps are
module constants, read at call time, and most functions also take them as
arguments.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import math
import os
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..fileio import atomic_write_bytes
from .datasets import Dataset

Fetch = Callable[[str], bytes]
PathLike = Union[str, "os.PathLike[str]"]

# Largest genuine inputs: CIFAR-10's tarball is 170 MB and unpacks to about 186 MB;
# MNIST's biggest file is 47 MB decompressed. 256 MiB leaves room and still stops a
# small bomb long before it hurts a laptop.
MAX_FILE_BYTES = 256 << 20          # one file read from disk or downloaded
MAX_DECOMPRESSED_BYTES = 256 << 20  # what one gzip stream (or IDX payload) may expand to
DOWNLOAD_TIMEOUT_S = 60.0           # connecting, and each network read
DOWNLOAD_DEADLINE_S = 1800.0        # the whole transfer of one file: 170 MB at 100 kB/s
_CHUNK = 1 << 20                    # input and output piece size when streaming
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 16 + zlib.MAX_WBITS   # tells zlib to expect (and check) a gzip header and trailer


class DataError(ValueError):
    """A data file is missing, malformed, too large, or could not be fetched."""


class ChecksumError(DataError):
    """A file's digest does not match the one recorded in ``REGISTRY``."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The files wanted are in none of the folders searched (also a FileNotFoundError)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file we know how to fetch and verify.

    Attributes
    ----------
    name : str
        File name as published, e.g. "train-images-idx3-ubyte.gz".
    digest : str
        Hex digest, computed with ``algorithm``.
    algorithm : str
        Any ``hashlib`` name. We record what upstream publishes (or what we
        computed from a copy we verified against it), never a guess.
    urls : tuple of str
        Mirrors, tried in order.
    digest_of : {"file", "content"}
        "file": the digest is of the published file's bytes, so only that
        exact file passes. "content": it is of the decompressed content, so
        the published .gz, any faithful re-compression and the uncompressed
        file all pass.
    content_sha256 : str, optional
        A second accepted digest, the sha256 of the decompressed content of
        a copy we trust by another route (``content_source`` says which), for
        files whose upstream publishes only a compressed file's digest. A
        copy passes if it matches either digest.
    content_source : str
        Where ``content_sha256`` comes from.
    """

    name: str
    digest: str
    algorithm: str
    urls: tuple
    digest_of: str = "file"
    content_sha256: str = ""
    content_source: str = ""

    def __post_init__(self):
        if self.digest_of not in ("file", "content"):
            raise ValueError(f"RemoteFile {self.name}: digest_of must be 'file' or 'content', "
                             f"got {self.digest_of!r}")


_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(base, algorithm, digests, digest_of, content=(), content_source=""):
    content = content or ("",) * len(_IDX_NAMES)
    return tuple(RemoteFile(n, d, algorithm, (base + n,), digest_of, c, content_source)
                 for n, d, c in zip(_IDX_NAMES, digests, content))


# data set name -> files. Tests monkeypatch entries to point at fabricated files.
REGISTRY: dict = {
    # SHA-256 of the decompressed files. We computed them from copies of the four .gz files
    # whose SHA-256 match the published ones (440fcabf..., 3552534a..., 8d422c7b..., f7ae60f9...,
    # the digests this registry held before); independent public lists give the same values.
    "mnist": _idx_files(_MNIST_BASE, "sha256", (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",  # 47040016 bytes
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",  # 60008 bytes
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",  # 7840016 bytes
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",  # 10008 bytes
    ), "content"),
    # Fashion-MNIST publishes only the MD5 of its .gz files, so the published .gz passes by that
    # digest. Debian's dataset-fashion-mnist package re-gzips the files (other bytes, no
    # upstream digest); it is signed by Debian's archive keys, so the sha256 of its decompressed
    # files (package 0.0~git20200523.55506a9-1, computed here) is a second accepted digest: that
    # copy, any faithful re-compression of it and its uncompressed files pass, a changed byte
    # does not. (Whether it decompresses to upstream's bytes we could not check: no upstream copy.)
    "fashion_mnist": _idx_files(_FASHION_BASE, "md5", (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12e480ee83cd310",
    ), "file", content=(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # 47040016 bytes
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # 60008 bytes
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",  # 7840016 bytes
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # 10008 bytes
    ), content_source="Debian's signed package dataset-fashion-mnist 0.0~git20200523.55506a9-1"),
    # CIFAR-10 publishes one MD5, of the tarball: see cifar.py for how the batches are read.
    "cifar10": (
        RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "md5", (_CIFAR10_URL,)),
    ),
}


def data_home() -> Path:
    """Cache directory: ``$MINIDRESS_DATA`` or ``~/.cache/minidress``."""
    return Path(os.environ.get("MINIDRESS_DATA", "~/.cache/minidress")).expanduser()


# ---------------------------------------------------------------------------
# size caps and gzip
# ---------------------------------------------------------------------------

def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: messages may hold newlines or huge reprs."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _cap(value: Optional[int], default: int, arg: str) -> int:
    """Resolve a size cap argument: None means the module constant, read now (so tests can patch it)."""
    cap = default if value is None else value
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 0:
        raise ValueError(f"{arg} must be an int >= 0, got {cap!r}")
    return int(cap)


def _check_size(size: int, cap: int, source, what: str, constant: str) -> None:
    if size > cap:
        raise DataError(f"{source}: {what} {size} bytes, more than the cap of {cap} bytes "
                        f"({constant}; pass a larger max_bytes if this file is genuine)")


def is_gzip(data) -> bool:
    """True if ``data`` starts with the gzip magic bytes (sniffing beats trusting a file name)."""
    return bytes(data[:2]) == _GZIP_MAGIC


class _GzipStream:
    """Read the decompressed bytes of a gzip file held in memory, a bounded piece at a time.

    ``zlib`` is never asked for more output than the caller wants, so a bomb
    (a small file expanding to gigabytes) costs only what is read. zlib checks
    each member's CRC-32 and length; concatenated members are read as one
    stream, as ``gzip`` does, and zero padding at the end is ignored.
    """

    def __init__(self, data, source):
        self._data = memoryview(data)
        self._pos = 0        # first byte not yet handed to zlib
        self._pending = b""  # handed to zlib but not consumed yet (its unconsumed_tail)
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._source = source
        self._ended = False  # the last member's trailer and any zero padding have been read

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; fewer only at the end of the stream."""
        parts, want = [], n
        while want > 0:
            if self._zlib.eof and not self._next_member():
                break
            if not self._pending and self._pos < len(self._data):
                # feed bounded pieces: zlib copies its unconsumed input on every call
                self._pending = self._data[self._pos:self._pos + _CHUNK]
                self._pos += len(self._pending)
            try:
                chunk = self._zlib.decompress(self._pending, min(want, _CHUNK))
            except zlib.error as e:
                raise DataError(f"{self._source}: corrupt gzip stream ({e}); delete the file "
                                f"and download it again") from e
            self._pending = self._zlib.unconsumed_tail
            if not chunk and not self._pending and self._pos == len(self._data) and not self._zlib.eof:
                raise DataError(f"{self._source}: gzip stream is truncated (ends before its "
                                f"trailer); delete the file and download it again")
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def _next_member(self) -> bool:
        """After a member's trailer: start the next member, or return False at the clean end."""
        if self._ended:
            return False
        self._pos -= len(self._zlib.unused_data)  # handed to zlib, but past this member's end
        rest = self._data[self._pos:]
        if not rest or (rest[0] == 0 and not bytes(rest).strip(b"\0")):  # zero padding to the end
            self._ended = True
            return False
        if bytes(rest[:2]) != _GZIP_MAGIC:
            raise DataError(f"{self._source}: {len(rest)} bytes of trailing garbage after the "
                            f"gzip stream; expected the end of the file or another gzip member")
        self._zlib, self._pending = zlib.decompressobj(_GZIP_WBITS), b""
        return True


def gunzip(data, max_bytes: Optional[int] = None, source="<bytes>") -> bytes:
    """Decompress gzip ``data``, refusing to produce more than ``max_bytes``.

    Parameters
    ----------
    data : bytes-like
        A complete gzip file (one or more members).
    max_bytes : int, optional
        Cap on the decompressed size; default ``MAX_DECOMPRESSED_BYTES``.
    source : str or path
        Named in error messages.

    Returns
    -------
    bytes

    Raises
    ------
    DataError
        Corrupt, truncated or followed by garbage, or larger than the cap
        (found after decompressing at most ``max_bytes + 1`` bytes).
    """
    cap = _cap(max_bytes, MAX_DECOMPRESSED_BYTES, "max_bytes")
    stream = _GzipStream(data, source)
    parts, total = [], 0
    # piece by piece, stopping one byte past the cap: a refused bomb is never joined
    while chunk := stream.read(min(_CHUNK, cap + 1 - total)):
        total += len(chunk)
        _check_size(total, cap, source, "gzip stream decompresses to at least", "MAX_DECOMPRESSED_BYTES")
        parts.append(chunk)
    return b"".join(parts)


def read_capped(path: Path, max_bytes: Optional[int] = None) -> bytes:
    """The bytes of the file at ``path``, refusing files over ``max_bytes`` (default ``MAX_FILE_BYTES``)."""
    cap = _cap(max_bytes, MAX_FILE_BYTES, "max_bytes")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(size, cap, path, "file has", "MAX_FILE_BYTES")
            data = f.read(size + 1)  # read(n) allocates n bytes up front: ask for no more than needed
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or _one_line(e)})") from e
    if len(data) != size:
        raise DataError(f"{path}: file changed while being read (its size was {size} bytes, "
                        f"{len(data)} were read); expected a complete file")
    return data


# ---------------------------------------------------------------------------
# fetching and verifying
# ---------------------------------------------------------------------------

def default_fetch(url: str, timeout: Optional[float] = None, deadline: Optional[float] = None,
                  max_bytes: Optional[int] = None) -> bytes:
    """Download ``url`` (http(s):// or file://) and return its bytes.

    Parameters
    ----------
    url : str
    timeout : float, optional
        Seconds to wait to connect and for each network read; default
        ``DOWNLOAD_TIMEOUT_S``.
    deadline : float, optional
        Seconds for the whole transfer; default ``DOWNLOAD_DEADLINE_S``.
        Checked after each read, so a transfer ends at most ``timeout``
        seconds past it, however slowly the server drips bytes.
    max_bytes : int, optional
        Largest accepted body; default ``MAX_FILE_BYTES``. An announced
        Content-Length over it is refused before reading.

    Raises
    ------
    DataError
        Too large, too slow, or shorter than its announced Content-Length.
    OSError, http.client.HTTPException
        Network errors, as raised by ``urllib``.
    """
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    deadline = DOWNLOAD_DEADLINE_S if deadline is None else deadline
    cap = _cap(max_bytes, MAX_FILE_BYTES, "max_bytes")
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length", "")
        declared = int(length) if length.strip().isdigit() else None
        if declared is not None:
            _check_size(declared, cap, url, "server announces", "MAX_FILE_BYTES")
        # read1 returns after one network read, so no single call can wait much past `timeout`
        read = getattr(response, "read1", response.read)
        parts, total = [], 0
        while chunk := read(_CHUNK):
            total += len(chunk)
            _check_size(total, cap, url, "download reached", "MAX_FILE_BYTES")
            parts.append(chunk)
            elapsed = time.monotonic() - start
            if elapsed > deadline:
                raise DataError(f"{url}: download still running after {elapsed:.1f} s ({total} bytes "
                                f"so far); expected it to finish within {deadline} s (DOWNLOAD_DEADLINE_S)")
    if declared is not None and total != declared:
        raise DataError(f"{url}: download truncated: got {total} bytes, the server announced {declared}")
    return b"".join(parts)


def check_digest(data: bytes, spec: RemoteFile, source) -> None:
    """Raise ChecksumError unless ``data`` hashes to ``spec.digest``.

    ``data`` is what ``spec.digest_of`` says: the file's bytes, or its
    decompressed content. ``source`` (a path or URL) goes into the message
    so the user knows which copy is bad.
    """
    got = hashlib.new(spec.algorithm, data).hexdigest()
    if got != spec.digest.lower():
        what = "decompressed content" if spec.digest_of == "content" else "file"
        hint = ""
        if spec.digest_of == "file" and spec.name.endswith(".gz"):
            hint = (f" Nor does its decompressed content match {spec.content_source}." if spec.content_sha256
                    else " Only this exact published .gz is accepted: a re-compressed copy has other bytes.")
        raise ChecksumError(
            f"checksum mismatch for {spec.name} ({source}): expected {spec.algorithm} "
            f"{spec.digest} of the {what}, got {got}. The file is truncated, corrupt or not the "
            f"official one; delete it and load again with download=True.{hint}"
        )


def verify(data: bytes, spec: RemoteFile, source) -> bytes:
    """Check a file's bytes against ``spec``; return the verified bytes to parse.

    With a content digest, gzip data is decompressed (under the cap) first,
    and the decompressed content is returned; otherwise ``data`` itself.
    """
    if spec.content_sha256 and spec.digest_of == "file":
        content = gunzip(data, source=source) if is_gzip(data) else data
        if hashlib.sha256(content).hexdigest() == spec.content_sha256:
            return data           # the trusted copy (or a faithful re-compression of it)
        if not (spec.name.endswith(".gz") and is_gzip(data)):
            check_digest(content, RemoteFile(spec.name, spec.content_sha256, "sha256", (), "content"), source)
    if spec.digest_of == "content" and is_gzip(data):
        data = gunzip(data, source=source)
    check_digest(data, spec, source)
    return data


def download_file(spec: RemoteFile, dest_dir: Path, fetch: Optional[Fetch] = None,
                  max_bytes: Optional[int] = None) -> bytes:
    """Fetch ``spec`` from its first working mirror, verify it, then save it in ``dest_dir``.

    A mirror that fails in any way (network error, truncated, too slow, too
    large, wrong digest) is reported and the next one tried. Nothing is
    written unless the digest matches, and the write is atomic, so an
    interrupted download never leaves a half file in the cache.

    Returns
    -------
    bytes
        The verified contents, as :func:`verify` returns them.

    Raises
    ------
    ChecksumError
        Every mirror failed and at least one served the wrong bytes.
    DataError
        Every mirror failed otherwise (the message lists each failure).
    """
    fetch = fetch or default_fetch
    cap = _cap(max_bytes, MAX_FILE_BYTES, "max_bytes")
    failures, wrong_bytes = [], False
    for url in spec.urls:
        print(f"minidress: downloading {url}", file=sys.stderr)
        try:
            data = fetch(url)
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"fetch({url!r}) must return bytes, got {type(data).__name__}")
            _check_size(len(data), cap, url, "download has", "MAX_FILE_BYTES")  # a custom fetch may not cap
            content = verify(bytes(data), spec, url)
        except ChecksumError as e:
            failures.append(_one_line(e, 400))
            wrong_bytes = True
        # ValueError covers DataError (too large, too slow, truncated) and malformed URLs;
        # HTTPException covers IncompleteRead and other protocol errors
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{url}: {type(e).__name__}: {_one_line(e)}")
        else:
            _write_cache(Path(dest_dir) / spec.name, bytes(data))
            return content
    error = ChecksumError if wrong_bytes else DataError
    raise error(f"could not download {spec.name} from any of its {len(spec.urls)} mirror(s): "
                + " | ".join(failures) + f". Download it by hand into {dest_dir}")


def _write_cache(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise DataError(f"{path}: cannot write to the cache ({e.strerror or _one_line(e)}); "
                        f"set $MINIDRESS_DATA to a writable folder") from e


def _read_sha256sums(directory: Path) -> dict:
    """Parse ``directory/SHA256SUMS`` (``sha256sum`` output) into {name: digest}."""
    path = directory / "SHA256SUMS"
    if not path.is_file():
        return {}
    try:
        text = read_capped(path, 1 << 20).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: expected UTF-8 text in sha256sum format, got undecodable bytes") from e
    sums = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{line_no}: expected '<sha256>  <name>', got {line[:100]!r}")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()  # '*' marks binary mode
    return sums


def search_dirs(name: str, data_dir=None, download: Optional[bool] = None) -> list:
    """Folders :func:`fetch_files` searches, in order: ``data_dir``, and the cache unless
    a ``data_dir`` was given without ``download=True``."""
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    if data_dir is None or download:
        dirs.append(data_home() / name)
    return dirs


def _accepted_names(spec: RemoteFile) -> list:
    """File names that can hold ``spec``: an uncompressed copy too, if the digest is of the content."""
    if (spec.digest_of == "content" or spec.content_sha256) and spec.name.endswith(".gz"):
        return [spec.name, spec.name[:-3]]
    return [spec.name]


def _read_local(path: Path, spec: RemoteFile) -> bytes:
    """Read a file found on disk, verifying every digest we know for it."""
    if path.name not in _accepted_names(spec):
        raise DataError(f"{path}: only the digest of the compressed {spec.name} is published, so "
                        f"this uncompressed copy cannot be checked; put the original {spec.name} there")
    data = read_capped(path)
    listed = _read_sha256sums(path.parent).get(path.name)
    if listed is not None:
        check_digest(data, RemoteFile(path.name, listed, "sha256", ()), path.parent / "SHA256SUMS")
    return verify(data, spec, path)


def _missing_message(name, missing, dirs, data_dir, may_download) -> str:
    wanted = ", ".join(" or ".join(_accepted_names(s)) for s in missing)
    looked = ", ".join(str(d) if d.is_dir() else f"{d} (no such folder)" for d in dirs)
    cache = data_home() / name
    if data_dir is not None and not may_download:
        advice = (f"check data_dir, or pass download=True to also use the cache {cache} "
                  f"and download what is missing")
    else:
        advice = (f"pass download=True, or download {[s.urls[0] for s in missing]} by hand and "
                  f"pass data_dir=<folder>")
    return f"{name}: cannot find {wanted}; looked in {looked}; {advice}"


def fetch_files(name: str, data_dir=None, download: Optional[bool] = None,
                fetch: Optional[Fetch] = None) -> dict:
    """Verified contents of every file in ``REGISTRY[name]``.

    Parameters
    ----------
    name : str
        A key of ``REGISTRY``.
    data_dir : path, optional
        Never written to. When given, it is the only folder searched, unless
        ``download=True``.
    download : bool, optional
        Allow the cache ``data_home() / name`` and downloads into it.
        Default: allowed when no ``data_dir`` is given, not when one is.
    fetch : callable(url) -> bytes, optional
        Replaces ``default_fetch`` (tests inject one to stay offline).

    Returns
    -------
    dict
        {registry file name: (path it came from, verified bytes)}: the
        decompressed content for a content digest, else the file's bytes.

    Raises
    ------
    DataNotFoundError
        Files missing and downloading not allowed; names every file wanted
        and every folder searched.
    ChecksumError, DataError
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(REGISTRY)}")
    may_download = (data_dir is None) if download is None else bool(download)
    dirs = search_dirs(name, data_dir, download)
    found, missing = {}, []
    for spec in REGISTRY[name]:
        # the uncompressed name is looked for even when it cannot be checked, to say why it is refused
        candidates = [spec.name] + ([spec.name[:-3]] if spec.name.endswith(".gz") else [])
        path = next((d / c for d in dirs for c in candidates if (d / c).is_file()), None)
        if path is None:
            missing.append(spec)
        else:
            found[spec.name] = (path, _read_local(path, spec))
    if missing and not may_download:
        raise DataNotFoundError(_missing_message(name, missing, dirs, data_dir, may_download))
    cache = data_home() / name
    for spec in missing:
        found[spec.name] = (cache / spec.name, download_file(spec, cache, fetch))
    return found


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------

# IDX type code (3rd byte of the magic) -> big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_MAX_DIMS = 32  # NumPy's limit on array dimensions (numpy 1.x; 2.x allows 64)


def read_idx(path_or_bytes, source: Optional[str] = None, magic: Optional[int] = None,
             max_bytes: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not.

    Layout: 2 zero bytes, a type code byte, an ndim byte, ``ndim`` big-endian
    uint32 sizes, then the values in C order. Images are 0x00000803
    (uint8, 3-D), labels 0x00000801 (uint8, 1-D).

    Parameters
    ----------
    path_or_bytes : str, os.PathLike or bytes
        A path is read under ``MAX_FILE_BYTES``.
    source : str, optional
        Name used in error messages when passing bytes.
    magic : int, optional
        Require exactly this magic number, e.g. 0x00000803 for MNIST images.
    max_bytes : int, optional
        Cap on the decompressed size; default ``MAX_DECOMPRESSED_BYTES``. The
        header's declared shape is checked against it before the payload is
        read, and gzip data is inflated only as far as the header says.

    Returns
    -------
    np.ndarray
        Native byte order, shape given by the header, e.g. uint8 [N, 28, 28].
    """
    cap = _cap(max_bytes, MAX_DECOMPRESSED_BYTES, "max_bytes")
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, source = path_or_bytes, source or "<bytes>"
    else:
        source = source or str(path_or_bytes)
        data = read_capped(Path(path_or_bytes))
    stream = _GzipStream(data, source) if is_gzip(data) else io.BytesIO(data)

    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{source}: IDX header needs 4 bytes, file has {len(head)}")
    zero, code, ndim = head[0:2], head[2], head[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or not 1 <= ndim <= _IDX_MAX_DIMS:
        raise DataError(
            f"{source}: bad IDX magic 0x{head.hex()}; expected 0x0000TTNN with type TT in "
            f"{[hex(c) for c in _IDX_DTYPES]} and NN in 1..{_IDX_MAX_DIMS} dims (e.g. 0x00000803 for images)"
        )
    if magic is not None and int.from_bytes(head, "big") != magic:
        raise DataError(f"{source}: bad IDX magic 0x{head.hex()}, expected 0x{magic:08x}")
    header = 4 + 4 * ndim
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{source}: IDX header needs {header} bytes, file has {4 + len(sizes)}")
    dims = tuple(int.from_bytes(sizes[i:i + 4], "big") for i in range(0, 4 * ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: a garbage header cannot overflow
    if header + expected > cap:
        raise DataError(f"{source}: IDX header declares shape {dims} of {dtype.name} = {expected} "
                        f"payload bytes, {header + expected} with the header: more than the cap of "
                        f"{cap} bytes (MAX_DECOMPRESSED_BYTES)")
    payload = stream.read(expected + 1)  # one byte more tells a file with trailing bytes apart
    if len(payload) != expected:
        kind, found = ("truncated", len(payload)) if len(payload) < expected else ("has trailing bytes", "more")
        raise DataError(
            f"{source}: IDX file {kind}: header says shape {dims} of {dtype.name} = "
            f"{expected} payload bytes, found {found}"
        )
    arr = np.frombuffer(payload, dtype).reshape(dims)
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


def load_mnist(data_dir: Optional[PathLike] = None, download: Optional[bool] = None,
               fetch: Optional[Fetch] = None) -> Dataset:
    """MNIST handwritten digits (60000 train / 10000 test).

    Parameters
    ----------
    data_dir : path, optional
        Folder holding the four ``*-ubyte.gz`` files (gzipped by anyone, or
        uncompressed): their decompressed content must match the published
        digests. If a ``SHA256SUMS`` file sits next to them it is checked too.
        When given, only this folder is searched (unless ``download=True``).
    download : bool, optional
        Allow the cache ``data_home()/mnist`` and downloads into it; default:
        only when ``data_dir`` is not given.
    fetch : callable(url) -> bytes, optional
        Replacement downloader (tests, proxies).

    Returns
    -------
    Dataset
        ``x_*`` float32 [N, 1, 28, 28] in [0, 1], ``y_*`` int64 [N] in 0..9.

    Raises
    ------
    DataNotFoundError, ChecksumError, DataError
    """
    return _load_idx_dataset("mnist", data_dir, download, fetch)


def load_fashion_mnist(data_dir: Optional[PathLike] = None, download: Optional[bool] = None,
                       fetch: Optional[Fetch] = None) -> Dataset:
    """Fashion-MNIST (Zalando clothing images); same API as :func:`load_mnist`.

    Only the published ``.gz`` files are accepted (upstream publishes the MD5
    of those alone, see ``REGISTRY``), not re-compressed or uncompressed copies.
    """
    return _load_idx_dataset("fashion_mnist", data_dir, download, fetch)

"""Tests for minidress.data: in-memory data sets, file loaders, batching.

File loaders are tested on tiny IDX / CIFAR files fabricated in tmp_path,
with the registry's checksums monkeypatched to match them, and an injected
``fetch`` (or a file:// URL, or an HTTP server on 127.0.0.1) standing in for
the network. tests/test_fuzz_data.py reuses the helpers defined here.
"""

import dataclasses
import gzip
import hashlib
import http.client
import http.server
import io
import os
import pickle
import pickletools
import struct
import tarfile
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from minidress.data import (
    ChecksumError,
    DataError,
    DataNotFoundError,
    Dataset,
    Normalizer,
    iterate_minibatches,
    load_cifar10,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    make_moons,
    make_spirals,
    read_cifar_batch,
    read_idx,
    standardize,
    stratified_split,
    train_val_split,
)
from minidress.data import cifar, loaders

REAL_MNIST = Path(__file__).parents[1].parent / "shared/data/mnist"
IDX_NAMES = [s.name for s in loaders.REGISTRY["mnist"]]
CIFAR_TAR = "cifar-10-python.tar.gz"
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the cache at tmp_path so no test reads or writes ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIDRESS_DATA", str(cache))
    return cache


# ---------------------------------------------------------------------------
# helpers: fabricate IDX files and a matching registry
# ---------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray, code: int = 0x08, gz: bool = True) -> bytes:
    """Serialise arr as IDX (big-endian header + C-order payload)."""
    big = arr.astype(arr.dtype.newbyteorder(">"))
    raw = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + big.tobytes()
    return gzip.compress(raw) if gz else raw


def fake_mnist_arrays(n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def registry_entry(files: dict, algorithm="sha256", urls=None, digest_of="file") -> tuple:
    """RemoteFiles for `files` {name: bytes}; a content digest is of the gunzipped bytes."""
    def digest(b):
        content = gzip.decompress(b) if digest_of == "content" and b[:2] == b"\x1f\x8b" else b
        return hashlib.new(algorithm, content).hexdigest()

    return tuple(
        loaders.RemoteFile(n, digest(b), algorithm,
                           (urls[n],) if urls else ("https://example.invalid/" + n,), digest_of)
        for n, b in files.items()
    )


def register(monkeypatch, name, files: dict, algorithm="sha256", urls=None, digest_of="file"):
    """Replace REGISTRY[name] with digests (and optionally URLs) of `files` {name: bytes}."""
    monkeypatch.setitem(loaders.REGISTRY, name, registry_entry(files, algorithm, urls, digest_of))


def write_files(folder: Path, files: dict) -> Path:
    """Write {relative path: bytes} under folder; returns folder."""
    for n, b in files.items():
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b)
    return folder


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A folder with four tiny MNIST .gz files, registered like the real ones (content digests).

    Returns (dir, arrays, bytes)."""
    arrays = fake_mnist_arrays()
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    register(monkeypatch, "mnist", files, digest_of="content")
    return write_files(tmp_path / "mnist", files), arrays, files


class CountingFetch:
    """Injected downloader serving fixed bytes per file name, counting calls."""

    def __init__(self, files):
        self.files, self.calls = files, []

    def __call__(self, url):
        self.calls.append(url)
        return self.files[url.rsplit("/", 1)[-1]]


def peak_bytes(fn) -> int:
    """Peak memory traced while fn() runs (its exception, if any, is swallowed)."""
    tracemalloc.start()
    try:
        fn()
    except DataError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def gzip_bomb(prefix: bytes, zeros: int) -> bytes:
    """A gzip file of `prefix` then `zeros` zero bytes (a multiple of 1 MiB), built in milliseconds.

    One MiB of zeros is deflated once: after a full flush the compressor starts
    afresh, so the same compressed block stands for every further MiB.
    """
    mib = 1 << 20
    assert zeros % mib == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate: the gzip framing is ours
    head = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH)
    assert comp.compress(bytes(mib)) + comp.flush(zlib.Z_FULL_FLUSH) == block
    crc = zlib.crc32(prefix)
    for _ in range(zeros // mib):
        crc = zlib.crc32(bytes(mib), crc)
    trailer = struct.pack("<II", crc, (len(prefix) + zeros) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + head + block * (zeros // mib) + comp.flush() + trailer


# ---------------------------------------------------------------------------
# helpers: CIFAR batches pickled as Python 2 did, and tar archives
# ---------------------------------------------------------------------------

NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]


class Py2Pickler(pickle._Pickler):
    """Pickle (protocol 2) as Python 2's cPickle wrote the official CIFAR-10 batches.

    Python 2 had one string type, written as BINSTRING, and its NumPy named the
    array reconstructor numpy.core.multiarray._reconstruct. Python 3 would write
    bytes through a _codecs.encode global and use NumPy 2's module name instead.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        if obj is NUMPY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def pickle_globals(data: bytes) -> set:
    """The (module, name) globals a protocol-2 pickle refers to."""
    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def cifar_batch(n, seed):
    """A batch with the keys and types of a genuine one: bytes keys, list labels, uint8 data."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"image_{seed}_{i}.png".encode() for i in range(n)]}


def make_tar(members: dict, extra=None, gz: bool = True) -> bytes:
    """tar(.gz) with {member name: bytes}; `extra(tar)` may add odd members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buf.getvalue()


def cifar_members(batches: dict) -> dict:
    return {f"cifar-10-batches-py/{n}": py2_pickle(b) for n, b in batches.items()}


@pytest.fixture
def fake_cifar(monkeypatch):
    """Six tiny registered batches in a tarball. Returns (batches, tarball bytes)."""
    batches = {n: cifar_batch(3, i) for i, n in enumerate(CIFAR_BATCHES)}
    tar = make_tar(cifar_members(batches))
    register(monkeypatch, "cifar10", {CIFAR_TAR: tar}, algorithm="md5")
    return batches, tar


class RunsCommand:
    """Unpickling this runs a shell command, as a hostile batch would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalsCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


# ---------------------------------------------------------------------------
# in-memory data sets
# ---------------------------------------------------------------------------

def test_digits_shapes_dtypes_ranges():
    ds = load_digits(seed=0)
    assert isinstance(ds, Dataset) and ds.name == "digits" and ds.n_classes == 10
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_test.shape[1:] == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert "digits" in ds.summary() and "(1347, 1, 8, 8)" in ds.summary()


def test_digits_split_reproducible_stratified():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_test, c.x_test)
    # stratified: every class sends round(0.25 * n_c) images to test, for any seed
    from sklearn.datasets import load_digits as sk
    n_c = np.bincount(sk().target)
    for ds in (a, c):
        np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.round(0.25 * n_c))
        np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test), n_c)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_stratified_split_indices():
    y = np.repeat(np.arange(4), [10, 7, 3, 1])
    tr, te = stratified_split(y, 0.3, np.random.default_rng(0))
    assert tr.dtype == np.int64 and np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    np.testing.assert_array_equal(np.bincount(y[te], minlength=4), [3, 2, 1, 0])


@pytest.mark.parametrize("make", [make_spirals, make_moons])
def test_toy_sets_seeded(make):
    x, y = make(n_samples=301, seed=0)
    x2, y2 = make(n_samples=301, seed=0)
    x3, _ = make(n_samples=301, seed=1)
    assert x.shape == (301, 2) and x.dtype == np.float32
    assert y.shape == (301,) and y.dtype == np.int64
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, x3)
    counts = np.bincount(y)
    assert counts.max() - counts.min() <= 1  # balanced classes
    assert np.isfinite(x).all()


def test_spirals_classes_and_noise_free_radius():
    x, y = make_spirals(n_samples=500, n_classes=5, noise=0.0, seed=0)
    assert set(np.unique(y)) == set(range(5))
    assert np.all(np.hypot(x[:, 0], x[:, 1]) <= 1.0 + 1e-6)
    with pytest.raises(ValueError, match="n_classes"):
        make_spirals(n_classes=1)
    with pytest.raises(ValueError, match="noise"):
        make_moons(noise=-1.0)


# ---------------------------------------------------------------------------
# IDX parsing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "a.idx"
    p.write_bytes(idx_bytes(a, gz=gz))
    np.testing.assert_array_equal(read_idx(p), a)
    np.testing.assert_array_equal(read_idx(str(p)), a)
    np.testing.assert_array_equal(read_idx(p.read_bytes()), a)


def test_read_idx_other_dtypes():
    a = np.array([[1, -2, 300], [4, 5, -70000]], dtype=np.int32)
    out = read_idx(idx_bytes(a, code=0x0C))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)
    f = np.array([0.5, -1.25], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(idx_bytes(f, code=0x0D)), f)


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((2, 4, 4), np.uint8), gz=False)
    with pytest.raises(DataError, match=r"truncated.*32 payload bytes, found 31"):
        read_idx(good[:-1], source="imgs.idx")
    with pytest.raises(DataError, match=r"imgs\.idx.*trailing bytes.*32 payload bytes, found more"):
        read_idx(good + b"\x00", source="imgs.idx")
    with pytest.raises(DataError, match="bad IDX magic 0x00000703"):
        read_idx(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(b"\x01" + good[1:])
    with pytest.raises(DataError, match=r"bad IDX magic 0x00000821.*NN in 1\.\.32"):
        read_idx(b"\x00\x00\x08\x21" + bytes(4 * 33))  # 33 dims: more than NumPy allows
    with pytest.raises(DataError, match="header"):
        read_idx(good[:6])
    p = tmp_path / "bad.gz"
    p.write_bytes(gzip.compress(good)[:-8] + b"garbage!")
    with pytest.raises(DataError, match=r"bad\.gz.*corrupt gzip"):
        read_idx(p)


def test_read_idx_gzip_variants():
    """Any faithful gzip of the same content reads the same; damage is a one-line DataError."""
    a = np.arange(200, dtype=np.uint8).reshape(2, 100)
    raw = idx_bytes(a, gz=False)
    half = len(raw) // 2
    for data in (gzip.compress(raw, 9, mtime=0), gzip.compress(raw, 1, mtime=123),
                 gzip.compress(raw[:half]) + gzip.compress(raw[half:]),  # two members, as `cat` makes
                 gzip.compress(raw) + bytes(10)):                        # zero padding
        np.testing.assert_array_equal(read_idx(data), a)
    stream = loaders._GzipStream(gzip.compress(b"ab") + bytes(3), "padded.gz")
    assert [stream.read(10), stream.read(10), stream.read(1)] == [b"ab", b"", b""]  # the end stays the end
    good = gzip.compress(raw)
    with pytest.raises(DataError, match="trailing garbage after the gzip stream"):
        read_idx(good + b"junk")
    with pytest.raises(DataError, match="gzip stream is truncated"):
        read_idx(good[:-4])  # the length field of the trailer is missing
    crc_flipped = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]
    with pytest.raises(DataError, match="corrupt gzip stream.*incorrect data check"):
        read_idx(crc_flipped)


# ---------------------------------------------------------------------------
# size caps: decompression, files, IDX headers (defect 2)
# ---------------------------------------------------------------------------

def test_read_idx_checks_declared_shape_before_allocating():
    # 0x00000803 with shape (2**32-1)^3: 8e28 bytes, from a 16-byte header
    huge = b"\x00\x00\x08\x03" + b"\xff" * 12
    for data in (huge, gzip.compress(huge)):
        with pytest.raises(DataError, match=r"declares shape \(4294967295, 4294967295, 4294967295\).*"
                                            r"more than the cap of \d+ bytes \(MAX_DECOMPRESSED_BYTES\)"):
            read_idx(data, source="huge.idx")
    labels = idx_bytes(np.zeros(100, np.uint8), gz=False)
    with pytest.raises(DataError, match="100 payload bytes, 108 with the header: more than the cap of 50 bytes"):
        read_idx(labels, max_bytes=50)
    assert read_idx(labels, max_bytes=108).shape == (100,)


def test_gzip_bomb_stops_at_the_declared_size():
    # header says 10 labels; the stream then holds 64 MiB of zeros: reading stops after 11 bytes
    bomb = gzip_bomb(idx_bytes(np.zeros(10, np.uint8), gz=False), 64 << 20)
    assert len(bomb) < 100_000
    with pytest.raises(DataError, match="trailing bytes: header says shape \\(10,\\)"):
        read_idx(bomb, source="bomb.gz")
    assert peak_bytes(lambda: read_idx(bomb)) < 4 << 20


def test_gunzip_cap_and_module_constant(monkeypatch):
    bomb = gzip_bomb(b"", 8 << 20)
    with pytest.raises(DataError, match=r"bomb\.gz: gzip stream decompresses to at least 1048577 bytes, "
                                        r"more than the cap of 1048576 bytes"):
        loaders.gunzip(bomb, max_bytes=1 << 20, source="bomb.gz")
    assert peak_bytes(lambda: loaders.gunzip(bomb, max_bytes=1 << 20)) < 4 << 20
    assert loaders.gunzip(bomb, max_bytes=8 << 20) == bytes(8 << 20)
    monkeypatch.setattr(loaders, "MAX_DECOMPRESSED_BYTES", 1000)  # read at call time
    with pytest.raises(DataError, match="cap of 1000 bytes"):
        loaders.gunzip(bomb)
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0, got -1"):
        loaders.gunzip(bomb, max_bytes=-1)


def test_mnist_loader_refuses_bomb_and_oversized_file(fake_mnist, monkeypatch):
    folder, _, _ = fake_mnist
    (folder / IDX_NAMES[1]).write_bytes(gzip_bomb(b"", 4 << 20))
    monkeypatch.setattr(loaders, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    with pytest.raises(DataError, match=f"{IDX_NAMES[1]}: gzip stream decompresses to at least"):
        load_mnist(folder)
    assert peak_bytes(lambda: load_mnist(folder)) < 4 << 20
    monkeypatch.setattr(loaders, "MAX_FILE_BYTES", 100)
    with pytest.raises(DataError, match=rf"{IDX_NAMES[0]}: file has \d+ bytes, more than the cap of 100"):
        load_mnist(folder)


# ---------------------------------------------------------------------------
# MNIST-style loaders on fabricated files
# ---------------------------------------------------------------------------

def test_load_mnist_from_data_dir(fake_mnist, isolated_cache):
    folder, arrays, _ = fake_mnist
    ds = load_mnist(folder, download=False)
    assert ds.name == "mnist" and ds.n_classes == 10
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train[:, 0], arrays[IDX_NAMES[0]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays[IDX_NAMES[3]])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert not isolated_cache.exists()  # reading from data_dir writes nothing


def test_load_mnist_accepts_uncompressed_and_regzipped_files(fake_mnist):
    folder, arrays, _ = fake_mnist
    for n, a in arrays.items():
        (folder / n).unlink()
        (folder / n[:-3]).write_bytes(idx_bytes(a, gz=False))
    ds = load_mnist(folder)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])
    for n, a in arrays.items():  # as Debian re-gzips: other level, no name, another mtime
        (folder / n[:-3]).unlink()
        (folder / n).write_bytes(gzip.compress(idx_bytes(a, gz=False), compresslevel=9, mtime=0))
    np.testing.assert_array_equal(load_mnist(folder).x_test, ds.x_test)


def test_uncompressed_file_with_a_changed_label_is_refused(fake_mnist):
    """Defect 3: uncompressed files used to load without any check."""
    folder, arrays, _ = fake_mnist
    labels = arrays[IDX_NAMES[3]].copy()
    labels[0] = (labels[0] + 1) % 10
    (folder / IDX_NAMES[3]).unlink()
    (folder / IDX_NAMES[3][:-3]).write_bytes(idx_bytes(labels, gz=False))
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz \(.*t10k-labels-idx1-ubyte\): "
                                            r"expected sha256 \w+ of the decompressed content"):
        load_mnist(folder)


def test_load_mnist_uses_cache_dir(fake_mnist, isolated_cache):
    folder, arrays, _ = fake_mnist
    isolated_cache.mkdir()
    folder.rename(isolated_cache / "mnist")
    ds = load_mnist(download=False)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])


def test_wrong_checksum_names_file(fake_mnist):
    folder, arrays, files = fake_mnist
    other = idx_bytes(arrays[IDX_NAMES[1]][::-1].copy())
    (folder / IDX_NAMES[1]).write_bytes(other)
    expected = hashlib.sha256(gzip.decompress(files[IDX_NAMES[1]])).hexdigest()
    got = hashlib.sha256(gzip.decompress(other)).hexdigest()
    with pytest.raises(ChecksumError) as e:
        load_mnist(folder, download=False)
    msg = str(e.value)
    assert IDX_NAMES[1] in msg and expected in msg and got in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_sha256sums_file_is_checked(fake_mnist):
    folder, _, files = fake_mnist
    lines = [f"{hashlib.sha256(b).hexdigest()}  {n}" for n, b in files.items()]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    load_mnist(folder, download=False)  # consistent: fine
    lines[2] = "0" * 64 + "  " + IDX_NAMES[2]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(ChecksumError, match=f"{IDX_NAMES[2]}.*SHA256SUMS"):
        load_mnist(folder, download=False)
    (folder / "SHA256SUMS").write_bytes(b"\xff\xfe not text")
    with pytest.raises(DataError, match="SHA256SUMS: expected UTF-8 text"):
        load_mnist(folder, download=False)


def _register_and_write(folder, monkeypatch, name, data):
    """Write data under name and register its digest, so only parsing can fail."""
    (folder / name).write_bytes(data)
    files = {n: (folder / n).read_bytes() for n in IDX_NAMES}
    register(monkeypatch, "mnist", files, digest_of="content")


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda raw: raw[:-5], r"train-images.*truncated.*3920 payload bytes, found 3915"),
        (lambda raw: raw + b"xyz", r"train-images.*trailing bytes.*3920 payload bytes, found more"),
        (lambda raw: b"\x00\x00\x07\x03" + raw[4:], r"train-images.*bad IDX magic 0x00000703"),
        (lambda raw: raw[:3] + b"\x02" + raw[4:], r"train-images.*bad IDX magic 0x00000802.*0x00000803"),
    ],
    ids=["truncated", "trailing", "bad_type", "wrong_ndim"],
)
def test_malformed_idx_in_loader(fake_mnist, monkeypatch, mutate, pattern):
    folder, arrays, _ = fake_mnist
    raw = idx_bytes(arrays[IDX_NAMES[0]], gz=False)
    _register_and_write(folder, monkeypatch, IDX_NAMES[0], gzip.compress(mutate(raw)))
    with pytest.raises(DataError, match=pattern):
        load_mnist(folder, download=False)


def test_corrupt_gzip_in_loader(fake_mnist):
    folder, _, files = fake_mnist
    (folder / IDX_NAMES[2]).write_bytes(files[IDX_NAMES[2]][:40])  # a gzip stream cut short
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*gzip stream is truncated"):
        load_mnist(folder, download=False)


def test_label_range_and_count_mismatch(fake_mnist, monkeypatch):
    folder, arrays, _ = fake_mnist
    bad = arrays[IDX_NAMES[1]].copy()
    bad[0] = 10
    _register_and_write(folder, monkeypatch, IDX_NAMES[1], idx_bytes(bad))
    with pytest.raises(DataError, match="labels must be < 10, found 10"):
        load_mnist(folder, download=False)
    _register_and_write(folder, monkeypatch, IDX_NAMES[1], idx_bytes(arrays[IDX_NAMES[1]][:4]))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_mnist(folder, download=False)


def test_unreadable_file_is_a_data_error(fake_mnist):
    folder, _, _ = fake_mnist
    with pytest.raises(DataError, match=r"cannot read the file \(Is a directory\)"):
        loaders.read_capped(folder)


# ---------------------------------------------------------------------------
# where files are looked for (defect 5)
# ---------------------------------------------------------------------------

def test_missing_files_without_download(tmp_path, fake_mnist):
    folder, _, _ = fake_mnist
    (folder / IDX_NAMES[3]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(folder, download=False)
    assert isinstance(e.value, DataNotFoundError) and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz or t10k-labels-idx1-ubyte" in msg and str(folder) in msg
    assert "download=True" in msg and "\n" not in msg
    with pytest.raises(DataNotFoundError, match="train-images"):
        load_mnist(tmp_path / "empty", download=False)


def test_explicit_data_dir_never_falls_back_to_cache_or_download(tmp_path, fake_mnist, isolated_cache):
    """Defect 5: a wrong --data-dir used to be replaced silently by the cache or a download."""
    folder, _, files = fake_mnist
    write_files(isolated_cache / "mnist", files)  # a complete cache that must not be used
    fetch = CountingFetch(files)
    wrong = tmp_path / "typo"
    with pytest.raises(DataNotFoundError) as e:
        load_mnist(wrong, fetch=fetch)
    msg = str(e.value)
    assert f"looked in {wrong} (no such folder);" in msg
    assert all(n in msg for n in IDX_NAMES) and str(isolated_cache) in msg  # named as the way out
    assert fetch.calls == []
    ds = load_mnist(wrong, download=True, fetch=fetch)  # explicitly allowed: cache, no download
    assert ds.x_train.shape == (5, 1, 28, 28) and fetch.calls == []
    with pytest.raises(DataNotFoundError, match="download=True"):
        load_dataset("mnist", data_dir=wrong)  # what --data-dir does


def test_download_with_injected_fetch_fills_cache(fake_mnist, isolated_cache):
    _, arrays, files = fake_mnist
    fetch = CountingFetch(files)
    ds = load_mnist(fetch=fetch)  # no data_dir: cache, then download
    assert len(fetch.calls) == 4
    for n, b in files.items():
        assert (isolated_cache / "mnist" / n).read_bytes() == b
    assert sorted(p.name for p in (isolated_cache / "mnist").iterdir()) == sorted(IDX_NAMES)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])
    ds2 = load_mnist(download=True, fetch=fetch)  # served from the cache now
    assert len(fetch.calls) == 4
    np.testing.assert_array_equal(ds2.x_test, ds.x_test)


def test_download_only_missing_files(fake_mnist, isolated_cache):
    folder, _, files = fake_mnist
    (folder / IDX_NAMES[0]).unlink()
    fetch = CountingFetch(files)
    load_mnist(folder, download=True, fetch=fetch)
    assert [u.rsplit("/", 1)[-1] for u in fetch.calls] == [IDX_NAMES[0]]
    assert (isolated_cache / "mnist" / IDX_NAMES[0]).is_file()
    assert not (folder / IDX_NAMES[0]).exists()  # data_dir is never written


# ---------------------------------------------------------------------------
# downloads (defects 2 and 4)
# ---------------------------------------------------------------------------

def test_download_via_file_url_default_fetch(tmp_path, monkeypatch, isolated_cache):
    arrays = fake_mnist_arrays(seed=1)
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    src = write_files(tmp_path / "mirror", files)
    register(monkeypatch, "mnist", files, urls={n: (src / n).as_uri() for n in files}, digest_of="content")
    ds = load_mnist()  # default fetch, file:// URLs
    np.testing.assert_array_equal(ds.y_test, arrays[IDX_NAMES[3]])
    assert (isolated_cache / "mnist" / IDX_NAMES[0]).read_bytes() == files[IDX_NAMES[0]]


def test_fetch_with_wrong_bytes_writes_nothing(fake_mnist, isolated_cache):
    _, _, files = fake_mnist
    evil = dict(files)
    good = files[IDX_NAMES[0]]
    evil[IDX_NAMES[0]] = good[:-1] + bytes([good[-1] ^ 0xFF])  # one flipped byte (gzip trailer)
    with pytest.raises(DataError, match=f"{IDX_NAMES[0]}.*corrupt gzip stream"):
        load_mnist(fetch=CountingFetch(evil))
    evil[IDX_NAMES[0]] = idx_bytes(fake_mnist_arrays(seed=9)[IDX_NAMES[0]])  # valid, other content
    with pytest.raises(ChecksumError, match=f"{IDX_NAMES[0]}.*expected sha256"):
        load_mnist(fetch=CountingFetch(evil))
    written = list((isolated_cache / "mnist").glob("*")) if isolated_cache.exists() else []
    assert IDX_NAMES[0] not in [p.name for p in written]
    assert not [p for p in written if p.name.endswith(".tmp")]


def _with_mirrors(monkeypatch, name, *prefixes):
    """Give every file of REGISTRY[name] extra mirrors in front of its own URL."""
    specs = tuple(dataclasses.replace(s, urls=tuple(p + s.name for p in prefixes) + s.urls)
                  for s in loaders.REGISTRY[name])
    monkeypatch.setitem(loaders.REGISTRY, name, specs)


def test_mirror_fallback_and_all_mirrors_failing(fake_mnist, monkeypatch, isolated_cache):
    _, _, files = fake_mnist
    _with_mirrors(monkeypatch, "mnist", "https://down.invalid/", "https://short.invalid/")

    def flaky(url):
        if "down.invalid" in url:
            raise OSError("connection refused")
        if "short.invalid" in url:  # defect 4: this used to escape and skip the other mirrors
            raise http.client.IncompleteRead(b"partial", 1000)
        return files[url.rsplit("/", 1)[-1]]

    load_mnist(fetch=flaky)
    assert len(list((isolated_cache / "mnist").iterdir())) == 4

    def dead(url):
        raise OSError("no network")

    monkeypatch.setenv("MINIDRESS_DATA", str(isolated_cache.parent / "other"))
    with pytest.raises(DataError) as e:
        load_mnist(fetch=dead)
    msg = str(e.value)
    assert msg.startswith("could not download train-images-idx3-ubyte.gz from any of its 3 mirror(s)")
    assert "https://down.invalid/train-images-idx3-ubyte.gz: OSError: no network" in msg
    assert "\n" not in msg and not isinstance(e.value, ChecksumError)


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves BODY: whole, cut short, too big without announcing it, or a byte at a time."""

    BODY = bytes(range(256)) * 40

    def do_GET(self):
        self.send_response(200)
        if self.path == "/unannounced":
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            self.wfile.write(self.BODY * 10)
            return
        if self.path != "/slow":
            self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.path == "/ok":
            self.wfile.write(self.BODY)
        elif self.path == "/short":
            self.wfile.write(self.BODY[:1000])
        elif self.path == "/slow":
            for _ in range(100):  # bounded: at most 5 s, and it stops when the client hangs up
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_default_fetch_caps_size_time_and_checks_length(local_server):
    body = _Server.BODY
    assert loaders.default_fetch(local_server + "/ok") == body
    with pytest.raises(DataError, match=rf"/ok: server announces {len(body)} bytes, more than the cap of 100"):
        loaders.default_fetch(local_server + "/ok", max_bytes=100)
    with pytest.raises(DataError, match=r"/unannounced: download reached \d+ bytes, more than the cap of 20000"):
        loaders.default_fetch(local_server + "/unannounced", max_bytes=20_000)
    with pytest.raises(DataError, match=rf"/short: download truncated: got 1000 bytes, the server announced {len(body)}"):
        loaders.default_fetch(local_server + "/short")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"/slow: download still running after .* within 0.3 s"):
        loaders.default_fetch(local_server + "/slow", deadline=0.3, timeout=2.0)
    assert time.monotonic() - start < 2.0  # each read is short; the deadline covers the whole transfer


def test_truncated_download_tries_the_next_mirror(local_server, monkeypatch, isolated_cache):
    body = _Server.BODY
    spec = loaders.RemoteFile("payload.bin", hashlib.sha256(body).hexdigest(), "sha256",
                              (local_server + "/short", local_server + "/ok"))
    assert loaders.download_file(spec, isolated_cache) == body
    assert (isolated_cache / "payload.bin").read_bytes() == body
    only_short = dataclasses.replace(spec, urls=(local_server + "/short",))
    with pytest.raises(DataError, match="/short: DataError: .*download truncated"):
        loaders.download_file(only_short, isolated_cache / "other")


def test_fashion_mnist_uses_md5(tmp_path, monkeypatch):
    arrays = fake_mnist_arrays(seed=2)
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    register(monkeypatch, "fashion_mnist", files, algorithm="md5")
    ds = load_fashion_mnist(fetch=CountingFetch(files))
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (5, 1, 28, 28)
    bad = dict(files)
    bad[IDX_NAMES[3]] = idx_bytes(arrays[IDX_NAMES[3]][::-1].copy())
    monkeypatch.setenv("MINIDRESS_DATA", str(tmp_path / "c2"))
    with pytest.raises(ChecksumError, match="expected md5"):
        load_fashion_mnist(fetch=CountingFetch(bad))


def test_fashion_mnist_copies_that_cannot_be_checked_are_refused(tmp_path, monkeypatch):
    """Only the .gz digests are published, so re-gzipped or uncompressed copies cannot be verified."""
    arrays = fake_mnist_arrays(seed=3)
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    register(monkeypatch, "fashion_mnist", files, algorithm="md5")
    folder = write_files(tmp_path / "fashion", files)
    raw = idx_bytes(arrays[IDX_NAMES[1]], gz=False)
    (folder / IDX_NAMES[1]).write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    with pytest.raises(ChecksumError, match="Only this exact published .gz is accepted"):
        load_fashion_mnist(folder)
    (folder / IDX_NAMES[1]).unlink()
    (folder / IDX_NAMES[1][:-3]).write_bytes(raw)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: only the digest of the compressed "
                                        r"train-labels-idx1-ubyte\.gz is published"):
        load_fashion_mnist(folder)


def test_fashion_mnist_accepts_the_trusted_recompressed_copy(tmp_path, monkeypatch):
    """A second digest, of the decompressed content of a trusted copy (Debian's package), lets a
    re-gzipped or uncompressed copy pass; a changed label still does not."""
    arrays = fake_mnist_arrays(seed=4)
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    entry = tuple(loaders.RemoteFile(s.name, s.digest, s.algorithm, s.urls, "file",
                                     hashlib.sha256(gzip.decompress(files[s.name])).hexdigest(), "a test copy")
                  for s in registry_entry(files, "md5"))
    monkeypatch.setitem(loaders.REGISTRY, "fashion_mnist", entry)
    folder = write_files(tmp_path / "fashion", files)
    for name in IDX_NAMES[:2]:                           # re-gzipped, and uncompressed
        raw = gzip.decompress(files[name])
        (folder / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=7))
    (folder / IDX_NAMES[2]).unlink()
    (folder / IDX_NAMES[2][:-3]).write_bytes(gzip.decompress(files[IDX_NAMES[2]]))
    ds = load_fashion_mnist(folder)
    assert np.array_equal(ds.y_train, arrays[IDX_NAMES[1]]) and ds.x_test.shape[0] == 3
    changed = arrays[IDX_NAMES[1]].copy()
    changed[0] = (changed[0] + 1) % 10
    (folder / IDX_NAMES[1]).write_bytes(gzip.compress(idx_bytes(changed, gz=False), mtime=7))
    with pytest.raises(ChecksumError, match="Nor does its decompressed content match a test copy"):
        load_fashion_mnist(folder)


def test_registry_has_upstream_digests():
    mnist = {s.name: s for s in loaders.REGISTRY["mnist"]}
    assert mnist["train-images-idx3-ubyte.gz"].digest.startswith("ba891046")
    assert mnist["t10k-labels-idx1-ubyte.gz"].digest.startswith("ff7bcfd4")
    assert all(s.algorithm == "sha256" and len(s.digest) == 64 and s.digest_of == "content"
               for s in mnist.values())
    assert all(s.algorithm == "md5" and s.digest_of == "file" and len(s.content_sha256) == 64
               and "Debian" in s.content_source for s in loaders.REGISTRY["fashion_mnist"])
    assert loaders.REGISTRY["cifar10"][0].digest == "c58f30108f718f92721af3b95e74349a"
    with pytest.raises(ValueError, match="digest_of must be 'file' or 'content', got 'gz'"):
        loaders.RemoteFile("x", "0", "md5", (), "gz")


# ---------------------------------------------------------------------------
# CIFAR-10 on a fabricated tarball
# ---------------------------------------------------------------------------

def test_fake_batch_is_pickled_like_the_official_one():
    """The fixture's batches use exactly the globals (and opcodes) of Python 2's batches."""
    data = py2_pickle(cifar_batch(3, 0))
    assert pickle_globals(data) == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                                    ("numpy", "dtype")}
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert {"SHORT_BINSTRING", "BINSTRING"} <= ops and not ops & {"BINUNICODE", "SHORT_BINBYTES"}
    x, y = read_cifar_batch(data, "fake")
    np.testing.assert_array_equal(x.reshape(3, -1), cifar_batch(3, 0)[b"data"])
    assert y.tolist() == cifar_batch(3, 0)[b"labels"]


def test_cifar10_download_and_cache(fake_cifar, isolated_cache):
    batches, tar = fake_cifar
    fetch = CountingFetch({CIFAR_TAR: tar})
    ds = load_cifar10(fetch=fetch)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    first = batches["data_batch_1"][b"data"][0]
    np.testing.assert_allclose(ds.x_train[0, 0].ravel(), first[:1024] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_train[0, 2, 31, 31], first[-1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    assert sorted(p.name for p in (isolated_cache / "cifar10").iterdir()) == [CIFAR_TAR]  # nothing extracted
    load_cifar10(fetch=fetch)
    assert len(fetch.calls) == 1


def test_cifar10_verifies_the_tarball_on_every_load(fake_cifar, isolated_cache):
    """Defect 1: the extracted folder in the cache used to be trusted forever."""
    batches, tar = fake_cifar
    load_cifar10(fetch=CountingFetch({CIFAR_TAR: tar}))
    # what an old minidress left in the cache, since tampered with: never read
    stale = write_files(isolated_cache / "cifar10" / "cifar-10-batches-py",
                        {n: py2_pickle(cifar_batch(3, 99)) for n in CIFAR_BATCHES})
    ds = load_cifar10(download=False)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    assert stale.is_dir()
    cached = isolated_cache / "cifar10" / CIFAR_TAR
    cached.write_bytes(tar[:-1] + bytes([tar[-1] ^ 1]))
    with pytest.raises(ChecksumError, match=f"{CIFAR_TAR}.*expected md5"):
        load_cifar10(download=False)


def test_cifar10_from_data_dir(fake_cifar, tmp_path, isolated_cache):
    batches, tar = fake_cifar
    mine = write_files(tmp_path / "mine", {CIFAR_TAR: tar})
    ds = load_cifar10(mine)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    assert sorted(p.name for p in mine.iterdir()) == [CIFAR_TAR] and not isolated_cache.exists()
    folder_only = write_files(tmp_path / "folder", cifar_members(batches))
    with pytest.raises(DataNotFoundError, match=r"cannot find cifar-10-python\.tar\.gz.*An extracted "
                                                r"cifar-10-batches-py/ .* only the tarball has a published digest"):
        load_cifar10(folder_only)


def test_cifar10_errors(fake_cifar, tmp_path, monkeypatch):
    batches, tar = fake_cifar
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nothing")
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        load_cifar10(fetch=lambda url: tar + b"\x00")

    def load_with(name, data):
        members = {**cifar_members(batches), f"cifar-10-batches-py/{name}": data}
        folder = write_files(tmp_path / "bad", {CIFAR_TAR: make_tar(members)})
        register(monkeypatch, "cifar10", {CIFAR_TAR: (folder / CIFAR_TAR).read_bytes()}, algorithm="md5")
        return load_cifar10(folder)

    bad = {**batches["data_batch_3"], b"data": np.zeros((3, 3000), np.uint8)}
    with pytest.raises(DataError, match=r"data_batch_3: b'data' must be uint8 \[N, 3072\], got uint8 \(3, 3000\)"):
        load_with("data_batch_3", py2_pickle(bad))
    with pytest.raises(DataError, match="data_batch_3: expected a dict with keys b'data'"):
        load_with("data_batch_3", py2_pickle({b"labels": []}))
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR-10 batch"):
        load_with("data_batch_3", b"not a pickle")
    bad = {**batches["test_batch"], b"labels": [0, 1, 10]}
    with pytest.raises(DataError, match=r"test_batch: labels must be in 0\.\.9, found 0\.\.10"):
        load_with("test_batch", py2_pickle(bad))
    members = cifar_members(batches)
    del members["cifar-10-batches-py/data_batch_4"]
    register(monkeypatch, "cifar10", {CIFAR_TAR: make_tar(members)}, algorithm="md5")
    with pytest.raises(DataError, match=r"archive has no file \['cifar-10-batches-py/data_batch_4'\]"):
        load_cifar10(fetch=lambda url: make_tar(members))


@pytest.mark.parametrize("make", [
    lambda marker: RunsCommand(f"touch {marker}"),
    lambda marker: EvalsCode(f"open({str(marker)!r}, 'w')"),
    lambda marker: {b"data": RunsCommand(f"touch {marker}"), b"labels": []},
], ids=["os.system", "eval", "inside_the_dict"])
def test_hostile_batch_never_runs(tmp_path, make, monkeypatch):
    """Defect 1: a plain pickle.load ran whatever the batch's __reduce__ named."""
    marker = tmp_path / "ran"
    hostile = make(marker)
    for data in (py2_pickle(hostile), pickle.dumps(hostile)):  # as Python 2 and 3 write them
        with pytest.raises(DataError, match=r"evil: not a readable CIFAR-10 batch \(UnpicklingError: "
                                            r"refusing global (posix\.system|(__builtin__|builtins)\.eval)"):
            read_cifar_batch(data, "evil")
    assert not marker.exists()
    batches = {n: cifar_batch(3, i) for i, n in enumerate(CIFAR_BATCHES)}
    members = {**cifar_members(batches), "cifar-10-batches-py/data_batch_2": py2_pickle(hostile)}
    tar = make_tar(members)
    register(monkeypatch, "cifar10", {CIFAR_TAR: tar}, algorithm="md5")
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR-10 batch"):
        load_cifar10(fetch=lambda url: tar)
    assert not marker.exists()


def test_batch_reader_survives_a_pickle_that_crashes_the_c_unpickler():
    """A dict key nested 150000 tuples deep: pickle.loads overflows the C stack hashing it (a
    segfault, here at 150 kB of input); the batch reader refuses tuple keys before hashing."""
    deep_key = b"\x80\x02})" + b"\x85" * 150_000 + b"K\x01s."
    with pytest.raises(DataError, match="deep: not a readable .* dict keys must be strings or ints, got tuple"):
        read_cifar_batch(deep_key, "deep")


def test_batch_stand_ins_refuse_what_numpy_would_allocate_or_interpret():
    def batch_with(data):
        return py2_pickle({b"data": data, b"labels": []})

    class CraftedReconstruct:  # _reconstruct asked for a 10**12-element array
        def __reduce__(self):
            return NUMPY_RECONSTRUCT, (np.ndarray, (10**12,), b"b")

    with pytest.raises(DataError, match="_reconstruct must be called as in a NumPy array pickle"):
        read_cifar_batch(batch_with(CraftedReconstruct()))
    with pytest.raises(DataError, match="dtype 'O8' .* is not a plain number type"):
        read_cifar_batch(pickle.dumps({b"data": np.array([None]), b"labels": []}, protocol=4))
    re_pickled = pickle.dumps(cifar_batch(2, 0), protocol=4)  # NumPy 2 names, Python 3 opcodes
    assert read_cifar_batch(re_pickled)[0].shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="refusing global _codecs.encode"):
        read_cifar_batch(pickle.dumps(cifar_batch(2, 0), protocol=2))  # Python 3's protocol 2


# ---------------------------------------------------------------------------
# tar members (defects 1 and 4)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "cifar-10-batches-py/../../evil"])
def test_tar_rejects_escaping_paths(name):
    tar = make_tar({"ok.txt": b"fine", name: b"evil"})
    with pytest.raises(DataError, match="t.tar.gz: refusing unsafe member path"):
        cifar.read_tar_members(tar, ["ok.txt"], source="t.tar.gz")


def test_tar_rejects_links_and_clashing_names():
    def add_link(kind, target):
        def extra(tar):
            info = tarfile.TarInfo("cifar-10-batches-py/link")
            info.type, info.linkname = kind, target
            tar.addfile(info)
        return extra

    for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "a")):
        with pytest.raises(DataError, match="'cifar-10-batches-py/link': not a plain file or folder"):
            cifar.read_tar_members(make_tar({"a": b"1"}, extra=add_link(kind, target)), ["a"])
    twice = make_tar({"a/b": b"1"}, extra=lambda tar: tar.addfile(tarfile.TarInfo("./a//b")))
    with pytest.raises(DataError, match=r"member name './a//b' appears twice"):
        cifar.read_tar_members(twice, ["a/b"])
    # defect 4: extracting this used to raise a raw NotADirectoryError
    clash = make_tar({"cifar-10-batches-py": b"a file", "cifar-10-batches-py/test_batch": b"2"})
    with pytest.raises(DataError, match="member 'cifar-10-batches-py/test_batch' needs "
                                        "'cifar-10-batches-py' as a folder"):
        cifar.read_tar_members(clash, ["cifar-10-batches-py/test_batch"])
    with pytest.raises(DataError, match="corrupt gzip stream"):
        cifar.read_tar_members(b"\x1f\x8b definitely not a tarball", ["a"])
    with pytest.raises(DataError, match="corrupt tar"):
        cifar.read_tar_members(make_tar({"a": bytes(5000)}, gz=False)[:2000], ["a"])
    assert cifar.read_tar_members(make_tar({"a": b"1", "b": b"2"}, gz=False), ["b"]) == {"b": b"2"}


# ---------------------------------------------------------------------------
# batching, splitting, standardising
# ---------------------------------------------------------------------------

def test_minibatches_deterministic_and_a_permutation():
    x = np.arange(103, dtype=np.float32).reshape(103, 1) * np.ones((1, 3), np.float32)
    y = np.arange(103)
    run = lambda seed: list(iterate_minibatches(x, y, 10, rng=np.random.default_rng(seed)))
    a, b, c = run(0), run(0), run(1)
    assert len(a) == 11 and [len(yb) for _, yb in a][-1] == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    order = np.concatenate([yb for _, yb in a])
    assert sorted(order.tolist()) == list(range(103)) and not np.array_equal(order, y)
    assert not np.array_equal(order, np.concatenate([yb for _, yb in c]))
    for xb, yb in a:  # x and y stay aligned
        np.testing.assert_array_equal(xb[:, 0], yb)
    assert xb.dtype == np.float32


def test_minibatches_options():
    x, y = np.zeros((25, 2), np.float32), np.arange(25)
    batches = list(iterate_minibatches(x, y, 10, rng=0, drop_last=True))
    assert [len(yb) for _, yb in batches] == [10, 10]
    plain = list(iterate_minibatches(x, y, 10, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in plain]), y)
    gen = np.random.default_rng(0)  # one Generator across epochs: new order each epoch
    e1 = np.concatenate([yb for _, yb in iterate_minibatches(x, y, 5, rng=gen)])
    e2 = np.concatenate([yb for _, yb in iterate_minibatches(x, y, 5, rng=gen)])
    assert not np.array_equal(e1, e2)


def test_minibatches_validation():
    x, y = np.zeros((5, 2), np.float32), np.zeros(5, np.int64)
    with pytest.raises(ValueError, match="5 samples but y has 4"):
        next(iterate_minibatches(x, y[:4], 2, rng=0))
    for bs in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            next(iterate_minibatches(x, y, bs, rng=0))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        next(iterate_minibatches(bad, y, 2, rng=0))
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        next(iterate_minibatches(bad, y, 2, rng=0))
    with pytest.raises(ValueError, match="rng"):
        next(iterate_minibatches(x, y, 2))


def test_minibatches_reject_empty_data():
    """An empty epoch used to yield nothing, and fit then divided by zero."""
    x, y = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match=r"iterate_minibatches: x and y have no samples \(shapes \(0, 2\) "
                                         r"and \(0,\)\); expected at least 1"):
        next(iterate_minibatches(x, y, 2, rng=0))
    with pytest.raises(ValueError, match="no samples"):
        next(iterate_minibatches(x, y, 2, shuffle=False))


def test_train_val_split():
    x, y = np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20)
    a = train_val_split(x, y, 0.25, seed=0)
    b = train_val_split(x, y, 0.25, seed=0)
    c = train_val_split(x, y, 0.25, seed=1)
    xt, yt, xv, yv = a
    assert len(yv) == 5 and len(yt) == 15
    assert sorted(np.concatenate([yt, yv]).tolist()) == list(range(20))
    np.testing.assert_array_equal(xv[:, 0], 2 * yv)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[3], c[3])
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(x, y, 0.0, seed=0)
    with pytest.raises(ValueError, match="20 samples but y has 19"):
        train_val_split(x, y[:-1], 0.2, seed=0)


def test_standardize_images_keeps_dtype_per_channel():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 3, 4, 4)) * [[[[1.0]], [[5.0]], [[0.1]]]] + 7).astype(np.float32)
    x_test = x[:10] + np.float32(1)
    (xn, xtn), stats = standardize(x, x_test)
    assert xn.dtype == np.float32 and xtn.dtype == np.float32
    assert isinstance(stats, Normalizer) and stats.mean.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(xn.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(xn.std(axis=(0, 2, 3)), 1, atol=1e-4)
    # test data uses the *train* statistics
    shift = np.broadcast_to(1 / stats.std, xtn.shape)  # x_test = x + 1, so a shift of 1/std
    np.testing.assert_allclose(xtn - xn[:10], shift, rtol=1e-3)
    np.testing.assert_allclose(stats.inverse(xn), x, rtol=1e-5, atol=1e-5)
    (again,), _ = standardize(x, mean=stats.mean, std=stats.std)
    np.testing.assert_allclose(again, xn, atol=1e-6)


def test_standardize_features_and_errors():
    x = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float64)
    (xn,), stats = standardize(x)
    assert xn.dtype == np.float64 and stats.mean.shape == (1, 2)
    np.testing.assert_allclose(xn, [[-1.0, 0.0], [1.0, 0.0]])  # constant column -> 0, not NaN
    (x16,), _ = standardize(x.astype(np.float16))
    assert x16.dtype == np.float16
    (scaled,), _ = standardize(x, mean=0.0, std=2.0)
    np.testing.assert_allclose(scaled, x / 2)
    with pytest.raises(TypeError, match="floating"):
        standardize(np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="both mean and std"):
        standardize(x, mean=0.0)
    with pytest.raises(ValueError, match="2 entries"):
        standardize(x, mean=[0.0, 1.0, 2.0], std=1.0)
    with pytest.raises(ValueError, match="NaN/inf"):
        standardize(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        stats(np.zeros((2, 3)))


def test_load_dataset_dispatch(fake_mnist):
    folder, _, _ = fake_mnist
    assert load_dataset("digits", seed=1).y_test.shape == load_digits(seed=1).y_test.shape
    assert load_dataset("MNIST", data_dir=folder, download=False).x_train.shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*cifar10"):
        load_dataset("imagenet")


# ---------------------------------------------------------------------------
# real MNIST, only when the shared copy is present
# ---------------------------------------------------------------------------

needs_real_mnist = pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")


@needs_real_mnist
def test_real_mnist(isolated_cache):
    ds = load_mnist(REAL_MNIST)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.float32 and 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    assert ds.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert not isolated_cache.exists()


@needs_real_mnist
def test_real_mnist_regzipped_passes_and_changed_label_fails(tmp_path):
    """The published digests are of the decompressed files: a re-gzip (as Debian ships) passes,
    an uncompressed copy passes, and one changed label does not."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in IDX_NAMES[:3]:
        (folder / name).symlink_to(REAL_MNIST / name)
    labels = gzip.decompress((REAL_MNIST / IDX_NAMES[3]).read_bytes())
    (folder / IDX_NAMES[1]).unlink()
    (folder / IDX_NAMES[1]).write_bytes(gzip.compress(gzip.decompress((REAL_MNIST / IDX_NAMES[1]).read_bytes()),
                                                      compresslevel=9, mtime=0))
    (folder / IDX_NAMES[3][:-3]).write_bytes(labels)
    ds = load_mnist(folder)
    assert ds.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3] and ds.y_test.shape == (10000,)
    changed = bytearray(labels)
    changed[8] = (changed[8] + 1) % 10  # the first test label
    (folder / IDX_NAMES[3][:-3]).write_bytes(bytes(changed))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.*expected sha256 ff7bcfd4"):
        load_mnist(folder)

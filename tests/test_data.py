"""Tests for minidress.data: in-memory data sets, file loaders, batching.

File loaders are tested on tiny IDX / CIFAR files fabricated in tmp_path,
with the registry's checksums monkeypatched to match them, and an injected
``fetch`` (or a file:// URL) standing in for the network.
"""

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from minidress.data import (
    ChecksumError,
    DataError,
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
    read_idx,
    standardize,
    stratified_split,
    train_val_split,
)
from minidress.data import loaders

REAL_MNIST = Path(__file__).parents[1].parent / "shared/data/mnist"
IDX_NAMES = [s.name for s in loaders.REGISTRY["mnist"]]


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


def register(monkeypatch, name, files: dict, algorithm="sha256", urls=None):
    """Replace REGISTRY[name] with digests (and optionally URLs) of `files` {name: bytes}."""
    specs = tuple(
        loaders.RemoteFile(n, hashlib.new(algorithm, b).hexdigest(), algorithm,
                           (urls[n],) if urls else ("https://example.invalid/" + n,))
        for n, b in files.items()
    )
    monkeypatch.setitem(loaders.REGISTRY, name, specs)


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A folder with four tiny, registered MNIST .gz files. Returns (dir, arrays, bytes)."""
    arrays = fake_mnist_arrays()
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    folder = tmp_path / "mnist"
    folder.mkdir()
    for n, b in files.items():
        (folder / n).write_bytes(b)
    register(monkeypatch, "mnist", files)
    return folder, arrays, files


class CountingFetch:
    """Injected downloader serving fixed bytes per file name, counting calls."""

    def __init__(self, files):
        self.files, self.calls = files, []

    def __call__(self, url):
        self.calls.append(url)
        return self.files[url.rsplit("/", 1)[-1]]


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
    with pytest.raises(DataError, match=r"imgs\.idx.*trailing bytes.*found 33"):
        read_idx(good + b"\x00", source="imgs.idx")
    with pytest.raises(DataError, match="bad IDX magic 0x00000703"):
        read_idx(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(b"\x01" + good[1:])
    with pytest.raises(DataError, match="header"):
        read_idx(good[:6])
    p = tmp_path / "bad.gz"
    p.write_bytes(gzip.compress(good)[:-8] + b"garbage!")
    with pytest.raises(DataError, match=r"bad\.gz.*corrupt gzip"):
        read_idx(p)


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


def test_load_mnist_accepts_uncompressed_files(fake_mnist):
    folder, arrays, _ = fake_mnist
    for n, a in arrays.items():
        (folder / n).unlink()
        (folder / n[:-3]).write_bytes(idx_bytes(a, gz=False))
    ds = load_mnist(folder, download=False)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])


def test_load_mnist_uses_cache_dir(fake_mnist, isolated_cache):
    folder, arrays, _ = fake_mnist
    folder.rename(isolated_cache.parent / "moved")
    isolated_cache.mkdir()
    (isolated_cache.parent / "moved").rename(isolated_cache / "mnist")
    ds = load_mnist(download=False)
    np.testing.assert_array_equal(ds.y_train, arrays[IDX_NAMES[1]])


def test_wrong_checksum_names_file(fake_mnist):
    folder, arrays, files = fake_mnist
    other = idx_bytes(arrays[IDX_NAMES[1]][::-1].copy())
    (folder / IDX_NAMES[1]).write_bytes(other)
    expected = hashlib.sha256(files[IDX_NAMES[1]]).hexdigest()
    got = hashlib.sha256(other).hexdigest()
    with pytest.raises(ChecksumError) as e:
        load_mnist(folder, download=False)
    msg = str(e.value)
    assert IDX_NAMES[1] in msg and expected in msg and got in msg
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


def _register_and_write(folder, monkeypatch, name, data):
    """Write data under name and register its digest, so only parsing can fail."""
    (folder / name).write_bytes(data)
    files = {n: (folder / n).read_bytes() for n in IDX_NAMES}
    register(monkeypatch, "mnist", files)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda raw: raw[:-5], r"train-images.*truncated.*3920 payload bytes, found 3915"),
        (lambda raw: raw + b"xyz", r"train-images.*trailing bytes.*found 3923"),
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


def test_corrupt_gzip_in_loader(fake_mnist, monkeypatch):
    folder, _, files = fake_mnist
    broken = files[IDX_NAMES[2]][:40]  # a gzip stream cut short
    _register_and_write(folder, monkeypatch, IDX_NAMES[2], broken)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*corrupt gzip"):
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


def test_missing_files_without_download(tmp_path, fake_mnist):
    folder, _, _ = fake_mnist
    (folder / IDX_NAMES[3]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(folder, download=False)
    assert IDX_NAMES[3] in str(e.value) and "download=True" in str(e.value)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist(tmp_path / "empty", download=False)


def test_download_with_injected_fetch_fills_cache(fake_mnist, isolated_cache):
    _, arrays, files = fake_mnist
    fetch = CountingFetch(files)
    ds = load_mnist(download=True, fetch=fetch)
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
    load_mnist(folder, fetch=fetch)
    assert [u.rsplit("/", 1)[-1] for u in fetch.calls] == [IDX_NAMES[0]]
    assert (isolated_cache / "mnist" / IDX_NAMES[0]).is_file()
    assert not (folder / IDX_NAMES[0]).exists()  # data_dir is never written


def test_download_via_file_url_default_fetch(tmp_path, monkeypatch, isolated_cache):
    arrays = fake_mnist_arrays(seed=1)
    src = tmp_path / "mirror"
    src.mkdir()
    files = {n: idx_bytes(a) for n, a in arrays.items()}
    for n, b in files.items():
        (src / n).write_bytes(b)
    register(monkeypatch, "mnist", files, urls={n: (src / n).as_uri() for n in files})
    ds = load_mnist()  # default fetch, file:// URLs
    np.testing.assert_array_equal(ds.y_test, arrays[IDX_NAMES[3]])
    assert (isolated_cache / "mnist" / IDX_NAMES[0]).read_bytes() == files[IDX_NAMES[0]]


def test_fetch_with_wrong_bytes_writes_nothing(fake_mnist, isolated_cache):
    _, _, files = fake_mnist
    evil = dict(files)
    good = files[IDX_NAMES[0]]
    evil[IDX_NAMES[0]] = good[:-1] + bytes([good[-1] ^ 0xFF])  # one flipped byte
    with pytest.raises(ChecksumError, match=f"{IDX_NAMES[0]}.*expected sha256"):
        load_mnist(fetch=CountingFetch(evil))
    written = list((isolated_cache / "mnist").glob("*")) if isolated_cache.exists() else []
    assert IDX_NAMES[0] not in [p.name for p in written]
    assert not [p for p in written if p.name.endswith(".tmp")]


def test_mirror_fallback_and_all_mirrors_failing(fake_mnist, monkeypatch, isolated_cache):
    _, _, files = fake_mnist
    specs = tuple(dataclasses.replace(s, urls=("https://down.invalid/" + s.name,) + s.urls)
                  for s in loaders.REGISTRY["mnist"])
    monkeypatch.setitem(loaders.REGISTRY, "mnist", specs)

    def flaky(url):
        if "down.invalid" in url:
            raise OSError("connection refused")
        return files[url.rsplit("/", 1)[-1]]

    load_mnist(fetch=flaky)
    assert len(list((isolated_cache / "mnist").iterdir())) == 4

    def dead(url):
        raise OSError("no network")

    monkeypatch.setenv("MINIDRESS_DATA", str(isolated_cache.parent / "other"))
    with pytest.raises(DataError, match="(?s)could not download train-images.*no network"):
        load_mnist(fetch=dead)


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


def test_registry_has_upstream_digests():
    mnist = {s.name: s for s in loaders.REGISTRY["mnist"]}
    assert mnist["train-images-idx3-ubyte.gz"].digest.startswith("440fcabf")
    assert all(s.algorithm == "sha256" and len(s.digest) == 64 for s in mnist.values())
    assert all(s.algorithm == "md5" for s in loaders.REGISTRY["fashion_mnist"])
    assert loaders.REGISTRY["cifar10"][0].digest == "c58f30108f718f92721af3b95e74349a"


# ---------------------------------------------------------------------------
# CIFAR-10 on a fabricated tarball
# ---------------------------------------------------------------------------

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"batch_label": b"fake"}


def make_tar(members: dict, extra=None) -> bytes:
    """tar.gz with {member name: bytes}; `extra(tar)` may add odd members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buf.getvalue()


@pytest.fixture
def fake_cifar(monkeypatch):
    batches = {n: cifar_batch(3, i) for i, n in enumerate(CIFAR_BATCHES)}
    tar = make_tar({f"cifar-10-batches-py/{n}": pickle.dumps(b) for n, b in batches.items()})
    register(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": tar}, algorithm="md5")
    return batches, tar


def test_cifar10_download_extract_and_cache(fake_cifar, isolated_cache):
    batches, tar = fake_cifar
    fetch = CountingFetch({"cifar-10-python.tar.gz": tar})
    ds = load_cifar10(fetch=fetch)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    first = batches["data_batch_1"][b"data"][0]
    np.testing.assert_allclose(ds.x_train[0, 0].ravel(), first[:1024] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_train[0, 2, 31, 31], first[-1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    assert (isolated_cache / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in (isolated_cache / "cifar10").iterdir() if p.name.startswith(".")]
    load_cifar10(fetch=fetch)
    assert len(fetch.calls) == 1


def test_cifar10_from_data_dir_folder_and_tarball(fake_cifar, tmp_path, isolated_cache):
    batches, tar = fake_cifar
    folder = tmp_path / "mine" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for n, b in batches.items():
        (folder / n).write_bytes(pickle.dumps(b))
    ds = load_cifar10(tmp_path / "mine", download=False)
    assert ds.x_train.shape == (15, 3, 32, 32)
    assert not isolated_cache.exists()
    only_tar = tmp_path / "tar_only"
    only_tar.mkdir()
    (only_tar / "cifar-10-python.tar.gz").write_bytes(tar)
    ds2 = load_cifar10(only_tar, download=False)  # extracted into the cache, not into only_tar
    np.testing.assert_array_equal(ds2.x_test, ds.x_test)
    assert sorted(p.name for p in only_tar.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar10_errors(fake_cifar, tmp_path, monkeypatch):
    batches, tar = fake_cifar
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nothing", download=False)
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        load_cifar10(fetch=lambda url: tar + b"\x00")
    folder = tmp_path / "bad" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for n, b in batches.items():
        (folder / n).write_bytes(pickle.dumps(b))
    bad = {**batches["data_batch_3"], b"data": np.zeros((3, 3000), np.uint8)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"data_batch_3.*uint8 \[N, 3072\]"):
        load_cifar10(folder.parent, download=False)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*b'data'"):
        load_cifar10(folder.parent, download=False)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a readable CIFAR pickle"):
        load_cifar10(folder.parent, download=False)


@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "cifar-10-batches-py/../../evil"])
def test_safe_extract_rejects_escaping_paths(tmp_path, name):
    tar = make_tar({"ok.txt": b"fine", name: b"evil"})
    with pytest.raises(DataError, match="unsafe member path"):
        loaders.safe_extract(tar, tmp_path / "dest", source="t.tar.gz")
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "dest" / "ok.txt").exists()  # all-or-nothing


def test_safe_extract_rejects_symlinks(tmp_path):
    def add_link(tar):
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(DataError, match="not a plain file"):
        loaders.safe_extract(make_tar({"a": b"1"}, extra=add_link), tmp_path)
    with pytest.raises(DataError, match="corrupt tar"):
        loaders.safe_extract(b"\x1f\x8b definitely not a tarball", tmp_path)


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

@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")
def test_real_mnist(isolated_cache):
    ds = load_mnist(REAL_MNIST, download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.float32 and 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    assert ds.y_train[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert not isolated_cache.exists()

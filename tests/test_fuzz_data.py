"""Fuzzing the data loaders: malformed, truncated, oversized and hostile inputs.

Every case must end in one of two ways: the original content, loaded exactly,
or the loaders' documented error (``DataError``, of which ``ChecksumError``
and ``DataNotFoundError`` are kinds) with a one-line message. Never another
exception type, never a hang (each case runs under a SIGALRM time limit),
never a large allocation (each case runs under ``tracemalloc`` with a peak
bound; bombs get a tighter one), and never a command run from a pickle (a
marker file must not appear).

The families: hypothesis strategies (random bytes, bit flips, truncations,
splices, headers, tar member lists, pickle opcode streams) and hand-made ones
(every truncation point, every magic number, gzip bombs, hostile pickles,
tar members with "..", absolute paths, links and clashing names), over
``read_idx``, ``gunzip``, the MNIST loader (on small files made here, with
their digests registered as tests/test_data.py does), ``read_tar_members``
and ``read_cifar_batch``. Deterministic (``derandomize=True``), a few thousand
cases in all, well under a minute on 2 cores.
"""

import collections
import contextlib
import gzip
import io
import operator
import pickle
import posixpath
import signal
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidress.data import DataError, load_mnist, read_cifar_batch, read_idx
from minidress.data import cifar, loaders
from test_data import (
    IDX_NAMES,
    NUMPY_RECONSTRUCT,
    EvalsCode,
    RunsCommand,
    cifar_batch,
    fake_mnist_arrays,
    gzip_bomb,
    idx_bytes,
    make_tar,
    py2_pickle,
    registry_entry,
    write_files,
)

CASES = collections.Counter()  # cases run per family; printed at the end (pytest -s)
CASE_SECONDS = 10.0            # a case slower than this is a hang
CASE_PEAK = 32 << 20           # no case may allocate more (inputs here are a few kB)
BOMB_PEAK = 4 << 20            # bombs expand to 64 MiB; reading one must stay far below
HOSTILE_PEAK = 32 << 20        # the largest hostile pickle is 200 kB of one-byte list opcodes


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code can swallow it."""


@contextlib.contextmanager
def time_limit(seconds=CASE_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\nfuzz cases: {sum(CASES.values())} {dict(CASES)}")


def outcome(family, fn, expected=None, same=operator.eq, peak=CASE_PEAK):
    """Run one case: return fn()'s result, or None if it raised DataError; check all the rules.

    If ``expected`` is given, a result must equal it (``same``): a case either
    loads the original content exactly or is refused. Memory is traced only
    while fn runs (tracing hypothesis itself would slow the suite tenfold).
    """
    CASES[family] += 1
    tracemalloc.start()
    try:
        with time_limit():
            result = fn()
    except DataError as e:
        message = str(e)
        assert message and "\n" not in message, f"{family}: not a one-line message: {message!r}"
        result = None
    finally:
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert used < peak, f"{family}: allocated {used} bytes, bound {peak}"
    if expected is not None and result is not None:
        assert same(result, expected), f"{family}: loaded something other than the original"
    return result


# ---------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------

def flipped(data: bytes, i: int, mask: int) -> bytes:
    """data with byte i XORed with mask."""
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]


def flip_every_bit(data: bytes):
    for i in range(len(data)):
        for bit in range(8):
            yield flipped(data, i, 1 << bit)


@st.composite
def mutation(draw, original: bytes):
    """original with one bit flipped, cut short, extended, or a run overwritten."""
    kind = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip":
        return flipped(original, draw(st.integers(0, len(original) - 1)), 1 << draw(st.integers(0, 7)))
    if kind == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=32))
    i = draw(st.integers(0, len(original) - 1))
    patch = draw(st.binary(min_size=1, max_size=16))
    return original[:i] + patch + original[i + len(patch):]


def cut_points(data: bytes, n=60) -> list:
    """About n truncation lengths spread over data, plus every one of the last 16 bytes."""
    return sorted(set(range(0, len(data), max(1, len(data) // n))) | set(range(max(0, len(data) - 16), len(data))))


def as_gzip_oracle(data: bytes):
    """What Python's gzip makes of data (None if it refuses): the reference for our decoder."""
    try:
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error):
        return None


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------

IDX_CODES = (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)
IDX_DTYPES = dict(zip(IDX_CODES, (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64)))


def check_idx_result(arr, data):
    """A parsed array must re-serialise to exactly what Python's gzip (or nothing) makes of the input."""
    if arr is not None:
        raw = as_gzip_oracle(data)
        assert raw is not None, "read_idx accepted a stream that Python's gzip refuses"
        assert raw == idx_bytes(arr, code=raw[2], gz=False)


HEADS = st.sampled_from([b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x00\x00\x0d\x02", b"\x1f\x8b\x08\x00"])


@fuzz(150)
@given(st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, HEADS, st.binary(max_size=300))))
def test_read_idx_arbitrary_bytes(data):
    check_idx_result(outcome("read_idx: arbitrary bytes", lambda: read_idx(data)), data)


@st.composite
def idx_file(draw):
    code = draw(st.sampled_from(IDX_CODES))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arr = (rng.random(shape) * 200 - 100).astype(IDX_DTYPES[code])
    return idx_bytes(arr, code=code, gz=draw(st.booleans()))


@fuzz(150)
@given(st.data())
def test_read_idx_mutated_files(data):
    original = data.draw(idx_file())
    mutated = data.draw(mutation(original))
    check_idx_result(outcome("read_idx: mutated", lambda: read_idx(mutated)), mutated)


@fuzz(100)
@given(code=st.sampled_from(IDX_CODES), dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
       payload=st.binary(max_size=64), gz=st.booleans())
def test_read_idx_huge_declared_dimensions(code, dims, payload, gz):
    raw = bytes([0, 0, code, len(dims)]) + np.array(dims, ">u4").tobytes() + payload
    data = gzip.compress(raw) if gz else raw
    arr = outcome("read_idx: declared dimensions", lambda: read_idx(data), peak=1 << 20)
    check_idx_result(arr, data)


def test_read_idx_every_magic_number():
    """Every type byte and every ndim byte, and non-zero leading bytes: valid iff documented."""
    for b0, b1, code, ndim in ([(0, 0, c, n) for c in range(256) for n in (1, 3)]
                               + [(0, 0, 0x08, n) for n in range(256)]
                               + [(b, 0, 0x08, 1) for b in range(1, 256)] + [(0, b, 0x08, 1) for b in range(1, 256)]):
        dtype = IDX_DTYPES.get(code, np.uint8)
        data = bytes([b0, b1, code, ndim]) + np.full(ndim, 1, ">u4").tobytes() + bytes(np.dtype(dtype).itemsize)
        arr = outcome("read_idx: magic numbers", lambda: read_idx(data))
        valid = b0 == b1 == 0 and code in IDX_DTYPES and 1 <= ndim <= 32
        assert (arr is not None) == valid, (b0, b1, code, ndim)
        check_idx_result(arr, data)


def test_read_idx_truncated_everywhere():
    arr = np.arange(2 * 10 * 10, dtype=np.uint8).reshape(2, 10, 10)
    for gz in (False, True):
        data = idx_bytes(arr, gz=gz)
        for n in range(len(data)):
            assert outcome("read_idx: truncations", lambda: read_idx(data[:n])) is None, (gz, n)
        outcome("read_idx: truncations", lambda: read_idx(data), expected=arr, same=np.array_equal)


# ---------------------------------------------------------------------------
# gzip: the decoder against Python's, bombs
# ---------------------------------------------------------------------------

@st.composite
def gzip_file(draw):
    content = draw(st.binary(max_size=2000))
    level, mtime = draw(st.integers(0, 9)), draw(st.integers(0, 2**31))
    if draw(st.booleans()) and len(content) > 1:  # two members, as `cat a.gz b.gz` makes
        cut = draw(st.integers(1, len(content) - 1))
        return content, gzip.compress(content[:cut], level, mtime=mtime) + gzip.compress(content[cut:])
    return content, gzip.compress(content, level, mtime=mtime)


@fuzz(150)
@given(st.data())
def test_gunzip_mutated_streams(data):
    """CRC-32 and length checks mean a damaged stream gives the original content or an error."""
    content, packed = data.draw(gzip_file())
    mutated = data.draw(mutation(packed))
    if mutated[:2] != b"\x1f\x8b":
        return  # not gzip any more: gunzip's callers sniff the magic first
    outcome("gunzip: mutated", lambda: loaders.gunzip(mutated, max_bytes=1 << 20), expected=content)


def test_gunzip_truncated_everywhere():
    content = bytes(range(256)) * 8
    first = gzip.compress(content[:700])
    packed = first + gzip.compress(content[700:])
    for n in range(len(packed)):
        result = outcome("gunzip: truncations", lambda: loaders.gunzip(packed[:n]))
        # cut exactly between the two members, what is left is a complete gzip file of the first part
        assert result is None or (n == len(first) and result == content[:700]), n
    outcome("gunzip: truncations", lambda: loaders.gunzip(packed + bytes(7)), expected=content)


BOMB = 64 << 20


@pytest.fixture(scope="module")
def bombs():
    """Hand-made bombs, each under 1 MB and expanding to 64 MiB (or one level of it)."""
    labels = idx_bytes(np.zeros(10, np.uint8), gz=False)
    one = gzip.compress(labels)
    member = gzip.compress(bytes(1 << 16))
    return {
        "zeros": gzip_bomb(b"", BOMB),
        "small header, then zeros": gzip_bomb(labels, BOMB),
        "header declaring 822 MB": gzip_bomb(b"\x00\x00\x08\x03" + np.array([2**20, 28, 28], ">u4").tobytes(), BOMB),
        "header within the cap": gzip_bomb(b"\x00\x00\x08\x03" + np.array([200, 28, 28], ">u4").tobytes(), BOMB),
        "valid file, then a bomb member": one + gzip_bomb(b"", BOMB),
        "1024 small members": gzip_bomb(labels, 0) + member * (BOMB >> 16),
        "bomb inside a gzip": gzip.compress(gzip_bomb(labels, BOMB)),
    }


def test_gzip_bombs_stay_small(bombs, tmp_path, monkeypatch):
    for name, bomb in bombs.items():
        assert len(bomb) < 1 << 20, name
        assert outcome("bombs: read_idx", lambda: read_idx(bomb), peak=BOMB_PEAK) is None, name
        unpacked = outcome("bombs: gunzip", lambda: loaders.gunzip(bomb, max_bytes=1 << 20), peak=BOMB_PEAK)
        assert unpacked is None or unpacked[:2] == b"\x1f\x8b", name  # one level of a nested bomb is small
    # the same through the loader, with the module cap lowered (it is read at call time)
    monkeypatch.setattr(loaders, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    files = {n: idx_bytes(a) for n, a in fake_mnist_arrays().items()}
    monkeypatch.setitem(loaders.REGISTRY, "mnist", registry_entry(files, digest_of="content"))
    for name, bomb in bombs.items():
        folder = write_files(tmp_path / "bomb", {**files, IDX_NAMES[2]: bomb})
        assert outcome("bombs: load_mnist", lambda: load_mnist(folder), peak=BOMB_PEAK) is None, name


# ---------------------------------------------------------------------------
# the MNIST loader, on small registered files
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
    """Four small MNIST files with their content digests registered. Returns (folder, files, dataset)."""
    files = {n: idx_bytes(a) for n, a in fake_mnist_arrays(n_train=3, n_test=2, seed=5).items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(loaders.REGISTRY, "mnist", registry_entry(files, digest_of="content"))
        mp.setenv("MINIDRESS_DATA", str(tmp_path_factory.mktemp("empty-cache")))
        folder = write_files(tmp_path_factory.mktemp("fuzz-mnist"), files)
        yield folder, files, load_mnist(folder)


def same_dataset(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_test", "y_test"))


def load_with(mnist_folder, name, data, uncompressed=False):
    """Load the folder with one file replaced by data (and put the original back)."""
    folder, files, original = mnist_folder
    path = folder / (name[:-3] if uncompressed else name)
    if uncompressed:
        (folder / name).unlink()
    path.write_bytes(data)
    try:
        return outcome("load_mnist: " + ("uncompressed" if uncompressed else "gzipped"),
                       lambda: load_mnist(folder), expected=original, same=same_dataset)
    finally:
        path.unlink()
        (folder / name).write_bytes(files[name])


@fuzz(150)
@given(st.data())
def test_mnist_loader_mutated_gz(mnist_folder, data):
    name = data.draw(st.sampled_from(IDX_NAMES))
    load_with(mnist_folder, name, data.draw(mutation(mnist_folder[1][name])))


@fuzz(100)
@given(st.data())
def test_mnist_loader_mutated_uncompressed(mnist_folder, data):
    name = data.draw(st.sampled_from(IDX_NAMES))
    raw = gzip.decompress(mnist_folder[1][name])
    load_with(mnist_folder, name, data.draw(mutation(raw)), uncompressed=True)


def test_mnist_loader_every_bit_of_a_labels_file(mnist_folder):
    name = IDX_NAMES[3]  # 2 labels: a 32-byte .gz and a 10-byte file, every bit of each
    for data in flip_every_bit(mnist_folder[1][name]):
        load_with(mnist_folder, name, data)
    for data in flip_every_bit(gzip.decompress(mnist_folder[1][name])):
        assert load_with(mnist_folder, name, data, uncompressed=True) is None


def test_mnist_loader_truncated_and_recompressed(mnist_folder):
    for name in IDX_NAMES:
        packed = mnist_folder[1][name]
        for n in cut_points(packed):
            assert load_with(mnist_folder, name, packed[:n]) is None, (name, n)
        raw = gzip.decompress(packed)
        for level in range(10):  # any faithful recompression loads exactly
            assert load_with(mnist_folder, name, gzip.compress(raw, level, mtime=level)) is not None
        assert load_with(mnist_folder, name, raw, uncompressed=True) is not None


# ---------------------------------------------------------------------------
# tar archives
# ---------------------------------------------------------------------------

WANTED = "cifar-10-batches-py/test_batch"
MEMBER_NAMES = [WANTED, "cifar-10-batches-py", "./" + WANTED, "cifar-10-batches-py//test_batch",
                "cifar-10-batches-py/../cifar-10-batches-py/test_batch", "/" + WANTED, "../test_batch",
                "cifar-10-batches-py/data_batch_1", "readme.html"]
MEMBER_TYPES = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE]


def tar_of(members) -> bytes:
    """tar.gz of [(name, type, bytes)]; links point at the wanted member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = WANTED
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def expected_members(members):
    """What read_tar_members must return for [(name, type, bytes)], or None if it must refuse."""
    seen, files = {}, {}
    for name, kind, data in members:
        if name.startswith("/") or ".." in name.split("/"):
            return None
        if kind not in (tarfile.REGTYPE, tarfile.DIRTYPE):
            return None
        key = posixpath.normpath(name)
        if key in seen:
            return None
        seen[key] = kind
        if kind == tarfile.REGTYPE:
            files[key] = data
    if any(p in files for k in seen for p in parents(k)):
        return None
    if WANTED not in files:
        return None
    return {WANTED: files[WANTED]}


def parents(key):
    parts = key.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@fuzz(150)
@given(st.lists(st.tuples(st.sampled_from(MEMBER_NAMES), st.sampled_from(MEMBER_TYPES),
                          st.binary(max_size=64)), min_size=1, max_size=5))
def test_tar_member_lists(members):
    got = outcome("tar: member lists", lambda: cifar.read_tar_members(tar_of(members), [WANTED]))
    assert got == expected_members(members), members


@fuzz(100)
@given(st.data())
def test_tar_mutated_archives(data):
    """gzip's CRC covers the whole tar: a damaged archive gives the original members or an error."""
    members = {WANTED: bytes(range(200)), "cifar-10-batches-py/readme.html": b"<html>"}
    tar = make_tar(members)
    mutated = data.draw(mutation(tar))
    outcome("tar: mutated", lambda: cifar.read_tar_members(mutated, [WANTED]), expected={WANTED: members[WANTED]})


def test_tar_every_byte_of_an_archive():
    members = {WANTED: b"batch bytes"}
    tar = make_tar(members)
    for i in range(len(tar)):
        damaged = flipped(tar, i, 0xFF)
        outcome("tar: every byte", lambda: cifar.read_tar_members(damaged, [WANTED]), expected=members)
    raw = make_tar(members, gz=False)[:1536]  # one header block, one data block, one end block
    for i in range(len(raw)):  # an uncompressed header is guarded by its own checksum
        damaged = flipped(raw, i, 0xFF)
        got = outcome("tar: every byte", lambda: cifar.read_tar_members(damaged, [WANTED]))
        assert got in (None, members) or i >= 512, i  # bytes past the header are the content itself


def test_tar_hand_made_members():
    def gnu_long_name(tar):
        tar.addfile(tarfile.TarInfo("cifar-10-batches-py/" + "x" * 300))  # written as a GNU long name

    def huge_size(tar):
        info = tarfile.TarInfo(WANTED)
        info.size = 2**33  # claims 8 GiB; the archive holds none of it
        tar.addfile(info)

    pax = io.BytesIO()
    with tarfile.open(fileobj=pax, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(WANTED)
        info.size, info.pax_headers = 1, {"comment": "\u00e9" * 100}
        tar.addfile(info, io.BytesIO(b"1"))
    found = {WANTED: b"1"}
    cases = {  # name: (archive, what read_tar_members must return; None: refuse)
        "long name": (make_tar(found, extra=gnu_long_name), found),
        "pax format": (pax.getvalue(), found),
        "huge declared size": (make_tar({}, extra=huge_size), None),
        "empty": (b"", None),
        "zero blocks": (gzip.compress(bytes(10240)), None),
        "not gzip, not tar": (b"hello world" * 100, None),
    }
    for name, (data, expected) in cases.items():
        assert outcome("tar: hand-made", lambda: cifar.read_tar_members(data, [WANTED])) == expected, name


# ---------------------------------------------------------------------------
# CIFAR batches: random, damaged and hostile pickles
# ---------------------------------------------------------------------------

def check_batch(result):
    """A batch that loads obeys the documented contract, whatever bytes it came from."""
    if result is not None:
        x, y = result
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32)
        assert y.dtype == np.int64 and y.shape == (len(x),) and (len(y) == 0 or 0 <= y.min() <= y.max() <= 9)


@fuzz(100)
@given(st.one_of(st.binary(max_size=400), st.builds(bytes.__add__, st.just(b"\x80\x02"), st.binary(max_size=400))))
def test_cifar_arbitrary_bytes(data):
    check_batch(outcome("cifar: arbitrary bytes", lambda: read_cifar_batch(data)))


@fuzz(150)
@given(st.data())
def test_cifar_mutated_batches(data):
    batch = cifar_batch(2, data.draw(st.integers(0, 3)))
    original = data.draw(st.sampled_from([py2_pickle(batch), pickle.dumps(batch, protocol=4)]))
    check_batch(outcome("cifar: mutated", lambda: read_cifar_batch(data.draw(mutation(original)))))


def test_cifar_every_byte_of_a_batch_header():
    """Every byte of the part of a batch that is structure (not pixels), flipped."""
    batch = cifar_batch(1, 0)
    data = py2_pickle(batch)
    pixels = data.index(bytes(batch[b"data"][0, :16]))
    for i in [*range(pixels), *range(pixels + 3072, len(data))]:
        damaged = flipped(data, i, 0xFF)
        check_batch(outcome("cifar: every byte", lambda: read_cifar_batch(damaged)))


def test_cifar_truncated_everywhere():
    batch = cifar_batch(1, 0)
    data = py2_pickle(batch)
    for n in cut_points(data, 200):
        assert outcome("cifar: truncations", lambda: read_cifar_batch(data[:n])) is None, n
    x, y = outcome("cifar: truncations", lambda: read_cifar_batch(data))
    assert np.array_equal(x.reshape(1, -1), batch[b"data"]) and y.tolist() == batch[b"labels"]


def binstring(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return pickle.BINSTRING + struct.pack("<i", len(raw)) + raw


def call(module, name, *args) -> bytes:
    """Protocol-2 opcodes calling module.name(*args) (args already pickled), then STOP."""
    return (b"\x80\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.MARK + b"".join(args)
            + pickle.TUPLE + pickle.REDUCE + pickle.STOP)


HOSTILE_GLOBALS = [
    ("posix", "system"), ("os", "system"), ("nt", "system"), ("os", "popen"), ("os", "execv"),
    ("builtins", "eval"), ("__builtin__", "eval"), ("builtins", "exec"), ("builtins", "__import__"),
    ("builtins", "getattr"), ("builtins", "open"), ("builtins", "compile"), ("subprocess", "Popen"),
    ("subprocess", "check_output"), ("importlib", "import_module"), ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"), ("pickle", "loads"), ("_pickle", "loads"), ("functools", "partial"),
    ("operator", "attrgetter"), ("shutil", "rmtree"), ("webbrowser", "open"), ("runpy", "run_path"),
    ("numpy", "load"), ("numpy", "loadtxt"), ("numpy", "fromfile"), ("numpy", "frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    ("numpy.testing._private.utils", "runstring"), ("numpy.core.multiarray ", "_reconstruct"),
    ("numpy", "ndarray.__reduce__"), ("numpy", "dtype.__new__"),
]


def hostile_pickles(marker) -> dict:
    command = binstring(f"touch {marker}")
    cases = {f"{m}.{n}": call(m, n, command) for m, n in HOSTILE_GLOBALS}
    cases.update({
        "os.system via __reduce__, protocol 2": py2_pickle({b"data": RunsCommand(f"touch {marker}")}),
        "os.system via __reduce__, protocol 4": pickle.dumps([RunsCommand(f"touch {marker}")], protocol=4),
        "eval via __reduce__": py2_pickle(EvalsCode(f"open({str(marker)!r}, 'w')")),
        "INST opcode": b"(" + binstring(f"touch {marker}") + b"ios\nsystem\n.",
        "OBJ opcode": b"\x80\x02(cos\nsystem\n" + binstring(f"touch {marker}") + b"o.",
        "STACK_GLOBAL": (b"\x80\x04\x8c\x05posix\x8c\x06system\x93" + pickle.SHORT_BINUNICODE
                         + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x85R."),
        "NEWOBJ": b"\x80\x02cnumpy\nndarray\n)\x81.",
        "persistent id": b"\x80\x02" + binstring("x") + b"Q.",
        "extension code": b"\x80\x02\x82\x01.",
        "ndarray called directly": call("numpy", "ndarray", b"K\x05"),
        "_reconstruct of 10**12 elements": py2_pickle(_Reduce(NUMPY_RECONSTRUCT, (np.ndarray, (10**12,), b"b"))),
        "_reconstruct of a dtype": py2_pickle(_Reduce(NUMPY_RECONSTRUCT, (np.dtype, (0,), b"b"))),
        "object dtype": pickle.dumps({b"data": np.array([None, 1])}, protocol=4),
        "string dtype": pickle.dumps({b"data": np.array(["a", "b"])}, protocol=4),
        "structured dtype": pickle.dumps({b"data": np.zeros(2, "u1,u1")}, protocol=4),
        "subarray dtype": call("numpy", "dtype", binstring("(1000000000,)u1"), b"K\x00K\x01"),
        "array state claiming 10**12 elements": _array_state((10**12,), b"\x00" * 8),
        "array state with negative size": _array_state((-1,), b""),
        "array state with 40 dims": _array_state((1,) * 40, b"\x00"),
        "BUILD on a function": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n}U\x01aK\x01sb.",
        "BUILD with a dict state on a dtype": (b"\x80\x02cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
                                               b"}U\x04codeU\x01Osb."),
        "tuple as a dict key": b"\x80\x02})K\x01s.",
        "nested tuples as a key": b"\x80\x02})" + b"\x85" * 1000 + b"K\x01s.",  # deeper: test_data.py
        "100000 nested lists": b"\x80\x02" + b"]" * 10**5 + b"a" * (10**5 - 1) + b".",  # no dict: refused
        "BINSTRING claiming 2 GiB": b"\x80\x02T\xff\xff\xff\x7f" + b"x" * 100,
        "LONG4": b"\x80\x02\x8b\xff\xff\xff\x7f.",
        "FRAME claiming 2**60 bytes": b"\x80\x04\x95" + struct.pack("<Q", 2**60) + b"N.",
        "protocol 99": b"\x80\x63N.",
        "memo lookup of a missing index": b"\x80\x02h\x05.",
        "STOP on an empty stack": b"\x80\x02.",
        "a float": b"\x80\x02G" + struct.pack(">d", 1.5) + b".",
    })
    return cases


class _Reduce:
    """Pickles as func(*args): for building pickles numpy itself would never write."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def pickled_int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(16, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _array_state(shape, raw) -> bytes:
    """A protocol-2 pickle of {b"data": <array with this state>}, the state written by hand."""
    dims = b"(" + b"".join(pickled_int(n) for n in shape) + b"t"
    return (b"\x80\x02}U\x04data" + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            + b"(K\x01" + dims + b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff"
            + b"J\xff\xff\xff\xffK\x00tb\x89" + binstring(raw) + b"tbs.")


def test_hostile_pickles_never_run(tmp_path):
    marker = tmp_path / "ran"
    cases = hostile_pickles(marker)
    assert len(cases) > 60
    for name, data in cases.items():
        result = outcome("cifar: hostile pickles", lambda: read_cifar_batch(data, name), peak=HOSTILE_PEAK)
        assert result is None, f"{name}: loaded"
        assert not marker.exists(), f"{name}: ran the command"


def test_hand_written_array_state_is_what_numpy_writes():
    """The hostile array states above differ from a genuine one only in their numbers."""
    genuine = _array_state((1, 3072), bytes(range(256)) * 12)
    assert pickle.loads(genuine, encoding="bytes")[b"data"].shape == (1, 3072)  # NumPy agrees
    with_labels = genuine[:-1] + b"U\x06labels]K\x03as."  # before STOP: labels = [3], into the dict
    assert read_cifar_batch(with_labels)[1].tolist() == [3]


OPCODE_PIECES = [
    b"(", b"t", b"\x85", b"\x86", b"\x87", b")", b"]", b"}", b"a", b"e", b"s", b"u", b"R", b"b", b"N",
    b"\x88", b"\x89", b"K\x07", b"J\xff\xff\xff\xff", b"U\x02u1", b"U\x01|", b"U\x04data", b"U\x06labels",
    b"q\x00", b"h\x00", b"q\x01", b"h\x01", b"cnumpy\ndtype\n", b"cnumpy\nndarray\n",
    b"cnumpy.core.multiarray\n_reconstruct\n", b"cposix\nsystem\n", b"cbuiltins\neval\n",
    b"c__builtin__\ngetattr\n", b"T\x10\x00\x00\x00" + b"\x00" * 16, b"\x8c\x05numpy\x8c\x05dtype\x93",
]


@fuzz(150)
@given(st.lists(st.sampled_from(OPCODE_PIECES), max_size=40))
def test_cifar_opcode_streams(pieces):
    """Random programs from the opcodes a batch uses, and a few hostile globals among them."""
    data = b"\x80\x02" + b"".join(pieces) + b"."
    check_batch(outcome("cifar: opcode streams", lambda: read_cifar_batch(data)))

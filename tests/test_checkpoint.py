"""Checkpoints and the archive reader: refuse a file before it can allocate much, one
``ArchiveError`` line for every damaged file, only values a model state can hold, and no resuming
from another run's checkpoint.

The helpers at the top (re-signing, writing an archive or a zip by hand) are shared with
``test_store.py`` and ``test_fuzz_archives.py``.
"""
import hashlib
import io
import json
import struct
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from minidress.checkpoint import (CHECKPOINT_KIND, ArchiveError, ArchiveLimits, load_checkpoint,
                                  read_archive, save_checkpoint, write_archive)
from minidress.dress import Dress
from minidress.nn.models import mlp
from minidress.nn.optim import SGD, Adam

# ---------------------------------------------------------------------------------------------
# Helpers: files as a tamperer (or another program) would write them
# ---------------------------------------------------------------------------------------------


ANY_VERSION = range(1, 1000)


def resign(src, dst, kind, edit_arrays=None, edit_meta=None) -> Path:
    """A validly checksummed copy of ``src`` (of any format version, kept) with edited contents:
    what a tamperer would write."""
    arrays, meta = read_archive(src, kind, ANY_VERSION)
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    version = meta.pop("format_version")
    meta.pop("kind")
    meta.pop("minidress_version")
    return write_archive(dst, arrays, meta, kind, version)


def sha256_of(entries: dict) -> str:
    """The checksum as the format documents it, written independently of minidress."""
    h = hashlib.sha256()
    for name in sorted(entries):
        a = np.ascontiguousarray(entries[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode() + a.tobytes())
    return h.hexdigest()


def savez_signed(path, arrays: dict, meta) -> Path:
    """An archive laid out as format 1 documents it, written without ``write_archive``: the
    arrays, ``__meta__`` (a dict as JSON, or raw ``bytes``, or an array as it is) and a correct
    ``__sha256__``, by ``np.savez``."""
    if isinstance(meta, dict):
        meta = json.dumps(meta).encode()
    raw = np.frombuffer(meta, np.uint8) if isinstance(meta, bytes) else meta
    entries = {**arrays, "__meta__": raw}
    entries["__sha256__"] = np.frombuffer(sha256_of(entries).encode(), np.uint8)
    np.savez(path, **entries)
    return Path(path)


def meta_of(kind=CHECKPOINT_KIND, **extra) -> dict:
    return {"kind": kind, "format_version": 1, "minidress_version": "0.1.0", **extra}


@dataclass
class Member:
    """One zip member as it lies in the file: ``raw`` is the stored bytes (compressed for
    deflate); ``size`` and ``crc`` are what the headers declare (default: the truth)."""
    name: str
    raw: bytes
    method: int = zipfile.ZIP_STORED
    size: int | None = None
    crc: int | None = None
    flags: int = 0

    @classmethod
    def deflated(cls, name, data: bytes, **declared):
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return cls(name, c.compress(data) + c.flush(), zipfile.ZIP_DEFLATED,
                   declared.pop("size", len(data)), declared.pop("crc", zlib.crc32(data)), **declared)


def zip_bytes(members) -> bytes:
    """A zip file holding ``members`` exactly as given, for sizes, methods, flags and names
    that ``zipfile`` would never write (local headers, central directory, end record)."""
    out, central = io.BytesIO(), io.BytesIO()
    for m in members:
        size = len(m.raw) if m.size is None else m.size
        crc = zlib.crc32(m.raw) if m.crc is None else m.crc
        name, offset = m.name.encode(), out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m.flags, m.method, 0, 0x21, crc,
                              len(m.raw), size, len(name), 0) + name + m.raw)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m.flags, m.method, 0,
                                  0x21, crc, len(m.raw), size, len(name), 0, 0, 0, 0, 0, offset) + name)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                          len(central.getvalue()), start, 0))
    return out.getvalue()


def npy_bytes(array=None, header=None) -> bytes:
    """A ``.npy`` member: ``array`` as ``np.save`` writes it, or a header dict (``descr``,
    ``fortran_order``, ``shape``) followed by no data."""
    f = io.BytesIO()
    if header is None:
        np.save(f, array, allow_pickle=array.dtype.hasobject)
    else:
        np.lib.format.write_array_header_1_0(f, header)
    return f.getvalue()


def members_of(path) -> list:
    """The members of a genuine archive, as ``Member``s (stored), in file order."""
    with zipfile.ZipFile(path) as zf:
        return [Member(i.filename, zf.read(i)) for i in zf.infolist()]


def deflate_bomb(name, mib: int, declared=None) -> Member:
    """A deflated ``.npy`` member of ``mib`` MiB of zeros (float64), about 1 kB per MiB: the
    deflate stream of one MiB, flushed so that it can be repeated without compressing the
    rest. ``declared`` overrides the uncompressed size its headers declare."""
    header = npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (mib << 17,)})
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    one_mib = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    raw = head + one_mib * mib + c.flush()
    size = len(header) + (mib << 20) if declared is None else declared
    return Member(name, raw, zipfile.ZIP_DEFLATED, size, crc=0)


def expect_archive_error(load, path, match=None) -> ArchiveError:
    """``load(path)`` must raise one ``ArchiveError`` line naming the file (and ``match``)."""
    with pytest.raises(ArchiveError, match=match) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return err.value


# ---------------------------------------------------------------------------------------------
# A tiny checkpoint: an MLP with batch norm and a rank buffer, and SGD momentum after one step
# ---------------------------------------------------------------------------------------------

META = {"model": {"name": "mlp", "input_shape": [8], "n_classes": 3, "hidden": [6, 5]},
        "dataset": "digits", "config": {"levels": (1.0, 0.5), "lr": 0.1, "epochs": 3}, "seed": 0}


def tiny_model(seed=0):
    model = mlp([8, 6, 5, 3], seed=seed, batchnorm=True)
    Dress(model, levels=(1.0, 0.5))            # rank buffers and batch-norm slots
    return model


def trained_pair(seed=0):
    model, optimizer = tiny_model(seed), SGD(0.1, momentum=0.9)
    x = np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)
    out = model.forward(x)
    model.backward(np.ones_like(out))
    optimizer.step(model.parameters(), model.gradients())
    return model, optimizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, optimizer = trained_pair()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.npz", model, optimizer,
                           {**META, "history": [{"epoch": 1}]})


def load_fully(path, **kw):
    """Load as ``--resume`` does: into a fresh model and optimizer, checking the run."""
    return load_checkpoint(path, tiny_model(1), SGD(0.1, momentum=0.9), expect_meta=META, **kw)


def assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_a_checkpoint_round_trips_exactly(ckpt):
    model, optimizer = trained_pair()
    meta = load_fully(ckpt)
    assert_state_equal(meta["model_state"], model.state())
    assert_state_equal(meta["optimizer_state"], optimizer.state_dict())
    assert meta["history"] == [{"epoch": 1}] and meta["config"]["levels"] == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# Format 1 stays readable
# ---------------------------------------------------------------------------------------------

def test_a_format_1_file_written_without_minidress_still_loads(ckpt, tmp_path):
    """The documented layout (np.savez, JSON metadata, the documented sha256), written by
    another program: both Fortran- and C-ordered arrays come back as they were."""
    arrays, _ = read_archive(ckpt, CHECKPOINT_KIND, {1})
    arrays["model/2.weight"] = np.asfortranarray(arrays["model/2.weight"])
    path = savez_signed(tmp_path / "other.npz", arrays, meta_of(**META))
    model = tiny_model(1)
    state = load_checkpoint(path, model)["model_state"]
    assert np.array_equal(state["2.weight"], arrays["model/2.weight"])
    assert np.array_equal(model.state()["2.weight"], arrays["model/2.weight"])


def test_kinds_renamed_by_the_layout_move_are_the_same_kinds(tmp_path):
    """Files written while the code named the kinds minidress.deploy.store / minidress.app.golden
    (and code still spelling them so) read as format 1's minidress.store / minidress.golden."""
    for written, asked in [("minidress.deploy.store", "minidress.store"),
                           ("minidress.store", "minidress.deploy.store"),
                           ("minidress.app.golden", "minidress.golden")]:
        path = savez_signed(tmp_path / "k.npz", {"x": np.arange(3)}, meta_of(written))
        arrays, meta = read_archive(path, asked, {1})
        assert np.array_equal(arrays["x"], np.arange(3)) and meta["kind"] == written
    write_archive(tmp_path / "g.npz", {}, {}, "minidress.app.golden", 1)
    assert read_archive(tmp_path / "g.npz", "minidress.golden", {1})[1]["kind"] == "minidress.golden"


# ---------------------------------------------------------------------------------------------
# 1. Nothing large is allocated for a small file
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limits,cap", [(ArchiveLimits(max_member_bytes=200), "max_member_bytes=200"),
                                        (ArchiveLimits(max_total_bytes=2000), "max_total_bytes=2000"),
                                        (ArchiveLimits(max_members=10), "max_members=10"),
                                        (ArchiveLimits(max_meta_bytes=100), "max_meta_bytes=100")])
def test_caps_are_named_and_overridable(ckpt, limits, cap):
    expect_archive_error(lambda p: load_checkpoint(p, limits=limits), ckpt, cap)
    load_checkpoint(ckpt, limits=ArchiveLimits(max_member_bytes=10_000))      # all members fit


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path):
    """2 MB of deflated zeros that inflate to 2 GiB (the file the issue names): refused from the
    zip directory alone, and a bomb whose headers understate its size is read no further than
    they say. Before: 2 GiB allocated before the checksum rejected the file."""
    honest = tmp_path / "bomb.npz"
    honest.write_bytes(zip_bytes([deflate_bomb("model/w.npy", 2048)]))
    lying = tmp_path / "lying.npz"
    lying.write_bytes(zip_bytes([deflate_bomb("model/w.npy", 64, declared=4096)]))
    assert honest.stat().st_size < 2_200_000
    tracemalloc.start()
    try:
        expect_archive_error(load_checkpoint, honest, "max_member_bytes|max_compression_ratio")
        expect_archive_error(load_checkpoint, lying, "declares shape|CRC")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading a bomb allocated {peak} bytes"


def test_a_huge_declared_shape_is_refused_before_allocating(tmp_path):
    """A header that declares 8 TB in a member of 80 bytes. Before: MemoryError."""
    header = npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (10 ** 12,)})
    path = tmp_path / "shape.npz"
    path.write_bytes(zip_bytes([Member("model/w.npy", header + bytes(8))]))
    expect_archive_error(load_checkpoint, path, r"declares shape \(1000000000000,\)")


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "pickle.npz"
    path.write_bytes(zip_bytes([Member("model/w.npy", npy_bytes(np.array([{"a": 1}], dtype=object)))]))
    expect_archive_error(load_checkpoint, path, "never objects")


# ---------------------------------------------------------------------------------------------
# 2. One line, naming the file, for every damaged file
# ---------------------------------------------------------------------------------------------

W = npy_bytes(np.arange(6.0))

ZIP_DAMAGE = {
    # Before: NotImplementedError ("That compression method is not supported").
    "unknown compression method": ([Member("model/w.npy", W, method=99)], "compression method 99"),
    # Before: RuntimeError ("File ... is encrypted, password required for extraction").
    "encrypted flag": ([Member("model/w.npy", W, flags=0x1)], "encrypted"),
    "wrong CRC": ([Member("model/w.npy", W, crc=1234)], "CRC"),
    "size declared too small": ([Member("model/w.npy", W, size=20)], "CRC|declares shape"),
    "duplicate member": ([Member("model/w.npy", W), Member("model/w.npy", W)], "appears twice"),
    "not a .npy member": ([Member("model/w.txt", W)], "not a .npy array"),
    "garbage header": ([Member("model/w.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': <<<}  \n")], ".npy header"),
    "structured dtype": ([Member("model/w.npy", npy_bytes(np.zeros(2, [("a", "<f8")])))], "never objects"),
}


@pytest.mark.parametrize("case", ZIP_DAMAGE)
def test_corrupt_zip_members_are_one_line_archive_errors(tmp_path, case):
    members, message = ZIP_DAMAGE[case]
    path = tmp_path / "damaged.npz"
    path.write_bytes(zip_bytes(members))
    expect_archive_error(load_checkpoint, path, message)


MALFORMED_META = {
    "a list, not an object": (b"[]", "must be a JSON object"),              # before: AttributeError
    "nested 100000 deep": (b"[" * 100_000, "not valid JSON"),               # before: RecursionError
    "nested 40 deep": (json.dumps(meta_of(x=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])).encode(),
                       "max_meta_depth=32"),
    "an integer of 5000 digits": (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),   # before: ValueError
    "not UTF-8": (b"\xff\xfe{}", "not valid JSON"),
    "format_version true": (json.dumps(meta_of(format_version=True)).encode(), "format_version True"),
    "format_version 1.0": (json.dumps(meta_of(format_version=1.0)).encode(), "format_version 1.0"),
    "kind a list": (json.dumps(meta_of(kind=["minidress.checkpoint"])).encode(), "expected a 'minidress.checkpoint'"),
    "no minidress_version": (json.dumps({"kind": CHECKPOINT_KIND, "format_version": 1}).encode(), "minidress_version"),
    "model a list": (json.dumps(meta_of(model=[1, 2])).encode(), "'model' must be a JSON object"),
    "seed a string": (json.dumps(meta_of(seed="0")).encode(), "'seed' must be a JSON integer"),
    "history an object": (json.dumps(meta_of(history={})).encode(), "'history' must be a JSON array"),
    "meta of float64": (np.zeros(4), "__meta__ must be a 1-D uint8 array"),
}


@pytest.mark.parametrize("case", MALFORMED_META)
def test_malformed_metadata_is_one_archive_error(tmp_path, case):
    raw, message = MALFORMED_META[case]
    path = savez_signed(tmp_path / "meta.npz", {"model/w": np.zeros(3)}, raw)
    expect_archive_error(load_checkpoint, path, message)


# ---------------------------------------------------------------------------------------------
# 3. A checkpoint that loads is a state a model can hold, of the run it claims to be
# ---------------------------------------------------------------------------------------------

def _set(key, fn):
    def edit(arrays):
        arrays[key] = fn(arrays[key].copy())
    return edit


def _put(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


TAMPERED = {
    "NaN weight": (_set("model/1.weight", _put((0, 0), np.nan)), "model/1.weight holds NaN"),
    "infinite momentum": (_set("optim/momentum_buffer/1.weight", _put((0, 0), np.inf)),
                          "optim/momentum_buffer/1.weight holds NaN or infinite"),
    "negative variance": (_set("model/2.running_var", _put((0, 0), -0.5)), "model/2.running_var holds a negative"),
    "ranks repeat": (_set("model/4.ranks", _put((1, 0), 1)), "model/4.ranks row 1 is not a permutation"),
    "ranks out of range": (_set("model/4.ranks", _put((0, 0), 99)), "model/4.ranks row 0 is not a permutation"),
    "ranks of floats": (_set("model/4.ranks", lambda r: r.astype(np.float64)), "model/4.ranks must be an integer"),
    "extra array": (lambda a: a.__setitem__("notes", np.zeros(2)), "unexpected arrays \\['notes'\\]"),
    "weight of another shape": (_set("model/1.weight", lambda w: w[:-1]), "does not fit"),
    "weight of another dtype": (_set("model/1.weight", lambda w: w.astype(np.float64)), "does not fit"),
    "momentum of another shape": (_set("optim/momentum_buffer/1.weight", lambda m: m.T.copy()),
                                  "optim/momentum_buffer/1.weight has shape"),
    "momentum for no parameter": (lambda a: a.__setitem__("optim/momentum_buffer/9.weight", np.zeros(2, np.float32)),
                                  "belongs to no parameter"),
    "lr of another dtype": (_set("optim/lr", lambda lr: lr.astype(np.float32)), "optim/lr has"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_but_checksummed_checkpoints_are_refused(ckpt, tmp_path, case):
    """Before: every one loaded (or raised a plain ValueError)."""
    edit, message = TAMPERED[case]
    path = resign(ckpt, tmp_path / "bad.npz", CHECKPOINT_KIND, edit)
    expect_archive_error(load_fully, path, message)


def test_loading_into_another_optimizer_is_an_archive_error(ckpt):
    expect_archive_error(lambda p: load_checkpoint(p, tiny_model(), Adam(1e-3)), ckpt, "Adam")


def test_resume_accepts_the_same_run_only(ckpt, tmp_path):
    """``expect_meta``: the model spec, dataset, config and seed must be the checkpoint's
    (``may_differ`` config keys aside); refused before the model is touched."""
    load_fully(ckpt)                                                     # tuples equal lists
    longer = {**META, "config": {**META["config"], "epochs": 30}}
    load_checkpoint(ckpt, expect_meta=longer, may_differ={"epochs"})
    other = {**META, "seed": 1, "dataset": "mnist", "config": {**META["config"], "lr": 0.2, "epochs": 30}}
    model = tiny_model(1)
    before = {k: v.copy() for k, v in model.state().items()}
    err = expect_archive_error(lambda p: load_checkpoint(p, model, expect_meta=other, may_differ={"epochs"}),
                               ckpt, "a checkpoint of another run")
    assert "dataset, config.lr, seed differ" in str(err) and "0 there, 1 expected" in str(err)
    assert_state_equal(model.state(), before)
    unnamed = resign(ckpt, tmp_path / "unnamed.npz", CHECKPOINT_KIND, edit_meta=lambda m: m.pop("model"))
    expect_archive_error(lambda p: load_checkpoint(p, expect_meta=META), unnamed,
                         "model differ \\(model: absent there")

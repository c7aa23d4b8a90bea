"""The parameter-reusing store: every level a prefix of every row, exact round trips, honest byte
counts, a loader that rejects every damaged file with ArchiveError (fuzzed), and ``validate``:
one set of checks for files and for stores in memory, after which the store is read-only."""
import tracemalloc

import numpy as np
import pytest

from minidress.checkpoint import ArchiveError, read_archive, write_archive
from minidress.deploy import store as store_module
from minidress.dress import Dress, DressOptions, build_dress
from minidress.masks import n_kept
from minidress.deploy.store import STORE_KIND, Store, pack_rows
from minidress.nn.train import predict_logits
from test_checkpoint import resign

CFG = {"levels": [1.0, 0.5, 0.25, 0.1], "lambdas": "uniform", "resample_every": 0, "ramp": "none",
       "norm": "per_level", "dense_first_last": True}


def make_dress(name="cnn", shape=(1, 8, 8), dtype=np.float64, seed=0, **cfg):
    """An untrained DRESS model with random batch-norm parameters and statistics, so that
    per-level slots differ and folding them is exercised."""
    spec = {"name": name, "input_shape": list(shape), "n_classes": 10, "hidden": [24, 16]}
    config = {**CFG, **cfg}
    dress = build_dress(spec, DressOptions.from_config(config), dtype)
    rng = np.random.default_rng(seed)
    for bn in dress.batchnorms:
        for d in (bn.params, bn.buffers):
            for k, v in d.items():
                v[...] = rng.random(v.shape) + 0.5 if k == "running_var" else rng.standard_normal(v.shape)
    return dress, {"model": spec, "config": config}


@pytest.fixture(scope="module")
def cnn():
    return make_dress()


@pytest.mark.parametrize("order", ["rank", "level_major"])
def test_every_level_is_a_prefix_of_every_row(cnn, order):
    dress, meta = cnn
    store = Store.from_dress(dress, order, meta)
    for name, layer in dress.layers.items():
        rs = store.sparse[name]
        w = layer.params["weight"].reshape(len(rs.values), -1)
        assert rs.cols.dtype == np.uint16 and rs.values.shape == rs.cols.shape     # rows of 288
        assert np.array_equal(np.take_along_axis(w, rs.cols.astype(int), axis=1), rs.values)
        for d, k in zip(dress.levels, rs.prefix):
            assert k == n_kept(d, rs.row_len)
            kept = np.zeros(w.shape, bool)
            np.put_along_axis(kept, rs.cols[:, :k].astype(int), True, axis=1)
            dress.use(d)
            assert np.array_equal(kept, layer.mask.reshape(w.shape) > 0), (name, d)
        if order == "rank":     # any prefix, not only the levels, is the exact top-k
            for k in range(1, rs.values.shape[1] + 1):
                top = np.zeros(w.shape, bool)
                np.put_along_axis(top, rs.cols[:, :k].astype(int), True, axis=1)
                assert np.array_equal(top, layer.buffers["ranks"] < k)
        else:                   # each level's new entries sorted by column
            bounds = [0, *sorted(rs.prefix.tolist())]
            for a, b in zip(bounds[:-1], bounds[1:]):
                assert np.all(np.diff(rs.cols[:, a:b].astype(int), axis=1) > 0)


def test_pack_rows_by_hand():
    w = np.array([[0.1, -3.0, 2.0, 0.5, -0.2, 1.0]])
    ranks = np.argsort(np.argsort(-np.abs(w), kind="stable"), kind="stable")   # [[5, 0, 1, 3, 4, 2]]
    values, cols = pack_rows(w, ranks, [6, 3, 1], "rank")
    assert cols.tolist() == [[1, 2, 5, 3, 4, 0]] and values.tolist() == [[-3.0, 2.0, 1.0, 0.5, -0.2, 0.1]]
    values, cols = pack_rows(w, ranks, [6, 3, 1], "level_major")
    assert cols.tolist() == [[1, 2, 5, 0, 3, 4]]
    with pytest.raises(ValueError, match="order must be one of"):
        pack_rows(w, ranks, [1], "columns")


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet", (1, 12, 12))])
def test_save_load_to_dress_gives_the_same_network_at_any_density(tmp_path, name, shape):
    dress, meta = make_dress(name, shape)
    store = Store.from_dress(dress, "rank", meta)
    loaded = Store.load(store.save(tmp_path / "s.npz"))
    for k, v in store.arrays().items():
        assert np.array_equal(v, loaded.arrays()[k]) and v.dtype == loaded.arrays()[k].dtype
        assert not v.flags.writeable and not loaded.arrays()[k].flags.writeable   # validated
    again = Dress.from_store(loaded)                  # copies the read-only arrays into a model
    x = np.random.default_rng(1).standard_normal((4, *shape))
    for d in (1.0, 0.5, 0.25, 0.1, 0.37, 0.03):
        dress.use(d)
        again.use(d)
        assert np.array_equal(predict_logits(dress.model, x), predict_logits(again.model, x)), d


def test_accounting_counts_every_byte(cnn):
    dress, meta = cnn
    store = Store.from_dress(dress, "rank", meta)
    b = store.accounting()
    assert b["nested"] == sum(a.nbytes for a in store.arrays().values())
    # By hand: small_cnn on 8x8 digits sparsifies conv 3 (32x288) and conv 7 (64x288), uint16
    # columns (288 > 256) and float64 values; K = 4 levels keep 288, 144, 72, 29 per row.
    rows, kept, v = 32 + 64, [288, 144, 72, 29], 8
    dense_w = rows * 288 * v
    one = b["dense"] - dense_w            # everything that is not a sparsified weight, one level
    assert b["nested"] == rows * 288 * (v + 2) + 2 * 4 * 8 + sum(a.nbytes for a in store.dense.values())
    assert b["separate"] == 4 * one + dense_w + sum(rows * m * (v + 2) for m in kept[1:])
    assert b["separate_csr"] == 4 * one + sum(rows * m * (v + 4) for m in kept) + 4 * (33 + 65) * 4
    assert b["separate_dense"] == 4 * (one + dense_w)
    assert b["dense"] < b["nested"] < b["separate"] < b["separate_csr"]


# ---------------------------------------------------------------------------------------------
# The loader rejects damaged files, with ArchiveError and nothing else
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dress, meta = make_dress("mlp", (1, 8, 8), np.float32)
    return Store.from_dress(dress, "rank", meta).save(tmp_path_factory.mktemp("store") / "s.npz")


def rewrite(src, dst, edit_arrays=None, edit_meta=None):
    """A validly checksummed copy of the store ``src`` with edited contents."""
    return resign(src, dst, STORE_KIND, edit_arrays, edit_meta)


def first_sparse(arrays):
    return sorted(k for k in arrays if k.startswith("sparse/"))[0].rsplit("/", 1)[0]


def _set(arrays, key, fn):
    arrays[key] = fn(arrays[key].copy())


TAMPERING = {
    "column out of range": (lambda a: _set(a, first_sparse(a) + "/cols", lambda c: c.__setitem__((0, 0), 200) or c), None,
                            "out of range"),
    "repeated column": (lambda a: _set(a, first_sparse(a) + "/cols", lambda c: c.__setitem__((0, 1), c[0, 0]) or c), None,
                        "repeats a column"),
    "wrong prefix": (lambda a: _set(a, first_sparse(a) + "/prefix", lambda p: p[::-1].copy()), None, "prefix must be"),
    "NaN value": (lambda a: _set(a, first_sparse(a) + "/values", lambda v: v.__setitem__((0, 0), np.nan) or v), None,
                  "NaN"),
    "wide index type": (lambda a: _set(a, first_sparse(a) + "/cols", lambda c: c.astype(np.uint64)), None, "must be uint8"),
    "missing array": (lambda a: a.pop(first_sparse(a) + "/values"), None, "missing arrays"),
    "extra array": (lambda a: a.__setitem__("extra", np.zeros(3)), None, "unexpected arrays"),
    "wrong dense shape": (lambda a: _set(a, "dense/1.bias", lambda b: b[:-1].copy()), None, "has shape"),
    "mixed dtypes": (lambda a: _set(a, "dense/1.bias", lambda b: b.astype(np.float64)), None, "float64"),
    "unknown order": (None, lambda m: m.__setitem__("order", "random"), "order must be one of"),
    "bad level": (None, lambda m: m.__setitem__("levels", [1.0, 0.0]), "levels must be in"),
    "no model": (None, lambda m: m.pop("model"), "lacks 'model'"),
    "bad model": (None, lambda m: m["model"].__setitem__("name", "vgg"), "does not describe a model"),
    "bad shape": (None, lambda m: m["sparse_layers"].__setitem__(next(iter(m["sparse_layers"])), [0, 3]),
                  "weight shape"),
    # Loaded before the checks of issue "Robust by construction" (or raised another exception):
    "infinite dense value": (lambda a: _set(a, "dense/1.bias", lambda b: b.__setitem__(0, np.inf) or b), None,
                             "dense/1.bias holds NaN or infinite"),
    "config levels in another order": (None, lambda m: m["config"]["levels"].reverse(),
                                       "differ from the config's levels"),
    "levels not an array": (None, lambda m: m.__setitem__("levels", "1.0"), "'levels' must be a JSON array"),
    "layers not an object": (None, lambda m: m.__setitem__("sparse_layers", [[24, 64]]),
                             "'sparse_layers' must be a JSON object"),
    "per_level of lists": (None, lambda m: m.__setitem__("per_level", [["a"]]), "per_level must name arrays"),
    "model a list": (None, lambda m: m.__setitem__("model", ["mlp"]), "'model' must be a JSON object"),
    "model of 10^12 classes": (None, lambda m: m["model"].__setitem__("n_classes", 10 ** 12),
                               "'n_classes' must be an integer in"),
    "model of 60000 classes": (None, lambda m: m["model"].__setitem__("n_classes", 60000),
                               "describes more weights than the store"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_but_checksummed_files_are_rejected(saved, tmp_path, case):
    edit_arrays, edit_meta, message = TAMPERING[case]
    path = rewrite(saved, tmp_path / "bad.npz", edit_arrays, edit_meta)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match=message) as err:
            Store.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "bad.npz" in str(err.value) and "\n" not in str(err.value)
    assert peak < 16 << 20, f"refusing {case} allocated {peak} bytes"


def test_a_negative_batch_norm_variance_is_refused(cnn, tmp_path):
    """Before: loaded, and normalised with the square root of a negative number."""
    path = Store.from_dress(cnn[0], "rank", cnn[1]).save(tmp_path / "cnn.npz")
    bad = rewrite(path, tmp_path / "bad.npz", lambda a: _set(a, "dense/1.running_var",
                                                             lambda v: v.__setitem__((2, 0), -0.25) or v))
    with pytest.raises(ArchiveError, match="bad.npz: dense/1.running_var holds a negative variance"):
        Store.load(bad)


def test_a_store_without_model_metadata_is_not_saved(cnn, tmp_path):
    with pytest.raises(ValueError, match="lacks \\['model', 'config'\\]"):
        Store.from_dress(cnn[0]).save(tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def test_wrong_version_and_kind_are_rejected(saved, tmp_path):
    arrays, meta = read_archive(saved, "minidress.store", {1})
    write_archive(tmp_path / "v2.npz", arrays, meta, "minidress.store", 2)
    with pytest.raises(ArchiveError, match="format_version 2 is not supported"):
        Store.load(tmp_path / "v2.npz")
    write_archive(tmp_path / "ckpt.npz", arrays, meta, "minidress.checkpoint", 1)
    with pytest.raises(ArchiveError, match="expected a 'minidress.store' file"):
        Store.load(tmp_path / "ckpt.npz")


def test_fuzzed_files_fail_only_with_archive_error(saved, tmp_path):
    """Random byte flips anywhere in the file, and truncation at random lengths."""
    data = saved.read_bytes()
    original = Store.load(saved).arrays()
    rng = np.random.default_rng(0)
    bad = tmp_path / "fuzz.npz"
    outcomes = {"rejected": 0, "loaded": 0}
    cases = [("flip", int(n)) for n in rng.integers(1, 4, 150)] + [("cut", int(n)) for n in rng.integers(0, len(data), 60)]
    for kind, n in cases:
        buf = bytearray(data)
        if kind == "flip":
            for pos in rng.integers(0, len(buf), n):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        else:
            buf = buf[:n]
        bad.write_bytes(bytes(buf))
        try:
            loaded = Store.load(bad).arrays()
        except ArchiveError:
            outcomes["rejected"] += 1
            continue
        # A flip goes unnoticed only where the zip format ignores the byte (a timestamp, say);
        # whatever loads has passed the sha256 of every array: it must be the original store.
        outcomes["loaded"] += 1
        assert loaded.keys() == original.keys()
        assert all(np.array_equal(loaded[k], original[k]) for k in original)
    assert outcomes["rejected"] >= 0.9 * len(cases), outcomes


# ---------------------------------------------------------------------------------------------
# validate(): the checks of load, for a store in memory; then read-only
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def packed(cnn):
    return Store.from_dress(cnn[0], "rank", cnn[1])


def test_packed_and_loaded_stores_are_validated_and_read_only(packed, saved):
    for store in (packed, Store.load(saved)):
        assert store.validate() is store
        assert all(not a.flags.writeable for a in store.arrays().values())
        rs = next(iter(store.sparse.values()))
        with pytest.raises(ValueError, match="read-only"):
            rs.cols[0, 0] = 0


def _replace(array_name, fn):
    """Edit a store in memory: the named RowSparse array replaced by ``fn`` of a copy."""
    def edit(store):
        rs = next(iter(store.sparse.values()))
        setattr(rs, array_name, fn(getattr(rs, array_name).copy()))
    return edit


def _unlock_and_poison(store):
    rs = next(iter(store.sparse.values()))
    rs.values.flags.writeable = True        # the owner can undo the flag; validate() notices
    rs.values[0, 0] = np.nan


IN_MEMORY = {
    "column out of range": (_replace("cols", lambda c: c.__setitem__((0, 0), 288) or c),
                            "store: sparse/3/cols holds column 288, out of range for rows of 288"),
    "values unlocked and poisoned": (_unlock_and_poison, "store: sparse/3/values holds NaN"),
    "values of ints": (_replace("values", lambda v: v.astype(np.int64)), "store: sparse/3/values must be float32"),
    "values of another float": (_replace("values", lambda v: v.astype(np.float32)), "store: arrays mix float dtypes"),
    "another weight shape": (lambda s: setattr(next(iter(s.sparse.values())), "shape", (32, 16, 3, 3)),
                             "store: sparse/3/prefix must be"),
    "config levels reordered": (lambda s: s.meta["config"].__setitem__("levels", [0.1, 0.25, 0.5, 1.0]),
                                "store: levels .* differ from the config's levels"),
    "a batch norm dropped": (lambda s: s.dense.pop("1.running_var"), "store: dense arrays differ from the model's"),
    "a list for an array": (lambda s: s.dense.__setitem__("1.bias", [0.0] * 32), "store: dense/1.bias must be a NumPy array"),
}


@pytest.mark.parametrize("case", IN_MEMORY)
def test_validate_refuses_a_store_changed_in_memory(packed, case):
    """Before, only Store.load checked: DeployedModel.from_store ran its kernels (which do not
    check bounds) over whatever a store held, and an out-of-range column read past the input."""
    edit, message = IN_MEMORY[case]
    edit(packed)
    with pytest.raises(ArchiveError, match=message) as err:
        packed.validate()
    assert "\n" not in str(err.value)


def test_validate_checks_again_only_after_a_change(packed, monkeypatch):
    """On an unchanged validated store validate() compares identities and flags, no more."""
    calls = []
    check = store_module._check_against_model
    monkeypatch.setattr(store_module, "_check_against_model", lambda s, m: calls.append(1) or check(s, m))
    for _ in range(100):
        assert packed.validate() is packed
    assert calls == []
    rs = next(iter(packed.sparse.values()))
    rs.values = rs.values.copy()                    # equal, but a new (writable) array
    packed.validate()
    assert calls == [1] and not rs.values.flags.writeable
    packed.meta["dataset"] = "digits"
    packed.validate()
    assert calls == [1, 1]


def test_a_store_without_a_model_spec_counts_bytes_but_is_not_valid(cnn):
    store = Store.from_dress(cnn[0])
    assert store.accounting()["nested"] == store.nbytes()
    with pytest.raises(ArchiveError, match="store: meta must hold the model spec and the DRESS config"):
        store.validate()


def test_an_invalid_store_is_never_saved(packed, tmp_path):
    _replace("values", lambda v: v.__setitem__((0, 0), np.inf) or v)(packed)
    with pytest.raises(ArchiveError, match="store: sparse/3/values holds NaN or infinite"):
        packed.save(tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()

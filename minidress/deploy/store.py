"""The parameter-reusing store: one ordered copy of the weights serves every DRESS level.

For each sparsified layer the store keeps, per row, the entries of the densest trained level,
ordered so that **every level is a prefix of every row**:

* ``values [rows, kmax]`` and ``cols [rows, kmax]`` (column indices, the narrowest unsigned type
  that holds the row length: ``uint8`` up to 256 columns, then ``uint16``, ...);
* ``prefix [K]``: entries per row of each level, ``n_kept(level, row_len)``, in the order of
  ``levels`` (stored, so that a reader in another language needs no rounding rule).

Everything else (dense layers, biases, per-level batch norm) is stored once, as it is.

Two orderings of a row's entries (``order=``):

* ``"rank"`` (default): by rank, most important first. A prefix of *any* length is that row's
  exact top-k, so any density in (0, 1] is exact, not only the trained levels.
* ``"level_major"``: level by level (densest-but-one's new entries after the sparsest level's,
  ...), each level's entries sorted by column. Reads walk the input in increasing order within
  each level, which can help memory locality; a prefix is exact only at level boundaries.
  ``benchmarks/bench_kernels.py --orders`` measures both; the default is rank order because the
  two ran at the same speed here and only rank order serves every density.

File format (``save``/``load``): a minidress archive (``minidress.checkpoint.write_archive``:
versioned ``.npz``, JSON metadata, sha256, written atomically) of kind ``minidress.store``.
Arrays ``sparse/<layer>/values``, ``sparse/<layer>/cols``, ``sparse/<layer>/prefix`` and
``dense/<name>``.

Trust: ``Store.validate`` checks a store against the model its metadata describes (shapes,
dtypes, index ranges, distinct columns per row, prefix lengths, finite values, non-negative
variances, the config's level order) and then makes every array read-only. ``load`` and
``from_dress`` return validated stores; any problem is an ``ArchiveError`` (a ``ValueError``)
naming the file (or "store") and the array.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint import MAX_MEMBER_BYTES, ArchiveError, check_state_values, read_archive, write_archive
from ..kernels import index_dtype
from ..masks import check_density, n_kept
from ..nn.layers import BatchNorm, Conv2d, Linear
from ..nn.models import build_model

STORE_KIND = "minidress.store"        # format 1's name; see minidress.checkpoint.KIND_ALIASES
STORE_VERSION = 1
ORDERS = ("rank", "level_major")


@dataclass
class RowSparse:
    """One sparsified layer in the store.

    Attributes
    ----------
    shape : tuple, the weight's shape (``[out, in]`` or ``[C_out, C_in, kh, kw]``)
    values : ndarray [rows, kmax], float
    cols : ndarray [rows, kmax], unsigned int, each < row_len, distinct within a row
    prefix : ndarray [K], int64, entries per row of each level (the store's ``levels`` order)
    """
    shape: tuple
    values: np.ndarray
    cols: np.ndarray
    prefix: np.ndarray

    @property
    def row_len(self) -> int:
        return int(np.prod(self.shape[1:]))

    def dense(self, k=None) -> np.ndarray:
        """The dense weight (weight's shape) that the first ``k`` entries of every row describe
        (default: all stored entries); zeros elsewhere."""
        k = self.values.shape[1] if k is None else k
        w = np.zeros((self.shape[0], self.row_len), self.values.dtype)
        np.put_along_axis(w, self.cols[:, :k].astype(np.intp), self.values[:, :k], axis=1)
        return w.reshape(self.shape)


def pack_rows(weight, ranks, prefix, order="rank"):
    """Order a layer's kept entries so that each level is a prefix of every row.

    Parameters
    ----------
    weight : ndarray [rows, ...]
    ranks : int ndarray [rows, row_len], each row a permutation (``minidress.masks.row_ranks``)
    prefix : sequence of int, entries per row of each level (any order)
    order : "rank" or "level_major"

    Returns
    -------
    values, cols : ndarray [rows, max(prefix)]
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    w = np.asarray(weight).reshape(len(weight), -1)
    if ranks.shape != w.shape:
        raise ValueError(f"ranks must have shape {w.shape} (rows, row_len), got {ranks.shape}")
    kmax = max(prefix)
    cols = np.argsort(ranks, axis=1, kind="stable")[:, :kmax]      # columns, most important first
    if order == "level_major":
        bounds = [0, *sorted(set(prefix))]
        for a, b in zip(bounds[:-1], bounds[1:]):
            cols[:, a:b] = np.sort(cols[:, a:b], axis=1)
    cols = cols.astype(index_dtype(w.shape[1]))
    return np.take_along_axis(w, cols.astype(np.intp), axis=1), cols


@dataclass
class Store:
    """One nested copy of a trained DRESS model.

    Attributes
    ----------
    levels : tuple of float, the trained densities (in the model's level order)
    order : "rank" or "level_major"
    sparse : dict layer name -> RowSparse
    dense : dict name -> ndarray, every other parameter and buffer (``model.state()`` names)
    per_level : tuple of names in ``dense`` whose first axis is a level slot (batch norm ``[K, F]``,
        or ``[1, F]`` where the slot is shared)
    meta : dict, how to rebuild the model (``model`` spec, DRESS ``config``) and anything else
    """
    levels: tuple
    order: str
    sparse: dict
    dense: dict
    per_level: tuple = ()
    meta: dict = field(default_factory=dict)
    # What validate() accepted: (the arrays, a copy of the other fields); None until then.
    _sealed: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_dress(cls, dress, order="rank", meta=None) -> "Store":
        """Pack a (trained) ``minidress.dress.Dress`` model. ``meta`` should hold the ``model`` spec
        and ``config`` a checkpoint holds (``minidress.dress.Dress.from_store`` reads them); the
        store keeps a copy of it and is validated (``validate``). Without them there is no model
        to check the arrays against: the store is not validated, enough for ``accounting()``."""
        sparse = {}
        for name, layer in dress.layers.items():
            ranks = layer.buffers["ranks"]
            prefix = np.array([n_kept(d, ranks.shape[1]) for d in dress.levels], np.int64)
            values, cols = pack_rows(layer.params["weight"], ranks, prefix, order)
            sparse[name] = RowSparse(layer.params["weight"].shape, values, cols, prefix)
        dense = {k: v.copy() for k, v in _dense_state(dress).items()}
        per_level = tuple(f"{prefix}{k}" for prefix, layer in dress.model.named_layers()
                          if layer in dress.batchnorms for k in {**layer.params, **layer.buffers})
        store = cls(tuple(dress.levels), order, sparse, dense, per_level, copy.deepcopy(dict(meta or {})))
        return store.validate() if {"model", "config"} <= store.meta.keys() else store

    @property
    def dtype(self):
        return next(iter(self.sparse.values())).values.dtype

    # -- what it costs ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every array in the store."""
        return sum(a.nbytes for a in self.arrays().values())

    def accounting(self) -> dict:
        """Bytes of this store against the alternatives that hold the same K levels.

        Returns
        -------
        dict
            Bytes under these keys:

            * ``nested``: this store (one nested copy, all levels);
            * ``separate``: K separate row-sparse models (``[rows, n_kept]`` values + column
              indices per sparsified layer; a level of density 1 stored dense), each with its
              own copy of the dense parameters and its own level's batch-norm slot;
            * ``separate_csr``: K separate CSR models (values, int32 column indices, int32 row
              pointers);
            * ``separate_dense``: K separate dense models (a masked dense weight each);
            * ``dense``: one dense model (a single level).
        """
        k = len(self.levels)
        # A per-level array is [slots, F]: a separate model keeps one slot of it.
        one_model = sum(a.nbytes // a.shape[0] if n in self.per_level else a.nbytes
                        for n, a in self.dense.items())
        out = {"nested": self.nbytes(), "separate": k * one_model, "separate_csr": k * one_model,
               "separate_dense": k * one_model, "dense": one_model}
        for rs in self.sparse.values():
            rows, row_len, v = rs.shape[0], rs.row_len, rs.values.itemsize
            idx = index_dtype(row_len).itemsize
            dense_w = rows * row_len * v
            for m in rs.prefix:
                out["separate"] += dense_w if m == row_len else rows * m * (v + idx)
                out["separate_csr"] += rows * m * (v + 4) + (rows + 1) * 4
            out["separate_dense"] += k * dense_w
            out["dense"] += dense_w
        return {key: int(val) for key, val in out.items()}

    # -- files -----------------------------------------------------------------------------------
    def arrays(self) -> dict:
        out = {}
        for name, rs in self.sparse.items():
            out[f"sparse/{name}/values"], out[f"sparse/{name}/cols"] = rs.values, rs.cols
            out[f"sparse/{name}/prefix"] = rs.prefix
        out.update({f"dense/{k}": v for k, v in self.dense.items()})
        return out

    def save(self, path):
        """Validate the store (a file that would not load is never written), then write it
        atomically; returns the path."""
        missing = [k for k in ("model", "config") if k not in self.meta]
        if missing:
            raise ValueError(f"the store's meta lacks {missing}: pass meta={{'model': spec, 'config': "
                             f"config}} to Store.from_dress so that a reader can rebuild the model")
        self.validate()
        meta = {**self.meta, "levels": list(self.levels), "order": self.order,
                "sparse_layers": {n: list(rs.shape) for n, rs in self.sparse.items()},
                "per_level": list(self.per_level)}
        return write_archive(path, self.arrays(), meta, STORE_KIND, STORE_VERSION)

    @classmethod
    def load(cls, path, limits=None) -> "Store":
        """Read a store and validate it (``validate``); any problem is an ``ArchiveError`` naming
        the file and the array. ``limits``: ``minidress.checkpoint.ArchiveLimits``."""
        arrays, meta = read_archive(path, STORE_KIND, {STORE_VERSION}, limits)
        try:
            return _from_archive(arrays, meta)._validate()
        except ArchiveError as e:
            raise ArchiveError(f"{path}: {e}") from None

    def validate(self) -> "Store":
        """Check everything ``load`` checks, then make every array read-only; returns ``self``.

        The checks: ``order`` is known; ``levels`` are distinct densities in (0, 1], the same,
        in the same order, as ``meta["config"]["levels"]`` (batch-norm slot k belongs to level
        k); every array is an ndarray; per sparse layer, ``prefix`` is the int64 ``n_kept`` of
        each level, ``values`` float32/float64 and ``cols`` the narrowest index type, both
        ``[rows, max(prefix)]``, every column ``< row_len`` and distinct within its row; every
        float array finite, every ``running_var`` >= 0, one float dtype throughout; the arrays
        are exactly those of the model ``meta["model"]`` describes (built without drawing more
        weights than the store holds), batch norms with one slot per level or one shared.

        Then ``flags.writeable = False`` on every array, so that the validated store cannot be
        changed in place (``Dress.from_store`` copies what it loads). A store validated before
        and not changed since (the same array objects, still read-only, and equal levels,
        order, per_level, layer shapes and meta) is not checked again: the call then costs
        microseconds.

        Raises
        ------
        ArchiveError
            One line, ``"store: <what> ..."`` naming the array or field; a failed call changes
            nothing (no array is made read-only).
        """
        try:
            return self._validate()
        except ArchiveError as e:
            raise ArchiveError(f"store: {e}") from None

    def _validate(self) -> "Store":
        if self._sealed is not None and self._unchanged_since(*self._sealed):
            return self
        _check_fields(self)
        _check_arrays(self)
        _check_against_model(self, _described_model(self))
        for a in self.arrays().values():
            a.flags.writeable = False
        self._sealed = (self.arrays(), copy.deepcopy(self._fields()))
        return self

    def _fields(self) -> tuple:
        return self.levels, self.order, self.per_level, {n: rs.shape for n, rs in self.sparse.items()}, self.meta

    def _unchanged_since(self, arrays, fields) -> bool:
        """Whether the store still holds the very arrays it was validated with, read-only (so
        unchanged in place), and equal other fields."""
        now = self.arrays()
        return (now.keys() == arrays.keys() and fields == self._fields()
                and all(now[k] is a and not a.flags.writeable for k, a in arrays.items()))

    def sparse_state(self) -> dict:
        """The sparsified layers as model state: ``<layer>.weight`` (the stored entries, zero
        elsewhere) and ``<layer>.ranks`` (whose prefixes are the stored ones); with rank order the
        ranks of the stored entries are exact. ``minidress.dress.Dress.from_store`` loads them."""
        out = {}
        for name, rs in self.sparse.items():
            out[f"{name}.weight"], out[f"{name}.ranks"] = rs.dense(), _ranks_from_order(rs)
        return out


def _dense_state(dress) -> dict:
    """Everything of a DRESS model's state that the store keeps as it is: all but the
    sparsified weights (stored row-sparse), their ranks (the stored order) and the step count."""
    skip = {f"{n}.{k}" for n in dress.layers for k in ("weight", "ranks")} | {"dress_step"}
    return {k: v for k, v in dress.model.state().items() if k not in skip}


def _ranks_from_order(rs: RowSparse) -> np.ndarray:
    """Ranks whose prefixes are the stored ones: stored entries in stored order, then the
    columns that were not stored, in column order."""
    rows, kmax, row_len = rs.shape[0], rs.values.shape[1], rs.row_len
    ranks = np.full((rows, row_len), -1, np.int64)
    np.put_along_axis(ranks, rs.cols.astype(np.intp), np.arange(kmax)[None, :], axis=1)
    rest = ranks < 0
    ranks[rest] = (np.cumsum(rest, axis=1) - 1 + kmax)[rest]
    return ranks.astype(np.int32)


def _fail(message):
    raise ArchiveError(message)


def _show(a) -> str:
    """An array in a message: its values if few, else its dtype and shape."""
    return str(a.tolist()) if a.size <= 8 else f"{a.dtype} array of shape {a.shape}"


_JSON_TYPES = {"levels": (list, "array"), "order": (str, "string"), "sparse_layers": (dict, "object"),
               "per_level": (list, "array"), "model": (dict, "object"), "config": (dict, "object")}


def _from_archive(arrays: dict, meta: dict) -> Store:
    """The store a file's arrays and metadata describe, checking the file's layout: every metadata
    field present with its JSON type, every array a layer needs there, none unexpected. The
    contents are checked by ``Store.validate``."""
    for key, (kind, name) in _JSON_TYPES.items():
        if key not in meta:
            _fail(f"metadata lacks {key!r}")
        if not isinstance(meta[key], kind):
            _fail(f"metadata {key!r} must be a JSON {name}, got {type(meta[key]).__name__}")
    sparse = {}
    for name, shape in meta["sparse_layers"].items():
        names = [f"sparse/{name}/{a}" for a in ("values", "cols", "prefix")]
        missing = [n for n in names if n not in arrays]
        if missing:
            _fail(f"missing arrays {missing}")
        sparse[name] = RowSparse(tuple(shape) if isinstance(shape, list) else shape, *(arrays[n] for n in names))
    dense = {k[len("dense/"):]: v for k, v in arrays.items() if k.startswith("dense/")}
    store = Store(tuple(meta["levels"]), meta["order"], sparse, dense, tuple(meta["per_level"]), meta)
    unexpected = sorted(set(arrays) - set(store.arrays()))
    if unexpected:
        _fail(f"unexpected arrays {unexpected[:5]}")
    return store


def _check_fields(store: Store) -> None:
    """Field types, order, levels, per_level and the metadata the model is rebuilt from."""
    for name, kind, what in (("levels", (tuple, list), "sequence"), ("per_level", (tuple, list), "sequence"),
                             ("sparse", dict, "dict"), ("dense", dict, "dict"), ("meta", dict, "dict")):
        if not isinstance(getattr(store, name), kind):
            _fail(f"{name} must be a {what}, got {type(getattr(store, name)).__name__}")
    if not all(isinstance(rs, RowSparse) for rs in store.sparse.values()):
        _fail("sparse must map layer names to RowSparse")
    if store.order not in ORDERS:
        _fail(f"order must be one of {ORDERS}, got {store.order!r}")
    try:
        levels = [check_density(d, "levels") for d in store.levels]
    except (TypeError, ValueError) as e:
        _fail(str(e))
    if not levels or len(set(levels)) != len(levels):
        _fail(f"levels must be distinct densities, at least one, got {list(store.levels)}")
    if not all(isinstance(n, str) for n in store.per_level):
        _fail(f"per_level must name arrays (strings), got {list(store.per_level)!r:.80}")
    model, config = store.meta.get("model"), store.meta.get("config")
    if not isinstance(model, dict) or not isinstance(config, dict):
        _fail(f"meta must hold the model spec and the DRESS config as dicts, got model "
              f"{type(model).__name__} and config {type(config).__name__}")
    # The batch norms hold one slot per level in the config's order (Dress.from_store builds
    # them from the config); a store reading them in another order picks the wrong slot.
    config_levels = config.get("levels")
    if (not isinstance(config_levels, (list, tuple)) or list(config_levels) != levels
            or any(isinstance(d, bool) for d in config_levels)):      # True == 1.0, but not a density
        _fail(f"levels {levels} differ from the config's levels {config_levels!r:.80}; expected "
              f"the same densities in the same order (batch-norm slot k belongs to level k)")


def _check_arrays(store: Store) -> None:
    """Every array's type, dtype, shape and values (see ``Store.validate``)."""
    if not store.sparse:
        _fail("no sparse layers")
    arrays = store.arrays()
    not_arrays = [k for k, a in arrays.items() if not isinstance(a, np.ndarray)]
    if not_arrays:
        _fail(f"{not_arrays[0]} must be a NumPy array, got {type(arrays[not_arrays[0]]).__name__}")
    for name, rs in store.sparse.items():
        _check_row_sparse(name, rs, store.levels)
    check_state_values(arrays)
    dtypes = {rs.values.dtype for rs in store.sparse.values()} | {v.dtype for v in store.dense.values() if v.dtype.kind == "f"}
    if len(dtypes) > 1:
        _fail(f"arrays mix float dtypes {sorted(map(str, dtypes))}; expected one")


def _check_row_sparse(name: str, rs: RowSparse, levels) -> None:
    values, cols, prefix = (f"sparse/{name}/{a}" for a in ("values", "cols", "prefix"))
    shape = rs.shape
    if not (isinstance(shape, tuple) and len(shape) >= 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        _fail(f"sparse layer {name!r} must have a weight shape (two or more positive ints), got {shape!r}")
    rows, row_len = shape[0], math.prod(shape[1:])
    # The layer's dense weight (the model's, RowSparse.dense) must fit what an archive may hold:
    # with tiny levels a few stored entries per row could claim rows of any length.
    if rows * row_len * rs.values.itemsize > MAX_MEMBER_BYTES:
        _fail(f"sparse layer {name!r} has weight shape {shape}, more than MAX_MEMBER_BYTES="
              f"{MAX_MEMBER_BYTES} bytes")
    want = np.array([n_kept(d, row_len) for d in levels], np.int64)
    if rs.prefix.dtype != np.int64 or not np.array_equal(rs.prefix, want):
        _fail(f"{prefix} must be the int64 array {want.tolist()} (n_kept of each level for rows "
              f"of {row_len}), got {rs.prefix.dtype} {_show(rs.prefix)}")
    kmax = int(want.max())
    if rs.values.dtype not in (np.float32, np.float64) or rs.values.shape != (rows, kmax):
        _fail(f"{values} must be float32/float64 of shape {(rows, kmax)}, got {rs.values.dtype} "
              f"{rs.values.shape}")
    if rs.cols.dtype != index_dtype(row_len) or rs.cols.shape != (rows, kmax):
        _fail(f"{cols} must be {index_dtype(row_len)} of shape {(rows, kmax)}, got {rs.cols.dtype} "
              f"{rs.cols.shape}")
    if rs.cols.size and int(rs.cols.max()) >= row_len:
        _fail(f"{cols} holds column {int(rs.cols.max())}, out of range for rows of {row_len} "
              f"(expected < {row_len})")
    s = np.sort(rs.cols, axis=1)
    if kmax > 1 and np.any(s[:, 1:] == s[:, :-1]):
        _fail(f"{cols} repeats a column within a row; expected distinct columns")


class _WeightBudget:
    """Stands in for the random generator ``build_model`` draws every initial weight from, and
    refuses to draw more numbers than the store holds: metadata describing a huge model is
    refused before its weights are allocated. It draws zeros, as only the shapes are used."""

    def __init__(self, budget: int):
        self.budget = self.left = budget

    def standard_normal(self, shape):
        n = math.prod(shape)
        if n > self.left:
            _fail(f"metadata 'model' describes more weights than the store's {self.budget} numbers")
        self.left -= n
        return np.zeros(shape)


def _described_model(store: Store):
    """The model ``meta["model"]`` describes, in the store's dtype (its weights all zero)."""
    budget = sum(a.size for a in store.dense.values()) + sum(math.prod(rs.shape) for rs in store.sparse.values())
    try:
        return build_model(store.meta["model"], dtype=store.dtype, rng=_WeightBudget(budget))
    except ArchiveError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError) as e:
        _fail(f"metadata does not describe a model minidress can build: {e!r:.120}")


def _check_against_model(store: Store, model) -> None:
    """The arrays must be exactly what ``model`` holds: its sparsified Linear/Conv2d weights
    row-sparse, every other parameter and buffer dense, and a batch norm's arrays with a leading
    slot axis (one slot per level, or one shared)."""
    layers = dict((name.rstrip("."), layer) for name, layer in model.named_layers())
    for name, rs in store.sparse.items():
        layer = layers.get(name)
        if not isinstance(layer, (Linear, Conv2d)):
            _fail(f"sparse layer {name!r} is not a Linear or Conv2d layer of the model")
        if tuple(layer.params["weight"].shape) != rs.shape:
            _fail(f"layer {name} has weight shape {layer.params['weight'].shape} in the model, "
                  f"{rs.shape} in the store")
    sparse_weights = {f"{name}.weight" for name in store.sparse}
    want = {k: v for k, v in model.state().items() if k not in sparse_weights}
    if set(want) != set(store.dense):
        _fail(f"dense arrays differ from the model's: missing {sorted(set(want) - set(store.dense))[:5]}, "
              f"unexpected {sorted(set(store.dense) - set(want))[:5]}")
    slotted = {f"{p}{k}" for p, layer in model.named_layers() if isinstance(layer, BatchNorm)
               for k in ("weight", "bias", "running_mean", "running_var")}
    if set(store.per_level) != slotted:
        _fail(f"per_level must name the batch-norm arrays {sorted(slotted)}, got {sorted(store.per_level)}")
    for k, v in want.items():
        shapes = [(n, *v.shape) for n in sorted({1, len(store.levels)})] if k in slotted else [v.shape]
        if store.dense[k].shape not in shapes or store.dense[k].dtype != v.dtype:
            _fail(f"dense/{k} has shape {store.dense[k].shape} {store.dense[k].dtype}, the model "
                  f"needs {' or '.join(map(str, shapes))} {v.dtype}")

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
versioned ``.npz``, JSON metadata, sha256, written atomically) of kind ``minidress.deploy.store``.
Arrays ``sparse/<layer>/values``, ``sparse/<layer>/cols``, ``sparse/<layer>/prefix`` and
``dense/<name>``; ``load`` checks shapes, dtypes, index ranges, distinct columns per row and the
prefix lengths, and raises ``ArchiveError`` (a ``ValueError``) naming the file and the array.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..checkpoint import ArchiveError, read_archive, write_archive
from ..kernels import index_dtype
from ..masks import check_density, n_kept
from ..nn.layers import BatchNorm, Conv2d, Linear
from ..nn.models import build_model

STORE_KIND = "minidress.store"
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

    @classmethod
    def from_dress(cls, dress, order="rank", meta=None) -> "Store":
        """Pack a (trained) ``minidress.dress.Dress`` model. ``meta`` should hold the ``model`` spec
        and ``config`` a checkpoint holds (``minidress.dress.Dress.from_store`` reads them)."""
        sparse = {}
        for name, layer in dress.layers.items():
            ranks = layer.buffers["ranks"]
            prefix = np.array([n_kept(d, ranks.shape[1]) for d in dress.levels], np.int64)
            values, cols = pack_rows(layer.params["weight"], ranks, prefix, order)
            sparse[name] = RowSparse(layer.params["weight"].shape, values, cols, prefix)
        dense = {k: v.copy() for k, v in _dense_state(dress).items()}
        per_level = tuple(f"{prefix}{k}" for prefix, layer in dress.model.named_layers()
                          if layer in dress.batchnorms for k in {**layer.params, **layer.buffers})
        return cls(tuple(dress.levels), order, sparse, dense, per_level, dict(meta or {}))

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
        dict with
          nested : this store (one nested copy, all levels)
          separate : K separate row-sparse models (``[rows, n_kept]`` values + column indices
              per sparsified layer; a level of density 1 stored dense), each with its own copy of
              the dense parameters and its own level's batch-norm slot
          separate_csr : K separate CSR models (values, int32 column indices, int32 row pointers)
          separate_dense : K separate dense models (a masked dense weight each)
          dense : one dense model (a single level)
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
        """Write the store atomically; returns the path."""
        missing = [k for k in ("model", "config") if k not in self.meta]
        if missing:
            raise ValueError(f"the store's meta lacks {missing}: pass meta={{'model': spec, 'config': "
                             f"config}} to Store.from_dress so that a reader can rebuild the model")
        meta = {**self.meta, "levels": list(self.levels), "order": self.order,
                "sparse_layers": {n: list(rs.shape) for n, rs in self.sparse.items()},
                "per_level": list(self.per_level)}
        return write_archive(path, self.arrays(), meta, STORE_KIND, STORE_VERSION)

    @classmethod
    def load(cls, path) -> "Store":
        """Read and validate a store; any problem is an ``ArchiveError`` naming file and array."""
        arrays, meta = read_archive(path, STORE_KIND, {STORE_VERSION})
        try:
            return _validated(arrays, meta)
        except ArchiveError as e:
            raise ArchiveError(f"{path}: {e}") from None

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


def _validated(arrays: dict, meta: dict) -> Store:
    def fail(msg):
        raise ArchiveError(msg)

    for key in ("levels", "order", "sparse_layers", "per_level", "model", "config"):
        if key not in meta:
            fail(f"metadata lacks {key!r}")
    if meta["order"] not in ORDERS:
        fail(f"order must be one of {ORDERS}, got {meta['order']!r}")
    try:
        levels = tuple(check_density(d, "levels") for d in meta["levels"])
    except (TypeError, ValueError) as e:
        fail(str(e))
    if not levels:
        fail("levels is empty")
    sparse, expected = {}, set()
    for name, shape in meta["sparse_layers"].items():
        names = [f"sparse/{name}/{a}" for a in ("values", "cols", "prefix")]
        expected.update(names)
        missing = [n for n in names if n not in arrays]
        if missing:
            fail(f"missing arrays {missing}")
        values, cols, prefix = (arrays[n] for n in names)
        if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            fail(f"sparse_layers[{name!r}] must be a weight shape, got {shape!r}")
        rows, row_len = shape[0], int(np.prod(shape[1:]))
        want = np.array([n_kept(d, row_len) for d in levels], np.int64)
        if prefix.shape != want.shape or prefix.dtype.kind not in "iu" or not np.array_equal(prefix, want):
            fail(f"{names[2]} must be {want.tolist()} (n_kept of each level for rows of "
                 f"{row_len}), got {prefix.tolist()}")
        kmax = int(want.max())
        if values.dtype not in (np.float32, np.float64) or values.shape != (rows, kmax):
            fail(f"{names[0]} must be float32/float64 of shape {(rows, kmax)}, got {values.dtype} {values.shape}")
        if not np.all(np.isfinite(values)):
            fail(f"{names[0]} holds NaN or infinite values")
        if cols.dtype != index_dtype(row_len) or cols.shape != (rows, kmax):
            fail(f"{names[1]} must be {index_dtype(row_len)} of shape {(rows, kmax)}, got {cols.dtype} {cols.shape}")
        if cols.size and int(cols.max()) >= row_len:
            fail(f"{names[1]} holds column {int(cols.max())}, out of range for rows of {row_len}")
        s = np.sort(cols, axis=1)
        if kmax > 1 and np.any(s[:, 1:] == s[:, :-1]):
            fail(f"{names[1]} repeats a column within a row")
        sparse[name] = RowSparse(tuple(shape), values, cols, prefix.astype(np.int64))
    dense = {k[6:]: v for k, v in arrays.items() if k.startswith("dense/")}
    unexpected = sorted(set(arrays) - expected - {f"dense/{k}" for k in dense})
    if unexpected:
        fail(f"unexpected arrays {unexpected}")
    if not sparse:
        fail("no sparse layers")
    dtypes = {rs.values.dtype for rs in sparse.values()} | {v.dtype for v in dense.values() if v.dtype.kind == "f"}
    if len(dtypes) > 1:
        fail(f"arrays mix float dtypes {sorted(map(str, dtypes))}")
    store = Store(levels, meta["order"], sparse, dense, tuple(meta["per_level"]), meta)
    _check_against_model(store, fail)
    return store


def _check_against_model(store, fail):
    """The arrays must be exactly what the model described by the metadata holds: its sparsified
    Linear/Conv2d weights row-sparse, every other parameter and buffer dense, and a batch norm's
    arrays with a leading slot axis (one slot per level, or one shared)."""
    try:
        model = build_model(store.meta["model"], dtype=store.dtype)
    except (KeyError, TypeError, ValueError) as e:
        fail(f"metadata does not describe a model minidress can build: {e!r}")
    layers = dict((name.rstrip("."), layer) for name, layer in model.named_layers())
    for name, rs in store.sparse.items():
        layer = layers.get(name)
        if not isinstance(layer, (Linear, Conv2d)):
            fail(f"sparse layer {name!r} is not a Linear or Conv2d layer of the model")
        if tuple(layer.params["weight"].shape) != rs.shape:
            fail(f"layer {name} has weight shape {layer.params['weight'].shape} in the model, "
                 f"{rs.shape} in the store")
    sparse_weights = {f"{name}.weight" for name in store.sparse}
    want = {k: v for k, v in model.state().items() if k not in sparse_weights}
    if set(want) != set(store.dense):
        fail(f"dense arrays differ from the model's: missing {sorted(set(want) - set(store.dense))}, "
             f"unexpected {sorted(set(store.dense) - set(want))}")
    slotted = {f"{p}{k}" for p, layer in model.named_layers() if isinstance(layer, BatchNorm)
               for k in ("weight", "bias", "running_mean", "running_var")}
    if set(store.per_level) != slotted:
        fail(f"per_level must name the batch-norm arrays {sorted(slotted)}, got {sorted(store.per_level)}")
    for k, v in want.items():
        shapes = [(n, *v.shape) for n in sorted({1, len(store.levels)})] if k in slotted else [v.shape]
        if store.dense[k].shape not in shapes or store.dense[k].dtype != v.dtype:
            fail(f"dense/{k} has shape {store.dense[k].shape} {store.dense[k].dtype}, the model "
                 f"needs {' or '.join(map(str, shapes))} {v.dtype}")

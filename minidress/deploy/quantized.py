"""The quantized nested store: the float store's entries as int8 (or int4, two per byte) with one
scale per row, every level still a prefix of every row.

Source: symmetric per-channel ("per-row") linear quantization as in B. Jacob et al., "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018
(weights only here; activations stay float). Our choices:

* **The scale of a row does not depend on the level**: ``max |w|`` over the row's ``kmax``
  stored entries, divided by 127 (int8) or 7 (int4) (``minidress.kernels.quantized.row_scales``).
  A per-level scale would fit each level's range better but would give every level its own
  copy of the values: no prefix any more. The rank order puts the largest entries first, so the
  row's max-abs is its first entry's and the small late entries (dense levels) lose most.
* Symmetric grid ``[-qmax, qmax]``, round to nearest (ties to even); zero is exact.
* Only the sparsified layers are quantized; the layers DRESS keeps dense (``dense_layers``: by
  default the classifier and a first layer of short rows),
  biases and batch norms stay float, as they are few bytes and most sensitive.
* Column indices are stored at rest as their **Lehmer code**, bit-packed with one width per
  position (``minidress.kernels.quantized.lehmer_widths``: entry ``j`` of a row is its position
  among the columns still unused, below ``row_len - j``). In rank order the columns are not
  sorted, so delta coding does not shrink them; the Lehmer code does (a full row of 288 columns:
  7.2 bits per entry instead of 9; of 784: 8.7 instead of 10), and a prefix of a row's codes
  decodes alone, so every level is still a prefix. At load they are decoded to the narrowest
  unsigned type the kernels read. (Format 1 packed every index in ``ceil(log2 row_len)`` bits;
  it still loads.)

In memory, per sparsified layer: ``q [rows, ceil(kmax * bits / 8)]`` int8 (int4: entry ``2i``
in the low nibble of byte ``i``), ``scale [rows]`` float, ``cols [rows, kmax]``, ``prefix [K]``.
The deployed model (``DeployedModel.from_store``) reads ``q`` directly: the kernels
(``minidress.kernels.quantized``) dequantize as they go.

File format: a minidress archive of kind ``minidress.qstore``, ``format_version`` 2, arrays
``sparse/<layer>/{q,scale,cols_lehmer,prefix}`` (format 1: ``cols_packed``) and
``dense/<name>``, metadata as the float store's plus ``bits``. ``load`` and ``validate`` reject
a wrong bit width, a scale that is 0, negative, NaN or infinite, an entry off the grid, a column
code beyond the columns still free, and everything ``Store.validate`` rejects (checked on the
dequantized store), with one ``ArchiveError`` line.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..checkpoint import ArchiveError, read_archive, write_archive
from ..kernels import index_dtype
from ..kernels.quantized import (BITS, decode_columns, encode_columns, pack_int4, qmax,
                                 quantize_rows, row_scales, unpack_int4)
from .store import RowSparse, Store, _from_archive

QSTORE_KIND = "minidress.qstore"
QSTORE_VERSION = 2


@dataclass
class QuantizedRowSparse:
    """One sparsified layer, quantized.

    Attributes
    ----------
    shape : tuple, the weight's shape
    q : int8 ndarray [rows, kmax] (int8) or [rows, ceil(kmax / 2)] (int4, packed)
    scale : float ndarray [rows], > 0
    cols : unsigned ndarray [rows, kmax]
    prefix : int64 ndarray [K]
    bits : 8 or 4
    """
    shape: tuple
    q: np.ndarray
    scale: np.ndarray
    cols: np.ndarray
    prefix: np.ndarray
    bits: int

    @property
    def row_len(self) -> int:
        return int(np.prod(self.shape[1:]))

    @property
    def kmax(self) -> int:
        return self.cols.shape[1]

    @property
    def qt(self) -> np.ndarray:
        """The kernels' transposed layout ``[kmax or ceil(kmax / 2), rows]`` (a copy)."""
        return np.ascontiguousarray(self.q.T)

    def entries(self) -> np.ndarray:
        """The grid values ``[rows, kmax]`` int8 (int4 unpacked)."""
        return self.q if self.bits == 8 else unpack_int4(self.q.T, self.kmax).T

    @cached_property
    def values(self) -> np.ndarray:
        """The dequantized entries ``q * scale`` ``[rows, kmax]`` (what the kernels compute with)."""
        return self.entries().astype(self.scale.dtype) * self.scale[:, None]

    def dense(self, k=None) -> np.ndarray:
        """The dequantized dense weight of the first ``k`` entries of every row (``RowSparse.dense``)."""
        return RowSparse(self.shape, self.values, self.cols, self.prefix).dense(k)

    @classmethod
    def from_row_sparse(cls, rs: RowSparse, bits: int) -> "QuantizedRowSparse":
        scale = row_scales(rs.values, bits)
        q = quantize_rows(rs.values, scale, bits)
        return cls(rs.shape, q if bits == 8 else pack_int4(q.T).T.copy(), scale, rs.cols.copy(),
                   rs.prefix.copy(), bits)


@dataclass
class QuantizedStore:
    """A ``Store`` whose sparsified layers are quantized; the same fields, plus ``bits``.

    ``DeployedModel.from_store`` serves it like a float store (``dtype`` is the compute dtype).
    """
    levels: tuple
    order: str
    sparse: dict
    dense: dict
    per_level: tuple
    meta: dict
    bits: int

    @classmethod
    def from_store(cls, store: Store, bits: int = 8) -> "QuantizedStore":
        """Quantize ``store`` (a float ``Store``) to ``bits`` (8 or 4) per entry; validated."""
        qmax(bits)
        sparse = {n: QuantizedRowSparse.from_row_sparse(rs, bits) for n, rs in store.sparse.items()}
        return cls(tuple(store.levels), store.order, sparse, {k: v.copy() for k, v in store.dense.items()},
                   tuple(store.per_level), copy.deepcopy(store.meta), bits).validate()

    @property
    def dtype(self):
        return next(iter(self.sparse.values())).scale.dtype

    def dequantized(self) -> Store:
        """The float ``Store`` of the dequantized values (for ``Dress.from_store`` and checks)."""
        sparse = {n: RowSparse(rs.shape, rs.values, rs.cols, rs.prefix) for n, rs in self.sparse.items()}
        return Store(self.levels, self.order, sparse, self.dense, self.per_level, self.meta)

    # -- what it costs ---------------------------------------------------------------------------
    def arrays(self, at_rest=False) -> dict:
        """Every array by archive name; ``at_rest``: with the columns Lehmer-coded, as in the file."""
        out = {}
        for name, rs in self.sparse.items():
            out[f"sparse/{name}/q"], out[f"sparse/{name}/scale"] = rs.q, rs.scale
            if at_rest:
                out[f"sparse/{name}/cols_lehmer"] = encode_columns(rs.cols, rs.row_len)
            else:
                out[f"sparse/{name}/cols"] = rs.cols
            out[f"sparse/{name}/prefix"] = rs.prefix
        out.update({f"dense/{k}": v for k, v in self.dense.items()})
        return out

    def nbytes(self, at_rest=False) -> int:
        """Bytes of every array in memory (``at_rest``: as in the file, columns Lehmer-coded)."""
        return sum(a.nbytes for a in self.arrays(at_rest).values())

    def sparse_nbytes(self, at_rest=True) -> int:
        """Bytes of the sparsified layers' values, scales and column indices (not prefix)."""
        return sum(a.nbytes for k, a in self.arrays(at_rest).items()
                   if k.startswith("sparse/") and not k.endswith("/prefix"))

    # -- files -----------------------------------------------------------------------------------
    def save(self, path):
        """Validate, then write atomically (columns Lehmer-coded); returns the path."""
        self.validate()
        meta = {**self.meta, "levels": list(self.levels), "order": self.order, "bits": self.bits,
                "sparse_layers": {n: list(rs.shape) for n, rs in self.sparse.items()},
                "per_level": list(self.per_level)}
        return write_archive(path, self.arrays(at_rest=True), meta, QSTORE_KIND, QSTORE_VERSION)

    @classmethod
    def load(cls, path, limits=None) -> "QuantizedStore":
        """Read and validate a quantized store; any problem is one ``ArchiveError`` line naming
        the file. ``limits``: ``minidress.checkpoint.ArchiveLimits``."""
        arrays, meta = read_archive(path, QSTORE_KIND, {1, QSTORE_VERSION}, limits)
        try:
            return _from_qarchive(arrays, meta)._validate()
        except ArchiveError as e:
            raise ArchiveError(f"{path}: {e}") from None

    def validate(self) -> "QuantizedStore":
        """The checks of the module docstring, then every array made read-only; returns ``self``.
        Raises ``ArchiveError``: one line, ``"qstore: ..."``."""
        try:
            return self._validate()
        except ArchiveError as e:
            raise ArchiveError(f"qstore: {e}") from None

    def _validate(self) -> "QuantizedStore":
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ArchiveError(f"bits must be one of {BITS}, got {self.bits!r}")
        if not self.sparse or not all(isinstance(rs, QuantizedRowSparse) for rs in self.sparse.values()):
            raise ArchiveError("sparse must map layer names to QuantizedRowSparse, at least one")
        for name, rs in self.sparse.items():
            _check_quantized(name, rs, self.bits)
        self.dequantized()._validate()          # shapes, columns, prefixes, the model, dense arrays
        for a in self.arrays().values():
            a.flags.writeable = False
        return self


def _check_quantized(name: str, rs: QuantizedRowSparse, bits: int) -> None:
    """The quantized arrays of one layer: bit width, dtypes, shapes, scales > 0 and finite, entries
    on the grid. (The columns and prefix are checked on the dequantized store.)"""
    q, scale = f"sparse/{name}/q", f"sparse/{name}/scale"
    if rs.bits != bits:
        raise ArchiveError(f"{q} has bits {rs.bits!r}, the store {bits}; expected one bit width")
    if not all(isinstance(a, np.ndarray) for a in (rs.q, rs.scale, rs.cols, rs.prefix)):
        raise ArchiveError(f"sparse layer {name!r} must hold NumPy arrays")
    if rs.cols.ndim != 2 or not isinstance(rs.shape, tuple) or not rs.shape:
        raise ArchiveError(f"sparse/{name}/cols must be [rows, kmax], got shape {rs.cols.shape}")
    rows, kmax = rs.cols.shape
    width = kmax if bits == 8 else (kmax + 1) // 2
    if rs.q.dtype != np.int8 or rs.q.shape != (rows, width):
        raise ArchiveError(f"{q} must be int8 of shape {(rows, width)} for {bits}-bit entries, got "
                           f"{rs.q.dtype} {rs.q.shape}")
    if rs.scale.dtype not in (np.float32, np.float64) or rs.scale.shape != (rows,):
        raise ArchiveError(f"{scale} must be float32/float64 of shape {(rows,)}, got {rs.scale.dtype} "
                           f"{rs.scale.shape}")
    bad = ~(np.isfinite(rs.scale) & (rs.scale > 0))
    if bad.any():
        raise ArchiveError(f"{scale} holds {rs.scale[bad][0]!r} at row {int(np.argmax(bad))}; expected "
                           f"finite scales > 0")
    entries = rs.entries()
    if entries.size and np.abs(entries.astype(np.int16)).max() > qmax(bits):
        raise ArchiveError(f"{q} holds {int(entries.min())}, off the symmetric {bits}-bit grid "
                           f"[-{qmax(bits)}, {qmax(bits)}]")


def _from_qarchive(arrays: dict, meta: dict) -> QuantizedStore:
    """The quantized store a file describes: the float store's layout checks (``_from_archive``
    on the arrays renamed to a float store's), the bit width, then the columns decoded."""
    bits, leaf = meta.get("bits"), "cols_packed" if meta["format_version"] == 1 else "cols_lehmer"
    if isinstance(bits, bool) or bits not in BITS:
        raise ArchiveError(f"metadata 'bits' must be one of {BITS}, got {bits!r:.40}")
    renamed = {}
    for key, a in arrays.items():     # stand-ins with a float store's names, for its layout checks
        head, _, last = key.rpartition("/")
        renamed[{"q": f"{head}/values", leaf: f"{head}/cols"}.get(last, key)] = a
    extra = {k: a for k, a in arrays.items() if k.startswith("sparse/") and k.endswith("/scale")}
    layout = _from_archive({k: v for k, v in renamed.items() if k not in extra}, meta)
    sparse = {}
    for name, rs in layout.sparse.items():
        scale = extra.get(f"sparse/{name}/scale")
        if scale is None:
            raise ArchiveError(f"missing arrays ['sparse/{name}/scale']")
        if not (isinstance(rs.shape, tuple) and len(rs.shape) >= 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in rs.shape)):
            raise ArchiveError(f"sparse layer {name!r} must have a weight shape (two or more positive "
                               f"ints), got {rs.shape!r:.60}")
        if rs.prefix.dtype != np.int64 or rs.prefix.ndim != 1 or not rs.prefix.size or rs.prefix.min() < 1:
            raise ArchiveError(f"sparse/{name}/prefix must be a non-empty 1-D int64 array of lengths >= 1, "
                               f"got {rs.prefix.dtype} {rs.prefix.shape}")
        rows, row_len, kmax = rs.shape[0], math.prod(rs.shape[1:]), int(rs.prefix.max())
        try:
            cols = decode_columns(rs.cols, rows, row_len, kmax, lehmer=leaf == "cols_lehmer")
        except ValueError as e:
            raise ArchiveError(f"sparse/{name}/{leaf} {e}") from None
        sparse[name] = QuantizedRowSparse(rs.shape, rs.values, scale, cols.astype(index_dtype(row_len)),
                                          rs.prefix, bits)
    return QuantizedStore(layout.levels, layout.order, sparse, layout.dense, layout.per_level, meta, bits)

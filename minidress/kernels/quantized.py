"""Row-sparse products over quantized values: int8, or int4 packed two per byte, with one scale
per row, each kernel beside its NumPy reference and bit for bit equal to it.

Layout (the transposed, batch-1 layout of ``serving.py``, so a prefix of length ``k`` is still
the first ``k`` entries of every row):

* int8: ``qt [kmax, rows]`` int8, ``qt[j, r]`` the j-th stored entry of row ``r``;
* int4: ``qt [ceil(kmax / 2), rows]`` int8 bytes, entry ``2i`` in the low nibble of
  ``qt[i, r]`` and entry ``2i + 1`` in the high nibble, each a two's-complement value in
  ``[-7, 7]`` (-8 is never written: the grid is symmetric);
* ``ct [kmax, rows]`` the columns, ``scale [rows]`` float.

Dequantizing in the kernel: ``y[r] = scale[r] * sum_{j<k} float(q[j, r]) * x[ct[j, r]]``. The
scale is applied once per row after the sum (one multiply per row, not per weight), which is
exact algebra but not the same rounding as summing ``scale * q``: the references below add in
the same order with the same operations, so kernel and reference agree bit for bit (fastmath
off: no fused multiply-add, no reordering).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .serving import noalias_njit

BITS = (8, 4)


def qmax(bits: int) -> int:
    """The largest magnitude on the symmetric grid of ``bits`` bits: 127 or 7."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return (1 << (bits - 1)) - 1


def pack_int4(q):
    """``q [kmax, rows]`` int8 in [-7, 7] -> ``[ceil(kmax / 2), rows]`` int8 bytes (module docstring)."""
    q = np.asarray(q, np.int8)
    if len(q) % 2:
        q = np.concatenate([q, np.zeros((1, *q.shape[1:]), np.int8)])
    nib = q.view(np.uint8) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).view(np.int8)


def unpack_int4(packed, kmax):
    """Inverse of ``pack_int4``: ``[ceil(kmax / 2), rows]`` bytes -> ``q [kmax, rows]`` int8."""
    b = np.asarray(packed).view(np.uint8)
    nib = np.empty((2 * len(b), *b.shape[1:]), np.int16)
    nib[0::2], nib[1::2] = b & 0x0F, b >> 4
    return (nib - ((nib & 8) << 1))[:kmax].astype(np.int8)     # sign-extend the nibble


def pack_bits(a, bits):
    """Non-negative integers ``a`` (any shape) as a little-endian bit stream of ``bits`` each:
    ``uint8 [ceil(a.size * bits / 8)]``. For column indices at rest (``bits = ceil(log2 row_len)``)."""
    a = np.asarray(a, np.uint64).ravel()
    stream = ((a[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(stream.ravel(), bitorder="little")


def unpack_bits(packed, bits, count):
    """Inverse of ``pack_bits``: ``count`` integers (int64) from ``packed``."""
    stream = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    return (stream.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def _entries_reference(qt, j, bits):
    """Row ``j`` of the stored entries as int8 ``[rows]``."""
    if bits == 8:
        return qt[j]
    b = qt[j >> 1].view(np.uint8)
    nib = ((b >> 4) if j & 1 else (b & 0x0F)).astype(np.int16)
    return (nib - ((nib & 8) << 1)).astype(np.int8)


def qmatvec_t_reference(qt, ct, scale, bits, k, x):
    """``y [rows] = scale * sum_{j<k} float(q[j]) * x[ct[j]]``, added in order ``j``; ``x [in]``."""
    y = np.zeros(ct.shape[1], x.dtype)
    for j in range(k):
        y += _entries_reference(qt, j, bits).astype(x.dtype) * x[ct[j]]
    return y * scale.astype(x.dtype)


def qmatmul_reference(qt, ct, scale, bits, k, xt):
    """The batch: ``y [rows, N] = scale[:, None] * sum_{j<k} float(q[j])[:, None] * xt[ct[j], :]``."""
    y = np.zeros((ct.shape[1], xt.shape[1]), xt.dtype)
    for j in range(k):
        y += _entries_reference(qt, j, bits).astype(xt.dtype)[:, None] * xt[ct[j]]
    return y * scale.astype(xt.dtype)[:, None]


@njit(cache=True, inline="always")
def _entry(qt, j, r, bits):
    """Entry ``j`` of row ``r`` as an integer (int4: the nibble, sign-extended)."""
    if bits == 8:
        return np.int32(qt[j, r])
    b = np.int32(qt[j >> 1, r]) & 0xFF
    nib = (b >> 4) if j & 1 else (b & 0x0F)
    return nib - ((nib & 8) << 1)


@noalias_njit
def qmatvec_t(qt, ct, scale, bits, k, x, y):
    """Kernel of ``qmatvec_t_reference`` writing ``y [rows]`` (which must not overlap the inputs).
    The inner loop runs over consecutive rows, as ``serving.matvec_t``'s."""
    rows = y.shape[0]
    for r in range(rows):
        y[r] = 0
    for j in range(k):
        c = ct[j]
        for r in range(rows):
            y[r] += x.dtype.type(_entry(qt, j, r, bits)) * x[c[r]]
    for r in range(rows):
        y[r] *= x.dtype.type(scale[r])


@noalias_njit
def qmatmul(qt, ct, scale, bits, k, xt, y):
    """Kernel of ``qmatmul_reference`` writing ``y [rows, N]``: per row and kept entry, one
    contiguous stretch of the batch (SIMD over the batch, as ``rowsparse``'s batched kernel)."""
    rows, n = y.shape
    for r in range(rows):
        yr = y[r]
        yr[:] = 0
        for j in range(k):
            v = xt.dtype.type(_entry(qt, j, r, bits))
            src = xt[ct[j, r]]
            for b in range(n):
                yr[b] += v * src[b]
        s = xt.dtype.type(scale[r])
        for b in range(n):
            yr[b] *= s


# ---------------------------------------------------------------------------------------------
# The grid: one symmetric scale per row, shared by the store (deploy) and by training (quantize)
# ---------------------------------------------------------------------------------------------

def row_scales(values, bits):
    """Per-row scale of ``values [rows, kmax]``: ``max_j |values[r, j]| / qmax(bits)`` over *all*
    the stored entries of the row, so that the scale does not depend on the level served and
    every level stays a prefix of every row. A row of zeros gets scale 1 (a scale is never 0)."""
    peak = np.abs(np.asarray(values)).max(axis=1) if np.size(values) else np.zeros(len(values))
    return np.where(peak > 0, peak / qmax(bits), 1.0).astype(np.asarray(values).dtype)


def quantize_rows(values, scale, bits):
    """Nearest grid points: ``clip(rint(values / scale[:, None]), -qmax, qmax)`` as int8
    ``[rows, kmax]`` (ties to even, as ``np.rint``)."""
    m = qmax(bits)
    return np.clip(np.rint(values / scale[:, None]), -m, m).astype(np.int8)

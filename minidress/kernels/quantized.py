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

from .serving import noalias_njit, noalias_no_gather_njit

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


# ---------------------------------------------------------------------------------------------
# Column indices at rest: a Lehmer code, bit-packed with one width per position
# ---------------------------------------------------------------------------------------------
# In rank order a row's columns are distinct but not sorted, so delta coding does not shrink
# them. Their **Lehmer code** does (D. H. Lehmer, 1960; Knuth, TAOCP vol. 2, 3.3.2, the
# factorial number system): entry ``j`` of a row is stored as its position among the columns
# that entries ``0..j-1`` have not used, a number below ``row_len - j``, so it needs only
# ``lehmer_widths`` bits. Decoding entry ``j`` needs entries ``0..j-1`` only: a prefix of a row's
# codes decodes to the same prefix of its columns, so every level is still a prefix of every row.
# A full row of 288 columns takes 2081 bits instead of 288 * 9 = 2592 (``log2(288!)`` = 1943).

def lehmer_widths(row_len, kmax):
    """Bits of code ``j`` for ``j < kmax``: ``ceil(log2(row_len - j))`` (0 for the last column
    of a full row, which has one choice); int64 ``[kmax]``."""
    return np.array([int(row_len - j - 1).bit_length() for j in range(kmax)], np.int64)


def lehmer_encode(cols):
    """Codes ``[rows, kmax]`` int64 of distinct columns ``cols [rows, kmax]``: ``code[r, j]`` =
    ``cols[r, j]`` minus the number of earlier columns of the row below it."""
    cols = np.asarray(cols, np.int64)
    codes = cols.copy()
    for j in range(1, cols.shape[1]):
        codes[:, j] -= (cols[:, :j] < cols[:, j:j + 1]).sum(axis=1)
    return codes


def lehmer_decode(codes, row_len):
    """Inverse of ``lehmer_encode``: columns ``[rows, kmax]`` int64. Raises ``ValueError`` naming
    the first code that is not below the number of columns still free."""
    codes = np.asarray(codes, np.int64)
    rows, kmax = codes.shape
    bad = codes >= row_len - np.arange(kmax)
    if bad.any() or (codes < 0).any():
        r, j = np.argwhere(bad | (codes < 0))[0]
        raise ValueError(f"code {codes[r, j]} at row {r}, entry {j} is not below the {row_len - j} "
                         f"columns still free")
    cols = np.empty((rows, kmax), np.int64)
    for r in range(rows):
        free = list(range(row_len))
        cols[r] = [free.pop(c) for c in codes[r].tolist()]
    return cols


def pack_codes(codes, widths):
    """Codes ``[rows, kmax]`` as one little-endian bit stream, row after row, entry ``j`` in
    ``widths[j]`` bits: ``uint8 [ceil(rows * sum(widths) / 8)]``."""
    codes = np.asarray(codes, np.uint64)
    top = int(widths.max(initial=0))
    bits = (codes[:, :, None] >> np.arange(top, dtype=np.uint64)) & 1
    keep = np.arange(top) < widths[:, None]
    return np.packbits(bits[:, keep].astype(np.uint8).ravel(), bitorder="little")


def unpack_codes(packed, widths, rows):
    """Inverse of ``pack_codes``: ``[rows, len(widths)]`` int64."""
    top, total = int(widths.max(initial=0)), int(widths.sum())
    stream = np.unpackbits(np.asarray(packed, np.uint8), count=rows * total, bitorder="little")
    full = np.zeros((rows, len(widths), top), np.int64)
    full[:, np.arange(top) < widths[:, None]] = stream.reshape(rows, total)
    return (full << np.arange(top)).sum(axis=2)


def column_bits(row_len: int) -> int:
    """Bits of one column index in format 1's fixed-width packing: ``ceil(log2 row_len)``, >= 1."""
    return max(1, (int(row_len) - 1).bit_length())


def encode_columns(cols, row_len):
    """A layer's columns ``[rows, kmax]`` at rest: their Lehmer codes, bit-packed (``uint8``)."""
    return pack_codes(lehmer_encode(cols), lehmer_widths(row_len, np.shape(cols)[1]))


def decode_columns(packed, rows, row_len, kmax, lehmer=True):
    """Inverse of ``encode_columns`` (``lehmer=False``: format 1, ``pack_bits`` of
    ``column_bits(row_len)`` each): columns ``[rows, kmax]`` int64. Raises ``ValueError`` (one
    line) if ``packed`` is not ``uint8`` of the right size, or a code is out of range."""
    if kmax > row_len:
        raise ValueError(f"cannot hold {kmax} distinct columns per row of {row_len}")
    widths = lehmer_widths(row_len, kmax) if lehmer else np.full(kmax, column_bits(row_len))
    size = -(-rows * int(widths.sum()) // 8)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != size:
        raise ValueError(f"must be uint8 of {size} bytes ({rows} rows of {kmax} codes, {int(widths.sum())} "
                         f"bits a row), got {packed.dtype} {packed.shape}")
    if not lehmer:
        return unpack_bits(packed, column_bits(row_len), rows * kmax).reshape(rows, kmax)
    return lehmer_decode(unpack_codes(packed, widths, rows), row_len)


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
    As ``serving.matvec_t``: the inner loop runs over consecutive rows (vector gathers), four
    kept entries per pass over ``y``, the additions written out in their order. One loop per bit
    width: with the width tested inside it, the int8 loop ran about 15% slower."""
    _qmatvec_t_loops(qt, ct, scale, bits, k, x, y)


@noalias_no_gather_njit
def qmatvec_t_no_gather(qt, ct, scale, bits, k, x, y):
    """``qmatvec_t`` with its loops compiled without gather instructions, as
    ``serving.matvec_t_no_gather``: the same numbers."""
    _qmatvec_t_loops(qt, ct, scale, bits, k, x, y)


@njit(cache=True, inline="always")      # into each kernel above, compiled under its options
def _qmatvec_t_loops(qt, ct, scale, bits, k, x, y):
    if bits == 8:
        _qmatvec8_loop(qt, ct, k, x, y)
    else:
        _qmatvec4_loop(qt, ct, k, x, y)
    for r in range(y.shape[0]):
        y[r] *= y.dtype.type(scale[r])


@njit(cache=True, inline="always")
def _qmatvec8_loop(qt, ct, k, x, y):
    t = x.dtype.type
    for r in range(y.shape[0]):
        y[r] = 0
    j = 0
    while j + 4 <= k:
        c0, c1, c2, c3 = ct[j], ct[j + 1], ct[j + 2], ct[j + 3]
        q0, q1, q2, q3 = qt[j], qt[j + 1], qt[j + 2], qt[j + 3]
        for r in range(y.shape[0]):
            y[r] = (((y[r] + t(q0[r]) * x[c0[r]]) + t(q1[r]) * x[c1[r]]) + t(q2[r]) * x[c2[r]]) + t(q3[r]) * x[c3[r]]
        j += 4
    for j in range(j, k):
        c, q = ct[j], qt[j]
        for r in range(y.shape[0]):
            y[r] += t(q[r]) * x[c[r]]


@njit(cache=True, inline="always")
def _qmatvec4_loop(qt, ct, k, x, y):
    t = x.dtype.type
    for r in range(y.shape[0]):
        y[r] = 0
    j = 0
    while j + 4 <= k:
        c0, c1, c2, c3 = ct[j], ct[j + 1], ct[j + 2], ct[j + 3]
        for r in range(y.shape[0]):
            y[r] = (((y[r] + t(_entry(qt, j, r, 4)) * x[c0[r]]) + t(_entry(qt, j + 1, r, 4)) * x[c1[r]])
                    + t(_entry(qt, j + 2, r, 4)) * x[c2[r]]) + t(_entry(qt, j + 3, r, 4)) * x[c3[r]]
        j += 4
    for j in range(j, k):
        c = ct[j]
        for r in range(y.shape[0]):
            y[r] += t(_entry(qt, j, r, 4)) * x[c[r]]


@noalias_njit
def qmatmul(qt, ct, scale, bits, k, xt, y):
    """Kernel of ``qmatmul_reference`` writing ``y [rows, N]``: per row, eight kept entries per
    pass over one contiguous stretch of the batch (SIMD over the batch, the additions written
    out in their order, as ``rowsparse._matmul_rows``)."""
    rows, n = y.shape
    t = xt.dtype.type
    for r in range(rows):
        yr = y[r]
        for b in range(n):
            yr[b] = 0
        j = 0
        while j + 8 <= k:
            v0, v1 = t(_entry(qt, j, r, bits)), t(_entry(qt, j + 1, r, bits))
            v2, v3 = t(_entry(qt, j + 2, r, bits)), t(_entry(qt, j + 3, r, bits))
            v4, v5 = t(_entry(qt, j + 4, r, bits)), t(_entry(qt, j + 5, r, bits))
            v6, v7 = t(_entry(qt, j + 6, r, bits)), t(_entry(qt, j + 7, r, bits))
            x0, x1, x2, x3 = xt[ct[j, r]], xt[ct[j + 1, r]], xt[ct[j + 2, r]], xt[ct[j + 3, r]]
            x4, x5, x6, x7 = xt[ct[j + 4, r]], xt[ct[j + 5, r]], xt[ct[j + 6, r]], xt[ct[j + 7, r]]
            for b in range(n):
                yr[b] = (((((((yr[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[b])
                           + v4 * x4[b]) + v5 * x5[b]) + v6 * x6[b]) + v7 * x7[b]
            j += 8
        for j in range(j, k):
            v, src = t(_entry(qt, j, r, bits)), xt[ct[j, r]]
            for b in range(n):
                yr[b] += v * src[b]
        s = t(scale[r])
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

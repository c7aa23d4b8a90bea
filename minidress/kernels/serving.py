"""Serving kernels: the row-sparse products a compiled deployed model runs, beside their NumPy
references, and the small dense pieces around them (im2col, pooling, flatten).

Two things make these faster than ``rowsparse.py``'s public functions on one sample:

* **A transposed layout** for batch 1. ``vt[kmax, rows]`` and ``ct[kmax, rows]`` hold the same
  entries in the same rank order (``vt[j, r] = values[r, j]``), so a prefix of length ``k`` is
  still the first ``k`` of every row. The product walks ``j`` outside and the rows inside,
  ``y[r] += vt[j, r] * x[ct[j, r]]``: every row still adds its entries in order ``j = 0, 1, ...``
  (bit for bit the reference), but the inner loop now runs over *consecutive rows*, which the
  compiler turns into vector gathers (``vgatherdps``) instead of one scalar load per weight.
* **No aliasing.** LLVM vectorizes that loop only if it knows that ``y`` does not overlap
  ``x``, ``vt`` or ``ct`` (else a store into ``y`` might change an input mid-vector). Numba has
  no decorator option for this, but its documented ``pipeline_class`` argument lets us compile
  with the compiler flag ``noalias`` set, which marks every array argument ``noalias`` for LLVM.
  ``rowsparse.noalias_njit`` is the one place that does it. The price is a contract: **no output may
  overlap an input** of these kernels (every caller here passes a freshly allocated output).
* **Gathers where they pay.** A gather instruction is not fast everywhere: on an AMD EPYC
  (Zen 4) loading each entry on its own and assembling the vector was 1.1-1.2x faster than
  ``vgatherdps`` (``benchmarks/gather_rate.c`` finds the same in C), while an Intel Xeon
  gathered twice as fast as that AMD. So the batch-1 loop is compiled twice, as ``matvec_t``
  (gathers, where the target has them) and ``matvec_t_no_gather`` (``rowsparse.
  noalias_no_gather_njit``: the same loop, LLVM told to prefer no gathers); the deployed model
  times both, on each layer whose one sample is a matrix-vector product, before its first
  request and runs the faster (``deploy.compiled.CompiledNet.calibrate``).
  The two compute the same sums in the same order: the same numbers, bit for bit.

Exactness: fastmath stays off, so no multiply-add is fused and no addition reordered; each
kernel equals its reference bit for bit (``tests/test_serving.py``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, uint64

from ..im2col import im2col_cnhw
# noalias_njit lives in rowsparse (which serving imports, not the other way round)
from .rowsparse import (_matmul_rows, _NoAliasCompiler, noalias_njit, noalias_no_gather_njit,  # noqa: F401
                        rowsparse_matmul_reference)


def transpose_rowsparse(values, cols, index=np.uint16):
    """The batch-1 layout: ``vt [kmax, rows]`` (values) and ``ct [kmax, rows]`` (columns as
    ``index``), C-contiguous copies in the same rank order as ``values``/``cols [rows, kmax]``."""
    return np.ascontiguousarray(values.T), np.ascontiguousarray(cols.T.astype(index))


# ---------------------------------------------------------------------------------------------
# One sample over the transposed layout
# ---------------------------------------------------------------------------------------------

def matvec_t_reference(vt, ct, k, x):
    """``y[r] = sum_{j<k} vt[j, r] * x[ct[j, r]]``, added in order ``j``; ``x [in]`` -> ``y [rows]``.
    The same sums, in the same order, as ``rowsparse_matvec_reference(vt.T, ct.T, k, x)``."""
    y = np.zeros(vt.shape[1], vt.dtype)
    for j in range(k):
        y += vt[j] * x[ct[j]]
    return y


@njit(cache=True, inline='always')
def _matvec_t_loop(vt, ct, k, x, y):
    """The loop of ``matvec_t`` and ``matvec_t_no_gather``, inlined into each (at Numba's level,
    before LLVM sees it), so that each compiles it under its own options.

    Four kept entries per pass over ``y``: a quarter of the loads and stores of ``y``, and the
    additions written out in their order, so the sums are those of one entry per pass."""
    rows = y.shape[0]
    for r in range(rows):
        y[r] = 0
    j = 0
    while j + 4 <= k:
        v0, v1, v2, v3 = vt[j], vt[j + 1], vt[j + 2], vt[j + 3]
        c0, c1, c2, c3 = ct[j], ct[j + 1], ct[j + 2], ct[j + 3]
        for r in range(rows):        # consecutive rows: this is the loop that uses vector gathers
            y[r] = (((y[r] + v0[r] * x[c0[r]]) + v1[r] * x[c1[r]]) + v2[r] * x[c2[r]]) + v3[r] * x[c3[r]]
        j += 4
    for j in range(j, k):
        v, c = vt[j], ct[j]
        for r in range(rows):
            y[r] += v[r] * x[c[r]]


@noalias_njit
def matvec_t(vt, ct, k, x, y):
    """Kernel of ``matvec_t_reference`` writing ``y [rows]`` (which must not overlap the inputs),
    with vector gathers where the target has them."""
    _matvec_t_loop(vt, ct, k, x, y)


@noalias_no_gather_njit
def matvec_t_no_gather(vt, ct, k, x, y):
    """``matvec_t`` compiled without gather instructions: every ``x[ct[j, r]]`` loaded on its
    own into the vector (faster than a gather on some processors); the same numbers."""
    _matvec_t_loop(vt, ct, k, x, y)


# ---------------------------------------------------------------------------------------------
# A batch over the same transposed layout
# ---------------------------------------------------------------------------------------------

# Columns per block of the batched product: the rows of the input that the kept entries pick
# stay in cache while every output row reads them (as ``rowsparse.BLOCK_BYTES``).
BLOCK_COLUMNS = 2048
# Up to this many columns, two output rows per pass pay. Against ``rowsparse._matmul_rows`` over
# the same arrays, interleaved, one thread, Intel Xeon (AVX-512), on 300x784 and 512x512 layers:
# 1.4x at 8 columns, 1.1-1.2x at 32, 1.05x at 96, even or 2-4% slower from 128 on.
PAIRS_MAX_COLUMNS = 96


def matmul_t_reference(vt, ct, k, xt):
    """``yt[r, b] = sum_{j<k} vt[j, r] * xt[ct[j, r], b]``, added in order ``j``:
    ``rowsparse_matmul_reference(vt.T, ct.T, k, xt)``; ``xt [in, B]`` -> ``yt [rows, B]``."""
    return rowsparse_matmul_reference(vt.T, ct.T, k, xt)


@noalias_njit
def matmul_t(vt, ct, k, xt, yt):
    """Kernel of ``matmul_t_reference`` writing ``yt [rows, B]`` (which must not overlap the
    inputs): SIMD over the batch. Up to ``PAIRS_MAX_COLUMNS`` columns, two output rows per pass
    (``_matmul_t_pairs``); wider, ``rowsparse``'s loop over blocks of columns."""
    rows, m = yt.shape
    if m <= PAIRS_MAX_COLUMNS:
        _matmul_t_pairs(vt, ct, np.uint64(k), xt, yt)
        return
    for b0 in range(0, m, BLOCK_COLUMNS):
        _matmul_rows(vt.T, ct.T, k, xt, yt, 0, rows, b0, min(m, b0 + BLOCK_COLUMNS))


@noalias_njit
def _matmul_t_pairs(vt, ct, k, xt, yt):
    """``matmul_t`` over whole rows of ``xt``, two output rows ``ra, rb`` at a time, four kept
    entries per pass; ``k`` unsigned.

    Why so: each row's sum is a chain of dependent additions, so two rows in one pass give the
    processor two independent chains; whole rows (``xt[c]``, not ``xt[c, b0:b1]``) and unsigned
    indices leave the compiler nothing to check. Every row still adds its entries in order
    ``j = 0, 1, ...``: bit for bit the reference."""
    rows = np.uint64(yt.shape[0])
    one, two, three, four = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    r = np.uint64(0)
    while r + one < rows:
        ra, rb = r, r + one
        ya, yb = yt[ra], yt[rb]
        ya[:] = 0
        yb[:] = 0
        j = np.uint64(0)
        while j + four <= k:
            a0, a1, a2, a3 = vt[j, ra], vt[j + one, ra], vt[j + two, ra], vt[j + three, ra]
            b0, b1, b2, b3 = vt[j, rb], vt[j + one, rb], vt[j + two, rb], vt[j + three, rb]
            xa0, xa1 = xt[np.uint64(ct[j, ra])], xt[np.uint64(ct[j + one, ra])]
            xa2, xa3 = xt[np.uint64(ct[j + two, ra])], xt[np.uint64(ct[j + three, ra])]
            xb0, xb1 = xt[np.uint64(ct[j, rb])], xt[np.uint64(ct[j + one, rb])]
            xb2, xb3 = xt[np.uint64(ct[j + two, rb])], xt[np.uint64(ct[j + three, rb])]
            for b in range(ya.shape[0]):
                ya[b] = (((ya[b] + a0 * xa0[b]) + a1 * xa1[b]) + a2 * xa2[b]) + a3 * xa3[b]
                yb[b] = (((yb[b] + b0 * xb0[b]) + b1 * xb1[b]) + b2 * xb2[b]) + b3 * xb3[b]
            j += four
        while j < k:
            va, vb = vt[j, ra], vt[j, rb]
            xa, xb = xt[np.uint64(ct[j, ra])], xt[np.uint64(ct[j, rb])]
            for b in range(ya.shape[0]):
                ya[b] += va * xa[b]
                yb[b] += vb * xb[b]
            j += one
        r += two
    if r < rows:                                  # an odd last row, on its own
        y = yt[r]
        y[:] = 0
        j = np.uint64(0)
        while j < k:
            v, xr = vt[j, r], xt[np.uint64(ct[j, r])]
            for b in range(y.shape[0]):
                y[b] += v * xr[b]
            j += one


# ---------------------------------------------------------------------------------------------
# Pieces of a feature-major network: activations [C, N, H, W] (vectors: [F, N, 1, 1])
# ---------------------------------------------------------------------------------------------

def im2col_reference(x, kh, kw, stride, padding):
    """``minidress.im2col.im2col_cnhw`` (``x [C, N, H, W]`` -> ``[C*kh*kw, N*Ho*Wo]``), repeated
    here so that kernels and their references sit side by side."""
    return im2col_cnhw(x, kh, kw, stride, padding)[0]


@noalias_njit
def im2col(x, kh_in, kw_in, s_in, p_in, out):
    """Kernel of ``im2col_reference`` writing ``out [C*kh*kw, N*Ho*Wo]`` (which must not overlap
    ``x``); padding reads as 0.

    The input is first copied into a zero-padded buffer, so that the copy loop has no branch:
    output ``(r, b, oy, ox)`` reads ``xp[ci, b, oy*stride + i, ox*stride + j]``. Plain element
    loops over one row of input and output at a time, not slice assignments (a slice costs an
    array view per output line, and ``Wo`` is often 8), with unsigned indices, which need no
    wrap-around checks: 2-6x faster than signed ones at batch 32 (AMD EPYC, Zen 4; LeNet-5's
    first layer 160 against 600 us), bit for bit the same copy."""
    c, n, h, w = x.shape
    ho, wo = (h + 2 * p_in - kh_in) // s_in + 1, (w + 2 * p_in - kw_in) // s_in + 1
    kh, kw, s, p = uint64(kh_in), uint64(kw_in), uint64(s_in), uint64(p_in)
    xp = x
    if p_in:
        xp = np.zeros((c, n, h + 2 * p_in, w + 2 * p_in), x.dtype)
        for ci in range(uint64(c)):
            for b in range(uint64(n)):
                for iy in range(uint64(h)):
                    src, dst = x[ci, b, iy], xp[ci, b, iy + p]
                    for ix in range(uint64(w)):
                        dst[ix + p] = src[ix]
    hou, wou = uint64(ho), uint64(wo)
    for ci in range(uint64(c)):
        for i in range(kh):
            for j in range(kw):
                row = out[(ci * kh + i) * kw + j]
                for b in range(uint64(n)):
                    for oy in range(hou):
                        base, src = (b * hou + oy) * wou, xp[ci, b, oy * s + i]
                        for ox in range(wou):
                            row[base + ox] = src[ox * s + j]


def pool2d_reference(x, k, stride, average):
    """``pool2d``'s rule in NumPy: over each window of ``x [C, N, H, W]`` in row order, the max
    takes an entry only if it is greater (``v > m``), and the mean adds from ``m - m`` and
    divides in float64, as the kernel's ``t / (k * k)`` does; returns ``[C, N, Ho, Wo]``."""
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    window = [x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
              for i in range(k) for j in range(k)]
    with np.errstate(invalid="ignore"):          # inf - inf: NaN, as in the kernel, silently
        m, total = window[0], window[0] - window[0]
        for v in window:
            total = total + v
            m = np.where(v > m, v, m)
        return (total / np.float64(k * k)).astype(x.dtype) if average else m


@njit(cache=True)
def pool2d(x, k_in, s_in, average, out):
    """Max (or mean) over ``k x k`` windows of ``x [C, N, H, W]`` into ``out [C, N, Ho, Wo]``.
    The max keeps the first of equal values, as ``argmax`` does in ``nn.layers.maxpool_forward``.
    NaNs differ from training: a NaN in the window's first place is kept, a later one is never
    greater and so skipped, while training's max-pool returns a NaN wherever its window holds
    one. The mean adds the window in row order, from ``m - m`` (0, or NaN for an infinite first
    entry).

    Unsigned indices, and the max as a select (``v if v > m else m``, the same comparison as a
    branch), which vectorizes; 2x2 windows of stride 2 (every model's pooling) read the two
    input rows of an output row: max-pooling 6-13x faster than the signed, branching loop at
    batch 32 (Zen 4), bit for bit the same."""
    c, n, ho, wo = out.shape
    k, s, two = uint64(k_in), uint64(s_in), uint64(2)
    for ci in range(uint64(c)):
        for b in range(uint64(n)):
            for oy in range(uint64(ho)):
                o = out[ci, b, oy]
                if k_in == 2 and s_in == 2 and not average:
                    r0, r1 = x[ci, b, two * oy], x[ci, b, two * oy + uint64(1)]
                    for ox in range(uint64(wo)):
                        x0 = two * ox
                        m, v = r0[x0], r0[x0 + uint64(1)]
                        m = v if v > m else m
                        v = r1[x0]
                        m = v if v > m else m
                        v = r1[x0 + uint64(1)]
                        o[ox] = v if v > m else m
                    continue
                for ox in range(uint64(wo)):
                    m = x[ci, b, oy * s, ox * s]
                    t = m - m
                    for i in range(k):
                        r = x[ci, b, oy * s + i]
                        for j in range(k):
                            v = r[ox * s + j]
                            t += v
                            m = v if v > m else m
                    o[ox] = t / (k_in * k_in) if average else m


def flatten_reference(x):
    """``x [C, N, H, W]`` -> ``[C*H*W, N]`` in NCHW feature order (``c*H*W + h*W + w``)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, x.shape[1])


@njit(cache=True)
def flatten(x, out):
    """Kernel of ``flatten_reference`` writing ``out [C*H*W, N]``: per channel a transpose of
    ``[N, H*W]``, in tiles of 32 x 32 so that both the reads and the writes stay in cache.
    (One sample, or ``H = W = 1``, is the same memory order: the caller just reshapes.)
    Unsigned indices: 1.6-1.8x faster than signed ones, which are checked for wrap-around."""
    c, n, h, w = x.shape
    hw, nn, tile = np.uint64(h * w), np.uint64(n), np.uint64(32)
    src = x.reshape(c, n, h * w)
    for ci in range(np.uint64(c)):
        for p0 in range(np.uint64(0), hw, tile):
            for b0 in range(np.uint64(0), nn, tile):
                for p in range(p0, min(hw, p0 + tile)):
                    row = out[ci * hw + p]
                    for b in range(b0, min(nn, b0 + tile)):
                        row[b] = src[ci, b, p]


@njit(cache=True)
def to_feature_major(x, out):
    """Batch-major ``x [N, C, H, W]`` -> feature-major ``out [C, N, H, W]``."""
    n, c = x.shape[:2]
    for ci in range(c):
        for b in range(n):
            out[ci, b] = x[b, ci]

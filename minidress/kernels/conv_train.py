"""Training convolutions and pooling: per-image GEMMs over strided views, and direct Numba loops.

The reference ``conv2d_forward_reference`` (``minidress.nn.layers``) unfolds every receptive
field of the whole batch into ``cols [N*Ho*Wo, C_in*kh*kw]`` (a ``kh*kw``-fold copy of the
input, 115 MB for the small CNN's 32-channel 28x28 layer at batch 128), runs one GEMM and
transposes the result; its backward pass runs two more GEMMs and scatters ``dcols`` back with
``col2im``. Those copies cost more than the arithmetic on this project's small images.

**Per-image GEMMs** (``conv2d_forward``'s default): each image's im2col matrix
``cols_n [C_in*kh*kw, Ho*Wo]`` is copied from the padded input by a Numba loop
(``_im2col_chunk``), a chunk of images at a time small enough to stay in cache
(``CHUNK_BYTES``), and ``W @ cols_n`` (NumPy's stacked matmul: one BLAS GEMM per image) writes
the output in NCHW directly. Backward: ``dw.T += cols_n @ dout_n.T`` image by image,
``dcols_n = W.T @ dout_n``, and ``_col2im_add`` (a Numba loop) adds ``dcols`` back into the
padded input gradient. Measured on the ``bench_train.py`` layers (float32, one thread, a loaded
2-core machine; forward and backward): 0.2-0.7x the reference's time, and 0.1-0.8x the direct
loops' (0.3-0.8x on every LeNet-5, small-CNN and ResNet layer), so the direct loops run only on
request.

**Direct loops** (``direct=True``) compute the same sums directly on the zero-padded input:

* forward:          ``out[n, o, y, x]  += w[o, c, i, j] * xp[n, c, s*y + i, s*x + j]``
* input gradient:   ``dxp[n, c, s*y + i, s*x + j] += w[o, c, i, j] * dout[n, o, y, x]``
* weight gradient:  ``dw[o, c, i, j] = sum_{n, y, x} dout[n, o, y, x] * xp[n, c, s*y + i, s*x + j]``

Every innermost loop runs over one output row (``x``), zero-based over a slice, which the
compiler turns into SIMD without ``fastmath`` (the weight gradient accumulates a vector of
partial sums, one per ``x``, and adds them up at the end, so no reduction needs reassociating).
The only copy is the zero padding of the input (``_pad``: one ``np.zeros`` and a slice copy of ``x``).

Every loop here is serial: training runs one Numba thread (``TRAINING_THREADS``, measured
below), and on a cold cache the ``parallel=True`` versions of these kernels took 4-6x as long to
compile (``tests/test_conv_train.py`` with an empty ``NUMBA_CACHE_DIR``: 73 s against 18 s),
which every fresh install, CI run and tutorial kernel pays. Results therefore cannot depend on
the thread count. They compile with ``rowsparse.noalias_njit``: no output of these kernels
overlaps an input (each wrapper allocates its outputs), and with that promise LLVM vectorizes
them as the parallel versions' outlined loops were (the 2x2 max-pool: 7x faster than without).

Results equal the reference up to the order of the additions (tests: ``tests/test_conv_train.py``,
relative to the largest magnitude, 1e-12 in float64 and 1e-5 in float32). The pooling kernels
follow the reference's order exactly and agree with it bit for bit.

Thread policy for training (``training_threads``): the GEMMs and the Linear layers run on BLAS,
the pooling, ``_col2im_add`` and the row-sparse kernels on the Numba pool, one after the other,
never at the same time; ``benchmarks/README.md`` (bench_train) has the measurement.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, uint64
from threadpoolctl import threadpool_limits

from ..im2col import conv_output_size
from .rowsparse import noalias_njit


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

@noalias_njit
def _conv_forward(xp, w, b, s, ho, wo, out):
    n_img, c_in = xp.shape[:2]
    c_out, _, kh, kw = w.shape
    for n in range(n_img):
        for o in range(c_out):
            plane = out[n, o]
            plane[:] = 0
            for c in range(c_in):
                src = xp[n, c]
                for i in range(kh):
                    for j in range(kw):
                        wv = w[o, c, i, j]
                        for y in range(ho):
                            orow = plane[y]
                            if s == 1:
                                xrow = src[y + i, j:j + wo]
                                for x in range(wo):
                                    orow[x] += wv * xrow[x]
                            else:
                                xrow = src[s * y + i]
                                for x in range(wo):
                                    orow[x] += wv * xrow[s * x + j]
            bv = b[o]
            for y in range(ho):
                orow = plane[y]
                for x in range(wo):
                    orow[x] += bv


@noalias_njit
def _conv_backward_input(dout, w, s, dxp):
    n_img, c_out, ho, wo = dout.shape
    _, c_in, kh, kw = w.shape
    for n in range(n_img):
        for c in range(c_in):
            dst = dxp[n, c]
            dst[:] = 0
            for o in range(c_out):
                g = dout[n, o]
                for i in range(kh):
                    for j in range(kw):
                        wv = w[o, c, i, j]
                        for y in range(ho):
                            grow = g[y]
                            if s == 1:
                                drow = dst[y + i, j:j + wo]
                                for x in range(wo):
                                    drow[x] += wv * grow[x]
                            else:
                                drow = dst[s * y + i]
                                for x in range(wo):
                                    drow[s * x + j] += wv * grow[x]


@noalias_njit
def _conv_backward_weight(dout, xp, s, kh, kw, dw):
    n_img, c_out, ho, wo = dout.shape
    c_in = xp.shape[1]
    for o in range(c_out):
        acc = np.empty(wo, dout.dtype)
        for c in range(c_in):
            for i in range(kh):
                for j in range(kw):
                    acc[:] = 0
                    for n in range(n_img):
                        g, src = dout[n, o], xp[n, c]
                        for y in range(ho):
                            grow = g[y]
                            if s == 1:
                                xrow = src[y + i, j:j + wo]
                                for x in range(wo):
                                    acc[x] += grow[x] * xrow[x]
                            else:
                                xrow = src[s * y + i]
                                for x in range(wo):
                                    acc[x] += grow[x] * xrow[s * x + j]
                    total = acc.dtype.type(0)
                    for x in range(wo):
                        total += acc[x]
                    dw[o, c, i, j] = total


@noalias_njit
def _col2im_add(dcols, s_in, dxp):
    # dxp[n, c, s*y + i, s*x + j] += dcols[n, c, i, j, y, x]: offsets (i, j) outermost, as the
    # reference's scatter adds; unsigned indices (no negative-index checks: 2-3x faster).
    n_img, ch, kh, kw, ho, wo = dcols.shape
    s = uint64(s_in)
    for n in range(uint64(n_img)):
        for c in range(uint64(ch)):
            for i in range(uint64(kh)):
                for j in range(uint64(kw)):
                    for y in range(uint64(ho)):
                        for x in range(uint64(wo)):
                            dxp[n, c, s * y + i, s * x + j] += dcols[n, c, i, j, y, x]


# Images per BLAS chunk: about this many bytes of im2col columns, so that one chunk's columns
# stay in the L2 cache between the copy that makes them and the GEMM that reads them.
CHUNK_BYTES = 1 << 21


@noalias_njit
def _im2col_chunk(xp, n0, kh_in, kw_in, s_in, ho_in, wo_in, cols):
    """``cols [m, C*kh*kw, Ho*Wo]``: image ``n0 + n``'s im2col matrix in NCHW order,
    ``cols[n, (c*kh + i)*kw + j, y*Wo + x] = xp[n0 + n, c, s*y + i, s*x + j]``. Unsigned indices:
    no negative-index checks, so the copy runs 2-4x faster than NumPy's copy of the strided view."""
    m, ch = cols.shape[0], xp.shape[1]
    kh, kw, s = uint64(kh_in), uint64(kw_in), uint64(s_in)
    ho, wo = uint64(ho_in), uint64(wo_in)
    for n in range(uint64(m)):
        src_n = uint64(n0) + n
        for c in range(uint64(ch)):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    for y in range(ho):
                        for x in range(wo):
                            cols[n, row, y * wo + x] = xp[src_n, c, s * y + i, s * x + j]


def _chunks(xp, kh, kw, s, ho, wo):
    """``(n0, cols)`` per chunk of images: ``cols [n, C*kh*kw, Ho*Wo]``, each image's im2col
    matrix in NCHW order (rows ``(c, i, j)``, columns ``(y, x)``), one buffer reused."""
    n, c = xp.shape[:2]
    step = max(1, CHUNK_BYTES // (c * kh * kw * ho * wo * xp.itemsize))
    buf = np.empty((min(step, n), c * kh * kw, ho * wo), xp.dtype)
    for n0 in range(0, n, step):
        cols = buf[:min(step, n - n0)]
        _im2col_chunk(xp, n0, kh, kw, s, ho, wo, cols)
        yield n0, cols


def _gemm_conv(xp, w, s, ho, wo):
    """``out [N, C_out, Ho, Wo]`` of the padded input ``xp`` and ``w``, without bias: one GEMM
    per image, ``W [C_out, C*kh*kw] @ cols_n``, written straight into NCHW."""
    c_out, _, kh, kw = w.shape
    out = np.empty((len(xp), c_out, ho * wo), xp.dtype)
    wm = w.reshape(c_out, -1)
    for n0, cols in _chunks(xp, kh, kw, s, ho, wo):
        np.matmul(wm, cols, out=out[n0:n0 + len(cols)])     # stacked: one BLAS GEMM per image
    return out.reshape(len(xp), c_out, ho, wo)


def _pad(x, p):
    """``x`` zero-padded by ``p`` on both sides of H and W (a copy; ``np.pad`` costs 3x more)."""
    if not p:
        return np.ascontiguousarray(x)
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * p, w + 2 * p), x.dtype)
    xp[:, :, p:p + h, p:p + w] = x
    return xp


def conv2d_forward(x, w, b, stride=1, padding=0, direct=False):
    """Same arguments and output as ``minidress.nn.layers.conv2d_forward_reference``; the cache
    holds the padded input instead of the im2col matrix. ``direct``: run the direct loops (True)
    instead of the GEMMs (the default: faster on every layer measured).

    Per-image GEMMs: ``out[n] = W [C_out, C*kh*kw] @ cols_n``, where
    ``cols_n`` is image ``n``'s im2col matrix taken from a strided view of the padded input, a
    chunk of images at a time (``CHUNK_BYTES``): each GEMM writes NCHW directly, with no
    transpose, and no batch-sized im2col matrix is ever made. Otherwise the direct loops."""
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    xp, wc = _pad(x, padding), np.ascontiguousarray(w)
    bc = np.ascontiguousarray(np.broadcast_to(b, (c_out,)), dtype=x.dtype)
    if direct:
        out = np.empty((n, c_out, ho, wo), x.dtype)
        _conv_forward(xp, wc, bc, stride, ho, wo, out)
    else:
        out = _gemm_conv(xp, wc, stride, ho, wo)
        if bc.any():        # no bias (b = 0): skip a pass over the output; x + 0 is x, up to the
            out += bc[:, None, None]        # sign of a zero (-0.0 + 0 = +0.0)
    return out, (x.shape, xp, wc, stride, padding, direct)


def conv2d_backward(dout, cache, input_grad=True):
    """``dout [N, C_out, Ho, Wo]`` -> ``dx, dw, db``, as ``conv2d_backward_reference``. GEMM path:
    ``dw.T = sum_n cols_n @ dout_n.T`` and ``dcols_n = W.T @ dout_n`` per image (the columns
    copied again from the view: cheaper than keeping a batch of them), ``dcols`` added back into
    the padded input by ``_col2im_add``. (Computing the input gradient at stride 1 as a
    convolution of the padded ``dout`` with the flipped kernel instead, GEMMs and no scatter,
    was as fast or slower on every benchmark layer: 2.5x slower on LeNet-5's first conv.)"""
    x_shape, xp, w, stride, p, direct = cache
    dout = np.ascontiguousarray(dout)
    c_out, c_in, kh, kw = w.shape
    dxp = None          # with input_grad=False, nothing of the input's gradient is computed
    if direct:
        if input_grad:
            dxp = np.empty(xp.shape, dout.dtype)
            _conv_backward_input(dout, w, stride, dxp)
        dw = np.empty(w.shape, dout.dtype)
        _conv_backward_weight(dout, xp, stride, kh, kw, dw)
    else:
        ho, wo = dout.shape[2:]
        d3 = dout.reshape(len(dout), c_out, ho * wo)
        wm = w.reshape(c_out, -1)
        # dw transposed: cols_n @ dout_n.T gives the same sums as dout_n @ cols_n.T (each entry
        # one dot product over Ho*Wo, in the same order; bit for bit on every benchmark layer),
        # and BLAS runs it 1.2-1.6x faster (AMD EPYC, one thread: 189 against 309 us on the
        # small CNN's 32x32 layer at 28x28), as the long dimension is then the output's rows.
        dwt, part = np.zeros(wm.T.shape, dout.dtype), np.empty(wm.T.shape, dout.dtype)
        if input_grad:
            dxp = np.zeros(xp.shape, dout.dtype)
            wmt = np.ascontiguousarray(wm.T)
        for n0, cols in _chunks(xp, kh, kw, stride, ho, wo):
            dc = d3[n0:n0 + len(cols)]
            for i in range(len(cols)):      # NumPy's stacked matmul does not call BLAS with a
                np.matmul(cols[i], dc[i].T, out=part)   # transposed operand (9x slower)
                dwt += part
            if input_grad:
                dcols = np.empty(cols.shape, dout.dtype)
                np.matmul(wmt, dc, out=dcols)
                _col2im_add(dcols.reshape(len(cols), c_in, kh, kw, ho, wo), stride, dxp[n0:n0 + len(cols)])
        dw = np.ascontiguousarray(dwt.T).reshape(w.shape)
    dx = dxp[:, :, p:p + x_shape[2], p:p + x_shape[3]] if p and input_grad else dxp
    return dx, dw, dout.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# Pooling: the reference's sums in the reference's order (bit for bit)
# ---------------------------------------------------------------------------------------------

# The pooling loops index with unsigned integers: a signed index would be checked for negative
# (wrap-around) values at every access, which on 8x8 planes cost more than the pooling itself
# (unsigned: 6-17x faster, the same operations).

@noalias_njit
def _maxpool_forward(x, k_in, s_in, ho, wo, out, arg):
    n_img, ch = x.shape[:2]
    k, s = uint64(k_in), uint64(s_in)     # new names: reassigning would make them float64
    for n in range(n_img):
        nu = uint64(n)
        for c in range(uint64(ch)):
            for y in range(uint64(ho)):
                for xo in range(uint64(wo)):
                    y0, x0 = s * y, s * xo
                    best, besti = x[nu, c, y0, x0], uint64(0)
                    for i in range(k):
                        for j in range(k):
                            v = x[nu, c, y0 + i, x0 + j]
                            # argmax's rule: the first maximum, and the first NaN if any
                            take = (v > best) | ((v != v) & (best == best))
                            besti = i * k + j if take else besti
                            best = v if take else best
                    out[nu, c, y, xo], arg[nu, c, y, xo] = best, besti


@noalias_njit
def _maxpool2_forward(x, out, arg):
    # _maxpool_forward for k = s = 2 (MaxPool2d(2), the models' pooling), unrolled over the two
    # input rows of an output row (1-D slices): 2.4-9x faster than the general loop
    n_img, ch, ho, wo = out.shape
    for n in range(n_img):
        for c in range(ch):
            for y in range(ho):
                r0, r1, o, a = x[n, c, 2 * y], x[n, c, 2 * y + 1], out[n, c, y], arg[n, c, y]
                for xo in range(uint64(wo)):
                    x0 = xo * uint64(2)
                    best, besti = r0[x0], 0
                    for t, v in ((1, r0[x0 + uint64(1)]), (2, r1[x0]), (3, r1[x0 + uint64(1)])):
                        take = (v > best) | ((v != v) & (best == best))     # as _maxpool_forward
                        best, besti = (v, t) if take else (best, besti)
                    o[xo], a[xo] = best, besti


@noalias_njit
def _maxpool_backward(dout, arg, k_in, s_in, dx):
    n_img, ch, ho, wo = dout.shape
    k, s = uint64(k_in), uint64(s_in)     # new names: reassigning would make them float64
    zero = dx.dtype.type(0.0)
    for n in range(n_img):
        nu = uint64(n)
        for c in range(uint64(ch)):
            if k == s:          # windows do not overlap: each input gets 0 + (its gradient or 0)
                if s * uint64(ho) < dx.shape[2] or s * uint64(wo) < dx.shape[3]:
                    dx[n, c] = 0                    # rows or columns no window covers
                for y in range(uint64(ho)):
                    for xo in range(uint64(wo)):
                        g, t = zero + dout[nu, c, y, xo], uint64(arg[nu, c, y, xo])
                        for i in range(k):
                            for j in range(k):
                                dx[nu, c, s * y + i, s * xo + j] = g if t == i * k + j else zero
                continue
            dst = dx[n, c]
            dst[:] = 0
            for i in range(k):           # offsets outermost, as the reference's scatter adds
                for j in range(k):
                    t = i * k + j
                    for y in range(uint64(ho)):
                        for xo in range(uint64(wo)):
                            if uint64(arg[nu, c, y, xo]) == t:
                                dst[s * y + i, s * xo + j] += dout[nu, c, y, xo]


@noalias_njit
def _avgpool_forward(x, k, s, ho, wo, out):
    n_img, ch = x.shape[:2]
    for n in range(n_img):
        for c in range(ch):
            src = x[n, c]
            for y in range(ho):
                for xo in range(wo):
                    total = src.dtype.type(0)
                    for i in range(k):       # NumPy's order: each window row, then the rows
                        row = src.dtype.type(0)
                        for j in range(k):
                            row += src[s * y + i, s * xo + j]
                        total += row
                    out[n, c, y, xo] = total / (k * k)


@noalias_njit
def _avgpool_backward(dout, k, s, dx):
    n_img, ch, ho, wo = dout.shape
    for n in range(n_img):
        for c in range(ch):
            dst, g = dx[n, c], dout[n, c]
            dst[:] = 0
            for i in range(k):
                for j in range(k):
                    for y in range(ho):
                        for xo in range(wo):
                            dst[s * y + i, s * xo + j] += g[y, xo]


ARG_DTYPE = np.uint8       # the max-pool cache's window offsets


def maxpool_forward(x, k=2, stride=None):
    """As ``minidress.nn.layers.maxpool_forward_reference``: the same output, and a cache with the
    same window offsets, held as ``ARG_DTYPE`` (a byte) while a window has at most 256 values."""
    s = k if stride is None else stride
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0)
    # The argmax as one byte while a window holds at most 256 values: as intp (8 bytes per
    # output, twice the bytes of the input read) it made the 2x2 forward 2.5-3x slower (small
    # CNN at batch 128: 5.0 -> 2.0 ms on the 28x28 layer, 5.4 -> 1.8 ms on the 14x14 one; the
    # backward, which reads it, is 1.1x slower with the byte: 2.8 -> 3.2 ms on the 28x28 layer)
    out, arg = np.empty((n, c, ho, wo), x.dtype), np.empty((n, c, ho, wo), ARG_DTYPE if k * k <= 256 else np.intp)
    if k == s == 2:
        _maxpool2_forward(np.ascontiguousarray(x), out, arg)
    else:
        _maxpool_forward(np.ascontiguousarray(x), k, s, ho, wo, out, arg)
    return out, (x.shape, arg, k, s)


def maxpool_backward(dout, cache):
    x_shape, arg, k, s = cache
    dx = np.empty(x_shape, dout.dtype)
    _maxpool_backward(np.ascontiguousarray(dout), arg, k, s, dx)
    return dx


def avgpool_forward(x, k=2, stride=None):
    """As ``minidress.nn.layers.avgpool_forward_reference``."""
    s = k if stride is None else stride
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0)
    out = np.empty((n, c, ho, wo), x.dtype)
    _avgpool_forward(np.ascontiguousarray(x), k, s, ho, wo, out)
    return out, (x.shape, k, s)


def avgpool_backward(dout, cache):
    x_shape, k, s = cache
    dx = np.empty(x_shape, dout.dtype)
    _avgpool_backward(np.ascontiguousarray(dout / (k * k)), k, s, dx)
    return dx


# ---------------------------------------------------------------------------------------------
# Thread policy
# ---------------------------------------------------------------------------------------------

# Measured on the project's 2-core machine while another job used one core (ms per dense
# training step): a second BLAS thread made every model 3-40x slower (digits small CNN at batch
# 64: 37 -> 1050 ms; LeNet-5 at batch 128: 43 -> 121 ms; ``benchmarks/bench_train.py
# --thread-policy``), because a pool's idle threads spin on the cores others need. A second Numba
# thread gave 0.6-1.7x, varying from run to run and between separate processes and interleaved
# rounds in one, so it buys nothing dependable. Idle, a second thread bought at most 10-15%.
# One thread each, then.
TRAINING_THREADS = 1


@contextmanager
def training_threads(n_numba=TRAINING_THREADS, n_blas=TRAINING_THREADS):
    """Run the block with ``n_numba`` threads in the Numba pool (the conv, pooling and
    batch-norm kernels) and ``n_blas`` in BLAS's (the GEMMs and Linear layers; through
    threadpoolctl), restoring both afterwards; ``None`` leaves a pool as it is. The layers run one
    after the other, so the two pools never compute at the same time, but their idle threads
    spin: one thread each (``TRAINING_THREADS``) is the only setting that stays fast when the
    machine is shared."""
    before = numba.get_num_threads()
    if n_numba is not None:
        numba.set_num_threads(n_numba)
    try:
        with threadpool_limits(n_blas, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)

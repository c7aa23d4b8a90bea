"""Training convolutions and pooling without im2col: direct Numba loops over NCHW.

The reference ``conv2d_forward_reference`` (``minidress.nn.layers``) unfolds every receptive
field into ``cols [N*Ho*Wo, C_in*kh*kw]`` (a ``kh*kw``-fold copy of the input), runs one GEMM and
transposes the result; its backward pass runs two more GEMMs and scatters ``dcols`` back with
``col2im``. On the small images and channel counts of this project (LeNet-5, the small CNN, the
16-32-64 ResNet) those copies cost more than the arithmetic, and the GEMMs are too skinny for
BLAS to run at speed. The kernels below compute the same sums directly on the (zero-padded) input:

* forward:          ``out[n, o, y, x]  += w[o, c, i, j] * xp[n, c, s*y + i, s*x + j]``
* input gradient:   ``dxp[n, c, s*y + i, s*x + j] += w[o, c, i, j] * dout[n, o, y, x]``
* weight gradient:  ``dw[o, c, i, j] = sum_{n, y, x} dout[n, o, y, x] * xp[n, c, s*y + i, s*x + j]``

Every innermost loop runs over one output row (``x``), zero-based over a slice, which the
compiler turns into SIMD without ``fastmath`` (the weight gradient accumulates a vector of
partial sums, one per ``x``, and adds them up at the end, so no reduction needs reassociating).
The only copy is the zero padding of the input (``np.pad``, one copy of ``x``).

Parallel loops: the forward pass and the input gradient over images ``n``, the weight gradient
over output channels ``o``. Each output element is written by one thread, in an order that does
not depend on the thread count, so results are the same for any ``numba.set_num_threads``.

Results equal the reference up to the order of the additions (tests: ``tests/test_conv_train.py``,
relative to the largest magnitude, 1e-12 in float64 and 1e-5 in float32). The pooling kernels
follow the reference's order exactly and agree with it bit for bit.

Thread policy for training (``training_threads``): on this project's 2-core machines the Numba
kernels run on the Numba pool and the Linear layers on BLAS, one after the other, never at the
same time; see the README section "Training speed against PyTorch" for the measurement.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange

from ..im2col import conv_output_size


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _conv_forward(xp, w, b, s, ho, wo, out):
    n_img, c_in = xp.shape[:2]
    c_out, _, kh, kw = w.shape
    for n in prange(n_img):
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


@njit(cache=True, parallel=True)
def _conv_backward_input(dout, w, s, dxp):
    n_img, c_out, ho, wo = dout.shape
    _, c_in, kh, kw = w.shape
    for n in prange(n_img):
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


@njit(cache=True, parallel=True)
def _conv_backward_weight(dout, xp, s, kh, kw, dw):
    n_img, c_out, ho, wo = dout.shape
    c_in = xp.shape[1]
    for o in prange(c_out):
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


def direct_wins(x_shape, w_shape, stride, padding):
    """Whether the direct loops beat im2col + BLAS for this layer (measured on 2 cores,
    float32, ``benchmarks/bench_train.py`` shapes): they do at stride 1 for a small fan-in
    (LeNet-5, the first conv of every model, the 16-channel ResNet stage) or wide rows
    (28-pixel rows of the small CNN); BLAS wins on strided and on 7x7/14x14 layers with 32+
    input channels, where the direct loops' rows are short and the GEMM is square enough."""
    c_in, kh, kw = w_shape[1:]
    wo = conv_output_size(x_shape[3], kw, stride, padding)
    return stride == 1 and (c_in * kh * kw <= 160 or wo >= 24)


def _pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else np.ascontiguousarray(x)


def conv2d_forward(x, w, b, stride=1, padding=0):
    """Same arguments and output as ``minidress.nn.layers.conv2d_forward_reference``; the cache
    holds the padded input instead of the im2col matrix."""
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    xp, wc = _pad(x, padding), np.ascontiguousarray(w)
    bc = np.ascontiguousarray(np.broadcast_to(b, (c_out,)), dtype=x.dtype)
    out = np.empty((n, c_out, ho, wo), x.dtype)
    _conv_forward(xp, wc, bc, stride, ho, wo, out)
    return out, (x.shape, xp, wc, stride, padding)


def conv2d_backward(dout, cache):
    """``dout [N, C_out, Ho, Wo]`` -> ``dx, dw, db``, as ``conv2d_backward_reference``."""
    x_shape, xp, w, stride, p = cache
    dout = np.ascontiguousarray(dout)
    dxp = np.empty(xp.shape, dout.dtype)
    _conv_backward_input(dout, w, stride, dxp)
    dw = np.empty(w.shape, dout.dtype)
    _conv_backward_weight(dout, xp, stride, w.shape[2], w.shape[3], dw)
    dx = dxp[:, :, p:p + x_shape[2], p:p + x_shape[3]] if p else dxp
    return dx, dw, dout.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# Pooling: the reference's sums in the reference's order (bit for bit)
# ---------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def _maxpool_forward(x, k, s, ho, wo, out, arg):
    n_img, ch = x.shape[:2]
    for n in prange(n_img):
        for c in range(ch):
            src = x[n, c]
            for y in range(ho):
                for xo in range(wo):
                    best, besti = src[s * y, s * xo], 0
                    for i in range(k):
                        for j in range(k):
                            v = src[s * y + i, s * xo + j]
                            # argmax's rule: the first maximum, and the first NaN if any
                            if v > best or (v != v and best == best):
                                best, besti = v, i * k + j
                    out[n, c, y, xo], arg[n, c, y, xo] = best, besti


@njit(cache=True, parallel=True)
def _maxpool_backward(dout, arg, k, s, dx):
    n_img, ch, ho, wo = dout.shape
    for n in prange(n_img):
        for c in range(ch):
            dst, g, a = dx[n, c], dout[n, c], arg[n, c]
            dst[:] = 0
            for i in range(k):           # offsets outermost, as the reference's scatter adds
                for j in range(k):
                    t = i * k + j
                    for y in range(ho):
                        for xo in range(wo):
                            if a[y, xo] == t:
                                dst[s * y + i, s * xo + j] += g[y, xo]


@njit(cache=True, parallel=True)
def _avgpool_forward(x, k, s, ho, wo, out):
    n_img, ch = x.shape[:2]
    for n in prange(n_img):
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


@njit(cache=True, parallel=True)
def _avgpool_backward(dout, k, s, dx):
    n_img, ch, ho, wo = dout.shape
    for n in prange(n_img):
        for c in range(ch):
            dst, g = dx[n, c], dout[n, c]
            dst[:] = 0
            for i in range(k):
                for j in range(k):
                    for y in range(ho):
                        for xo in range(wo):
                            dst[s * y + i, s * xo + j] += g[y, xo]


def maxpool_forward(x, k=2, stride=None):
    """As ``minidress.nn.layers.maxpool_forward_reference`` (same output and cache)."""
    s = k if stride is None else stride
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, k, s, 0), conv_output_size(w, k, s, 0)
    out, arg = np.empty((n, c, ho, wo), x.dtype), np.empty((n, c, ho, wo), np.intp)
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

@contextmanager
def training_threads(n_numba):
    """Run the block with ``n_numba`` threads in the Numba pool (the conv and pooling kernels),
    restoring the previous count afterwards. BLAS (the Linear layers) keeps its own pool; set it
    before NumPy loads (``OPENBLAS_NUM_THREADS``) or with ``threadpoolctl``. The two pools never
    run at the same time: each layer finishes before the next starts."""
    before = numba.get_num_threads()
    numba.set_num_threads(n_numba)
    try:
        yield
    finally:
        numba.set_num_threads(before)

"""Training-mode batch norm over ``[N, C, H, W]`` in a few Numba passes over the batch, bit for bit.

The NumPy reference (``minidress.nn.layers.batchnorm_forward_reference`` and
``batchnorm_backward_reference``) makes about ten full-size temporaries per call (``x.mean``,
``x.var``'s deviations and squares, ``xhat``, the products of the backward pass); on the small
CNN's 32 x 28 x 28 activations they cost more than the convolution beside them. These kernels
make no temporary beyond the outputs, and reproduce the reference's floating-point operations in
the reference's order, so the results are **identical** (``tests/test_batchnorm_kernel.py``
asserts ``array_equal`` on random shapes in float32 and float64):

* A sum over ``(0, 2, 3)`` is NumPy's (for the inputs ``follows_numpy`` accepts): for each channel ``c``, starting from 0, ``acc += s(n, c)``
  for ``n = 0, 1, ...``, where ``s(n, c)`` is NumPy's pairwise sum of the contiguous plane
  ``[n, c, :, :]`` (``_pairwise``: blocks of 8 partial sums up to 128 values, halves above).
* A mean or variance divides by the count in float64 and rounds to the array's type, as
  ``np.mean`` does (``true_divide`` of the sum by an ``intp`` count, ``casting="unsafe"``).
* Every element-wise expression keeps the reference's operand order and dtype (``eps`` and the
  count ``m`` are cast to the array's type first, as NumPy's weak Python scalars are).

The loops are serial: training runs one Numba thread (``conv_train.TRAINING_THREADS``),
and a parallel kernel takes twice as long to compile. Both compile with ``rowsparse.noalias_njit``
(their outputs, which the wrappers allocate, never overlap their inputs).
"""
from __future__ import annotations

import numpy as np
from numba import njit, uint64

from .rowsparse import noalias_njit

PAIRWISE_BLOCK = 128        # NumPy's PW_BLOCKSIZE
NUMPY_BUFSIZE = 8192        # NumPy's reductions sum runs longer than this in buffer-sized pieces
MIN_PLANE = 64              # smaller planes run the reference (kernel_pays)


def follows_numpy(x) -> bool:
    """Whether these kernels add in NumPy's order for ``x``: a C-contiguous ``[N, C, H, W]``
    array with more than one channel (with one, NumPy sums all of ``x`` as one run) whose planes
    fit one buffer of NumPy's iterator."""
    return (x.ndim == 4 and x.flags.c_contiguous and x.shape[1] > 1
            and x.shape[2] * x.shape[3] <= NUMPY_BUFSIZE)


def kernel_pays(x) -> bool:
    """Whether the layer should run these kernels on ``x``: where they follow NumPy's order and
    its planes hold at least ``MIN_PLANE`` values. Measured on the layer functions (batch 64,
    one thread, interleaved rounds; the end-to-end effect is ``benchmarks/bench_train.py``'s):
    2.5-3.3x faster than the reference on 32 x 28 x 28, 1.2-1.9x on 32 x 8 x 8, and 0.6-1.2x on
    64 x 4 x 4, where the per-plane overhead outweighs the reference's temporaries."""
    return follows_numpy(x) and x.shape[2] * x.shape[3] >= MIN_PLANE


@njit(cache=True, inline="always")
def _pairwise_block(a, n):
    """NumPy's pairwise sum of ``a[:n]`` for ``n <= PAIRWISE_BLOCK``: eight partial sums
    (below 8 values, one), combined as a tree, then the remainder in order."""
    if n < 8:
        res = a.dtype.type(-0.0)
        for i in range(n):
            res += a[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    # Unsigned offsets: no negative-index wraparound to check, so the eight sums become one
    # SIMD register (2x faster; the same additions).
    for block in range(uint64(1), uint64(n // 8)):
        i = block * uint64(8)
        r0 += a[i]
        r1 += a[i + uint64(1)]
        r2 += a[i + uint64(2)]
        r3 += a[i + uint64(3)]
        r4 += a[i + uint64(4)]
        r5 += a[i + uint64(5)]
        r6 += a[i + uint64(6)]
        r7 += a[i + uint64(7)]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(n - n % 8, n):
        res += a[i]
    return res


@njit(cache=True)
def _pairwise(a, frames, left):
    """NumPy's pairwise sum of the 1-D ``a``: above ``PAIRWISE_BLOCK`` values, the sum of the
    two halves' sums, the first half's length rounded down to a multiple of 8. The recursion runs
    on an explicit stack, ``frames [depth, 3]`` (start, length, phase) and ``left [depth]`` (a
    finished left half's sum): Numba's cache cannot hold a recursive function."""
    if len(a) <= PAIRWISE_BLOCK:
        return _pairwise_block(a, len(a))
    sp, ret = 0, a.dtype.type(0.0)
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, len(a), 0
    while sp >= 0:
        lo, m = frames[sp, 0], frames[sp, 1]
        if m <= PAIRWISE_BLOCK:                 # a leaf: its sum goes to the parent
            ret = _pairwise_block(a[lo:lo + m], m)
            sp -= 1
            continue
        phase = frames[sp, 2]
        if phase == 2:                          # both halves done: their sum goes up
            ret = left[sp] + ret
            sp -= 1
            continue
        h = m // 2
        h -= h % 8
        if phase == 1:                          # the left half is done: now the right one
            left[sp] = ret
            lo, h = lo + h, m - h
        frames[sp, 2] = phase + 1
        sp += 1
        frames[sp, 0], frames[sp, 1], frames[sp, 2] = lo, h, 0
    return ret


# NumPy's sum over (0, 2, 3) adds each plane's pairwise sum to the channel's total, in order of
# n, starting from 0; the kernels do the same. They walk the planes in memory order (n outer, c
# inner) with one running total per channel: each channel's totals still add its planes in order
# of n, so the sums are the same, and the walk streams through memory instead of jumping from
# plane [n, c] to [n + 1, c] (measured: 1.4x faster on 128 x 32 x 28 x 28, 1.3x on 64 x 16 x 28 x
# 28, even on 64 x 32 x 14 x 14). Element loops run over 1-D slices from 0: indexing the 3-D
# arrays directly keeps the compiler from vectorizing (negative-index checks).

@noalias_njit
def _forward_train(x, gamma, beta, eps, out, xhat, mean, var, inv_std):
    n_img, ch, hw = x.shape
    one, m = x.dtype.type(1.0), np.float64(n_img * hw)
    frames, left = np.empty((64, 3), np.int64), np.empty(64, x.dtype)     # 64 halvings
    dev = np.empty(hw, x.dtype)                      # one plane of (x - mean)**2
    total = np.zeros(ch, x.dtype)
    for n in range(n_img):
        for c in range(ch):
            total[c] += _pairwise(x[n, c], frames, left)
    for c in range(ch):
        mean[c] = x.dtype.type(np.float64(total[c]) / m)   # np.mean: float64 division, then rounded
    total[:] = 0
    for n in range(n_img):
        for c in range(ch):
            src, mu = x[n, c], mean[c]
            for i in range(hw):
                d = src[i] - mu
                dev[i] = d * d
            total[c] += _pairwise(dev, frames, left)
    for c in range(ch):
        var[c] = x.dtype.type(np.float64(total[c]) / m)
        inv_std[c] = one / np.sqrt(var[c] + eps)
    for n in range(n_img):
        for c in range(ch):
            mu, s, g, b = mean[c], inv_std[c], gamma[c], beta[c]
            src, h, o = x[n, c], xhat[n, c], out[n, c]
            for i in range(hw):
                h[i] = (src[i] - mu) * s
                o[i] = h[i] * g + b


@noalias_njit
def _backward_train(dout, xhat, gamma, inv_std, dx, dgamma, dbeta):
    n_img, ch, hw = dout.shape
    mf = dout.dtype.type(n_img * hw)
    frames, left = np.empty((64, 3), np.int64), np.empty(64, dout.dtype)
    prod, dxhat, dxhat_xhat = np.empty(hw, dout.dtype), np.empty(hw, dout.dtype), np.empty(hw, dout.dtype)
    s1, s2 = np.zeros(ch, dout.dtype), np.zeros(ch, dout.dtype)
    dbeta[:] = 0
    dgamma[:] = 0
    for n in range(n_img):
        for c in range(ch):
            d, h, g = dout[n, c], xhat[n, c], gamma[c]
            for i in range(hw):
                prod[i] = d[i] * h[i]
                dxhat[i] = d[i] * g
                dxhat_xhat[i] = dxhat[i] * h[i]
            dbeta[c] += _pairwise(d, frames, left)          # dout.sum
            dgamma[c] += _pairwise(prod, frames, left)      # (dout * xhat).sum
            s1[c] += _pairwise(dxhat, frames, left)         # dxhat.sum
            s2[c] += _pairwise(dxhat_xhat, frames, left)    # (dxhat * xhat).sum
    for n in range(n_img):
        for c in range(ch):
            d, h, o = dout[n, c], xhat[n, c], dx[n, c]
            g, k, a, b = gamma[c], inv_std[c] / mf, s1[c], s2[c]
            for i in range(hw):
                o[i] = k * ((mf * (d[i] * g) - a) - h[i] * b)


def batchnorm_forward_train(x, gamma, beta, eps=1e-5):
    """Training-mode forward of ``x [N, C, H, W]`` with the batch's statistics.

    Returns
    -------
    out, xhat : ndarray [N, C, H, W], the output and the normalised input
    mean, var, inv_std : ndarray [C], the batch mean, biased variance and ``1 / sqrt(var + eps)``
    """
    n, c, h, w = x.shape
    x3 = np.ascontiguousarray(x).reshape(n, c, h * w)
    out, xhat = np.empty_like(x3), np.empty_like(x3)
    mean, var, inv_std = (np.empty(c, x.dtype) for _ in range(3))
    _forward_train(x3, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), x.dtype.type(eps),
                   out, xhat, mean, var, inv_std)
    return out.reshape(x.shape), xhat.reshape(x.shape), mean, var, inv_std


def batchnorm_backward_train(dout, xhat, gamma, inv_std):
    """``dout, xhat [N, C, H, W]`` -> ``dx [N, C, H, W], dgamma [C], dbeta [C]`` of the
    training-mode forward (the batch statistics depend on x)."""
    n, c, h, w = dout.shape
    d3 = np.ascontiguousarray(dout).reshape(n, c, h * w)
    dx = np.empty_like(d3)
    dgamma, dbeta = np.empty(c, dout.dtype), np.empty(c, dout.dtype)
    _backward_train(d3, np.ascontiguousarray(xhat).reshape(n, c, h * w), np.ascontiguousarray(gamma),
                    inv_std, dx, dgamma, dbeta)
    return dx.reshape(dout.shape), dgamma, dbeta

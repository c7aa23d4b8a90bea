"""ReLU's forward and backward in one pass each, bit for bit NumPy's.

The reference (``minidress.nn.layers.relu_forward_reference``) is ``np.maximum(x, 0)``, and its
backward is ``dout * (out > 0)``: the output itself serves as the mask (``out > 0`` exactly where
``x > 0``: a positive ``x`` is kept, everything else becomes ``+0`` or stays NaN), so no boolean
mask is stored. (Before these kernels the layer also computed and kept ``x > 0``: one more pass
and one more array per ReLU.) The kernels read each input once and write each output once; the
backward one compares and multiplies in the same pass, where NumPy first writes the comparison
and then casts it inside the product.

Every value equals NumPy's, bit for bit, special values included (``tests/test_relu_kernel.py``
compares the bytes):

* forward, ``np.maximum(x, 0)``: a positive ``x`` (``+inf`` too) is kept, ``NaN`` is kept as it
  is, everything else (negative numbers, ``-inf``, ``-0.0``) becomes ``+0.0``;
* backward, ``dout * (x > 0)``: NumPy casts the mask to ``1.0`` or ``0.0`` and multiplies, so a
  dropped negative ``dout`` gives ``-0.0`` and a dropped ``NaN`` or infinite one gives ``NaN``;
  the kernel multiplies by the same ``1.0`` or ``0.0`` (fastmath stays off, so the multiply by
  zero is not folded away).

Measured with ``benchmarks/bench_layers.py`` (one thread, float32, AMD EPYC), on the small CNN's
and the ResNet's activations: 3.1-4.4x faster than the reference forward, 1.8-2.2x backward
(1.1-2.0x on a strided gradient); about 2% of a whole training step (``bench_train.py``'s
models, the old and new ReLU interleaved in one process).
"""
from __future__ import annotations

import numpy as np

from .rowsparse import noalias_njit

DTYPES = (np.float32, np.float64)


def kernel_applies(x) -> bool:
    """Whether ``x`` runs the kernels: a float32 or float64 array of at most 4 dimensions, any
    strides (a convolution's input gradient arrives as a view into its padded buffer)."""
    return x.dtype in DTYPES and x.ndim <= 4


def _as_4d(*arrays):
    """Views of ``arrays`` (one shape) with 4 axes for the kernels' loops: one long row when all
    are C-contiguous (short rows, 7 x 7 planes, cost 2x in loop overhead), else leading axes of
    length 1 added."""
    if all(a.flags.c_contiguous for a in arrays):
        return [a.reshape(1, 1, 1, -1) for a in arrays]
    return [a[(None,) * (4 - a.ndim)] for a in arrays]


# Each loop nest runs over the last axis innermost, over 1-D rows from 0: the rows are contiguous
# in every array the layers pass, which the compiler turns into SIMD.

@noalias_njit
def _relu_forward(x, out):
    zero = x.dtype.type(0)
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            for c in range(x.shape[2]):
                src, dst = x[a, b, c], out[a, b, c]
                for i in range(src.shape[0]):
                    v = src[i]
                    dst[i] = v if (v > zero or v != v) else zero   # v != v: NaN passes, as in np.maximum


@noalias_njit
def _relu_backward(dout, out, dx):
    zero, one = dout.dtype.type(0), dout.dtype.type(1)
    for a in range(dout.shape[0]):
        for b in range(dout.shape[1]):
            for c in range(dout.shape[2]):
                d, o, g = dout[a, b, c], out[a, b, c], dx[a, b, c]
                for i in range(d.shape[0]):
                    g[i] = d[i] * (one if o[i] > zero else zero)


def relu_forward(x):
    """``max(x, 0)`` of a float array ``x`` of at most 4 dimensions: a new C-contiguous array."""
    out = np.empty(x.shape, x.dtype)
    _relu_forward(*_as_4d(x, out))
    return out


def relu_backward(dout, out):
    """``dout * (out > 0)``, with ``out`` the forward's output (``out > 0`` where ``x > 0``);
    ``dout`` and ``out`` of one shape and dtype, at most 4 dimensions, any strides."""
    dx = np.empty(dout.shape, dout.dtype)
    _relu_backward(*_as_4d(dout, out, dx))
    return dx

"""im2col: every receptive field of an image batch as one row (or column) of a matrix.

A convolution becomes one matrix product over these rows, which is how ``minidress.nn.layers``
trains convolutions (batch-major, ``[N, C, H, W]``) and how the deployed model runs them through
the row-sparse kernels (feature-major, ``[C, N, H, W]``). A leaf module, as CS231n keeps its
``im2col.py``: it imports nothing from minidress, so the layers and the kernels can both use it.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def conv_output_size(size: int, k: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - k) // stride + 1
    if out < 1:
        raise ValueError(f"kernel {k} with stride {stride} and padding {padding} does not fit "
                         f"an input of size {size}")
    return out


def receptive_fields(x, kh, kw, stride=1, padding=0):
    """Every ``kh x kw`` window of the last two axes of ``x [A, B, H, W]`` after zero padding,
    as a view ``[A, B, Ho, Wo, kh, kw]``; also returns ``(Ho, Wo)``. The layout of the first two
    axes is the caller's: ``[N, C]`` for ``im2col``, ``[C, N]`` for the feature-major kernels."""
    h, w = x.shape[2:]
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :ho, :wo]
    return win, (ho, wo)


def im2col(x, kh, kw, stride=1, padding=0):
    """Unfold every receptive field of ``x`` into one row.

    Parameters
    ----------
    x : ndarray [N, C, H, W]

    Returns
    -------
    cols : ndarray [N*Ho*Wo, C*kh*kw]
        Columns ordered (c, i, j), the same order as ``weight.reshape(C_out, -1)``, so one
        weight row meets one receptive field.
    (Ho, Wo) : output height and width
    """
    n, c = x.shape[:2]
    win, (ho, wo) = receptive_fields(x, kh, kw, stride, padding)
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
    return cols, (ho, wo)


def col2im(dcols, x_shape, kh, kw, stride=1, padding=0):
    """Adjoint of ``im2col``: add every row of ``dcols [N*Ho*Wo, C*kh*kw]`` back into
    ``dx [N, C, H, W]`` (overlapping windows add up)."""
    n, c, h, w = x_shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    d = dcols.reshape(n, ho, wo, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # [N, C, kh, kw, Ho, Wo]
    dxp = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dcols.dtype)
    # One strided add per kernel offset: kh*kw vectorised adds instead of N*Ho*Wo small ones.
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += d[:, :, i, j]
    return dxp[:, :, padding:padding + h, padding:padding + w] if padding else dxp


def im2col_cnhw(x, kh, kw, stride=1, padding=0):
    """Unfold every receptive field of ``x [C, N, H, W]`` into a column.

    Returns
    -------
    cols : ndarray [C*kh*kw, N*Ho*Wo], C-contiguous
    (Ho, Wo) : output height and width
    """
    c, n = x.shape[:2]
    win, (ho, wo) = receptive_fields(x, kh, kw, stride, padding)
    cols = np.ascontiguousarray(win.transpose(0, 4, 5, 1, 2, 3)).reshape(c * kh * kw, n * ho * wo)
    return cols, (ho, wo)

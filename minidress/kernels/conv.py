"""Row-sparse convolution, feature-major: im2col onto the row-sparse product.

Images are kept channel-major, ``[C, N, H, W]`` ("CNHW"), through a deployed network. Then
im2col gives ``cols [C*kh*kw, N*Ho*Wo]``, which is already the feature-major input that
``rowsparse_matmul`` wants (one receptive field per column, in the ``(c, i, j)`` order of
``weight.reshape(C_out, -1)``), and its output ``[C_out, N*Ho*Wo]`` is already CNHW again: no
transpose anywhere between layers.
"""
from __future__ import annotations

from ..im2col import im2col_cnhw
from .rowsparse import rowsparse_matmul, rowsparse_matmul_reference


def _conv(product, values, cols, k, x, kh, kw, stride, padding):
    if x.ndim != 4:
        raise ValueError(f"x must be [C_in, N, H, W] (channel-major), got shape {x.shape}")
    xcols, (ho, wo) = im2col_cnhw(x, kh, kw, stride, padding)
    return product(values, cols, k, xcols).reshape(values.shape[0], x.shape[1], ho, wo)


def rowsparse_conv2d_reference(values, cols, k, x, kh, kw, stride=1, padding=0):
    """Convolution of ``x [C_in, N, H, W]`` with a row-sparse weight (rows = output channels,
    columns = ``C_in*kh*kw``) at prefix length ``k``; returns ``[C_out, N, Ho, Wo]``. No bias."""
    return _conv(rowsparse_matmul_reference, values, cols, k, x, kh, kw, stride, padding)


def rowsparse_conv2d(values, cols, k, x, kh, kw, stride=1, padding=0):
    """Numba version of ``rowsparse_conv2d_reference``: same arguments, same result bit for bit."""
    return _conv(rowsparse_matmul, values, cols, k, x, kh, kw, stride, padding)

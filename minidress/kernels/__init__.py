"""Numba kernels for row-sparse products, each beside its NumPy reference (``rowsparse``), and
the feature-major convolution built on them (``conv``)."""
from .conv import im2col_cnhw, rowsparse_conv2d, rowsparse_conv2d_reference
from .rowsparse import (rowsparse_matmul, rowsparse_matmul_grads, rowsparse_matmul_grads_reference,
                        rowsparse_matmul_reference, rowsparse_matvec, rowsparse_matvec_reference)

__all__ = ["rowsparse_matvec", "rowsparse_matvec_reference", "rowsparse_matmul",
           "rowsparse_matmul_reference", "im2col_cnhw", "rowsparse_conv2d",
           "rowsparse_conv2d_reference", "rowsparse_matmul_grads", "rowsparse_matmul_grads_reference"]

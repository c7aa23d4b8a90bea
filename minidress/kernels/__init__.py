"""Numba kernels for row-sparse products, each beside its NumPy reference (``rowsparse``), and
the feature-major convolution built on them (``conv``).

Importing this package first drops Numba cache files compiled from other versions of its sources (``_cache``).
"""
from . import _cache  # noqa: F401  (before any kernel module is compiled or loaded)
from .conv import rowsparse_conv2d, rowsparse_conv2d_reference
from .rowsparse import (index_dtype, rowsparse_matmul, rowsparse_matmul_grads, rowsparse_matmul_grads_reference,
                        rowsparse_matmul_reference, rowsparse_matvec, rowsparse_matvec_reference)

__all__ = ["rowsparse_matvec", "rowsparse_matvec_reference", "rowsparse_matmul",
           "rowsparse_matmul_reference", "index_dtype", "rowsparse_conv2d",
           "rowsparse_conv2d_reference", "rowsparse_matmul_grads", "rowsparse_matmul_grads_reference"]

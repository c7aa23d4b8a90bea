"""Matrix products inside compiled code, through NumPy's own BLAS.

Inside a Numba function ``np.dot`` calls the BLAS that SciPy ships (Numba takes its functions
from ``scipy.linalg.cython_blas``), which is a separate copy of OpenBLAS from the one NumPy
loads, and can be a different version. On an AMD EPYC (Zen 4) SciPy's OpenBLAS 0.3.30 ran the
thin products of a convolution at batch 32 1.3-1.4x slower than NumPy's 0.3.31 (6x25 @ 25x25088:
272 against 195 us; 16x150 @ 150x3200: 277 against 200 us), which made the compiled LeNet-5 at
density 1 slower than the same network run by NumPy. ``gemm`` calls NumPy's library instead: its
``cblas_?gemm`` is found among the libraries NumPy has loaded (``threadpoolctl``), loaded into
LLVM's symbol table (``llvmlite.binding.load_library_permanently``) and declared as an external
function, so compiled code calls it by name and Numba's on-disk cache stays valid.

Where it is not found (a NumPy built against another BLAS, or JIT off), ``gemm`` is ``np.dot``
as before. ``BACKEND`` names the choice; ``_cache`` counts it among the sources, so a cache
compiled for one choice is never loaded under the other. That guard covers only the cache in
this package's ``__pycache__``, so the external call is compiled only when Numba caches there:
not with ``NUMBA_CACHE_DIR`` set, nor in a read-only install (Numba then caches in the user's
directory, which no guard watches, and code calling a symbol that another process never
loaded would crash it). One-sample products stay ``np.dot`` (a matrix-vector product).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
from numba import config, njit, types
from threadpoolctl import threadpool_info

# ILP64 CBLAS names of the OpenBLAS builds in NumPy's wheels (NumPy 2: scipy-openblas64; 1.x:
# openblas64_), each with 64-bit integer arguments.
SYMBOLS = (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), ("cblas_sgemm64_", "cblas_dgemm64_"))
ROW_MAJOR, NO_TRANS = 101, 111                     # CblasRowMajor, CblasNoTrans


def _numba_caches_in_package() -> bool:
    """Whether Numba writes this package's cache into its own ``__pycache__`` (the one ``_cache``
    guards): no ``NUMBA_CACHE_DIR``, and a writable package folder."""
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    return not config.CACHE_DIR and os.access(pycache if pycache.exists() else here, os.W_OK)


def _numpy_blas():
    """``(path, (sgemm name, dgemm name))`` of the BLAS that NumPy loaded, or None."""
    if config.DISABLE_JIT or not _numba_caches_in_package():
        return None
    try:
        home = Path(np.__file__).resolve().parent
        for info in threadpool_info():
            path = Path(info.get("filepath", "")).resolve()
            # numpy.libs (Linux, Windows) beside the package, or numpy/.dylibs (macOS) in it
            if info.get("user_api") != "blas" or home.parent not in path.parents \
                    or not path.parent.name.startswith(("numpy", ".dylibs")):
                continue
            lib = ctypes.CDLL(str(path))
            for names in SYMBOLS:
                if all(hasattr(lib, name) for name in names):
                    return str(path), names
    except (OSError, AttributeError):
        pass
    return None


_found = _numpy_blas()
if _found:
    try:
        llvm.load_library_permanently(_found[0])
    except RuntimeError:           # llvmlite's error when the library cannot be loaded
        _found = None
BACKEND = f"numpy cblas ({_found[1][0]} in {Path(_found[0]).name})" if _found else "numba np.dot"

if _found:
    _i64, _ptr = types.int64, types.voidptr

    def _declare(name, real):
        return types.ExternalFunction(name, types.void(types.int32, types.int32, types.int32, _i64, _i64,
                                                       _i64, real, _ptr, _i64, _ptr, _i64, real, _ptr, _i64))
    _sgemm, _dgemm = _declare(_found[1][0], types.float32), _declare(_found[1][1], types.float64)

    @njit(cache=True, inline="always")
    def gemm(a, b):
        """``a [m, k] @ b [k, n]`` (C-contiguous, float32 or float64) by NumPy's BLAS."""
        if not (a.flags.c_contiguous and b.flags.c_contiguous) or a.size == 0 or b.size == 0:
            return np.dot(a, b)         # strided, or empty (nothing for BLAS to do)
        m, k = a.shape
        n = b.shape[1]
        out = np.empty((m, n), a.dtype)
        if a.itemsize == 4:                 # float32 (the store holds float32 or float64)
            _sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, np.float32(1), a.ctypes, k, b.ctypes, n,
                   np.float32(0), out.ctypes, n)
        else:
            _dgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1.0, a.ctypes, k, b.ctypes, n, 0.0, out.ctypes, n)
        return out
else:
    @njit(cache=True, inline="always")
    def gemm(a, b):
        """``a [m, k] @ b [k, n]`` by ``np.dot`` (SciPy's BLAS under Numba)."""
        return np.dot(a, b)

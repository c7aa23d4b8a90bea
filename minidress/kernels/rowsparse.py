"""Row-sparse products: the kernels a deployed DRESS model runs.

A row-sparse layer is two arrays of the same shape ``[rows, kmax]``:

* ``values[r, j]``: the j-th stored weight of row ``r``;
* ``cols[r, j]``: its column (input feature), an unsigned integer of the narrowest type that
  holds the row length (``uint8`` for rows of up to 256 entries, then ``uint16``, ...).

The product at prefix length ``k`` uses the first ``k`` entries of every row and nothing else,
so switching density is changing one integer. Every row has the same ``k``: the load is the same
for every row, which is what lets the loops below run without any bookkeeping.

Activations are **feature-major**, ``[features, batch]``: the kernel adds ``v * xt[col, :]``
into ``yt[row, :]``, a contiguous stretch that the compiler turns into SIMD over the batch.
(Batch-major input would make every kept weight a strided gather across the batch.) Dense BLAS
does not care about the layout, so a whole network can stay feature-major from input to logits.

Each kernel sits beside its NumPy reference, with one signature. The reference loops over the
kept entries in the same order and accumulates the same way (a multiply, then an add; with
``fastmath`` off the compiler may not fuse them), so kernel and reference agree **bit for bit**.

Shapes
------
values : [rows, kmax] float32 or float64
cols   : [rows, kmax] unsigned integer, every entry < in_features
x      : [in_features]            (``rowsparse_matvec``)
xt     : [in_features, batch]     (``rowsparse_matmul``), C-contiguous

The public functions check their arguments (shapes, dtypes, index range) and then call the
compiled loops; ``minidress.deploy.runtime`` validates a store once, at load, and then calls them with
``check=False``.

Training (``minidress.nn.layers.Linear`` with ``kept``) runs the forward product and the input
gradient here wherever ``rowsparse_wins`` measured them faster than dense masked BLAS products,
per layer shape, batch and dtype, once per process (``CROSSOVER``); ``ROUTING`` forces a path.
"""
from __future__ import annotations

import time

import numpy as np
from llvmlite import binding as llvm
from numba import get_num_threads, njit, prange
from numba.core import config as numba_config
from numba.core import lowering, typed_passes
from numba.core.compiler import Compiler, DefaultPassBuilder
from numba.core.compiler_machinery import register_pass
from numba.core.registry import cpu_target


class _NoAliasCompiler(Compiler):
    """Numba's standard compiler with the ``noalias`` flag on: every array argument is marked
    ``noalias`` for LLVM, which then vectorizes loops that store into one argument while
    reading others, without run-time overlap checks (``minidress.kernels.serving`` explains
    the measurement). Defined here, not in ``serving``, because ``serving`` imports this module."""

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags = flags.copy()
        flags.noalias = True
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)


def noalias_njit(fn):
    """``njit(cache=True)`` promising LLVM that no two array arguments of ``fn`` overlap: the
    caller must never pass an output that overlaps an input."""
    return njit(cache=True, pipeline_class=_NoAliasCompiler)(fn)


def no_gather_features():
    """The target features Numba compiles for, plus LLVM's ``prefer-no-gather``, or None where
    that does not apply: not an x86-64 target, an LLVM older than 17 (which lacks the tuning),
    or a Numba whose codegen does not say its features.

    With ``prefer-no-gather`` LLVM still vectorizes a loop that reads ``x[c[r]]``, but loads
    each entry on its own and assembles the vector instead of issuing a gather instruction.
    Which is faster depends on the processor: ``serving.matvec_t_no_gather`` is compiled so,
    and the deployed model measures it against ``matvec_t`` per layer before its first request."""
    codegen = cpu_target.target_context.codegen()
    features = getattr(codegen, "_tm_features", None)     # what every Numba function gets
    if not isinstance(features, str) or llvm.llvm_version_info < (17,) \
            or not llvm.get_process_triple().startswith("x86_64"):
        return None
    return (features + ",+prefer-no-gather").lstrip(",")     # "" (a generic CPU): the tuning alone


class _NoGatherLower(lowering.Lower):
    """Numba's lowering, with the function asked to compile under ``no_gather_features``: a
    function's ``target-features`` attribute replaces the target's features for that function
    alone, so nothing else Numba compiles in the process changes."""

    def post_lower(self):
        super().post_lower()
        features, attributes = no_gather_features(), self.function.attributes
        # llvmlite's attribute set takes known names only; a string attribute goes in as the set
        # element it prints as. Anything unexpected: no attribute, the loop as matvec_t's.
        if features is not None and isinstance(attributes, set):
            set.add(attributes, f'"target-features"="{features}"')


@register_pass(mutates_CFG=True, analysis_only=False)
class _NoGatherNativeLowering(typed_passes.NativeLowering):
    _name = "minidress_no_gather_native_lowering"

    @property
    def lowering_class(self):
        return _NoGatherLower


class _NoAliasNoGatherCompiler(_NoAliasCompiler):
    """``_NoAliasCompiler`` whose lowering asks for no gather instructions (``_NoGatherLower``)."""

    def define_pipelines(self):
        pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
        passes = [cls for cls, _ in pm.passes]
        if typed_passes.NativeLowering in passes:      # else a Numba we do not know: gathers stay
            i = passes.index(typed_passes.NativeLowering)
            pm.passes[i] = (_NoGatherNativeLowering, pm.passes[i][1])
            pm.finalize()
        return [pm]


def noalias_no_gather_njit(fn):
    """``noalias_njit`` compiling ``fn`` without gather instructions (``no_gather_features``)."""
    return njit(cache=True, pipeline_class=_NoAliasNoGatherCompiler)(fn)

# Below this many multiply-adds a product runs on one thread: waking the thread pool costs a
# few microseconds, more than the work it would share (on 2 cores: 300x784 at density 0.05,
# 11.7k MACs, ran as fast on one thread as on two; at 0.1, 23.4k MACs, two were 1.5x faster).
PARALLEL_MIN_WORK = 1 << 14
# Column blocks of the batched product (see rowsparse_matmul). For a 64x576 conv on 16384
# columns, 4 MiB blocks (1820 columns) halved the time against one block of 37 MiB.
BLOCK_BYTES = 1 << 22


def index_dtype(row_len: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every column index of a row."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if row_len - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)



# ---------------------------------------------------------------------------------------------
# One sample (batch 1): a dot product per row, gathering the inputs it needs
# ---------------------------------------------------------------------------------------------

def rowsparse_matvec_reference(values, cols, k, x):
    """``y[r] = sum_{j<k} values[r, j] * x[cols[r, j]]``; ``x [in]`` -> ``y [rows]``."""
    y = np.zeros(values.shape[0], values.dtype)
    for j in range(k):
        y += values[:, j] * x[cols[:, j]]
    return y


@njit(cache=True)
def _matvec_rows(values, cols, k, x, y, r0, r1):
    # Four rows at a time: four independent chains of additions keep the core busy while each
    # waits for its previous add. Every row still adds its entries in order j = 0, 1, ..., k-1.
    zero = values.dtype.type(0)
    r = r0
    while r + 4 <= r1:
        a0 = a1 = a2 = a3 = zero
        for j in range(k):
            a0 += values[r, j] * x[cols[r, j]]
            a1 += values[r + 1, j] * x[cols[r + 1, j]]
            a2 += values[r + 2, j] * x[cols[r + 2, j]]
            a3 += values[r + 3, j] * x[cols[r + 3, j]]
        y[r], y[r + 1], y[r + 2], y[r + 3] = a0, a1, a2, a3
        r += 4
    for r in range(r, r1):
        a = zero
        for j in range(k):
            a += values[r, j] * x[cols[r, j]]
        y[r] = a


@njit(cache=True, parallel=True)
def _matvec_parallel(values, cols, k, x, y, n_chunks):
    rows = values.shape[0]
    for c in prange(n_chunks):
        _matvec_rows(values, cols, k, x, y, c * rows // n_chunks, (c + 1) * rows // n_chunks)


def rowsparse_matvec(values, cols, k, x, out=None, check=True):
    """Numba kernel of ``rowsparse_matvec_reference``; same arguments, same result bit for bit.

    Parameters
    ----------
    values, cols : [rows, kmax]
    k : int, 0 <= k <= kmax
    x : [in_features], dtype of ``values``
    out : [rows], optional, written in place
    check : bool
        Validate the arguments (``check_rowsparse``). Pass False only for arrays validated
        before: the compiled loops do not check bounds.

    Returns
    -------
    y : [rows]
    """
    if check:
        check_rowsparse(values, cols, k, x, 1)
    rows = values.shape[0]
    y = np.empty(rows, values.dtype) if out is None else out
    if rows * k >= PARALLEL_MIN_WORK and rows > 1:
        _matvec_parallel(values, cols, k, x, y, min(rows, get_num_threads()))
    else:
        _matvec_rows(values, cols, k, x, y, 0, rows)
    return y


# ---------------------------------------------------------------------------------------------
# A batch, feature-major: row r of the output is a sum of k scaled input rows
# ---------------------------------------------------------------------------------------------

def rowsparse_matmul_reference(values, cols, k, xt):
    """``yt[r, :] = sum_{j<k} values[r, j] * xt[cols[r, j], :]``; ``xt [in, B]`` -> ``yt [rows, B]``.

    Equal to ``(W * M) @ xt`` for the dense matrix ``W`` whose row ``r`` holds ``values[r, :k]``
    at columns ``cols[r, :k]`` (``M`` its mask), up to the order of the additions.
    """
    yt = np.zeros((values.shape[0], xt.shape[1]), values.dtype)
    for j in range(k):
        yt += values[:, j, None] * xt[cols[:, j]]
    return yt


@noalias_njit       # yt never overlaps the inputs (see serving.noalias_njit): SIMD without checks
def _matmul_rows(values, cols, k, xt, yt, r0, r1, b0, b1):
    # Eight kept entries per pass over the output row: the row is loaded and stored once per
    # eight input rows instead of once per input row. The additions keep their order, written
    # out in full, so the result is bit for bit that of one entry per pass (and the reference).
    n = b1 - b0
    for r in range(r0, r1):
        y = yt[r, b0:b1]
        for b in range(n):
            y[b] = 0
        j = 0
        while j + 8 <= k:
            v0, v1, v2, v3 = values[r, j], values[r, j + 1], values[r, j + 2], values[r, j + 3]
            v4, v5, v6, v7 = values[r, j + 4], values[r, j + 5], values[r, j + 6], values[r, j + 7]
            x0, x1 = xt[cols[r, j], b0:b1], xt[cols[r, j + 1], b0:b1]
            x2, x3 = xt[cols[r, j + 2], b0:b1], xt[cols[r, j + 3], b0:b1]
            x4, x5 = xt[cols[r, j + 4], b0:b1], xt[cols[r, j + 5], b0:b1]
            x6, x7 = xt[cols[r, j + 6], b0:b1], xt[cols[r, j + 7], b0:b1]
            for b in range(n):      # zero-based over slices: this is the loop that vectorizes
                y[b] = (((((((y[b] + v0 * x0[b]) + v1 * x1[b]) + v2 * x2[b]) + v3 * x3[b])
                         + v4 * x4[b]) + v5 * x5[b]) + v6 * x6[b]) + v7 * x7[b]
            j += 8
        for j in range(j, k):
            v = values[r, j]
            xr = xt[cols[r, j], b0:b1]
            for b in range(n):
                y[b] += v * xr[b]


@njit(cache=True, parallel=True)
def _matmul_parallel(values, cols, k, xt, yt, n_chunks, block):
    rows, n = values.shape[0], xt.shape[1]
    for b0 in range(0, n, block):
        for c in prange(n_chunks):
            _matmul_rows(values, cols, k, xt, yt, c * rows // n_chunks, (c + 1) * rows // n_chunks,
                         b0, min(n, b0 + block))


def rowsparse_matmul(values, cols, k, xt, out=None, check=True):
    """Numba kernel of ``rowsparse_matmul_reference``; same arguments, same result bit for bit.

    Parallel over blocks of rows (each thread writes its own rows of ``yt``: no races, no locks).

    Parameters
    ----------
    values, cols : [rows, kmax]
    k : int, 0 <= k <= kmax
    xt : [in_features, batch], C-contiguous, dtype of ``values``
    out : [rows, batch], optional, written in place; must not overlap ``xt``
    check : bool, as in ``rowsparse_matvec``

    Returns
    -------
    yt : [rows, batch]
    """
    if check:
        check_rowsparse(values, cols, k, xt, 2)
    rows, n = values.shape[0], xt.shape[1]
    if out is not None and np.may_share_memory(out, xt):
        raise ValueError("out must not overlap xt (the compiled loop assumes it does not)")
    yt = np.empty((rows, n), values.dtype) if out is None else out
    if rows * k * n >= PARALLEL_MIN_WORK and rows > 1:
        # A large input is taken in blocks of columns of about BLOCK_BYTES, so that the rows of
        # xt that the kept entries pick stay in cache while every output row reads them.
        block = max(256, BLOCK_BYTES // (xt.shape[0] * xt.itemsize))
        _matmul_parallel(values, cols, k, xt, yt, min(rows, 4 * get_num_threads()), block)
    else:
        _matmul_rows(values, cols, k, xt, yt, 0, rows, 0, n)
    return yt


# ---------------------------------------------------------------------------------------------
# Gradients of the batched product: the input's, and the kept values' only
# ---------------------------------------------------------------------------------------------

def rowsparse_matmul_grads_reference(values, cols, k, xt, dyt):
    """Gradients of ``yt = rowsparse_matmul(values, cols, k, xt)`` given ``dyt [rows, B]``.

    Returns
    -------
    dxt : [in_features, B]
        ``dxt[cols[r, j], :] += values[r, j] * dyt[r, :]`` over rows ``r`` in order (within a
        row every column appears once).
    dvalues : [rows, k]
        ``dyt[r, :] . xt[cols[r, j], :]``, summed in a fixed order: eight interleaved partial
        sums (sample ``b`` goes to partial ``b mod 8``, the samples past the last multiple of
        eight to a ninth), combined as ``((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)) + tail``. This order
        was chosen so that SIMD over the batch could keep it, eight partial sums to one vector;
        Numba 0.68 compiles the kernel's loop to scalar code all the same (its assembly holds no
        vector multiply), which is one reason training takes the values' gradient from one dense
        BLAS product instead (``rowsparse_matmul_input_grad_reference``).
    """
    dxt = np.zeros(xt.shape, values.dtype)
    for r in range(values.shape[0]):
        dxt[cols[r, :k]] += values[r, :k, None] * dyt[r]
    n = xt.shape[1]
    nb = n - n % 8
    prod = dyt[:, None, :] * xt[cols[:, :k]]                 # [rows, k, B]
    p = np.zeros(prod.shape[:2] + (8,), values.dtype)
    for b in range(0, nb, 8):
        p += prod[:, :, b:b + 8]
    tail = np.zeros(prod.shape[:2], values.dtype)
    for b in range(nb, n):
        tail += prod[:, :, b]
    dvalues = ((((p[..., 0] + p[..., 1]) + (p[..., 2] + p[..., 3]))
                + ((p[..., 4] + p[..., 5]) + (p[..., 6] + p[..., 7]))) + tail)
    return dxt, dvalues


@njit(cache=True)
def _input_grad_columns(values, cols, k, dyt, dxt, b0, b1):
    n = b1 - b0
    for c in range(dxt.shape[0]):
        d = dxt[c, b0:b1]
        for b in range(n):
            d[b] = 0
    for r in range(values.shape[0]):
        dy = dyt[r, b0:b1]
        for j in range(k):
            v = values[r, j]
            d = dxt[cols[r, j], b0:b1]
            for b in range(n):
                d[b] += v * dy[b]


@njit(cache=True)
def _values_grad_rows(cols, k, xt, dyt, dvalues, r0, r1):
    n = xt.shape[1]
    nb = n - n % 8
    zero = xt.dtype.type(0)
    for r in range(r0, r1):
        dy = dyt[r]
        for j in range(k):
            xr = xt[cols[r, j]]
            p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
            for b in range(0, nb, 8):
                p0 += dy[b] * xr[b]
                p1 += dy[b + 1] * xr[b + 1]
                p2 += dy[b + 2] * xr[b + 2]
                p3 += dy[b + 3] * xr[b + 3]
                p4 += dy[b + 4] * xr[b + 4]
                p5 += dy[b + 5] * xr[b + 5]
                p6 += dy[b + 6] * xr[b + 6]
                p7 += dy[b + 7] * xr[b + 7]
            tail = zero
            for b in range(nb, n):
                tail += dy[b] * xr[b]
            dvalues[r, j] = (((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))) + tail


@njit(cache=True, parallel=True)
def _grads_parallel(values, cols, k, xt, dyt, dxt, dvalues, n_chunks):
    # The input gradient is split by columns (each thread owns a stretch of the batch of every
    # row of dxt: no two threads add into one number), the values' gradient by rows.
    rows, n = values.shape[0], xt.shape[1]
    for c in prange(n_chunks):
        _input_grad_columns(values, cols, k, dyt, dxt, c * n // n_chunks, (c + 1) * n // n_chunks)
    for c in prange(n_chunks):
        _values_grad_rows(cols, k, xt, dyt, dvalues, c * rows // n_chunks, (c + 1) * rows // n_chunks)


def rowsparse_matmul_grads(values, cols, k, xt, dyt, check=True):
    """Numba kernel of ``rowsparse_matmul_grads_reference``; same arguments, same results bit
    for bit. Returns ``dxt [in_features, B]`` and ``dvalues [rows, k]``."""
    if check:
        check_rowsparse(values, cols, k, xt, 2)
        if dyt.shape != (values.shape[0], xt.shape[1]) or dyt.dtype != values.dtype or not dyt.flags.c_contiguous:
            raise ValueError(f"dyt must be a C-contiguous {values.dtype} array of shape "
                             f"{(values.shape[0], xt.shape[1])}, got {dyt.dtype} {dyt.shape}")
    rows, n = values.shape[0], xt.shape[1]
    dxt = np.empty(xt.shape, values.dtype)
    dvalues = np.empty((rows, k), values.dtype)
    if rows * k * n >= PARALLEL_MIN_WORK and rows > 1:
        _grads_parallel(values, cols, k, xt, dyt, dxt, dvalues, min(rows, n, 4 * get_num_threads()))
    else:
        _input_grad_columns(values, cols, k, dyt, dxt, 0, n)
        _values_grad_rows(cols, k, xt, dyt, dvalues, 0, rows)
    return dxt, dvalues


def rowsparse_matmul_input_grad_reference(values, cols, k, dyt, in_features):
    """The input gradient alone of ``yt = rowsparse_matmul(values, cols, k, xt)``: ``dxt
    [in_features, B]``, the first result of ``rowsparse_matmul_grads_reference`` (same order).

    Training uses it with the values' gradient taken from one dense BLAS product instead
    (``minidress.nn.layers.rowsparse_linear_backward``): on this project's layers that product
    was measured faster than the row-sparse values' gradient at every density (784x300, batch
    128, float32, one thread: 0.6 ms dense against 1.1 ms at density 0.1 and 20-40 ms at 0.5,
    whose strict order of additions Numba does not vectorize).
    """
    dxt = np.zeros((in_features, dyt.shape[1]), values.dtype)
    for r in range(values.shape[0]):
        dxt[cols[r, :k]] += values[r, :k, None] * dyt[r]
    return dxt


@njit(cache=True, parallel=True)
def _input_grad_parallel(values, cols, k, dyt, dxt, n_chunks):
    n = dyt.shape[1]
    for c in prange(n_chunks):
        _input_grad_columns(values, cols, k, dyt, dxt, c * n // n_chunks, (c + 1) * n // n_chunks)


def rowsparse_matmul_input_grad(values, cols, k, dyt, in_features, check=True):
    """Numba kernel of ``rowsparse_matmul_input_grad_reference``; same result bit for bit.
    ``dyt [rows, B]`` C-contiguous, of ``values``' dtype; returns ``dxt [in_features, B]``."""
    if check:
        check_rowsparse(values, cols, k, np.empty((in_features, 1), values.dtype), 2)
        if dyt.ndim != 2 or dyt.shape[0] != values.shape[0] or dyt.dtype != values.dtype \
                or not dyt.flags.c_contiguous:
            raise ValueError(f"dyt must be a C-contiguous {values.dtype} array [{values.shape[0]}, "
                             f"batch], got {dyt.dtype} {dyt.shape}")
    rows, n = values.shape[0], dyt.shape[1]
    dxt = np.empty((in_features, n), values.dtype)
    if rows * k * n >= PARALLEL_MIN_WORK and n > 1:
        _input_grad_parallel(values, cols, k, dyt, dxt, min(n, 4 * get_num_threads()))
    else:
        _input_grad_columns(values, cols, k, dyt, dxt, 0, n)
    return dxt


def check_rowsparse(values, cols, k, x, ndim):
    """Raise a clear error unless the arguments fit a row-sparse product."""
    if not isinstance(values, np.ndarray) or values.ndim != 2 or values.dtype not in (np.float32, np.float64):
        raise ValueError(f"values must be a float32/float64 array [rows, kmax], got "
                         f"{getattr(values, 'shape', type(values).__name__)} {getattr(values, 'dtype', '')}")
    if not isinstance(cols, np.ndarray) or cols.shape != values.shape or cols.dtype.kind != "u":
        raise ValueError(f"cols must be an unsigned integer array of values' shape {values.shape}, "
                         f"got {getattr(cols, 'shape', None)} {getattr(cols, 'dtype', '')}")
    if not (0 <= int(k) <= values.shape[1]):
        raise ValueError(f"k must be in [0, {values.shape[1]}] (entries per row), got {k}")
    if not isinstance(x, np.ndarray) or x.ndim != ndim:
        want = "[in_features]" if ndim == 1 else "[in_features, batch]"
        raise ValueError(f"x must be a {ndim}-D array {want}, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype}, expected {values.dtype} (the dtype of values)")
    if ndim == 2 and not x.flags.c_contiguous:
        raise ValueError("xt must be C-contiguous ([in_features, batch] with the batch contiguous)")
    # The kernels do not check bounds (that would cost as much as the product at batch 1), so
    # an index past the input must be caught here. A DeployedModel checks once, at load.
    if k and values.shape[0] and int(cols[:, :k].max()) >= x.shape[0]:
        raise ValueError(f"cols holds a column index {int(cols[:, :k].max())} >= in_features = {x.shape[0]}")


# ---------------------------------------------------------------------------------------------
# Training: which product a sparse level's Linear layer runs, decided by measurement
# ---------------------------------------------------------------------------------------------

# "measured" (default): kernels where measured faster; "always" / "never" force one path (tests,
# benchmarks). Either path gives the same numbers up to the order of the additions.
ROUTING = "measured"
# (rows, in_features, batch, dtype) -> the largest k for which the kernels won; measured once.
CROSSOVER: dict = {}


def kept_columns(ranks, k):
    """Row ``r``'s ``k`` kept columns in rank order, ``[rows, k]`` of ``index_dtype``: the same as
    ``np.argsort(ranks, axis=1, kind="stable")[:, :k]``, but linear in the row length, as every
    row of ``ranks`` is a permutation (``masks.row_ranks``) whose inverse is a scatter."""
    rows, n = ranks.shape
    order = np.empty((rows, n), index_dtype(n))
    np.put_along_axis(order, ranks.astype(np.intp), np.arange(n, dtype=order.dtype)[None, :], axis=1)
    return np.ascontiguousarray(order[:, :k])


def rowsparse_wins(k, rows, in_features, batch, dtype) -> bool:
    """Whether a training step of a ``[rows, in_features]`` Linear layer that keeps ``k``
    weights per row is faster through the kernels (``rowsparse_matmul`` forward,
    ``rowsparse_matmul_input_grad`` backward) than as dense products with the mask (BLAS).

    The kernels' time grows with ``k``, the dense product's does not: the first call for a
    shape, batch and dtype times both (``measure_crossover``) and keeps the crossover ``k``, so
    any density, drawn ones included, is decided by one comparison afterwards. With the JIT
    disabled (``NUMBA_DISABLE_JIT=1``) the kernels are interpreted Python, never faster: False.
    """
    if ROUTING != "measured":
        return ROUTING == "always"
    if numba_config.DISABLE_JIT:
        return False
    key = (rows, in_features, batch, np.dtype(dtype).str)
    if key not in CROSSOVER:
        CROSSOVER[key] = measure_crossover(rows, in_features, batch, dtype)
    return k <= CROSSOVER[key]


def measure_crossover(rows, in_features, batch, dtype, repeats=9) -> float:
    """The largest ``k`` at which the kernels' training step (as ``nn.layers``'
    ``rowsparse_linear_forward`` and ``_backward`` run it: the forward product and the input
    gradient by the kernels, the kept values' gradient gathered from one dense product) is
    measured no slower than the dense masked step: both timed (median of ``repeats``
    interleaved rounds) on random data, the kernels at two ``k``; the kernels' time is taken as
    linear in ``k`` between and beyond them. (The best of 5 rounds, as before, put the 300x784
    layer's crossover at 131-142 of 784 at batch 128 on an AMD EPYC, where the layer's kernel
    path at k = 78 was 1.3x slower than its dense path by medians, and the routed joint step
    slower than the unrouted one: the best round is a lucky one, a training step is not.)"""
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    w = rng.standard_normal((rows, in_features)).astype(dt)
    x = rng.standard_normal((batch, in_features)).astype(dt)
    dout = rng.standard_normal((batch, rows)).astype(dt)
    mask = np.ones_like(w)
    ks = (max(1, in_features // 10), max(2, in_features // 2))
    kept = {k: np.ascontiguousarray(
        np.argsort(rng.random((rows, in_features)), axis=1)[:, :k].astype(index_dtype(in_features)))
        for k in ks}

    def dense():           # what nn.Linear runs with a mask
        wm = w * mask
        _ = x @ wm.T
        _ = (dout @ wm, (dout.T @ x) * mask)

    def kernels(k):        # what nn.rowsparse_linear_forward/backward run
        c = kept[k]
        values = np.take_along_axis(w, c.astype(np.intp), axis=1)
        xt = np.ascontiguousarray(x.T)
        rowsparse_matmul(values, c, k, xt, check=False)
        dxt = rowsparse_matmul_input_grad(values, c, k, np.ascontiguousarray(dout.T), in_features, check=False)
        idx, dw = c.astype(np.intp), np.zeros_like(w)
        np.put_along_axis(dw, idx, np.take_along_axis(dout.T @ xt.T, idx, axis=1), axis=1)
        _ = dxt.T

    fns = [dense] + [lambda k=k: kernels(k) for k in ks]
    times = [[] for _ in fns]
    for f in fns:
        f()                # compiles the kernels (or loads them from the cache)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    t_dense, t1, t2 = (float(np.median(t)) for t in times)
    slope = max(t2 - t1, 1e-12) / (ks[1] - ks[0])
    return max(0.0, ks[0] + (t_dense - t1) / slope)

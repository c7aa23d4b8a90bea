"""Row-sparse kernels: kernel == NumPy reference (bit for bit) == dense masked product, on random
shapes, prefix lengths (0, 1, full and in between) and both float dtypes. Also passes with
NUMBA_DISABLE_JIT=1, where the kernels run as plain Python."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidress.im2col import im2col_cnhw
from minidress.kernels import (index_dtype, rowsparse_conv2d, rowsparse_conv2d_reference,
                               rowsparse_matmul, rowsparse_matmul_grads,
                               rowsparse_matmul_grads_reference, rowsparse_matmul_reference,
                               rowsparse_matvec, rowsparse_matvec_reference)
from minidress.kernels import blas
from minidress.kernels import rowsparse as rs
from minidress.nn.layers import conv2d_forward, im2col

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def random_rowsparse(rng, rows, row_len, kmax, dtype):
    """values/cols of a random row-sparse matrix and its dense equivalent ``W [rows, row_len]``."""
    cols = np.stack([rng.permutation(row_len)[:kmax] for _ in range(rows)]).reshape(rows, kmax)
    cols = cols.astype(index_dtype(row_len))
    values = rng.standard_normal((rows, kmax)).astype(dtype)
    return values, cols


def dense_masked(values, cols, k, row_len):
    """The dense matrix ``W * M`` that the first ``k`` entries of every row describe."""
    w = np.zeros((values.shape[0], row_len), values.dtype)
    np.put_along_axis(w, cols[:, :k].astype(np.int64), values[:, :k], axis=1)
    return w


problems = st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(0, 3), st.integers(1, 33),
                     st.sampled_from(DTYPES), st.integers(0, 2**16))


def k_choice(kind, kmax, rng):
    return {0: 0, 1: min(1, kmax), 2: kmax}.get(kind, int(rng.integers(0, kmax + 1)))


def make_problem(p):
    """values, cols, k and a random generator from a hypothesis-drawn problem tuple."""
    rows, row_len, kind, _, dtype, seed = p
    rng = np.random.default_rng(seed)
    kmax = int(rng.integers(1, row_len + 1))
    values, cols = random_rowsparse(rng, rows, row_len, kmax, dtype)
    return values, cols, k_choice(kind, kmax, rng), rng


@settings(max_examples=80, deadline=None)
@given(problems)
def test_matmul_kernel_equals_reference_equals_dense(p):
    rows, row_len, _, batch, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    xt = rng.standard_normal((row_len, batch)).astype(dtype)
    ours = rowsparse_matmul(values, cols, k, xt)
    ref = rowsparse_matmul_reference(values, cols, k, xt)
    assert ours.dtype == dtype and ours.shape == (rows, batch)
    assert np.array_equal(ours, ref), f"kernel vs reference, max abs diff {np.abs(ours - ref).max():.3e}"
    np.testing.assert_allclose(ours, dense_masked(values, cols, k, row_len) @ xt,
                               rtol=TOL[dtype], atol=TOL[dtype] * max(1, k))


@settings(max_examples=80, deadline=None)
@given(problems)
def test_matvec_kernel_equals_reference_equals_dense(p):
    rows, row_len, _, _, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    x = rng.standard_normal(row_len).astype(dtype)
    ours = rowsparse_matvec(values, cols, k, x)
    assert ours.dtype == dtype and ours.shape == (rows,)
    assert np.array_equal(ours, rowsparse_matvec_reference(values, cols, k, x))
    np.testing.assert_allclose(ours, dense_masked(values, cols, k, row_len) @ x,
                               rtol=TOL[dtype], atol=TOL[dtype] * max(1, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_and_blocked_paths_equal_serial_ones(rng, dtype, monkeypatch):
    """Large enough to take the multi-threaded loops, and (with a tiny block size) the column
    blocks; each thread owns whole rows, so the result must not change with the split."""
    values, cols = random_rowsparse(rng, 40, 300, 64, dtype)
    xt = rng.standard_normal((300, 600)).astype(dtype)
    x = xt[:, 0].copy()
    monkeypatch.setattr(rs, "BLOCK_BYTES", 1)           # blocks of 256 columns: 3 of them
    big = rowsparse_matmul(values, cols, 50, xt), rowsparse_matvec(values, cols, 50, x)
    monkeypatch.setattr(rs, "PARALLEL_MIN_WORK", 1 << 62)
    small = rowsparse_matmul(values, cols, 50, xt), rowsparse_matvec(values, cols, 50, x)
    assert np.array_equal(big[0], small[0]) and np.array_equal(big[1], small[1])
    assert np.array_equal(big[0], rowsparse_matmul_reference(values, cols, 50, xt))


def test_out_argument_is_written_in_place(rng):
    values, cols = random_rowsparse(rng, 5, 9, 4, np.float64)
    xt = rng.standard_normal((9, 3))
    out = np.full((5, 3), np.nan)
    assert rowsparse_matmul(values, cols, 3, xt, out=out) is out
    assert np.array_equal(out, rowsparse_matmul_reference(values, cols, 3, xt))


@pytest.mark.parametrize("case", [(2, 3, 5, 5, 4, 3, 1, 1), (1, 2, 7, 6, 3, 3, 2, 0),
                                  (3, 2, 4, 5, 3, 1, 1, 0), (1, 1, 4, 4, 2, 2, 3, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_kernel_equals_reference_equals_dense_conv(rng, case, dtype):
    n, c, h, w, co, kk, s, p = case
    row_len = c * kk * kk
    values, cols = random_rowsparse(rng, co, row_len, row_len, dtype)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    x_cnhw = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
    for k in (0, 1, row_len // 2, row_len):
        ours = rowsparse_conv2d(values, cols, k, x_cnhw, kk, kk, s, p)
        assert np.array_equal(ours, rowsparse_conv2d_reference(values, cols, k, x_cnhw, kk, kk, s, p))
        wt = dense_masked(values, cols, k, row_len).reshape(co, c, kk, kk)
        dense, _ = conv2d_forward(x, wt, np.zeros(co, dtype), s, p)
        np.testing.assert_allclose(ours.transpose(1, 0, 2, 3), dense, rtol=TOL[dtype], atol=TOL[dtype] * row_len)


def test_im2col_cnhw_is_the_transpose_of_im2col(rng):
    x = rng.standard_normal((2, 3, 6, 5))
    batch_major, shape = im2col(x, 3, 2, 2, 1)
    feature_major, shape2 = im2col_cnhw(np.ascontiguousarray(x.transpose(1, 0, 2, 3)), 3, 2, 2, 1)
    assert shape == shape2 and feature_major.flags.c_contiguous
    assert np.array_equal(feature_major, batch_major.T)


def test_bad_arguments_get_clear_errors(rng):
    values, cols = random_rowsparse(rng, 4, 10, 5, np.float32)
    xt = rng.standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="k must be in \\[0, 5\\]"):
        rowsparse_matmul(values, cols, 6, xt)
    with pytest.raises(ValueError, match="k must be in"):
        rowsparse_matmul(values, cols, -1, xt)
    with pytest.raises(TypeError, match="expected float32"):
        rowsparse_matmul(values, cols, 2, xt.astype(np.float64))
    with pytest.raises(ValueError, match="unsigned integer"):
        rowsparse_matmul(values, cols.astype(np.int64), 2, xt)
    with pytest.raises(ValueError, match="2-D array"):
        rowsparse_matmul(values, cols, 2, xt[:, 0])
    with pytest.raises(ValueError, match="C-contiguous"):
        rowsparse_matmul(values, cols, 2, np.asfortranarray(xt))
    with pytest.raises(ValueError, match="column index 9 >= in_features = 5"):
        cols[0, 0] = 9
        rowsparse_matvec(values, cols, 2, xt[:5, 0].copy())


@settings(max_examples=60, deadline=None)
@given(problems)
def test_gradient_kernels_equal_reference_equal_dense(p):
    """dxt = (W*M).T @ dyt and dvalues = (dyt @ xt.T) at the kept entries."""
    rows, row_len, _, batch, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    xt = rng.standard_normal((row_len, batch)).astype(dtype)
    dyt = rng.standard_normal((rows, batch)).astype(dtype)
    dxt, dvalues = rowsparse_matmul_grads(values, cols, k, xt, dyt)
    ref_dxt, ref_dvalues = rowsparse_matmul_grads_reference(values, cols, k, xt, dyt)
    assert dxt.shape == (row_len, batch) and dvalues.shape == (rows, k) and dvalues.dtype == dtype
    assert np.array_equal(dxt, ref_dxt) and np.array_equal(dvalues, ref_dvalues)
    tol = TOL[dtype] * max(1, batch, rows)
    np.testing.assert_allclose(dxt, dense_masked(values, cols, k, row_len).T @ dyt, rtol=TOL[dtype], atol=tol)
    full = dyt @ xt.T                                      # gradient of every weight, kept or not
    np.testing.assert_allclose(dvalues, np.take_along_axis(full, cols[:, :k].astype(int), axis=1),
                               rtol=TOL[dtype], atol=tol)


def test_gradient_kernels_parallel_path(rng, monkeypatch):
    values, cols = random_rowsparse(rng, 40, 300, 64, np.float64)
    xt, dyt = rng.standard_normal((300, 37)), rng.standard_normal((40, 37))
    big = rowsparse_matmul_grads(values, cols, 50, xt, dyt)
    monkeypatch.setattr(rs, "PARALLEL_MIN_WORK", 1 << 62)
    small = rowsparse_matmul_grads(values, cols, 50, xt, dyt)
    assert all(np.array_equal(a, b) for a, b in zip(big, small))
    with pytest.raises(ValueError, match="dyt must be"):
        rowsparse_matmul_grads(values, cols, 50, xt, dyt[:, :-1])


@settings(max_examples=40, deadline=None)
@given(problems)
def test_input_gradient_kernel_equals_reference_and_the_full_gradients(p):
    """The input gradient alone (what training runs) is the first result of the gradient
    kernels, bit for bit, in both the serial and the parallel path."""
    rows, row_len, _, batch, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    xt = rng.standard_normal((row_len, batch)).astype(dtype)
    dyt = rng.standard_normal((rows, batch)).astype(dtype)
    dxt = rs.rowsparse_matmul_input_grad(values, cols, k, dyt, row_len)
    assert np.array_equal(dxt, rs.rowsparse_matmul_input_grad_reference(values, cols, k, dyt, row_len))
    assert np.array_equal(dxt, rowsparse_matmul_grads(values, cols, k, xt, dyt)[0])


def test_input_gradient_kernel_parallel_path_and_checks(rng, monkeypatch):
    values, cols = random_rowsparse(rng, 40, 300, 64, np.float64)
    dyt = rng.standard_normal((40, 37))
    big = rs.rowsparse_matmul_input_grad(values, cols, 50, dyt, 300)
    monkeypatch.setattr(rs, "PARALLEL_MIN_WORK", 1 << 62)
    assert np.array_equal(big, rs.rowsparse_matmul_input_grad(values, cols, 50, dyt, 300))
    with pytest.raises(ValueError, match="dyt must be"):
        rs.rowsparse_matmul_input_grad(values, cols, 50, dyt[:-1], 300)
    with pytest.raises(ValueError, match="column index"):
        rs.rowsparse_matmul_input_grad(values, cols, 50, dyt, 10)


# The strided case compiles np.dot on a non-contiguous operand, which Numba warns is slower:
# the point of that case, not a problem (the compiled model only passes contiguous arrays).
@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 60), st.integers(2, 300), st.sampled_from(DTYPES),
       st.booleans(), st.integers(0, 2**16))
def test_compiled_gemm_is_numpys_product(m, k, n, dtype, contiguous, seed):
    """``blas.gemm`` (what the compiled model's dense products call) equals NumPy's ``a @ b`` bit
    for bit when it calls NumPy's BLAS, and to rounding when it falls back to ``np.dot`` under
    Numba (SciPy's BLAS, or plain NumPy with the JIT off); a strided operand takes ``np.dot``.
    NumPy itself computes a one-row or one-column product with ``gemv`` instead of ``gemm``
    (another order of additions), so those shapes agree to rounding only."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, 2 * n)).astype(dtype)
    b = np.ascontiguousarray(b[:, :n]) if contiguous else b[:, ::2]
    got, want = blas.gemm(a, b), a @ b
    assert got.shape == want.shape and got.dtype == want.dtype
    if blas.BACKEND.startswith("numpy cblas") and contiguous and m > 1 and n > 1:
        assert np.array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("shapes", [((0, 3), (3, 4)), ((2, 0), (0, 4)), ((2, 3), (3, 0))])
def test_compiled_gemm_of_empty_operands(shapes):
    a, b = np.ones(shapes[0], np.float32), np.ones(shapes[1], np.float32)
    assert np.array_equal(blas.gemm(a, b), a @ b)

"""Serving kernels and the compiled program: every kernel equals its NumPy reference bit for bit
(random shapes, prefix lengths, both dtypes; also with NUMBA_DISABLE_JIT=1), the program's
product equals the reference row-sparse products, and the batch-1 loop really uses vector
gathers on x86-64 with AVX2."""
import platform
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import config as numba_config
from numba import njit
from test_kernels import make_problem, problems, random_rowsparse

from minidress.kernels import program as prog
from minidress.kernels import (rowsparse_conv2d_reference, rowsparse_matmul_reference,
                               rowsparse_matvec_reference)
from minidress.kernels import serving
from minidress.kernels.rowsparse import _NoAliasNoGatherCompiler, no_gather_features
from minidress.kernels.serving import (PAIRS_MAX_COLUMNS, _NoAliasCompiler, flatten, flatten_reference, im2col,
                                       im2col_reference, matmul_t, matmul_t_reference, matvec_t,
                                       matvec_t_reference, pool2d, pool2d_reference, to_feature_major,
                                       transpose_rowsparse)
from minidress.nn.layers import avgpool_forward, maxpool_forward

DTYPES = [np.float32, np.float64]


@settings(max_examples=80, deadline=None)
@given(problems)
def test_transposed_matvec_equals_its_reference_and_the_row_kernel_reference(p):
    rows, row_len, _, _, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    vt, ct = transpose_rowsparse(values, cols)
    assert vt.flags.c_contiguous and vt.shape == (values.shape[1], rows) and ct.dtype == np.uint16
    x = rng.standard_normal(row_len).astype(dtype)
    for kernel in (matvec_t, serving.matvec_t_no_gather):   # gathers, and each entry loaded alone
        y = np.full(rows, np.nan, dtype)
        kernel(vt, ct, k, x, y)
        assert np.array_equal(y, matvec_t_reference(vt, ct, k, x)), kernel.__name__
        assert np.array_equal(y, rowsparse_matvec_reference(values, cols, k, x)), kernel.__name__


@settings(max_examples=60, deadline=None)
@given(problems, st.one_of(st.integers(2, 70),      # both loops: two rows per pass, and blocks of columns
                           st.sampled_from([PAIRS_MAX_COLUMNS, PAIRS_MAX_COLUMNS + 1, 2 * PAIRS_MAX_COLUMNS + 3])))
def test_transposed_matmul_equals_its_reference_and_the_row_kernel_reference(p, batch):
    rows, row_len, _, _, dtype, _ = p
    values, cols, k, rng = make_problem(p)
    vt, ct = transpose_rowsparse(values, cols)
    xt = rng.standard_normal((row_len, batch)).astype(dtype)
    yt = np.full((rows, batch), np.nan, dtype)
    matmul_t(vt, ct, k, xt, yt)
    assert np.array_equal(yt, matmul_t_reference(vt, ct, k, xt))
    assert np.array_equal(yt, rowsparse_matmul_reference(values, cols, k, xt))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_the_product_epilogue_equals_bias_batchnorm_and_relu_run_apart(rng, dtype, batch):
    """A product with its batch norm and ReLU in the epilogue gives, bit for bit, what the
    product, OP_BATCHNORM and OP_RELU give one after the other, in every batch-norm slot."""
    values, cols = random_rowsparse(rng, 13, 40, 25, dtype)
    cols[0, 0] = 39
    bias = rng.standard_normal(13).astype(dtype)
    code, layers, params, index = one_product_program(values, cols, bias)
    layers[0, prog.L_ROW_LEN] = 40
    slots = 2
    scale, shift = rng.standard_normal((2, slots * 13)).astype(dtype)
    scale_off = params.size
    params = np.concatenate([params, scale, shift])
    norm = [scale_off, scale_off + scale.size, 13]
    fused = np.array([[prog.OP_PRODUCT, 0, *norm, 1]], np.int64)
    apart = np.array([[prog.OP_PRODUCT, 0, 0, 0, 0, 0], [prog.OP_BATCHNORM, *norm, 0, 0],
                      [prog.OP_RELU, 0, 0, 0, 0, 0]], np.int64)
    xt = rng.standard_normal((40, batch)).astype(dtype)
    xt[:, 0] = np.nan if batch > 1 else xt[:, 0]           # NaN stays NaN through the ReLU
    for slot in range(slots):
        for k in (0, 9, 25):
            state = np.array([[k], [-1], [-1], [slot]], np.int64)
            args = (layers, params, index, np.zeros(0, dtype), state, xt.ravel(), (40, batch, 1, 1))
            out_fused, _ = prog.run(fused, *args)
            out_apart, _ = prog.run(apart, *args)
            assert np.array_equal(out_fused, out_apart, equal_nan=True)
            ref = np.maximum((rowsparse_matmul_reference(values, cols, k, xt) + bias[:, None])
                             * scale[slot * 13:(slot + 1) * 13, None] + shift[slot * 13:(slot + 1) * 13, None], 0)
            assert np.array_equal(out_fused.reshape(13, batch), ref, equal_nan=True)


def one_product_program(values, cols, bias, kh=1, stride=1, pad=0):
    """The program of a single Linear/Conv2d, sparse at every prefix: its tables and arrays."""
    vt, ct = transpose_rowsparse(values, cols)
    params = np.concatenate([vt.ravel(), bias])
    layers = np.array([[values.shape[0], cols.max() + 1 if kh == 1 else 0, kh, kh, stride, pad, 0, 0,
                        vt.shape[0], vt.size]], np.int64)
    code = np.array([[prog.OP_PRODUCT, 0, 0, 0, 0, 0]], np.int64)
    return code, layers, params, ct.ravel()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 70])
def test_program_linear_equals_the_reference_products(rng, dtype, batch, monkeypatch):
    values, cols = random_rowsparse(rng, 13, 40, 25, dtype)
    cols[0, 0] = 39                                  # the row length the table infers
    bias = rng.standard_normal(13).astype(dtype)
    code, layers, params, index = one_product_program(values, cols, bias)
    layers[0, prog.L_ROW_LEN] = 40
    monkeypatch.setattr(serving, "BLOCK_COLUMNS", 32)   # no effect once compiled; blocks in pure Python
    xt = rng.standard_normal((40, batch)).astype(dtype)
    for k in (0, 1, 9, 25):
        state = np.array([[k], [-1], [-1], [0]], np.int64)
        out, shape = prog.run(code, layers, params, index, np.zeros(0, dtype), state, xt.ravel(), (40, batch, 1, 1))
        ref = (rowsparse_matvec_reference(values, cols, k, xt[:, 0])[:, None] if batch == 1
               else rowsparse_matmul_reference(values, cols, k, xt)) + bias[:, None]
        assert shape == (13, batch, 1, 1) and np.array_equal(out.reshape(13, batch), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(1, 2, 5, 5, 4, 3, 1, 1), (2, 3, 6, 7, 3, 3, 2, 0), (3, 2, 4, 4, 5, 1, 2, 0)])
def test_program_conv_equals_the_reference_conv(rng, dtype, case):
    n, c, h, w, co, kk, s, p = case
    row_len = c * kk * kk
    values, cols = random_rowsparse(rng, co, row_len, row_len, dtype)
    code, layers, params, index = one_product_program(values, cols, np.zeros(0, dtype), kk, s, p)
    layers[0, prog.L_ROW_LEN], layers[0, prog.L_BIAS] = row_len, -1
    x = rng.standard_normal((c, n, h, w)).astype(dtype)
    for k in (1, row_len // 2, row_len):
        state = np.array([[k], [-1], [-1], [0]], np.int64)
        out, shape = prog.run(code, layers, params, index, np.zeros(0, dtype), state, x.ravel(), x.shape)
        ref = rowsparse_conv2d_reference(values, cols, k, x, kk, kk, s, p)
        assert shape == ref.shape and np.array_equal(out.reshape(shape), ref)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 1), st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_im2col_flatten_and_layout_kernels_equal_their_references(c, n, h, w, kk, s, p, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((c, n, h, w)).astype(dtype)
    if h + 2 * p >= kk and w + 2 * p >= kk:
        ref = im2col_reference(x, kk, kk, s, p)
        out = np.full(ref.shape, np.nan, dtype)
        im2col(x, kk, kk, s, p, out)
        assert np.array_equal(out, ref)
    ref = flatten_reference(x)
    out = np.full(ref.shape, np.nan, dtype)
    flatten(x, out)
    assert np.array_equal(out, ref)
    batch_major = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
    out = np.full(x.shape, np.nan, dtype)
    to_feature_major(batch_major, out)
    assert np.array_equal(out, x)


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 1), (2, 1)])
def test_pooling_equals_the_training_layers(rng, k, stride):
    x = rng.standard_normal((3, 2, 7, 6))
    x[0, 0, :2, :2] = 1.5                               # ties: the first maximum wins, as argmax
    for average, ref_fn in ((False, maxpool_forward), (True, avgpool_forward)):
        ref = ref_fn(x.transpose(1, 0, 2, 3), k, stride)[0].transpose(1, 0, 2, 3)
        out = np.empty(ref.shape)
        pool2d(x, k, stride, average, out)
        if average:
            np.testing.assert_allclose(out, ref, rtol=1e-13)   # the mean sums in another order
        else:
            assert np.array_equal(out, ref)


# The inputs hold infinities on purpose: with the JIT off the kernel runs as NumPy scalars,
# which warn on inf - inf where the compiled loop is silent; the results are compared all the same.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9),
       st.sampled_from([(2, 2), (3, 1), (2, 1), (3, 3), (3, 2), (2, 3), (1, 2)]), st.booleans(), st.sampled_from(DTYPES),
       st.integers(0, 2**16))
def test_pooling_kernel_equals_its_reference_bit_for_bit(c, n, h, w, k_stride, average, dtype, seed):
    """Every path of ``pool2d`` (the 2x2 stride-2 max, the general loop) against the NumPy rule,
    with ties, NaNs and infinities in the windows."""
    k, stride = k_stride
    if h < k or w < k:
        return
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal((c, n, h, w)) * 2).astype(dtype)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.1] = np.inf
    x[rng.random(x.shape) < 0.1] = -np.inf
    ref = pool2d_reference(x, k, stride, average)
    out = np.full(ref.shape, 7.0, dtype)
    pool2d(x, k, stride, average, out)
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    # bit for bit (the sign of a zero too) wherever the result is a number; a NaN's sign bit is
    # the processor's choice
    assert np.array_equal(out[~np.isnan(out)].view(np.uint8), ref[~np.isnan(ref)].view(np.uint8))


def _has_avx2():
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="no compiled code without the JIT")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(), reason="needs x86-64 with AVX2")
def test_batch1_loop_uses_vector_gathers():
    """The noalias compile of the transposed kernel emits gathers; without noalias it does not
    (the reason the trick exists); ``matvec_t_no_gather`` emits none and is still vector code.
    Fresh, uncached compiles, since numba cannot show the assembly of cached code."""
    vt = np.zeros((4, 64), np.float32)
    args = (vt, np.zeros((4, 64), np.uint16), 4, np.zeros(64, np.float32), np.zeros(64, np.float32))
    gathers = ("vgatherdps", "vpgatherdd", "vgatherqps", "vpgatherqd")
    for pipeline, expect in ((_NoAliasCompiler, True), (None, False)):
        fn = njit(pipeline_class=pipeline)(matvec_t.py_func) if pipeline else njit(matvec_t.py_func)
        fn(*args)
        asm = "\n".join(fn.inspect_asm().values())
        assert any(g in asm for g in gathers) == expect, f"noalias={expect}: gathers {'not ' * expect}found"
    # The variant without gathers is still vector code: packed multiplies on 256- or 512-bit
    # registers, their inputs loaded one by one (where LLVM has the tuning that asks for it).
    if no_gather_features() is None:
        return
    fn = njit(pipeline_class=_NoAliasNoGatherCompiler)(serving.matvec_t_no_gather.py_func)
    fn(*args)
    asm = "\n".join(fn.inspect_asm().values())
    assert not any(g in asm for g in gathers), "matvec_t_no_gather: a gather instruction found"
    assert re.search(r"vmulps\s[^\n]*%[yz]mm", asm), "matvec_t_no_gather: no packed multiply found"

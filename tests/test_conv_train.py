"""The Numba training convolutions and pooling (``minidress.kernels.conv_train``, behind
``conv2d_forward``/``conv2d_backward`` and the pooling functions of ``minidress.nn.layers``)
against their NumPy references (the ``*_reference`` functions beside them).

Tolerances: the convolutions add the same products in another order than the im2col GEMM, so
they agree up to rounding: ``|fast - ref| <= tol * max|ref|`` with tol 1e-12 in float64 and 1e-5
in float32. The pooling kernels add in the reference's order and agree bit for bit.
"""
import numba
import numpy as np
import pytest

from minidress.kernels import conv_train
from minidress.kernels.conv_train import training_threads
from minidress.nn.layers import (avgpool_backward, avgpool_backward_reference, avgpool_forward,
                                 avgpool_forward_reference, conv2d_backward,
                                 conv2d_backward_reference, conv2d_forward, conv2d_forward_reference,
                                 maxpool_backward, maxpool_backward_reference, maxpool_forward,
                                 maxpool_forward_reference)

from test_layers import CONV_CASES

TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]


def assert_close(fast, ref, dtype):
    assert fast.dtype == ref.dtype == dtype and fast.shape == ref.shape
    scale = max(float(np.max(np.abs(ref))), 1.0) if ref.size else 1.0
    assert float(np.max(np.abs(fast - ref), initial=0.0)) <= TOL[dtype] * scale


def conv_both(rng, case, dtype, bias=True):
    n, c, h, w, co, k, s, p = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((co, c, k, k)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype) if bias else np.zeros((), dtype)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    dout = rng.standard_normal((n, co, ho, wo)).astype(dtype)
    out = []
    direct = lambda *a: conv_train.conv2d_forward(*a, direct=True)             # noqa: E731
    gemm = lambda *a: conv_train.conv2d_forward(*a, direct=False)              # noqa: E731
    for fwd, bwd in ((direct, conv_train.conv2d_backward),                     # direct loops
                     (gemm, conv_train.conv2d_backward),                       # per-image GEMMs
                     (conv2d_forward, conv2d_backward),                         # as dispatched
                     (conv2d_forward_reference, conv2d_backward_reference)):
        y, cache = fwd(x, wt, b, s, p)
        out.append((y, *bwd(dout, cache)))
    return out


CASES = CONV_CASES + [(3, 6, 14, 14, 16, 5, 1, 0), (2, 16, 9, 9, 8, 3, 2, 1), (2, 4, 8, 8, 6, 1, 2, 0)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_matches_reference(rng, case, dtype):
    direct, gemm, dispatched, ref = conv_both(rng, case, dtype)
    for a, g, d, b in zip(direct, gemm, dispatched, ref):
        assert_close(a, b, dtype)
        assert_close(g, b, dtype)
        assert_close(d, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_without_bias_and_noncontiguous_input(rng, dtype):
    case = (2, 3, 6, 5, 4, 3, 1, 1)
    direct, gemm, _, ref = conv_both(rng, case, dtype, bias=False)
    for a, g, b in zip(direct, gemm, ref):
        assert_close(a, b, dtype)
        assert_close(g, b, dtype)
    x = rng.standard_normal((5, 6, 3, 2)).astype(dtype).transpose(0, 3, 1, 2)[:, :, ::2]
    wt = rng.standard_normal((3, 2, 2, 2)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    for direct in (True, False):
        assert_close(conv_train.conv2d_forward(x, wt, b, 1, 1, direct=direct)[0],
                     conv2d_forward_reference(x, wt, b, 1, 1)[0], dtype)


def test_gemm_conv_in_several_chunks(rng, monkeypatch):
    """A batch split into chunks of images gives the one-chunk result."""
    case = (5, 3, 7, 6, 4, 3, 2, 1)
    whole = conv_both(np.random.default_rng(3), case, np.float64)[1]
    monkeypatch.setattr(conv_train, "CHUNK_BYTES", 1)          # one image per chunk
    split = conv_both(np.random.default_rng(3), case, np.float64)[1]
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_same_result_for_any_thread_count(rng, threads):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"Numba's pool has {numba.config.NUMBA_NUM_THREADS} thread(s) (NUMBA_NUM_THREADS)")
    case = (4, 3, 8, 8, 5, 3, 1, 1)
    with training_threads(1):
        base = conv_both(np.random.default_rng(1), case, np.float32)[0]
    with training_threads(threads):
        again = conv_both(np.random.default_rng(1), case, np.float32)[0]
    for a, b in zip(base, again):
        np.testing.assert_array_equal(a, b)


POOL_CASES = [((2, 3, 4, 4), 2, 2), ((1, 2, 5, 7), 3, 2), ((2, 1, 5, 5), 2, 1), ((3, 4, 28, 28), 2, 2),
              ((1, 2, 6, 6), 3, 1), ((2, 2, 7, 6), 3, 3), ((2, 3, 9, 8), 2, 2)]


@pytest.mark.parametrize("shape,k,s", POOL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_bit_for_bit(rng, shape, k, s, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[::3] = x.flat[1]                    # ties: the first maximum wins in both
    for (f, b), (fr, br) in (((maxpool_forward, maxpool_backward),
                              (maxpool_forward_reference, maxpool_backward_reference)),
                             ((avgpool_forward, avgpool_backward),
                              (avgpool_forward_reference, avgpool_backward_reference))):
        y, cache = f(x, k, s)
        yr, cache_r = fr(x, k, s)
        np.testing.assert_array_equal(y, yr)
        assert y.dtype == dtype
        dout = rng.standard_normal(y.shape).astype(dtype)
        dx, dxr = b(dout, cache), br(dout, cache_r)
        assert dx.dtype == dtype
        np.testing.assert_array_equal(dx, dxr)


@pytest.mark.parametrize("k", [2, 16, 17])
def test_maxpool_argmax_dtype_and_large_windows(rng, k):
    """The cache holds the window offsets as a byte while a window has at most 256 values (2x2:
    the models' pooling; 16x16: 256), as intp above (17x17), and both give the reference's bits."""
    x = rng.standard_normal((2, 3, 2 * k + 1, 2 * k)).astype(np.float32)
    y, cache = maxpool_forward(x, k, k)
    yr, cache_r = maxpool_forward_reference(x, k, k)
    assert cache[1].dtype == (np.uint8 if k * k <= 256 else np.intp)
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(cache[1], cache_r[1])
    dout = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(maxpool_backward(dout, cache), maxpool_backward_reference(dout, cache_r))


@pytest.mark.parametrize("k,s", [(2, 2), (3, 3), (3, 2)])
def test_maxpool_nan_bit_for_bit(rng, k, s):
    """NaN follows argmax's rule (the first NaN of a window wins) in the unrolled 2x2 kernel,
    the general one and the reference alike."""
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    x[0, 0, 0, 1] = x[1, 2, 4, 4] = x[1, 2, 4, 5] = np.nan
    y, cache = maxpool_forward(x, k, s)
    yr, cache_r = maxpool_forward_reference(x, k, s)
    np.testing.assert_array_equal(y, yr)
    np.testing.assert_array_equal(cache[1], cache_r[1])
    dout = rng.standard_normal(y.shape).astype(np.float32)
    np.testing.assert_array_equal(maxpool_backward(dout, cache), maxpool_backward_reference(dout, cache_r))

"""The training-mode batch-norm kernels (``minidress.kernels.batchnorm``, behind
``batchnorm_forward``/``batchnorm_backward`` of ``minidress.nn.layers``) against the NumPy
reference: they reproduce NumPy's order of additions (pairwise sums per plane, planes added in
order of n), so every output is **identical** (``array_equal``), in float32 and float64, with
JIT on and off (CI runs this file once more with ``NUMBA_DISABLE_JIT=1``), for any thread count.
"""
import numba
import numpy as np
import pytest

from minidress.kernels import batchnorm
from minidress.nn.layers import (BatchNorm, batchnorm_backward, batchnorm_backward_reference,
                                 batchnorm_forward, batchnorm_forward_reference)

# planes below 8 values (one running sum), 8..128 (eight partial sums, with and without a
# remainder), above 128 (halved: 129, 784 = 28 x 28, 1000), several images and channels
SHAPES = [(3, 2, 1, 5), (5, 3, 2, 4), (4, 2, 3, 3), (64, 3, 8, 8), (6, 4, 9, 15), (2, 3, 3, 43),
          (7, 2, 28, 28), (3, 5, 25, 40), (1, 2, 7, 7)]
DTYPES = [np.float32, np.float64]


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + rng.standard_normal()).astype(dtype)
    gamma, beta = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(2))
    return x, gamma, beta, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_equal_reference_bit_for_bit(shape, dtype):
    x, gamma, beta, dout = _inputs(shape, dtype)
    ref_out, ref_cache = batchnorm_forward_reference(x, gamma, beta)
    out, xhat, mean, var, inv_std = batchnorm.batchnorm_forward_train(x, gamma, beta)
    for got, want in [(out, ref_out), (xhat, ref_cache[0]), (inv_std, ref_cache[2]),
                      (mean, ref_cache[6]), (var, ref_cache[7])]:
        assert got.dtype == want.dtype and np.array_equal(got, want)
    ref_grads = batchnorm_backward_reference(dout, ref_cache)
    grads = batchnorm.batchnorm_backward_train(dout, xhat, gamma, inv_std)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_layer_functions_route_and_agree():
    """The layer functions take the kernels exactly where ``kernel_pays`` says, and give the
    reference's numbers either way (a 4x4 plane, non-contiguous input and one channel go to the
    reference)."""
    for shape, view in [((8, 3, 8, 8), False), ((8, 3, 4, 4), False), ((8, 3, 8, 8), True),
                        ((8, 1, 8, 8), False)]:
        x, gamma, beta, dout = _inputs(shape, np.float32, seed=1)
        if view:
            x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        assert batchnorm.kernel_pays(x) == (shape[1] > 1 and shape[2] * shape[3] >= 64 and not view)
        out, cache = batchnorm_forward(x, gamma, beta)
        ref_out, ref_cache = batchnorm_forward_reference(x, gamma, beta)
        assert np.array_equal(out, ref_out)
        for got, want in zip(batchnorm_backward(dout, cache), batchnorm_backward_reference(dout, ref_cache)):
            assert np.array_equal(got, want)


def test_nan_and_constant_channels_match():
    x, gamma, beta, dout = _inputs((4, 3, 8, 8), np.float32, seed=2)
    x[1, 0, 2, 3] = np.nan          # channel 0 becomes NaN throughout
    x[:, 1] = 2.5                   # channel 1 has zero variance
    ref_out, ref_cache = batchnorm_forward_reference(x, gamma, beta)
    out, cache = batchnorm_forward(x, gamma, beta)
    assert np.array_equal(out, ref_out, equal_nan=True)
    for got, want in zip(batchnorm_backward(dout, cache), batchnorm_backward_reference(dout, ref_cache)):
        assert np.array_equal(got, want, equal_nan=True)


def test_result_independent_of_thread_count():
    x, gamma, beta, dout = _inputs((16, 6, 12, 12), np.float32, seed=3)
    before = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            out, xhat, _, _, inv_std = batchnorm.batchnorm_forward_train(x, gamma, beta)
            results.append((out, *batchnorm.batchnorm_backward_train(dout, xhat, gamma, inv_std)))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


def test_training_layer_updates_running_statistics_as_before():
    """The layer's running statistics and gradients, through the kernels, are the reference's."""
    x, _, _, dout = _inputs((10, 4, 8, 8), np.float64, seed=4)
    layers = [BatchNorm(4, dtype=np.float64) for _ in range(2)]
    outs = [layers[0].forward(x)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batchnorm, "kernel_pays", lambda a: False)
        outs.append(layers[1].forward(x))
        grads_ref = layers[1].backward(dout)
    assert np.array_equal(*outs) and np.array_equal(layers[0].backward(dout), grads_ref)
    for name in ("running_mean", "running_var"):
        assert np.array_equal(layers[0].buffers[name], layers[1].buffers[name])
    for name in ("weight", "bias"):
        assert np.array_equal(layers[0].grads[name], layers[1].grads[name])

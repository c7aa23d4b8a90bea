"""The ReLU kernels (``minidress.kernels.activation``, behind ``relu_forward``/``relu_backward``
of ``minidress.nn.layers``) against the NumPy reference, byte for byte (so ``-0.0`` against
``+0.0`` and every NaN count), with JIT on and off (CI runs the suite once more with
``NUMBA_DISABLE_JIT=1``)."""
import numpy as np
import pytest

from minidress.kernels import activation
from minidress.nn.layers import ReLU, relu_backward, relu_backward_reference, relu_forward, relu_forward_reference

DTYPES = [np.float32, np.float64]
# inf * 0 and NaN comparisons in the NumPy expressions warn; the values are what is tested
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
SHAPES = [(0,), (1,), (7,), (3, 5), (4, 3, 6, 6), (2, 16, 28, 28)]
SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.0, -3.0]


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _arrays(shape, dtype, seed=0):
    """Random values with every special value mixed in, the same for ``x`` and ``dout``."""
    rng = np.random.default_rng(seed)
    x, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    for a in (x, dout):
        flat = a.reshape(-1)
        picks = rng.integers(0, max(1, flat.size), size=min(flat.size, 4 * len(SPECIAL)))
        flat[picks] = np.resize(np.array(SPECIAL, dtype), len(picks))
    return x, dout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_equal_reference_byte_for_byte(shape, dtype):
    x, dout = _arrays(shape, dtype)
    assert activation.kernel_applies(x)
    out, cache = relu_forward(x)
    ref_out, ref_cache = relu_forward_reference(x)
    assert _same_bytes(out, ref_out) and _same_bytes(cache, ref_cache)
    assert _same_bytes(out, np.maximum(x, 0))                  # the plain NumPy expression
    dx = relu_backward(dout, cache)
    assert _same_bytes(dx, relu_backward_reference(dout, ref_cache))
    assert _same_bytes(dx, dout * (x > 0))                       # the mask taken from x itself


def test_every_special_value_pair():
    """Each special ``x`` against each special ``dout``: 100 pairs, both dtypes."""
    for dtype in DTYPES:
        x = np.repeat(np.array(SPECIAL, dtype), len(SPECIAL))
        dout = np.tile(np.array(SPECIAL, dtype), len(SPECIAL))
        out, cache = relu_forward(x)
        assert _same_bytes(out, np.maximum(x, 0))
        assert _same_bytes(relu_backward(dout, cache), dout * (x > 0))


def test_strided_inputs_and_the_reference_path():
    """A strided view (as a convolution's input gradient arrives) runs the kernel with the same
    bytes; an integer array, 5 dimensions and mismatched dtypes take the reference."""
    x, dout = _arrays((3, 4, 10, 12), np.float32)
    view, dview = x[:, ::2, 1:9, 2:11], dout[:, ::2, 1:9, 2:11]
    assert activation.kernel_applies(view) and not view.flags.c_contiguous
    out, cache = relu_forward(view)
    assert _same_bytes(out, np.maximum(view, 0)) and out.flags.c_contiguous
    assert _same_bytes(relu_backward(dview, cache), dview * (view > 0))
    assert not activation.kernel_applies(np.arange(4)) and not activation.kernel_applies(x[None])
    ints = np.arange(-3, 4)
    assert np.array_equal(relu_forward(ints)[0], np.maximum(ints, 0))
    assert _same_bytes(relu_forward(x[None])[0], np.maximum(x[None], 0))
    out64 = relu_forward(x.astype(np.float64))[1]
    assert _same_bytes(relu_backward(dout, out64), dout * (out64 > 0))


def test_layer_gradient_is_the_mask():
    """The layer end to end: the gradient passes exactly where the input was positive."""
    x = np.array([[-2.0, -0.0, 0.0, 1e-300, 5.0]])
    layer = ReLU()
    assert np.array_equal(layer.forward(x), [[0.0, 0.0, 0.0, 1e-300, 5.0]])
    assert np.array_equal(layer.backward(np.full_like(x, 3.0)), [[0.0, 0.0, 0.0, 3.0, 3.0]])

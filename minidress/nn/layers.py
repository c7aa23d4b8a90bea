"""Layers with hand-written backward passes.

Every layer comes twice, side by side:

* a pair of functions in the CS231n style, ``out, cache = thing_forward(x, ...)`` and
  ``dx, dparams... = thing_backward(dout, cache)``, which hold all the mathematics; and
* a small class that owns the parameters (``params``), their gradients (``grads``, same names),
  any running statistics (``buffers``) and the cache between ``forward`` and ``backward``.

Conventions
-----------
* Activations are NCHW for images and ``[N, features]`` for vectors.
* Linear weight ``[out, in]``; Conv weight ``[C_out, C_in, kh, kw]``. A *row* is one output unit
  over its whole fan-in (``in`` or ``C_in*kh*kw``); row sparsity lives on this axis.
* dtype follows the parameters: a layer built in float32 takes float32 input and a float64 model
  takes float64 input. A mismatch is an error rather than a silent upcast, because a float64
  gradient check must never be quietly run in float32 (or the reverse).
* ``mask`` (Linear and Conv2d): an optional array of the weight's shape. As in
  ``torch.nn.utils.prune``, the weight itself is never edited: the forward pass uses
  ``weight * mask`` and the weight's gradient is masked the same way.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..im2col import col2im, conv_output_size, im2col, receptive_fields
from ..kernels import activation, batchnorm, conv_train, rowsparse_matmul
from ..kernels.rowsparse import rowsparse_matmul_input_grad, rowsparse_wins


# ---------------------------------------------------------------------------------------------
# The module system: parameters, gradients and buffers by name
# ---------------------------------------------------------------------------------------------

class Layer:
    """Base class: named ``params``/``grads``/``buffers`` and a train/eval switch.

    Composite layers list their sub-layers in ``children()``; names are joined with dots, so a
    model's parameters read ``"0.weight"``, ``"2.conv1.weight"`` and so on.
    """

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.training = True

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def children(self) -> list[tuple[str, "Layer"]]:
        return []

    def named_layers(self, prefix: str = ""):
        """Yield ``(prefix, layer)`` for this layer and, depth first, every sub-layer."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}{name}.")

    def _collect(self, attr: str) -> dict[str, np.ndarray]:
        return {p + k: v for p, layer in self.named_layers() for k, v in getattr(layer, attr).items()}

    def parameters(self) -> dict[str, np.ndarray]:
        """All trainable arrays by full name (the arrays themselves, not copies)."""
        return self._collect("params")

    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients from the last ``backward``, with the same names as ``parameters()``."""
        return self._collect("grads")

    def state(self) -> dict[str, np.ndarray]:
        """Parameters and buffers (running statistics): everything a checkpoint must hold."""
        return {**self.parameters(), **self._collect("buffers")}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` into this model's arrays in place; names, shapes and dtypes must match."""
        own = self.state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, arr in own.items():
            new = np.asarray(state[name])
            if new.shape == (1, *arr.shape) and new.dtype == arr.dtype:
                raise ValueError(f"state[{name!r}] has shape {new.shape}, expected {arr.shape}: a "
                                 f"checkpoint (format 1) of an any-time peer written by minidress "
                                 f"before the one BatchNorm class, whose batch norms kept a one-slot "
                                 f"axis; convert it with state[{name!r}] = state[{name!r}][0]")
            if new.shape != arr.shape or new.dtype != arr.dtype:
                raise ValueError(f"state[{name!r}] has shape {new.shape} and dtype {new.dtype}, "
                                 f"expected {arr.shape} and {arr.dtype}")
            arr[...] = new

    def astype(self, dtype) -> "Layer":
        """Convert every parameter and buffer to ``dtype`` (new arrays); returns self."""
        for _, layer in self.named_layers():
            for d in (layer.params, layer.buffers):
                for k in d:
                    d[k] = d[k].astype(dtype)
            layer.grads = {}
        return self

    def train(self, mode: bool = True) -> "Layer":
        for _, layer in self.named_layers():
            layer.training = mode
        return self

    def eval(self) -> "Layer":
        return self.train(False)


@contextmanager
def eval_mode(model):
    """Run a block with ``model`` in eval mode, then restore the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_input(x, name: str, ndim: int, dim1: int | None, dtype) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != ndim:
        got = x.shape if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name} expects a {ndim}-D array, got {got}")
    if dim1 is not None and x.shape[1] != dim1:
        raise ValueError(f"{name} expects x.shape[1] == {dim1}, got shape {x.shape}")
    if x.dtype != dtype:
        raise TypeError(f"{name} expects input of dtype {np.dtype(dtype)} (the dtype of its "
                        f"parameters), got {x.dtype}; convert the input or call model.astype()")


def _he_normal(rng, shape, fan_in, dtype):
    # He et al. (2015): keeps the activation variance constant through ReLU layers.
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def _masked(w, mask):
    return w if mask is None else w * mask


def _mask_gradient(dw, mask):
    """``_masked(dw, mask)`` written into ``dw``, a fresh gradient the backward pass owns: the
    same numbers without a new array (fresh pages are slow on a virtual machine)."""
    return dw if mask is None else np.multiply(dw, mask, out=dw)


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------

def linear_forward(x, w, b):
    """``out = x @ w.T + b``.

    Parameters
    ----------
    x : ndarray [N, in]
    w : ndarray [out, in]
    b : ndarray [out]

    Returns
    -------
    out : ndarray [N, out]
    cache : (x, w)
    """
    return x @ w.T + b, (x, w)


def linear_backward(dout, cache, input_grad=True):
    """Gradients of ``linear_forward``: ``dout [N, out]`` -> ``dx [N, in], dw [out, in], db [out]``.
    With ``input_grad=False``, ``dx`` is not computed (None): the data's gradient, which nothing
    in training reads (``Sequential.backward``)."""
    x, w = cache
    return dout @ w if input_grad else None, dout.T @ x, dout.sum(axis=0)


def rowsparse_linear_forward(x, w, kept, b):
    """``out = x @ (w * M).T + b`` for the mask ``M`` that keeps, in row ``r``, the columns
    ``kept[r]``, computed by the row-sparse kernel (``minidress.kernels``) on the kept weights
    only. Same result as ``linear_forward(x, w * M, b)`` up to the order of the additions.

    Parameters
    ----------
    x : ndarray [N, in];  w : ndarray [out, in];  b : ndarray [out]
    kept : unsigned int ndarray [out, k], distinct columns per row

    Returns
    -------
    out : ndarray [N, out] (column-major: ``out.T`` is the kernel's contiguous output)
    cache : for ``rowsparse_linear_backward``
    """
    values = np.take_along_axis(w, kept.astype(np.intp), axis=1)
    xt = np.ascontiguousarray(x.T)           # free when x came from a layer like this one
    yt = rowsparse_matmul(values, kept, kept.shape[1], xt, check=False)
    return yt.T + b, (xt, values, kept, w.shape)


def rowsparse_linear_backward(dout, cache, input_grad=True):
    """Gradients of ``rowsparse_linear_forward``: ``dx [N, in]`` by the row-sparse kernel,
    ``dw [out, in]`` (zero outside the kept entries) and ``db [out]``. The kept entries of ``dw``
    come from the dense product ``dout.T @ x``, the numbers the dense masked backward pass keeps:
    one BLAS call was measured faster than the row-sparse values' gradient
    (``rowsparse_matmul_grads``) at every density (``rowsparse_matmul_input_grad_reference``)."""
    xt, values, kept, shape = cache
    dx = None
    if input_grad:        # as linear_backward
        dx = rowsparse_matmul_input_grad(values, kept, kept.shape[1], np.ascontiguousarray(dout.T),
                                         shape[1], check=False).T
    idx, dw = kept.astype(np.intp), np.zeros(shape, values.dtype)
    np.put_along_axis(dw, idx, np.take_along_axis(dout.T @ xt.T, idx, axis=1), axis=1)
    return dx, dw, dout.sum(axis=0)


class Linear(Layer):
    """Fully connected layer, ``y = x @ (weight * mask).T + bias``.

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
        Source of the He-normal initial weights (biases start at zero).
    dtype : float32 (default) or float64

    ``kept``: optional ``[out, k]`` unsigned column indices, the same entries as ``mask``. When
    set, forward and backward run on the kept weights alone through the row-sparse kernels
    (``rowsparse_linear_forward``) instead of a dense product with the mask, wherever that is
    measured faster (``minidress.kernels.rowsparse.rowsparse_wins``; the same numbers up to the
    order of the additions).
    """

    def __init__(self, in_features: int, out_features: int, rng=None, dtype=np.float32, bias=True):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.in_features, self.out_features = in_features, out_features
        self.params["weight"] = _he_normal(rng, (out_features, in_features), in_features, dtype)
        if bias:
            self.params["bias"] = np.zeros(out_features, dtype)
        self.mask = None
        self.kept = None

    def forward(self, x):
        w = self.params["weight"]
        _check_input(x, "Linear", 2, self.in_features, w.dtype)
        b = self.params.get("bias", np.zeros((), w.dtype))
        # The kernels run where measured faster for this shape and batch (``rowsparse_wins``).
        # The path taken is recorded in the cache (as CS231n's fast layers do), so backward
        # follows forward even if ``kept`` changes in between.
        # Without a mask, ``kept`` alone says what is kept: only the kernels can honour it.
        if self.kept is not None and (self.mask is None or rowsparse_wins(self.kept.shape[1], *w.shape,
                                                                          len(x), w.dtype)):
            out, cache = rowsparse_linear_forward(x, w, self.kept, b)
            self.cache = ("rowsparse", cache)
        else:
            out, cache = linear_forward(x, _masked(w, self.mask), b)
            self.cache = ("dense", cache, self.mask)
        return out

    def backward(self, dout, input_grad=True):
        if self.cache[0] == "rowsparse":
            dx, dw, db = rowsparse_linear_backward(dout, self.cache[1], input_grad)
            self.grads["weight"] = dw
        else:
            dx, dw, db = linear_backward(dout, self.cache[1], input_grad)
            self.grads["weight"] = _mask_gradient(dw, self.cache[2])
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


# ---------------------------------------------------------------------------------------------
# Conv2d: Numba loops (kernels.conv_train), and the im2col reference beside them
# ---------------------------------------------------------------------------------------------

def conv2d_forward(x, w, b, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in every DL library): in float32, per-image GEMMs
    over a strided view of the input (``minidress.kernels.conv_train``); in float64, the im2col
    reference, so that the golden files and the float64 checks stay bit for bit. Same arguments
    and output as ``conv2d_forward_reference``, up to the order of the additions; its cache is
    for ``conv2d_backward`` only."""
    if x.dtype == np.float32:
        return conv_train.conv2d_forward(x, w, b, stride, padding)
    return conv2d_forward_reference(x, w, b, stride, padding)


def conv2d_backward(dout, cache, input_grad=True):
    """``dout [N, C_out, Ho, Wo]`` -> ``dx [N, C_in, H, W], dw [C_out, C_in, kh, kw], db [C_out]``
    (``dx`` None with ``input_grad=False``, as in ``linear_backward``)."""
    if cache[1].ndim == 4:      # the padded input (direct loops), not the im2col matrix
        return conv_train.conv2d_backward(dout, cache, input_grad)
    return conv2d_backward_reference(dout, cache, input_grad)


def conv2d_forward_reference(x, w, b, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in every DL library) via im2col and one GEMM: the NumPy
    reference for ``conv2d_forward``.

    Parameters
    ----------
    x : ndarray [N, C_in, H, W]
    w : ndarray [C_out, C_in, kh, kw]
    b : ndarray [C_out]

    Returns
    -------
    out : ndarray [N, C_out, Ho, Wo]
    cache : tuple for ``conv2d_backward_reference``
    """
    c_out, _, kh, kw = w.shape
    cols, (ho, wo) = im2col(x, kh, kw, stride, padding)
    wmat = w.reshape(c_out, -1)
    out = cols @ wmat.T + b                                   # [N*Ho*Wo, C_out]
    out = out.reshape(x.shape[0], ho, wo, c_out).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out), (x.shape, cols, w, stride, padding)


def conv2d_backward_reference(dout, cache, input_grad=True):
    """The reference backward pass of ``conv2d_forward_reference`` (its cache): two GEMMs and
    ``col2im`` (only the weight GEMM with ``input_grad=False``; ``dx`` is then None)."""
    x_shape, cols, w, stride, padding = cache
    c_out, _, kh, kw = w.shape
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, c_out)         # [N*Ho*Wo, C_out]
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0)
    dx = col2im(d2 @ w.reshape(c_out, -1), x_shape, kh, kw, stride, padding) if input_grad else None
    return dx, dw, db


def conv2d_forward_naive(x, w, b, stride=1, padding=0):
    """Reference convolution with explicit loops; same signature and result as
    ``conv2d_forward`` (without the cache). Slow: for tests and for reading."""
    n, c, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.empty((n, c_out, ho, wo), x.dtype)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


class Conv2d(Layer):
    """2-D convolution with square kernels, stride and zero padding.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
    stride, padding : int
    rng : numpy.random.Generator
    dtype : float32 (default) or float64

    Shapes: ``x [N, C_in, H, W]`` -> ``[N, C_out, Ho, Wo]`` with
    ``Ho = (H + 2*padding - kernel_size) // stride + 1``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None,
                 dtype=np.float32, bias=True):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        if stride < 1 or padding < 0 or kernel_size < 1:
            raise ValueError(f"Conv2d needs kernel_size >= 1, stride >= 1, padding >= 0; got "
                             f"{kernel_size}, {stride}, {padding}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.params["weight"] = _he_normal(rng, shape, in_channels * kernel_size ** 2, dtype)
        if bias:
            self.params["bias"] = np.zeros(out_channels, dtype)
        self.mask = None

    def forward(self, x):
        w = self.params["weight"]
        _check_input(x, "Conv2d", 4, self.in_channels, w.dtype)
        b = self.params.get("bias", np.zeros((), w.dtype))
        out, self.cache = conv2d_forward(x, _masked(w, self.mask), b, self.stride, self.padding)
        self.output_hw = out.shape[2:]          # (Ho, Wo) of the last input, for counting MACs
        return out

    def backward(self, dout, input_grad=True):
        dx, dw, db = conv2d_backward(dout, self.cache, input_grad)
        self.grads["weight"] = _mask_gradient(dw, self.mask)
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
                f"s={self.stride}, p={self.padding})")


# ---------------------------------------------------------------------------------------------
# Activations, reshaping, pooling
# ---------------------------------------------------------------------------------------------

def relu_forward_reference(x):
    """``max(x, 0)``; any shape. The cache is the output: ``out > 0`` exactly where ``x > 0``."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward_reference(dout, cache):
    """The gradient passes where the input was positive (0 at exactly 0, as in PyTorch)."""
    return dout * (cache > 0)


def relu_forward(x):
    """Same as ``relu_forward_reference``, bit for bit; a float input of at most 4 dimensions
    runs ``kernels.activation`` (one pass, no mask)."""
    if not activation.kernel_applies(x):
        return relu_forward_reference(x)
    out = activation.relu_forward(x)
    return out, out


def relu_backward(dout, cache):
    """Same as ``relu_backward_reference``, bit for bit (the kernel where both arrays allow)."""
    if not (activation.kernel_applies(dout) and activation.kernel_applies(cache)
            and dout.dtype == cache.dtype and dout.shape == cache.shape):
        return relu_backward_reference(dout, cache)
    return activation.relu_backward(dout, cache)


class ReLU(Layer):
    def forward(self, x):
        out, self.cache = relu_forward(x)
        return out

    def backward(self, dout):
        return relu_backward(dout, self.cache)

    def __repr__(self):
        return "ReLU()"


class Flatten(Layer):
    """``[N, ...]`` -> ``[N, prod(...)]``."""

    def forward(self, x):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.shape)

    def __repr__(self):
        return "Flatten()"


def _windows(x, k, stride):
    """``[N, C, H, W]`` -> read-only view ``[N, C, Ho, Wo, k, k]`` of the pooling windows."""
    return receptive_fields(x, k, k, stride)[0]


def _scatter_windows(dwin, x_shape, k, stride):
    """Adjoint of ``_windows``: add ``dwin [N, C, Ho, Wo, k, k]`` back into ``[N, C, H, W]``."""
    n, c, ho, wo = dwin.shape[:4]
    dx = np.zeros(x_shape, dwin.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += dwin[..., i, j]
    return dx


def maxpool_forward_reference(x, k=2, stride=None):
    """NumPy reference for ``maxpool_forward``: max over ``k x k`` windows. ``x [N, C, H, W]`` -> ``[N, C, Ho, Wo]``.

    Ties inside a window send the gradient to the first maximum in row-major order.
    """
    stride = k if stride is None else stride
    win = _windows(x, k, stride)
    flat = win.reshape(*win.shape[:4], k * k)
    arg = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return out, (x.shape, arg, k, stride)


def maxpool_backward_reference(dout, cache):
    x_shape, arg, k, stride = cache
    onehot = arg[..., None] == np.arange(k * k)                 # [N, C, Ho, Wo, k*k]
    dwin = (onehot * dout[..., None]).reshape(*dout.shape, k, k)
    return _scatter_windows(dwin, x_shape, k, stride)


def avgpool_forward_reference(x, k=2, stride=None):
    """NumPy reference for ``avgpool_forward``: mean over ``k x k`` windows. ``x [N, C, H, W]`` -> ``[N, C, Ho, Wo]``."""
    stride = k if stride is None else stride
    return _windows(x, k, stride).mean(axis=(-2, -1)), (x.shape, k, stride)


def avgpool_backward_reference(dout, cache):
    x_shape, k, stride = cache
    dwin = np.broadcast_to((dout / (k * k))[..., None, None], (*dout.shape, k, k))
    return _scatter_windows(dwin, x_shape, k, stride)


# The pooling layers run the Numba loops, which give the references' results bit for bit.
maxpool_forward, maxpool_backward = conv_train.maxpool_forward, conv_train.maxpool_backward
avgpool_forward, avgpool_backward = conv_train.avgpool_forward, conv_train.avgpool_backward


class _Pool2d(Layer):
    """A ``k x k`` pooling layer over its ``forward``/``backward`` function pair."""
    forward_fn = backward_fn = None

    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.k, self.stride = kernel_size, kernel_size if stride is None else stride

    def forward(self, x):
        out, self.cache = self.forward_fn(x, self.k, self.stride)
        return out

    def backward(self, dout):
        return self.backward_fn(dout, self.cache)

    def __repr__(self):
        return f"{type(self).__name__}({self.k}, s={self.stride})"


class MaxPool2d(_Pool2d):
    """Max pooling: ``[N, C, H, W]`` -> ``[N, C, Ho, Wo]``."""
    forward_fn, backward_fn = staticmethod(maxpool_forward), staticmethod(maxpool_backward)


class AvgPool2d(_Pool2d):
    """Average pooling: ``[N, C, H, W]`` -> ``[N, C, Ho, Wo]``."""
    forward_fn, backward_fn = staticmethod(avgpool_forward), staticmethod(avgpool_backward)


class GlobalAvgPool(Layer):
    """Mean over all positions: ``[N, C, H, W]`` -> ``[N, C]``."""

    def forward(self, x):
        self.shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dout):
        n, c, h, w = self.shape
        return np.broadcast_to((dout / (h * w))[:, :, None, None], self.shape).copy()

    def __repr__(self):
        return "GlobalAvgPool()"


# ---------------------------------------------------------------------------------------------
# Batch normalisation
# ---------------------------------------------------------------------------------------------

def batchnorm_forward_reference(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Normalise each feature (``[N, F]``) or channel (``[N, C, H, W]``), then scale and shift.

    With ``mean``/``var`` given (eval mode) those statistics are used; otherwise the batch's own
    (biased) mean and variance are.

    Returns
    -------
    out : ndarray, shape of x
    cache : tuple; ``cache[-2:]`` are the batch mean and biased variance used, shape [F] or [C]
    """
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    use_batch = mean is None
    if use_batch:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    out = xhat * gamma.reshape(shape) + beta.reshape(shape)
    return out, (xhat, gamma, inv_std, axes, shape, use_batch, mean, var)


def batchnorm_backward_reference(dout, cache):
    """``dout`` (shape of x) -> ``dx, dgamma [F], dbeta [F]``.

    In training mode the batch statistics depend on x, which adds the two mean terms; in eval
    mode the statistics are constants and the layer is a per-feature affine map.
    """
    xhat, gamma, inv_std, axes, shape, use_batch, _, _ = cache
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * xhat).sum(axis=axes)
    dxhat = dout * gamma.reshape(shape)
    if not use_batch:
        return dxhat * inv_std.reshape(shape), dgamma, dbeta
    m = dout.size // dbeta.size
    dx = (inv_std.reshape(shape) / m) * (
        m * dxhat - dxhat.sum(axis=axes).reshape(shape)
        - xhat * (dxhat * xhat).sum(axis=axes).reshape(shape))
    return dx, dgamma, dbeta


def batchnorm_forward(x, gamma, beta, mean=None, var=None, eps=1e-5):
    """Same arguments, output and cache as ``batchnorm_forward_reference``, bit for bit; the
    training mode of a C-contiguous ``[N, C, H, W]`` input runs ``kernels.batchnorm`` (passes in
    memory order, no temporaries) where it follows NumPy's order of additions and pays
    (``kernel_pays``), everything else the reference."""
    if mean is not None or not batchnorm.kernel_pays(x):
        return batchnorm_forward_reference(x, gamma, beta, mean, var, eps)
    out, xhat, mean, var, inv_std = batchnorm.batchnorm_forward_train(x, gamma, beta, eps)
    return out, (xhat, gamma, inv_std, (0, 2, 3), (1, -1, 1, 1), True, mean, var)


def batchnorm_backward(dout, cache):
    """Same as ``batchnorm_backward_reference``, bit for bit (the kernel in training mode on
    ``[N, C, H, W]``)."""
    xhat, gamma, inv_std, _, _, use_batch, _, _ = cache
    if not use_batch or not batchnorm.kernel_pays(dout):
        return batchnorm_backward_reference(dout, cache)
    return batchnorm.batchnorm_backward_train(dout, xhat, gamma, inv_std)


def _batchnorm_step(layer, x, gamma, beta, running_mean, running_var, override=None):
    """Forward of a batch-norm layer in its current mode; updates the running statistics (in
    place) in training mode."""
    name = type(layer).__name__
    if x.ndim not in (2, 4):
        raise ValueError(f"{name} expects [N, F] or [N, C, H, W] input, got shape {x.shape}")
    _check_input(x, name, x.ndim, layer.num_features, gamma.dtype)
    if not layer.training:
        mean, var = override or (running_mean, running_var)
        return batchnorm_forward(x, gamma, beta, mean, var, layer.eps)
    m = x.size // layer.num_features
    if m < 2:
        raise ValueError(f"{name} in training mode needs more than one value per feature, "
                         f"got input shape {x.shape}")
    out, cache = batchnorm_forward(x, gamma, beta, eps=layer.eps)
    mean, var = cache[-2:]
    r = layer.momentum
    running_mean *= 1 - r
    running_mean += r * mean
    running_var *= 1 - r
    running_var += (r * m / (m - 1)) * var
    return out, cache


def in_slot(arr, slot):
    """The slot rule: row ``slot`` of a per-slot array ``[n_slots, F]``; the only row of a shared
    one (``[1, F]``, or ``[F]`` in a layer without slots)."""
    return arr if arr.ndim == 1 else arr[slot if len(arr) > 1 else 0]


def fold_batchnorm(weight, bias, running_mean, running_var, eps, slot=0):
    """Eval-mode batch norm at ``slot`` as one affine map, ``y = x * scale + shift``.

    Returns ``(scale [F], shift [F])``: ``scale = weight / sqrt(var + eps)``,
    ``shift = bias - mean * scale`` (arrays ``[F]`` or ``[n_slots, F]``, see ``in_slot``).
    """
    scale = in_slot(weight, slot) / np.sqrt(in_slot(running_var, slot) + eps)
    return scale, in_slot(bias, slot) - in_slot(running_mean, slot) * scale


class BatchNorm(Layer):
    """Batch normalisation for ``[N, F]`` (1-D) and ``[N, C, H, W]`` (2-D) input.

    Training mode normalises with the batch statistics and updates the running ones,
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance,
    exactly as PyTorch does; eval mode normalises with the running statistics.

    Parameters
    ----------
    num_features : int   (F or C)
    momentum : float
    eps : float
    dtype : float32 (default) or float64

    Slots
    -----
    Sub-networks that share the surrounding weights (DRESS levels, for instance) see differently
    distributed activations, so each may want statistics and affine parameters of its own. A
    layer starts with one slot and arrays ``[F]``; ``set_slots(n, ...)`` gives it ``n``, after
    which ``params["weight"], params["bias"]`` are ``[n_affine, F]`` and the buffers
    ``running_mean, running_var`` are ``[n_stats, F]`` (``n`` where per slot, 1 where shared).
    ``slot`` selects the one in use (``in_slot``). A backward pass in slot ``s`` writes only row
    ``s`` of a per-slot gradient, so gradients summed over slots train each row by its own slot.

    ``stats_override``: ``(mean [F], var [F])`` used in eval mode instead of the running
    statistics (batch-norm recalibration sets it for a density that was not trained); None = off.
    """

    def __init__(self, num_features, momentum=0.1, eps=1e-5, dtype=np.float32):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.params["weight"] = np.ones(num_features, dtype)
        self.params["bias"] = np.zeros(num_features, dtype)
        self.buffers["running_mean"] = np.zeros(num_features, dtype)
        self.buffers["running_var"] = np.ones(num_features, dtype)
        self.n_slots, self.slot, self.stats_override = 1, 0, None

    def set_slots(self, n_slots, per_slot_stats=True, per_slot_affine=True):
        """Give the layer ``n_slots`` slots, each starting from its current parameters and
        statistics; per slot or shared, for the statistics and the affine pair separately."""
        layout = {"weight": per_slot_affine, "bias": per_slot_affine,
                  "running_mean": per_slot_stats, "running_var": per_slot_stats}
        arrays = {**self.params, **self.buffers}
        want = {k: (n_slots if per else 1, self.num_features) for k, per in layout.items()}
        if all(arrays[k].shape == want[k] for k in want) and self.n_slots == n_slots:
            return self                                    # already laid out this way
        if self.n_slots != 1 or arrays["weight"].ndim != 1:
            raise ValueError(f"{self!r} already has slots; set_slots expects a layer without slots")
        for d in (self.params, self.buffers):
            for k in d:
                d[k] = np.repeat(d[k][None], want[k][0], axis=0)
        self.n_slots, self.grads = n_slots, {}
        return self

    def forward(self, x):
        if not 0 <= self.slot < self.n_slots:
            raise ValueError(f"slot must be in [0, {self.n_slots}), got {self.slot}")
        p, b = self.params, self.buffers
        out, self.cache = _batchnorm_step(self, x, in_slot(p["weight"], self.slot), in_slot(p["bias"], self.slot),
                                          in_slot(b["running_mean"], self.slot),
                                          in_slot(b["running_var"], self.slot), self.stats_override)
        self._slot_used = self.slot
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = batchnorm_backward(dout, self.cache)
        for name, g in (("weight", dgamma), ("bias", dbeta)):
            p = self.params[name]
            if p.ndim == 1:
                self.grads[name] = g
            else:                   # only the slot in use gets a gradient
                self.grads[name] = np.zeros_like(p)
                in_slot(self.grads[name], self._slot_used)[...] = g
        return dx

    def __repr__(self):
        if self.n_slots == 1 and self.params["weight"].ndim == 1:
            return f"BatchNorm({self.num_features})"
        return (f"BatchNorm({self.num_features}, slots={self.n_slots}, "
                f"stats={self.buffers['running_mean'].shape[0]}, affine={self.params['weight'].shape[0]})")


# ---------------------------------------------------------------------------------------------
# Composites: Sequential and the pre-activation residual block
# ---------------------------------------------------------------------------------------------

class Sequential(Layer):
    """Layers applied in order; ``backward`` runs them in reverse."""

    def __init__(self, *layers: Layer):
        super().__init__()
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout, input_grad=True):
        """Every layer's gradients from ``dout``; returns the input's gradient.

        With ``input_grad=False`` (what training calls: nothing reads the data's gradient), the
        layers before the first one with parameters are skipped and a first Linear or Conv2d
        computes no input gradient; returns None. Every parameter's gradient is the same bit
        for bit; the saving is a whole product of the first layer (30% of an MNIST MLP's
        multiply-adds)."""
        first = 0 if input_grad else next((i for i, layer in enumerate(self.layers)
                                            if layer.parameters()), len(self.layers))
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            if i == first and not input_grad and isinstance(layer, (Linear, Conv2d)):
                layer.backward(dout, input_grad=False)
            else:
                dout = layer.backward(dout)
        return dout if input_grad else None

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}) {layer!r}".replace("\n", "\n  ") for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class PreActBlock(Layer):
    """Pre-activation residual block (He et al., 2016, "Identity Mappings in Deep ResNets")::

        a   = relu(bn1(x))
        out = conv2(relu(bn2(conv1(a)))) + shortcut

    where ``shortcut = x`` when shapes agree and ``shortcut = proj(a)`` (1x1 conv with the
    block's stride) when they do not. Both 3x3 convs have padding 1; conv1 carries the stride.
    Convs have no bias: the batch norm after them has one.
    """

    def __init__(self, in_channels, out_channels, stride=1, rng=None, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.bn1 = BatchNorm(in_channels, dtype=dtype)
        self.relu1 = ReLU()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, rng, dtype, bias=False)
        self.bn2 = BatchNorm(out_channels, dtype=dtype)
        self.relu2 = ReLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, rng, dtype, bias=False)
        self.proj = None
        if stride != 1 or in_channels != out_channels:
            self.proj = Conv2d(in_channels, out_channels, 1, stride, 0, rng, dtype, bias=False)

    def children(self):
        names = ["bn1", "relu1", "conv1", "bn2", "relu2", "conv2"] + (["proj"] if self.proj else [])
        return [(n, getattr(self, n)) for n in names]

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (self.proj(a) if self.proj else x)

    def backward(self, dout):
        da = self.conv1.backward(self.bn2.backward(self.relu2.backward(self.conv2.backward(dout))))
        if self.proj:
            return self.bn1.backward(self.relu1.backward(da + self.proj.backward(dout)))
        return self.bn1.backward(self.relu1.backward(da)) + dout

    def __repr__(self):
        return f"PreActBlock({self.conv1.in_channels}, {self.conv1.out_channels}, s={self.conv1.stride})"

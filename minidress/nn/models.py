"""Small models built from ``minidress.nn.layers``: an MLP, a LeNet-5-style CNN and a tiny
pre-activation ResNet. Every builder takes ``seed`` (or ``rng``) and ``dtype``, so the same seed
gives the same initial weights, bit for bit."""
from __future__ import annotations

import numpy as np

from ..im2col import conv_output_size
from ..validate import check_int
from .layers import (BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d, PreActBlock,
                     ReLU, Sequential)


def _rng(seed, rng):
    return np.random.default_rng(seed) if rng is None else rng


def mlp(sizes, seed=0, rng=None, dtype=np.float32, batchnorm=False):
    """Multi-layer perceptron ``Flatten -> Linear -> ReLU -> ... -> Linear``.

    Parameters
    ----------
    sizes : sequence of int
        ``[in, hidden..., out]``, e.g. ``[784, 300, 100, 10]``. The input is flattened first,
        so image batches ``[N, C, H, W]`` with ``C*H*W == in`` work as they are.
    batchnorm : bool
        Put a BatchNorm between every hidden Linear and its ReLU.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least 2 positive widths, got {sizes}")
    rng = _rng(seed, rng)
    layers = [Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2
        # A bias before batch norm is cancelled by its mean subtraction, so leave it out.
        layers.append(Linear(a, b, rng, dtype, bias=not (hidden and batchnorm)))
        if hidden:
            layers += [BatchNorm(b, dtype=dtype)] if batchnorm else []
            layers.append(ReLU())
    return Sequential(*layers)


def lenet5(input_shape=(1, 28, 28), n_classes=10, seed=0, rng=None, dtype=np.float32,
           widths=(6, 16, 120, 84)):
    """LeNet-5-style CNN: two 5x5 conv + ReLU + 2x2 max-pool stages, then three Linear layers.

    conv1 has padding 2 (the classic 32x32 input becomes 28x28 here). conv2 has no padding on
    inputs of 16 pixels or more and padding 2 on smaller ones, so the same network runs on 8x8
    digits (8 -> 8 -> 4 -> 4 -> 2) and on 28x28 MNIST (28 -> 28 -> 14 -> 10 -> 5).

    Parameters
    ----------
    input_shape : (C, H, W)
    widths : (conv1 channels, conv2 channels, fc1, fc2)
    """
    c, h, w = input_shape
    rng = _rng(seed, rng)
    c1, c2, f1, f2 = widths
    pad2 = 0 if min(h, w) >= 16 else 2
    ho = conv_output_size(conv_output_size(h, 5, 1, 2) // 2, 5, 1, pad2) // 2
    wo = conv_output_size(conv_output_size(w, 5, 1, 2) // 2, 5, 1, pad2) // 2
    return Sequential(
        Conv2d(c, c1, 5, 1, 2, rng, dtype), ReLU(), MaxPool2d(2),
        Conv2d(c1, c2, 5, 1, pad2, rng, dtype), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(c2 * ho * wo, f1, rng, dtype), ReLU(),
        Linear(f1, f2, rng, dtype), ReLU(),
        Linear(f2, n_classes, rng, dtype),
    )


def small_cnn(input_shape=(1, 8, 8), n_classes=10, widths=(32, 32, 64), seed=0, rng=None,
              dtype=np.float32):
    """A small VGG-style CNN with batch norm: the default backbone on the digits data set.

    ``[conv3x3 -> BN -> ReLU] x 2 -> max-pool -> conv3x3 -> BN -> ReLU -> max-pool -> Linear``;
    8x8 inputs become 64 x 2 x 2 features, 28x28 inputs 64 x 7 x 7. Convs have no bias (the batch
    norm after each has one).
    """
    c, h, w = input_shape
    rng = _rng(seed, rng)
    c1, c2, c3 = widths

    def unit(cin, cout):
        return [Conv2d(cin, cout, 3, 1, 1, rng, dtype, bias=False), BatchNorm(cout, dtype=dtype), ReLU()]

    return Sequential(*unit(c, c1), *unit(c1, c2), MaxPool2d(2), *unit(c2, c3), MaxPool2d(2),
                      Flatten(), Linear(c3 * (h // 4) * (w // 4), n_classes, rng, dtype))


def preact_resnet(input_shape=(1, 28, 28), n_classes=10, widths=(16, 32, 64), blocks=1, seed=0,
                  rng=None, dtype=np.float32):
    """Tiny pre-activation ResNet: 3x3 stem conv, three stages of ``blocks`` PreActBlocks
    (the first block of stages 2 and 3 halves the resolution), BN, ReLU, global average pool and
    a Linear classifier. Runs on 28x28 (28 -> 14 -> 7) and 32x32 (32 -> 16 -> 8) inputs.
    """
    c = input_shape[0]
    rng = _rng(seed, rng)
    layers = [Conv2d(c, widths[0], 3, 1, 1, rng, dtype, bias=False)]
    prev = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(PreActBlock(prev, width, stride, rng, dtype))
            prev = width
    layers += [BatchNorm(prev, dtype=dtype), ReLU(), GlobalAvgPool(), Linear(prev, n_classes, rng, dtype)]
    return Sequential(*layers)


MODELS = ("mlp", "lenet5", "cnn", "resnet")


# Bounds of a model spec read from a file: a checkpoint or store is data, and its metadata must
# not make ``build_model`` allocate without limit before the weights are even compared.
MAX_WIDTH, MAX_KERNEL, MAX_LAYERS, MAX_WEIGHTS = 1 << 16, 64, 256, 1 << 27
LAYER_FIELDS = {"linear": ("in", "out"), "conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding"),
                "batchnorm": ("num_features",), "maxpool2d": ("kernel_size", "stride"), "relu": (), "flatten": ()}


def _bounded(value, name, lo, hi):
    what = f"an integer in [{lo}, {hi}]"
    if check_int(value, name, lo, what) > hi:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_spec(spec) -> None:
    """Refuse a model spec (``build_model``'s argument) whose fields have the wrong type or
    size, with one line naming the field: widths up to ``MAX_WIDTH``, kernels, strides and
    paddings up to ``MAX_KERNEL``, at most ``MAX_LAYERS`` layers and ``MAX_WEIGHTS`` weights."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a dict, got {type(spec).__name__}")
    if "layers" in spec:
        layers = spec["layers"]
        if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"model spec 'layers' must be a list of 1 to {MAX_LAYERS} layers")
        weights = 0
        for i, layer in enumerate(layers):
            kind = layer.get("type") if isinstance(layer, dict) else None
            if kind not in LAYER_FIELDS:
                raise ValueError(f"model spec layers[{i}] must be a dict with 'type' one of {sorted(LAYER_FIELDS)}")
            sizes = [_bounded(layer.get(f), f"model spec layers[{i}].{f}", int(f != "padding"),
                              MAX_KERNEL if f in ("kernel_size", "stride", "padding") else MAX_WIDTH)
                     for f in LAYER_FIELDS[kind]]
            if kind in ("linear", "conv2d"):         # in * out, times kernel_size ** 2 for a conv
                weights += sizes[0] * sizes[1] * (sizes[2] ** 2 if kind == "conv2d" else 1)
    else:
        if spec.get("name") not in MODELS:
            raise ValueError(f"model spec 'name' must be one of {MODELS}, got {spec.get('name')!r}")
        shape = spec.get("input_shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 3:
            raise ValueError(f"model spec 'input_shape' must be [C, H, W], got {shape!r}")
        c, h, w = (_bounded(v, f"model spec input_shape[{i}]", 1, MAX_WIDTH) for i, v in enumerate(shape))
        n = _bounded(spec.get("n_classes"), "model spec 'n_classes'", 1, MAX_WIDTH)
        hidden = spec.get("hidden", (300, 100))
        if not isinstance(hidden, (list, tuple)) or len(hidden) > MAX_LAYERS:
            raise ValueError(f"model spec 'hidden' must be a list of at most {MAX_LAYERS} widths, got {hidden!r}")
        sizes = [c * h * w, *(_bounded(v, f"model spec hidden[{i}]", 1, MAX_WIDTH) for i, v in enumerate(hidden)), n]
        weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) if spec["name"] == "mlp" else c * h * w
    if weights > MAX_WEIGHTS:
        raise ValueError(f"model spec has {weights:,} weights, more than the {MAX_WEIGHTS:,} allowed")


def _layer_from_spec(layer, rng, dtype):
    kind = layer["type"]
    if kind == "linear":
        return Linear(layer["in"], layer["out"], rng, dtype)
    if kind == "conv2d":
        return Conv2d(layer["in_channels"], layer["out_channels"], layer["kernel_size"],
                      layer["stride"], layer["padding"], rng, dtype)
    if kind == "batchnorm":
        return BatchNorm(layer["num_features"], layer["momentum"], layer["eps"], dtype)
    if kind == "maxpool2d":
        return MaxPool2d(layer["kernel_size"], layer["stride"])
    if kind in ("relu", "flatten"):
        return ReLU() if kind == "relu" else Flatten()
    raise ValueError(f"layer type must be linear, conv2d, batchnorm, maxpool2d, relu or flatten, got {kind!r}")


def build_model(spec, seed=0, dtype=np.float32, rng=None):
    """Build a model from its spec, the ``model`` metadata of every checkpoint and store.

    Parameters
    ----------
    spec : dict, one of
        * ``{"name": one of MODELS, "input_shape": [C, H, W], "n_classes": int, "hidden": [int, ...]}``:
          ``mlp`` (hidden widths ``hidden``), ``lenet5``, ``cnn`` (``small_cnn``) or ``resnet``
          (``preact_resnet``);
        * ``{"layers": [{"type": "linear", "in": int, "out": int}, {"type": "conv2d",
          "in_channels": int, "out_channels": int, "kernel_size": int, "stride": int,
          "padding": int}, {"type": "batchnorm", "num_features": int, "momentum": float,
          "eps": float}, {"type": "maxpool2d", "kernel_size": int, "stride": int},
          {"type": "relu"}, {"type": "flatten"}, ...]}``: a ``Sequential`` of those layers (the
          golden file's networks; see ``docs/golden-format.md``).
    seed, rng : the initial weights come from ``rng`` if given, else ``default_rng(seed)``
    dtype : float32 (default) or float64
    """
    check_spec(spec)
    rng = _rng(seed, rng)
    if "layers" in spec:
        return Sequential(*(_layer_from_spec(layer, rng, dtype) for layer in spec["layers"]))
    name, shape, n = spec["name"], tuple(spec["input_shape"]), spec["n_classes"]
    if name == "mlp":
        return mlp([int(np.prod(shape)), *spec.get("hidden", (300, 100)), n], rng=rng, dtype=dtype)
    builders = {"lenet5": lenet5, "cnn": small_cnn, "resnet": preact_resnet}
    if name in builders:
        return builders[name](shape, n, rng=rng, dtype=dtype)
    raise ValueError(f"model must be one of {MODELS}; got {name!r}")

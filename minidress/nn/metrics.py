"""Counting what a (sub-)network costs: multiply-accumulates and kept parameters (stored bytes:
``minidress.deploy.Store.accounting``)."""
from __future__ import annotations

import numpy as np

from .layers import Conv2d, Linear, eval_mode


def macs(model, input_shape) -> int:
    """Multiply-accumulates of one sample through every Linear and Conv2d, counting only the
    weights the current masks keep (``model`` as set by ``Dress.use``, or dense).

    Runs one eval-mode forward pass on zeros of shape ``[1, *input_shape]`` to learn each conv's
    output size.
    """
    w0 = next(iter(model.parameters().values()))
    with eval_mode(model):
        model.forward(np.zeros((1, *input_shape), w0.dtype))
    total = 0
    for _, layer in model.named_layers():
        if isinstance(layer, (Linear, Conv2d)):
            w = layer.params["weight"]
            nnz = int(np.count_nonzero(layer.mask)) if layer.mask is not None else w.size
            positions = int(np.prod(layer.output_hw)) if isinstance(layer, Conv2d) else 1
            total += nnz * positions
    return total


def kept_parameters(model) -> int:
    """Parameters the current sub-network uses: kept weights of masked layers, all others.
    (Per-level batch-norm parameters count once per level: they are all stored.)"""
    total = 0
    for _, layer in model.named_layers():
        for name, p in layer.params.items():
            mask = getattr(layer, "mask", None) if name == "weight" else None
            total += int(np.count_nonzero(mask)) if mask is not None else p.size
    return total

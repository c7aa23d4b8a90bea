"""Counting what a (sub-)network costs: multiply-accumulates, kept parameters, stored bytes."""
from __future__ import annotations

import numpy as np

from .layers import Conv2d, Linear


def index_dtype(row_len: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every column index of a row."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if row_len - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def macs(model, input_shape) -> int:
    """Multiply-accumulates of one sample through every Linear and Conv2d, counting only the
    weights the current masks keep (``model`` as set by ``Dress.use``, or dense).

    Runs one eval-mode forward pass on zeros of shape ``[1, *input_shape]`` to learn each conv's
    output size.
    """
    w0 = next(iter(model.parameters().values()))
    was_training = model.training
    model.eval()
    try:
        model.forward(np.zeros((1, *input_shape), w0.dtype))
    finally:
        model.train(was_training)
    total = 0
    for _, layer in model.named_layers():
        if isinstance(layer, (Linear, Conv2d)):
            w = layer.params["weight"]
            nnz = int(np.count_nonzero(layer.mask)) if layer.mask is not None else w.size
            positions = layer.cache[1].shape[0] if isinstance(layer, Conv2d) else 1  # Ho*Wo (N=1)
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


def storage_bytes(dress) -> dict:
    """Bytes to hold every level of ``dress``: one nested copy against K separate models
    (row-sparse, CSR, dense) and one dense model; see ``minidress.store.Store.accounting``."""
    from .store import Store
    return Store.from_dress(dress).accounting()

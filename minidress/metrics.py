"""Counting what a (sub-)network costs: multiply-accumulates, kept parameters, stored bytes."""
from __future__ import annotations

import numpy as np

from .layers import Conv2d, Linear
from .masks import n_kept


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


def storage_bytes(dress, value_dtype=np.float32) -> dict:
    """Bytes to store every level: one nested copy, K separate row-sparse models, or the dense
    model.

    * nested: each sparsified row stores its densest level's entries once, in rank order
      (value + column index of the narrowest type), plus K prefix lengths per layer; everything
      else (dense layers, biases, per-level norms) once.
    * separate: each level on its own, a sparsified layer as ``rows x n_kept`` values and indices
      (or dense values at density 1.0), plus its own copy of the dense parameters (with its own
      level's norm parameters only).
    * dense: the backbone as a plain dense model.
    """
    v = np.dtype(value_dtype).itemsize
    k = len(dress.levels)
    sparse_names = {f"{name}.weight" for name in dress.layers}
    params = dress.model.parameters()
    bn_all = sum(bn.params["weight"].size + bn.params["bias"].size for bn in dress.batchnorms)
    bn_one = sum(bn.params["weight"][0].size + bn.params["bias"][0].size for bn in dress.batchnorms)
    shared = sum(p.size for n, p in params.items() if n not in sparse_names) - bn_all
    nested, separate = (shared + bn_all) * v, k * (shared + bn_one) * v
    dense = (shared + bn_one) * v
    for layer in dress.layers.values():
        rows, row_len = layer.buffers["ranks"].shape
        idx = index_dtype(row_len).itemsize
        kept = [n_kept(d, row_len) for d in dress.levels]
        nested += rows * max(kept) * (v + idx) + k * 4
        separate += sum(rows * row_len * v if m == row_len else rows * m * (v + idx) for m in kept)
        dense += rows * row_len * v
    return {"nested": int(nested), "separate": int(separate), "dense": int(dense)}

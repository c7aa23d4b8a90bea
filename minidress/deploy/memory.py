"""The memory a device needs to serve a stored DRESS model, level by level.

Source: N. K. Jha, S. Mittal, G. Mattela, "The Ramifications of Making Deep Neural Networks
Compact", VLSID 2019: compacting a network (pruning, quantization) shrinks its parameters and
MACs, but the memory of a forward is often dominated by **activations**, which weight sparsity
does not shrink at all: a pruned layer still writes every output of every position. We count,
per density:

* ``params_level``: the bytes at rest a device holding *only* this level needs (each sparsified
  layer's first ``k`` entries per row, values and column indices as the store holds them, for a
  quantized store the first ``k`` Lehmer codes of each row and its per-row scales; every dense
  parameter; one batch-norm slot);
  ``params_store``: the whole nested store (every level), what a DRESS device holds;
* ``macs``: multiply-accumulates of one sample (kept weights only);
* ``activations[B]``: the peak bytes of activations live at once in a forward of batch ``B``
  in our runtime (``minidress.kernels.program``: every operation in the program writes a new
  array, its input freed after it unless a residual register still holds it; a batch norm or
  ReLU folded into a product's epilogue runs in place; the input counts);
* ``scratch[B]``: the peak bytes of the im2col buffer of a convolution and of the zero-padded
  copy of its input it reads from (working memory besides the activations);
* ``runtime``: what the deployed runtime holds besides the store (its transposed copy of the
  entries, folded batch norms, dense matrices: ``CompiledNet.nbytes``), the same at every level.

Activation bytes use the compute dtype (float32: 4 bytes), whatever the weights' precision.
"""
from __future__ import annotations

import math

from ..kernels import program as prog
from ..kernels.quantized import lehmer_widths
from ..masks import check_density, n_kept
from .compiled import CompiledNet


def device_memory(store, densities=None, batches=(1, 32)) -> dict:
    """Per density, the memory of serving ``store`` (a ``Store`` or a ``QuantizedStore``).

    Parameters
    ----------
    store : Store or QuantizedStore, validated here
    densities : iterable of float in (0, max level], default the store's levels
    batches : iterable of int >= 1, the batch sizes of ``activations`` and ``scratch``

    Returns
    -------
    dict density -> {"params_level": int, "params_store": int, "macs": int,
    "activations": {B: int}, "scratch": {B: int}, "runtime": int} (bytes, as the module docstring)
    """
    store.validate()
    net = CompiledNet(store, paths="sparse")
    itemsize = net.dtype.itemsize
    densities = store.levels if densities is None else [check_density(d) for d in densities]
    batches = [int(b) for b in batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be positive batch sizes, got {batches}")
    at_rest = store.nbytes(at_rest=True) if hasattr(store, "bits") else store.nbytes()
    runtime = sum(net.nbytes().values())
    walks = {b: _walk(net, b, itemsize) for b in batches}
    return {d: {"params_level": _level_bytes(store, d), "params_store": int(at_rest),
                "macs": int(sum(p["rows"] * p["positions"] * (n_kept(d, p["row_len"]) if p["sparse"] is not None
                                                              else p["row_len"]) for p in net.products)),
                "activations": {b: walks[b][0] for b in batches}, "scratch": {b: walks[b][1] for b in batches},
                "runtime": int(runtime)} for d in densities}


def _level_bytes(store, d) -> int:
    """Bytes at rest of one level alone (``params_level`` in the module docstring)."""
    total = sum(a.nbytes // a.shape[0] if n in store.per_level else a.nbytes for n, a in store.dense.items())
    for rs in store.sparse.values():
        rows, k = rs.shape[0], n_kept(d, rs.row_len)
        if hasattr(rs, "bits"):         # quantized: packed entries, Lehmer-coded columns, scales
            total += math.ceil(rows * k * rs.bits / 8) + math.ceil(rows * int(lehmer_widths(rs.row_len, k).sum()) / 8)
            total += rs.scale.nbytes
        else:
            total += rows * k * (rs.values.itemsize + rs.cols.itemsize)
    return int(total)


def _walk(net, batch, itemsize):
    """``(peak activation bytes, peak im2col bytes)`` of a forward of ``batch`` through the
    program ``net.code``, following which arrays are live (the current one and the registers)."""
    c, h, w = net.store.meta["model"]["input_shape"]
    sizes = {1: c * batch * h * w}      # array id -> elements
    current, registers, next_id = 1, [1] * prog.N_REGISTERS, 2
    peak = scratch = 0
    for op, a, b, _, _, _ in net.code.tolist():
        if op == prog.OP_PRODUCT:
            layer = net.layers[a]
            rows, kh, stride, pad = (int(layer[i]) for i in (prog.L_ROWS, prog.L_KH, prog.L_STRIDE, prog.L_PAD))
            ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kh) // stride + 1
            if not (kh == 1 and stride == 1 and pad == 0):   # im2col, and its zero-padded input
                padded = c * batch * (h + 2 * pad) * (w + 2 * pad) if pad else 0
                scratch = max(scratch, int(layer[prog.L_ROW_LEN]) * batch * ho * wo + padded)
            c, h, w = rows, ho, wo
        elif op == prog.OP_POOL:
            h, w = (h - a) // b + 1, (w - a) // b + 1
        elif op == prog.OP_GLOBAL_AVG:
            h = w = 1
        elif op == prog.OP_FLATTEN:
            copies = batch > 1 and h * w > 1        # else the same memory, reshaped
            c, h, w = c * h * w, 1, 1
            if not copies:
                continue
        if op == prog.OP_SAVE:
            registers[a] = current
            continue
        if op == prog.OP_LOAD:
            current = registers[a]
            continue
        sizes[next_id] = c * batch * h * w
        live = {current, next_id, *registers}
        peak = max(peak, sum(sizes[i] for i in live))
        current, next_id = next_id, next_id + 1
    return int(peak * itemsize), int(scratch * itemsize)

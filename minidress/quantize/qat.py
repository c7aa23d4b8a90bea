"""Quantization-aware fine-tuning of the DRESS levels with a straight-through estimator.

Sources: Y. Bengio, N. Leonard, A. Courville, "Estimating or Propagating Gradients Through
Stochastic Neurons", 2013 (the straight-through estimator); B. Jacob et al., CVPR 2018
(training with simulated quantization). No code was copied.

What we do: every joint DRESS step (``Dress.joint_step``, all K levels on the batch) runs on the
**fake-quantized** weights ``w_q = s * clip(rint(w / s), -qmax, qmax)`` of every sparsified layer,
with the grid the quantized store will use (``minidress.kernels.quantized``): one scale per row,
the max-abs of the row's ``kmax`` stored entries (rank < ``n_kept(densest level)``), so the
scale does not depend on the level. The float weights are what the optimizer updates; the
gradient with respect to ``w_q`` is passed to ``w`` unchanged inside the clip range and is zero
outside it (``ste_backward``); ``s`` is treated as a constant. After fine-tuning, ``Store`` ->
``QuantizedStore`` quantizes exactly the grid trained on.

Our choices: the STE on the full weight (entries outside the densest level are masked by every
level anyway); the ranking is DRESS's own (a re-ranking during QAT, if the options ask for one,
ranks the quantized weights: the same order up to ties within a grid step); batch-norm
statistics are updated under the quantized weights, as they will be served.
"""
from __future__ import annotations

import numpy as np

from ..kernels.quantized import qmax, quantize_rows, row_scales
from ..masks import n_kept
from ..nn.optim import SGD
from ..nn.train import fit


def stored_scales(weight, ranks, kmax, bits):
    """Per-row scales ``[rows]`` of ``weight [rows, ...]``: ``row_scales`` over the entries of rank
    < ``kmax`` (those a store keeps), as ``QuantizedStore`` computes them."""
    w = weight.reshape(len(weight), -1)
    kept = np.take_along_axis(w, np.argsort(ranks.reshape(len(w), -1), axis=1, kind="stable")[:, :kmax], axis=1)
    return row_scales(kept, bits)


def fake_quantize(weight, scale, bits):
    """``(w_q, inside)``: the grid values ``scale * clip(rint(w / scale), -qmax, qmax)`` (weight's
    shape and dtype) and the boolean mask of entries inside the clip range
    ``|w / scale| <= qmax`` (where the straight-through gradient is the identity)."""
    w = weight.reshape(len(weight), -1)
    wq = quantize_rows(w, scale, bits).astype(w.dtype) * scale[:, None]
    inside = np.abs(w) <= qmax(bits) * scale[:, None]
    return wq.reshape(weight.shape), inside.reshape(weight.shape)


def ste_backward(grad_wq, inside):
    """The straight-through gradient: ``dL/dw = dL/dw_q`` inside the clip range, 0 outside."""
    return np.where(inside, grad_wq, 0).astype(grad_wq.dtype)


def grid_quantizer(dress, bits):
    """The quantized store's grid as a ``quantizer(name, weight) -> (w_q, inside)`` for
    ``qat_step``: per-row scales over the entries a store keeps (``stored_scales``)."""
    qmax(bits)
    kmax = {n: n_kept(max(dress.levels), l.buffers["ranks"].reshape(len(l.buffers["ranks"]), -1).shape[1])
            for n, l in dress.layers.items()}

    def quantizer(name, weight):
        scale = stored_scales(weight, dress.layers[name].buffers["ranks"], kmax[name], bits)
        return fake_quantize(weight, scale, bits)
    return quantizer


def qat_step(dress, quantizer):
    """A ``fit`` step (``(model, xb, yb) -> (loss, n_correct, grads)``): ``dress.joint_step`` on
    the weights ``quantizer(name, w)`` gives (``grid_quantizer``, or the dithered one of
    ``minidress.quantize.universal``), the float weights restored after it, the gradients passed
    back through the STE."""
    def step(model, xb, yb):
        floats, inside = {}, {}
        for name, layer in dress.layers.items():
            w = layer.params["weight"]
            floats[name] = w.copy()
            w[...], inside[name] = quantizer(name, w)
        try:
            loss, correct, grads = dress.joint_step(model, xb, yb)
        finally:
            for name, layer in dress.layers.items():
                layer.params["weight"][...] = floats[name]
        for name in dress.layers:
            key = f"{name}.weight"
            grads[key] = ste_backward(grads[key], inside[name])
        return loss, correct, grads
    return step


def finetune(dress, x_train, y_train, quantizer, epochs=2, lr=0.005, momentum=0.9, batch_size=64, seed=0):
    """Fine-tune ``dress`` (in place) for ``epochs`` on the weights of ``quantizer``
    (``grid_quantizer(dress, bits)``: QAT for the quantized store); SGD with a constant ``lr``.
    Returns ``fit``'s history. Build the store afterwards as usual (``Store.from_dress``, then
    ``QuantizedStore.from_store(store, bits)``)."""
    return fit(dress.model, SGD(lr, momentum=momentum), x_train, y_train, epochs=epochs,
               batch_size=batch_size, seed=seed, step=qat_step(dress, quantizer), quiet=True)

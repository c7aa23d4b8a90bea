"""Learned, differentiable thresholds: one per layer, so each layer's density is learned.

Source: F. Manessi, A. Rozza, S. Bianco, P. Napoletano, R. Schettini, "Automated Pruning for
Deep Neural Network Compression", ICPR 2018 (arXiv:1712.01721). Its published description: a
family of differentiable pruning functions with one threshold per layer, learned jointly with
the weights by backpropagation, and a regulariser designed to enforce pruning. No code was
copied; the exact function and regulariser below are our reading, hence our choices.

The method
----------
Every sparsified layer computes with ``f(W; t)`` instead of ``W``, the smooth pruning function

    f(w; t) = relu(w - t) + t * sigmoid(a (w - t)) - relu(-w - t) - t * sigmoid(a (-w - t))

which is ~0 for ``|w| < t`` and ~``w`` for ``|w| > t`` (exactly ``w`` at ``t = 0``), with
``a`` its sharpness. Both ``w`` and ``t`` get gradients (``pruning_function_backward``). A
regulariser ``lam * sum_l exp(-theta_l)`` pushes every threshold up; the loss pushes back where
pruning hurts, so where each layer ends (its density) is learned, not set. After ``learn_steps``
the thresholds are frozen: the mask keeps ``|w| > t_l`` and the rest of the budget retrains the
masked network with plain weights.

What we chose
-------------
* Scale: ``t_l = c_l * theta_l`` with ``c_l`` the standard deviation of the layer's weights when
  the pruner is made (a buffer), and the sharpness ``a_l = sharpness / c_l``, so that one
  ``lam`` and one ``sharpness`` fit layers of any scale; ``theta_l`` (a parameter named
  ``"<layer>.threshold"``, shape ``[1]``: the optimizer keeps no 0-d state) starts at ``theta0`` (default 0: ``f`` is the identity).
* The regulariser ``lam * sum_l exp(-theta_l)`` (bounded, and its push fades as ``t`` grows);
  the optimizer's weight decay applies to ``theta`` too (small against ``lam``).
* The hard mask at the freeze, then masked retraining (the description does not say how the
  smooth network becomes a sparse one).
* Layers: DRESS's (``sparsifiable_layers``). The masks are not row-balanced: a row-sparse store
  would pad every row to the longest (``common.stored_bytes`` counts CSR for them).
"""
from __future__ import annotations

import numpy as np

from ..nn.losses import softmax_cross_entropy
from ..validate import check_number
from .common import Pruner, batch_accuracy, check_steps, penalised_step


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))      # no overflow for large |z|


def pruning_function_forward(w, t, a):
    """``f(w; t)`` elementwise; ``w`` any shape, ``t`` and ``a`` scalars (``t >= 0``, ``a > 0``).

    Returns
    -------
    out : ndarray, shape of w;  cache : for ``pruning_function_backward``
    """
    zp, zm = a * (w - t), a * (-w - t)
    sp, sm = _sigmoid(zp), _sigmoid(zm)
    out = np.maximum(w - t, 0) + t * sp - np.maximum(-w - t, 0) - t * sm
    return out.astype(w.dtype), (w, t, a, sp, sm)


def pruning_function_backward(dout, cache):
    """``dout`` (shape of w) -> ``(dw [shape of w], dt: float)``."""
    w, t, a, sp, sm = cache
    above, below = (w - t > 0), (-w - t > 0)
    dsp, dsm = sp * (1 - sp), sm * (1 - sm)               # sigmoid' at a(w - t), a(-w - t)
    dfdw = above + t * a * dsp + below + t * a * dsm
    dfdt = -above.astype(w.dtype) + sp - t * a * dsp + below - sm + t * a * dsm
    return (dout * dfdw).astype(w.dtype), float(np.sum(dout * dfdt))


class LearnedThresholds(Pruner):
    """Differentiable per-layer thresholds on ``model`` (modified in place: a ``threshold``
    parameter and a ``threshold_scale`` buffer per sparsified layer, masks, a step counter).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    lam : float >= 0, the regulariser's weight (larger: sparser)
    learn_steps : int >= 0, steps with learned thresholds; masked retraining after
    sharpness : float > 0, ``a_l * c_l``
    theta0 : float >= 0, the thresholds' start, in units of ``c_l``
    dense_first_last : bool

    Attributes
    ----------
    last_regularizer : float
    """

    kind = "learned_thresholds"

    def __init__(self, model, lam, learn_steps, sharpness=20.0, theta0=0.0, dense_first_last=True):
        self.lam = check_number("lam", lam, ">= 0", lambda v: v >= 0)
        self.learn_steps = check_steps(learn_steps, "learn_steps")
        self.sharpness = check_number("sharpness", sharpness, "> 0", lambda v: v > 0)
        self.theta0 = check_number("theta0", theta0, ">= 0", lambda v: v >= 0)
        self._setup(model, dense_first_last)
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.params.setdefault("threshold", np.full(1, self.theta0, w.dtype))
            layer.buffers.setdefault("threshold_scale", np.array(w.std(), w.dtype))
        self.last_regularizer = 0.0

    def options(self) -> dict:
        return {"lam": self.lam, "learn_steps": self.learn_steps, "sharpness": self.sharpness,
                "theta0": self.theta0, "dense_first_last": self.dense_first_last}

    def thresholds(self) -> dict:
        """``{layer name: t_l}`` in the weights' units."""
        return {n: float(l.params["threshold"][0]) * float(l.buffers["threshold_scale"])
                for n, l in self.layers.items()}

    def _shape(self, layer):
        c = float(layer.buffers["threshold_scale"])
        return max(float(layer.params["threshold"][0]), 0.0) * c, self.sharpness / c, c

    def freeze(self):
        """The hard mask ``|w| > t_l`` of every sparsified layer."""
        self.set_masks({n: np.abs(l.params["weight"]) > t for (n, l), t in
                        zip(self.layers.items(), self.thresholds().values())})
        for layer in self.layers.values():
            layer.grads.pop("threshold", None)

    def smooth_step(self, model, xb, yb, loss_fn):
        """Forward and backward through ``f(W; t)``: every sparsified layer computes with its
        pruned weights; the chain rule takes the gradient back to ``W`` and ``theta``."""
        latent, caches = {}, {}
        for name, layer in self.layers.items():
            t, a, _ = self._shape(layer)
            latent[name] = layer.params["weight"]
            layer.params["weight"], caches[name] = pruning_function_forward(latent[name], t, a)
        try:
            logits = model.forward(xb)
            loss, dlogits = loss_fn(logits, yb)
            model.backward(dlogits, input_grad=False)
        finally:
            for name, layer in self.layers.items():
                layer.params["weight"] = latent[name]
        reg = 0.0
        for name, layer in self.layers.items():
            dw, dt = pruning_function_backward(layer.grads["weight"], caches[name])
            theta = float(layer.params["threshold"][0])
            reg += self.lam * np.exp(-theta)
            # t = c * max(theta, 0): the data term reaches theta through c (0 below zero).
            dtheta = (dt * self._shape(layer)[2] if theta > 0 else 0.0) - self.lam * np.exp(-theta)
            layer.grads["weight"] = dw
            layer.grads["threshold"] = np.full(1, dtheta, dw.dtype)
        self.last_regularizer = float(reg)
        return float(loss) + self.last_regularizer, batch_accuracy(logits, yb), model.gradients()

    def step(self, model, xb, yb):
        """One step (``fit``'s signature): learning the thresholds, or, from ``learn_steps`` on
        (the mask set at that step), masked retraining."""
        t = self._advance()
        if t < self.learn_steps:
            return self.smooth_step(model, xb, yb, softmax_cross_entropy)
        if t == self.learn_steps:
            self.freeze()
        return penalised_step(model, xb, yb)

    def finish(self):
        """After training: the hard mask, if the run ended while the thresholds were learned."""
        if self.steps_done <= self.learn_steps:
            self.freeze()
        return self

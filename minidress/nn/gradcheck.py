"""Numerical gradient checks by central differences (use float64)."""
from __future__ import annotations

import numpy as np


def numerical_gradient(f, x, h=1e-6):
    """Central-difference gradient of the scalar function ``f()`` with respect to ``x``.

    ``x`` is perturbed in place, one entry at a time, and restored; ``f`` must read it.
    Error is O(h^2) plus round-off O(eps/h): h = 1e-6 balances the two in float64.

    Returns
    -------
    grad : ndarray, shape and dtype of x
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical gradients need float64 (float32 round-off swamps the "
                        f"difference quotient), got {x.dtype}")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


def relative_error(a, b):
    """``||a - b|| / (||a|| + ||b||)`` over the whole array (0 when both are 0).

    A norm-wise ratio, not an entry-wise one, so entries that are zero up to round-off do not
    dominate the verdict.
    """
    den = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if den == 0 else float(np.linalg.norm(a - b) / den)


def check_layer(layer, x, rng=None, h=1e-6):
    """Compare a layer's ``backward`` with central differences of ``sum(forward(x) * R)``.

    Returns
    -------
    errors : dict[str, float]
        Relative error of the input gradient (``"x"``) and of every parameter gradient.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    # Thousands of forward passes would drag BatchNorm's running statistics; put them back after.
    saved = {k: v.copy() for k, v in layer.state().items() if k not in layer.parameters()}
    r = rng.standard_normal(layer.forward(x).shape)

    def loss():
        return float(np.sum(layer.forward(x) * r))

    loss()
    dx = layer.backward(r)
    analytic = {"x": dx, **{k: v.copy() for k, v in layer.gradients().items()}}
    errors = {"x": relative_error(dx, numerical_gradient(loss, x, h))}
    for name, p in layer.parameters().items():
        errors[name] = relative_error(analytic[name], numerical_gradient(loss, p, h))
    for name, arr in layer.state().items():
        if name in saved:
            arr[...] = saved[name]
    return errors

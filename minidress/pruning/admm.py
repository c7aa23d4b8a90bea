"""ADMM pruning: minimise the loss subject to the weights lying in a sparsity set.

Sources: T. Zhang, S. Ye, K. Zhang, J. Tang, W. Wen, M. Fardad, Y. Wang, "A Systematic DNN
Weight Pruning Framework using Alternating Direction Method of Multipliers", ECCV 2018; A. Ren,
T. Zhang, S. Ye, J. Li, W. Xu, X. Qian, X. Lin, Y. Wang, "ADMM-NN: An Algorithm-Hardware
Co-Design Framework of DNNs Using ADMM", ASPLOS 2019. We know their published descriptions;
no code was copied.

The method
----------
``min_W f(W)  s.t.  W_l in S_l`` for every sparsified layer ``l`` is split with an auxiliary
``Z_l`` and a scaled dual ``U_l``::

    W-step:  a few SGD steps on  f(W) + sum_l rho/2 ||W_l - Z_l + U_l||^2
    Z-step:  Z_l = proj_S(W_l + U_l)            (keep the largest entries: ``common.project``)
    U-step:  U_l = U_l + W_l - Z_l

with ``rho`` raised during the run, then a hard projection of ``W`` onto ``S`` (the mask) and
masked retraining. Two sparsity sets: ``projection="layer"`` (the papers' per-layer top-k) and
``projection="row"`` (DRESS's row-balanced set: every row keeps ``n_kept(d, row_len)``,
``minidress.masks``), so that ADMM can be compared with plain magnitude pruning on the very
set DRESS deploys. With ``projection="row"`` the result is row-balanced: a row-sparse store
(``minidress.deploy``) can hold it; ``Store.from_dress`` itself wants a ``Dress``.

What we chose (the descriptions leave these open, or give values for ImageNet-scale runs)
------------------------------------------------------------------------------------------
* Layers: DRESS's (``sparsifiable_layers``; first layer and classifier dense by default).
* Budget split: ``admm_steps`` W-steps (the benchmark: 60% of the budget), the rest masked
  retraining; one ``fit`` run, the phase a function of the step counter.
* ``update_every`` SGD steps per W-step before each Z/U update (the papers use epochs).
* Initialisation: ``Z = proj_S(W)``, ``U = 0`` at the start (the pre-trained weights).
* The rho schedule: ``rho_t = min(rho_max, rho0 * growth ** (t // update_every))``: multiplied
  by ``growth`` at every Z/U update (ADMM-NN raises rho progressively; the values are ours).
* The penalty's gradient ``rho (W - Z + U)`` is added to the loss gradient of the masked
  network's ``weight`` only; the optimizer (momentum, weight decay) treats it like any gradient.
* The hard projection keeps the largest ``|W|`` (not ``Z``'s support; they agree once
  ``W - Z`` is small, which ``constraint_gap`` measures).
"""
from __future__ import annotations

import numpy as np

from ..masks import check_density
from ..validate import check_number
from .common import Pruner, check_projection, check_steps, penalised_step, project, projection_mask


class ADMMPruner(Pruner):
    """ADMM pruning of ``model`` (modified in place: masks, Z and U buffers, a step counter).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    density : float in (0, 1], the kept fraction of every sparsified layer
    admm_steps : int >= 0, steps of the ADMM phase; hard projection and masked retraining after
    projection : "row" (DRESS's row-balanced set) or "layer"
    rho0, growth, rho_max : the rho schedule (module docstring)
    update_every : int >= 1, SGD steps between Z/U updates
    dense_first_last : bool, keep the first layer and the classifier dense (as DRESS)

    Attributes
    ----------
    last_penalty : float, ``sum_l rho/2 ||W_l - Z_l + U_l||^2`` at the last ADMM step
    """

    kind = "admm"

    def __init__(self, model, density, admm_steps, projection="row", rho0=0.01, growth=1.5,
                 rho_max=1.0, update_every=20, dense_first_last=True):
        self.density_target = check_density(density)
        self.admm_steps = check_steps(admm_steps, "admm_steps")
        self.projection = check_projection(projection)
        self.rho0 = check_number("rho0", rho0, "> 0", lambda v: v > 0)
        self.growth = check_number("growth", growth, ">= 1", lambda v: v >= 1)
        self.rho_max = check_number("rho_max", rho_max, ">= rho0", lambda v: v >= self.rho0)
        self.update_every = check_steps(update_every, "update_every", 1)
        self._setup(model, dense_first_last)
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.buffers.setdefault("admm_z", project(w, self.density_target, self.projection))
            layer.buffers.setdefault("admm_u", np.zeros_like(w))
        self.last_penalty = 0.0

    def options(self) -> dict:
        return {"density": self.density_target, "admm_steps": self.admm_steps,
                "projection": self.projection, "rho0": self.rho0, "growth": self.growth,
                "rho_max": self.rho_max, "update_every": self.update_every,
                "dense_first_last": self.dense_first_last}

    def rho(self, step) -> float:
        """The penalty weight at ``step`` (a pure function of the step)."""
        return min(self.rho_max, self.rho0 * self.growth ** (step // self.update_every))

    def update_z_u(self):
        """``Z = proj_S(W + U)``, then ``U += W - Z``, for every sparsified layer."""
        for layer in self.layers.values():
            w, z, u = layer.params["weight"], layer.buffers["admm_z"], layer.buffers["admm_u"]
            z[...] = project(w + u, self.density_target, self.projection)
            u += w - z

    def constraint_gap(self) -> dict:
        """``||W_l - Z_l|| / ||W_l||`` per layer: how far the weights are from the set."""
        return {n: float(np.linalg.norm(l.params["weight"] - l.buffers["admm_z"])
                         / max(np.linalg.norm(l.params["weight"]), 1e-30))
                for n, l in self.layers.items()}

    def hard_prune(self):
        """Project ``W`` onto the set for good: the mask keeps the largest entries of ``W``."""
        self.set_masks({n: projection_mask(l.params["weight"], self.density_target, self.projection)
                        for n, l in self.layers.items()})

    def penalty(self, rho):
        """``(sum_l rho/2 ||W_l - Z_l + U_l||^2, {weight name: rho (W_l - Z_l + U_l)})``."""
        total, grads = 0.0, {}
        for name, layer in self.layers.items():
            w = layer.params["weight"]
            r = w - layer.buffers["admm_z"] + layer.buffers["admm_u"]
            total += 0.5 * rho * float(np.vdot(r, r))
            grads[f"{name}.weight"] = (rho * r).astype(w.dtype)
        return total, grads

    def finish(self):
        """After training: the hard projection, if the run ended inside the ADMM phase."""
        if self.steps_done <= self.admm_steps:
            self.hard_prune()
        return self

    def step(self, model, xb, yb):
        """One step (``fit``'s signature): an ADMM W-step (Z/U updated first every
        ``update_every`` steps), or, from ``admm_steps`` on, masked retraining."""
        t = self._advance()
        if t < self.admm_steps:
            if t > 0 and t % self.update_every == 0:
                self.update_z_u()
            rho = self.rho(t)

            def admm_penalty():
                self.last_penalty, grads = self.penalty(rho)
                return self.last_penalty, grads
            return penalised_step(model, xb, yb, admm_penalty)
        if t == self.admm_steps:
            self.hard_prune()
        return penalised_step(model, xb, yb)

"""Alternating sparse training: DRESS's nested levels, but one level per step, in turn.

Source: L. Yang, J. Meng, J. Seo, D. Fan, "Get More at Once: Alternating Sparse Training with
Gradient Correction" (AST), NeurIPS 2022. Its abstract: instead of the joint, multi-objective
training of all sub-networks ("which suffers from very large training overhead"), AST trains
multiple sparse sub-networks by alternating between them, at no extra cost compared with
training a single sparse model, and adds a gradient correction within the inner-group iterations
to reduce the interference of the sub-networks' updates.

What this module is, and what we chose
--------------------------------------
The point here is to isolate what DRESS's joint weighted loss itself buys, so everything but the
schedule is DRESS's (``minidress.dress.Dress``, built with DRESS's own options): the same
levels, the same row-based nested masks from the same per-row ranks, the same per-level batch
norms. Only the step differs:

* DRESS: every step runs all K levels on one batch and descends ``sum_k lambda_k * loss_k``.
* here: step ``t`` runs level ``t mod K`` alone (in the order the levels are given, round
  robin; DRESS's default levels are densest first) on its own batch and descends
  ``lambda_k * loss_k``. Given K times the steps, it makes exactly as
  many forward/backward passes as DRESS, and every level is trained on as many batches.

We leave out AST's gradient correction (the abstract does not define it and the paper's body
was not available to us): this is "alternating as in AST", not AST. Re-ranking
(``resample_every``, counted in DRESS joint steps) happens every ``resample_every * K``
alternating steps (and a whole ``resample_until`` likewise), and a ramp (``ramp_steps``) and the
run's length (``run_steps``, of which a fractional ``resample_until`` is a fraction) should be
given in alternating steps: all keep the same schedule per forward/backward pass as DRESS. With
fine-grained sampling (``sample_prob``), alternating step ``t`` trains what DRESS's pass of level
``t mod K`` trains at joint step ``t // K`` (``Dress.pass_plan``), with the same batch-norm
handling. In-place distillation (``distill``) needs the densest level's predictions on the same
batch, which a one-level step does not compute: alternating ignores it.
"""
from __future__ import annotations

from dataclasses import asdict

from ..dress import BEFORE_RECORDED, Dress, DressOptions
from ..nn.train import dense_step
from .common import Peer


class Alternating(Peer):
    """Alternating training of DRESS's levels on ``model`` (modified in place as by ``Dress``).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    options : minidress.dress.DressOptions (e.g. ``RunConfig.dress_for(K * steps_per_epoch)``)
    **changes : options to change, as ``Dress`` takes them

    Attributes
    ----------
    dress : minidress.dress.Dress, which holds the masks, ranks and per-level batch norms
    """

    kind = "alternating"
    counter = "dress_step"           # Dress's own step counter, so checkpoints are Dress's too
    before_recorded = BEFORE_RECORDED  # as DressOptions.from_config reads an older run's config

    def __init__(self, model, options: DressOptions | None = None, **changes):
        self.dress = Dress(model, options, **changes)
        self.model = self.net = model
        self.batchnorms = self.dress.batchnorms
        self.levels = self.dress.levels

    def options(self) -> dict:
        return asdict(self.dress.options)

    def level_at(self, step) -> int:
        """The level trained at ``step``: round robin over the levels in the given order."""
        return step % len(self.levels)

    def use(self, density, level=None):
        """``Dress.use``: any density is a per-row prefix of the ranking."""
        self.dress.use(density, level)
        return self

    def has_statistics(self, point) -> bool:
        return float(point) in self.levels

    def step(self, model, xb, yb):
        """One alternating step (``fit``'s signature): level ``t mod K`` alone."""
        t = self._advance()
        k = self.level_at(t)
        dress = self.dress
        joint, k_levels = divmod(t, len(self.levels))
        if k_levels == 0 and dress.rerank_due(joint, run_steps=dress.options.run_steps // len(self.levels)):
            dress.rank()
        density, drawn = dress.pass_plan(joint)[k]
        if not drawn:                       # a ramp counts alternating steps (module docstring)
            density = dress.level_densities(t)[k]
        dress.use_pass(k, density, drawn)
        with dress.frozen_statistics(drawn):
            loss, correct, grads = dense_step(model, xb, yb)
        lam = float(dress.lambdas[k])
        if lam != 1.0:
            grads = {name: g * g.dtype.type(lam) for name, g in grads.items()}
        return lam * loss, correct, grads

    def load_state(self, state):
        self.dress.load_state(state)          # also forgets the masks cached for the old ranks

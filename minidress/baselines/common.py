"""What every any-time peer shares: the ``Peer`` interface, a step counter, shared batch norms.

A peer wraps a model (usually the pre-trained dense backbone, modified in place) and offers

* ``step(model, xb, yb) -> (loss, n_correct, grads)``: one training step, the ``step`` signature
  of ``minidress.nn.train.fit``, so every peer trains through the same loop and the same
  ``minidress.app.experiment.train_phase`` (SGD, cosine schedule) as DRESS;
* ``use(point)``: make the model compute the sub-network at ``point`` (a density, or a width
  for US-Nets);
* ``evaluate(x, y, point, x_calib)``: test loss and accuracy at ``point``, with batch-norm
  statistics recalibrated on ``x_calib`` wherever the peer holds none of its own for ``point``
  (``minidress.dress.recalibrate_batchnorm``, which needs only ``use``, ``model`` and
  ``batchnorms``, so it serves every peer);
* ``save(path)`` / ``load(path)``: a minidress checkpoint (``minidress.checkpoint``) of the
  peer's whole state, step counter included, so a resumed run continues bit for bit.

Randomness: the random draw of step ``t`` comes from ``numpy.random.default_rng([seed, t])``
(``step_rng``), and ``t`` lives in a buffer of the model. A draw thus depends only on the seed
and the step, never on how often a run was interrupted.
"""
from __future__ import annotations

import json

import numpy as np

from ..checkpoint import load_checkpoint, save_checkpoint
from ..dress import recalibrate_batchnorm
from ..nn.layers import BatchNorm
from ..nn.train import StepCounter, evaluate
from ..validate import check_int


def step_rng(seed, step) -> np.random.Generator:
    """The generator of training step ``step``: a function of ``(seed, step)`` only."""
    return np.random.default_rng([int(seed), int(step)])


def check_seed(seed) -> int:
    return check_int(seed, "seed", 0, "a non-negative integer")


def batchnorms_of(model) -> list:
    """Every ``BatchNorm`` of ``model``; a peer's batch norms have one slot, shared by every
    sub-network, whose statistics ``recalibrate_batchnorm`` can override for one of them."""
    return [m for _, m in model.named_layers() if isinstance(m, BatchNorm)]


def forget_recalibration(batchnorms, slot=0):
    """Point every batch norm at ``slot`` and drop recalibrated statistics."""
    for bn in batchnorms:
        bn.slot, bn.stats_override = slot, None


def _jsonable(options: dict) -> dict:
    return json.loads(json.dumps(options))


class Peer(StepCounter):
    """Base class of the any-time peers; see the module docstring.

    Subclasses set ``kind`` (stored in checkpoints), ``counter`` (the name of the step-counter
    buffer in ``model.buffers``) and ``passes_per_step``, and define ``options``, ``use``,
    ``step`` and, if some points have batch-norm statistics of their own, ``has_statistics``.

    Attributes
    ----------
    model : minidress.nn.layers.Layer
        What ``fit`` trains: ``model.parameters()`` are exactly the arrays the optimizer updates.
    net : minidress.nn.layers.Sequential
        The network that computes (the same object as ``model``, except for LCS+L).
    batchnorms : list of BatchNorm

    Notes
    -----
    Validate a peer with ``evaluate`` at the points you care about, not with ``fit``'s
    ``x_val``: ``fit`` would evaluate whatever sub-network the last step left in place (a random
    density, or for LCS+L the mix of the ends before the last update).
    """

    kind = "peer"
    counter = "peer_step"
    passes_per_step = 1
    # Options a checkpoint from an older version did not record, with the value that version
    # behaved as, so that its checkpoints still load (and only into a peer that behaves so).
    before_recorded: dict = {}


    def options(self) -> dict:
        raise NotImplementedError

    def use(self, point):
        raise NotImplementedError

    def step(self, model, xb, yb):
        raise NotImplementedError

    def has_statistics(self, point) -> bool:
        """True if the peer holds batch-norm statistics trained for ``point`` (then evaluation
        uses them); False if they must be recalibrated."""
        return False

    def evaluate(self, x, y, point, x_calib=None, n_batches=10, batch_size=128, seed=0):
        """``(loss, accuracy)`` of the sub-network at ``point`` on ``(x, y)``.

        Where the peer has batch norms but no statistics of its own for ``point``, they are
        first recalibrated on ``n_batches`` random batches of ``x_calib`` (training data).
        """
        if self.batchnorms and not self.has_statistics(point):
            if x_calib is None:
                raise ValueError(f"x_calib (training inputs) is needed to recalibrate the batch-norm "
                                 f"statistics of {self.kind} at {point!r}")
            recalibrate_batchnorm(self, x_calib, point, n_batches, batch_size, seed)
        else:
            self.use(point)
        return evaluate(self.model, x, y)

    def held_bytes(self, n_points=0) -> int:
        """Bytes the peer keeps to serve every point: all floating-point parameters and buffers,
        plus, when it has batch norms without statistics of its own, one recalibrated
        (mean, variance) pair per batch norm for each of ``n_points`` points."""
        total = sum(a.nbytes for a in self.model.state().values() if a.dtype.kind == "f")
        per_point = sum(2 * bn.num_features * bn.buffers["running_mean"].itemsize for bn in self.batchnorms)
        return int(total + n_points * per_point)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path, meta=None):
        """Write the peer's state (parameters, buffers, step counter) and options atomically."""
        return save_checkpoint(path, self.model, meta={**(meta or {}), "peer": self.kind,
                                                       "options": _jsonable(self.options())})

    def load(self, path):
        """Load a checkpoint written by ``save`` (or by ``fit`` on ``self.model``) into this peer,
        which must be of the same kind and options; returns the checkpoint's metadata."""
        meta = load_checkpoint(path)
        if meta.get("peer", self.kind) != self.kind:
            raise ValueError(f"{path}: holds a {meta['peer']!r} peer, not a {self.kind!r}")
        stored, own = meta.get("options"), _jsonable(self.options())
        if stored is not None:
            stored = {**_jsonable(self.before_recorded), **stored}
        if stored is not None and stored != own:
            diff = sorted(k for k in set(stored) | set(own) if stored.get(k) != own.get(k))
            raise ValueError(f"{path}: options differ from this {self.kind}'s: "
                             + ", ".join(f"{k}: file {stored.get(k)!r}, here {own.get(k)!r}" for k in diff))
        self.load_state(meta["model_state"])
        return meta

    def load_state(self, state):
        self.model.load_state(state)

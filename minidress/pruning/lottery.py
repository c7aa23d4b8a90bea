"""Lottery tickets with rewinding (iterative magnitude pruning), and the class-dependent variant.

Sources: J. Frankle, M. Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks", ICLR 2019; J. Frankle, G. K. Dziugaite, D. M. Roy, M. Carbin, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" / "Stabilizing the Lottery Ticket Hypothesis"
(2019-2020: rewinding to an early step instead of the initialisation); R. Entezari, O. Saukh,
"Class-dependent Pruning of Deep Neural Networks", SenSys-ML 2020 (a loss that penalises false
negatives of classes marked important while pruning). We know their published descriptions;
no code was copied.

The method
----------
Train; prune ``p%`` of the smallest surviving weights; **rewind** the survivors (and every other
parameter) to their values at an early step ``k``; repeat. After ``rounds`` prunings the
density is ``density`` (``p = 1 - density ** (1 / rounds)`` per round), and the last ticket is
trained once more. ``granularity="row"`` prunes every row to ``n_kept(d_r, row_len)`` (DRESS's
row-balanced set, so the final ticket is row-balanced and a row-sparse store can serve it);
``granularity="layer"`` prunes each layer as a whole, as the papers do.

Class-dependent pruning: ``important`` classes get the weight ``class_weight`` in a class-
weighted cross-entropy (``class_weighted_cross_entropy``), so a false negative of an important
class (one of its examples given another label) costs ``class_weight`` times as much while the
ticket is trained and pruned.

What we chose
-------------
* The budget: ``rounds + 1`` training segments of ``round_steps`` steps each (the benchmark
  divides its budget equally); pruning and rewinding at the start of segments 1..rounds.
* The rewind step ``k = rewind_step`` (the benchmark: 10% of a round). The comparison starts
  from a pre-trained network, so "early" means early in the fine-tuning; ``k = 0`` rewinds to
  the pre-trained weights.
* Rewinding resets every parameter (weights, biases, batch-norm affine) to step ``k``; batch-
  norm running statistics are not rewound (they follow the current network within a few steps).
* Learning-rate schedule: restarted with every segment (``segment_schedule``: the same cosine
  over each segment, "learning-rate rewinding" in Renda et al.'s words), because one cosine over
  the whole budget would leave the last ticket a learning rate near zero. Steps beyond the
  ``rounds + 1`` segments (a budget not divisible by them) extend the last segment.
* The per-round density ``d_r = density ** (r / rounds)``, each pruning ranking the survivors by
  ``|W|`` (``common.surviving_scores``).
* Class-dependent loss: the weighted mean ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (torch's
  ``cross_entropy(weight=...)``); the SenSys-ML paper's exact loss is not available to us, and
  pruning itself stays by magnitude.
"""
from __future__ import annotations

import math

import numpy as np

from ..masks import check_density
from ..nn.losses import softmax_cross_entropy
from ..validate import check_number
from .common import (Pruner, check_projection, check_steps, penalised_step, projection_mask,
                     surviving_scores)


def class_weighted_cross_entropy(logits, y, class_weights):
    """Class-weighted softmax cross-entropy: ``sum_i w_{y_i} CE_i / sum_i w_{y_i}``.

    Parameters
    ----------
    logits : ndarray [N, C];  y : int ndarray [N];  class_weights : ndarray [C], > 0

    Returns
    -------
    loss : float;  dlogits : ndarray [N, C] (dtype of logits)
    """
    w = np.asarray(class_weights, np.float64)
    if w.shape != (logits.shape[1],) or not np.all(w > 0):
        raise ValueError(f"class_weights must be {logits.shape[1]} positive numbers (one per class), "
                         f"got shape {w.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    wi = w[y]
    loss = float(-(wi * log_p[np.arange(len(y)), y]).sum() / wi.sum())
    dlogits = np.exp(log_p)
    dlogits[np.arange(len(y)), y] -= 1.0
    dlogits *= (wi / wi.sum())[:, None]
    return loss, dlogits.astype(logits.dtype)


def class_report(predicted, y, n_classes) -> dict:
    """Per-class recall and false negatives.

    Parameters
    ----------
    predicted, y : int ndarray [N]
    n_classes : int

    Returns
    -------
    dict with ``recall`` [C] (nan for a class without examples), ``false_negatives`` [C] (its
    examples given another label), ``support`` [C]
    """
    predicted, y = np.asarray(predicted), np.asarray(y)
    support = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y[predicted == y], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
    return {"recall": recall, "false_negatives": support - hits, "support": support}


def important_class_weights(n_classes, important, class_weight) -> np.ndarray:
    """``[C]`` weights: ``class_weight`` for the ``important`` classes, 1 for the others."""
    w = np.ones(n_classes)
    bad = [c for c in important if not (isinstance(c, (int, np.integer)) and 0 <= c < n_classes)]
    if bad:
        raise ValueError(f"important must list class indices in [0, {n_classes}), got {list(important)}")
    w[list(important)] = check_number("class_weight", class_weight, "> 0", lambda v: v > 0)
    return w


class LotteryTicket(Pruner):
    """Iterative magnitude pruning with rewinding on ``model`` (modified in place).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    density : float in (0, 1], the final ticket's kept fraction
    rounds : int >= 1, prunings (each removes ``1 - density ** (1 / rounds)`` of the survivors)
    round_steps : int >= 1, training steps per segment (``rounds + 1`` segments in all)
    rewind_step : int in [0, round_steps), the step whose weights the survivors return to
    granularity : "row" (row-balanced, DRESS's set) or "layer"
    important : sequence of class indices, or empty (plain cross-entropy)
    class_weight : float > 0, the loss weight of an important class
    n_classes : int, needed with ``important``
    dense_first_last : bool
    """

    kind = "lottery"

    def __init__(self, model, density, rounds, round_steps, rewind_step=0, granularity="row",
                 important=(), class_weight=4.0, n_classes=10, dense_first_last=True):
        self.density_target = check_density(density)
        self.rounds = check_steps(rounds, "rounds", 1)
        self.round_steps = check_steps(round_steps, "round_steps", 1)
        self.rewind_step = check_steps(rewind_step, "rewind_step")
        if self.rewind_step >= self.round_steps:
            raise ValueError(f"rewind_step must be below round_steps = {self.round_steps} (the "
                             f"rewind point lies in the first segment), got {rewind_step!r}")
        self.granularity = check_projection(granularity, "granularity")
        self.important = tuple(int(c) for c in important)
        self.class_weight = float(class_weight)
        self.n_classes = check_steps(n_classes, "n_classes", 1)
        self.class_weights = (important_class_weights(self.n_classes, self.important, class_weight)
                              if self.important else None)
        self._setup(model, dense_first_last)
        for _, layer in model.named_layers():
            for key, p in layer.params.items():
                layer.buffers.setdefault(f"rewind_{key}", p.copy())

    def options(self) -> dict:
        return {"density": self.density_target, "rounds": self.rounds,
                "round_steps": self.round_steps, "rewind_step": self.rewind_step,
                "granularity": self.granularity, "important": list(self.important),
                "class_weight": self.class_weight, "n_classes": self.n_classes,
                "dense_first_last": self.dense_first_last}

    @property
    def total_steps(self) -> int:
        return (self.rounds + 1) * self.round_steps

    def density_after(self, r) -> float:
        """Kept fraction after ``r`` prunings: ``density ** (r / rounds)``."""
        return self.density_target ** (min(r, self.rounds) / self.rounds)

    def segment_schedule(self, base):
        """``step -> lr`` restarting ``base`` (a schedule over ``round_steps``) at every rewind.
        Steps past the last segment's end continue the last segment (a cosine stays at its
        end), rather than restarting it."""
        def schedule(t):
            segment = min(t // self.round_steps, self.rounds)
            return base(t - segment * self.round_steps)
        return schedule

    def _snapshot(self):
        for _, layer in self.model.named_layers():
            for key, p in layer.params.items():
                layer.buffers[f"rewind_{key}"][...] = p

    def rewind(self):
        """Every parameter back to its value at ``rewind_step``."""
        for _, layer in self.model.named_layers():
            for key, p in layer.params.items():
                p[...] = layer.buffers[f"rewind_{key}"]

    def prune(self, r):
        """The ``r``-th pruning: keep ``density_after(r)`` of every layer (or row), ranking the
        survivors by ``|W|``."""
        d = self.density_after(r)
        self.set_masks({n: projection_mask(l.params["weight"], d, self.granularity,
                                           surviving_scores(l.params["weight"], l.buffers["prune_mask"]))
                        for n, l in self.layers.items()})

    def loss(self, logits, y):
        if self.class_weights is None:
            return softmax_cross_entropy(logits, y)
        return class_weighted_cross_entropy(logits, y, self.class_weights)

    def step(self, model, xb, yb):
        """One step (``fit``'s signature): at the rewind step, remember the weights; at the
        start of segment ``r`` (1..rounds), prune and rewind; then train the current ticket."""
        t = self._advance()
        segment, local = divmod(t, self.round_steps)
        if segment == 0 and local == self.rewind_step:
            self._snapshot()
        if 1 <= segment <= self.rounds and local == 0:
            self.prune(segment)
            self.rewind()
        return penalised_step(model, xb, yb, loss_fn=self.loss)

    def finish(self):
        """After training: if the run stopped before the last pruning, prune to the target."""
        if self.steps_done < self.rounds * self.round_steps + 1:
            self.prune(self.rounds)
        return self


def rounds_for(total_steps, rounds) -> int:
    """Steps per segment when ``total_steps`` are shared by ``rounds + 1`` segments."""
    return max(1, math.floor(total_steps / (rounds + 1)))

"""Pruning families beside DRESS, each a small module built from its paper (no code copied).

Every family trains one network at one density, from the same pre-trained backbone and through
the same loop as DRESS (``minidress.nn.train.fit``, via its ``step`` seam), keeps its masks as
buffers beside the weights (never editing them, as ``torch.nn.utils.prune``), and saves, loads
and resumes bit for bit (``Pruner.save``/``load``; the step counter is a model buffer).

* ``admm``: ADMM pruning (Zhang et al., ECCV 2018; ADMM-NN, Ren et al., ASPLOS 2019), onto the
  layer-wise or DRESS's row-balanced sparsity set.
* ``lottery``: lottery tickets with rewinding (iterative magnitude pruning; Frankle et al.), row-
  based or layer-wise, and the class-dependent loss (Entezari & Saukh, SenSys-ML 2020).
* ``lowrank``: compression-aware training (Alvarez & Salzmann, NeurIPS 2017): a nuclear-norm
  prox (singular-value soft-thresholding), truncation and ``W = U V``; optionally with DRESS's
  row sparsity instead of the truncation.
* ``thresholds``: learned differentiable thresholds (Manessi et al., ICPR 2018): one per layer,
  the density each layer ends at is learned.

Row-balanced results (a row-sparse store, ``minidress.deploy``, can hold them; ``Store.from_dress``
itself wants a ``Dress``): ADMM with ``projection="row"``, lottery tickets with
``granularity="row"``, compression-aware training with ``row_density``. Layer-wise ADMM and
tickets and learned thresholds leave rows of unequal length; the truncated low-rank network is
dense factors.
"""
from .admm import ADMMPruner
from .common import PROJECTIONS, Pruner, penalised_step, project, projection_mask, stored_bytes
from .lottery import (LotteryTicket, class_report, class_weighted_cross_entropy,
                      important_class_weights, rounds_for)
from .lowrank import (CompressionAware, factorized_model, nuclear_norm, rank_for_density, svt,
                      truncate)
from .thresholds import LearnedThresholds, pruning_function_backward, pruning_function_forward

__all__ = ["Pruner", "PROJECTIONS", "project", "projection_mask", "penalised_step", "stored_bytes",
           "ADMMPruner", "LotteryTicket", "class_weighted_cross_entropy", "class_report",
           "important_class_weights", "rounds_for", "CompressionAware", "svt", "truncate",
           "nuclear_norm", "rank_for_density", "factorized_model", "LearnedThresholds",
           "pruning_function_forward", "pruning_function_backward"]

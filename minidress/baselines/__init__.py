"""DRESS's any-time peers, built inside minidress from their papers (no code copied).

Each peer trains one network that can run as many sub-networks, through the same layers,
training loop (``minidress.nn.train.fit`` via ``minidress.app.experiment.train_phase``) and batch-norm
recalibration as DRESS, so that a comparison measures the methods, not their implementations.

* ``alternating``: alternating training as in AST (Yang et al., NeurIPS 2022). DRESS's nested
  row-based levels; one level per step, in turn.
* ``lcs_point``: LCS+P (Nunez et al., arXiv:2110.04252). Layer-wise magnitude top-k of one
  weight set; one random density per step.
* ``lcs_line``: LCS+L (same paper). Layer-wise top-k on a line between two weight sets; one
  random point of the line per step.
* ``slimmable``: US-Nets (Yu & Huang, ICCV 2019; slimmable networks: Yu et al., ICLR 2019).
  Widths, a prefix of every layer's units; the sandwich of n widths per step, in-place
  distillation.

The single compressed networks and one-shot pruning are in ``minidress.app.experiment``;
``minidress.app.compare.run_comparison`` runs everything side by side (``benchmarks/compare_anytime.py`` is
the command, ``docs/results.md`` the numbers). Each module's docstring states its source and
what we chose where the source left a choice (or where its text was not available to us).
"""
from .alternating import Alternating
from .common import Peer
from .lcs_line import LCSLine, LineNet, cos2_backward, cos2_forward
from .lcs_point import LCSPoint
from .slimmable import (USNet, WidthPlan, soft_cross_entropy_backward, soft_cross_entropy_forward,
                        width_for_macs)

__all__ = ["Peer", "Alternating", "LCSPoint", "LCSLine", "LineNet", "USNet", "WidthPlan",
           "width_for_macs", "cos2_forward", "cos2_backward", "soft_cross_entropy_forward",
           "soft_cross_entropy_backward"]

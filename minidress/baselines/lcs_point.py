"""LCS+P: one weight set trained at a random density every step ("compressible point").

Source: E. Nunez, M. Horton, A. Prabhu, A. Ranjan, A. Farhadi, M. Rastegari, "LCS: Learning
Compressible Subspaces for Adaptive Network Compression at Inference Time", arXiv:2110.04252
(2021). Its abstract says that one trained "compressible subspace" holds a fine-grained spectrum
of models, from highly efficient to highly accurate, for structured and unstructured sparsity,
with no retraining. The paper's body was not available to us; the recipe below is the one
minidress's issue 5 describes for LCS+P, and every detail that recipe leaves open is marked
"we chose".

The recipe
----------
* One weight set (the backbone's own weights, no copy).
* A dense warm-up of ``warmup_steps`` steps, then every step draws one density ``d`` uniformly
  from ``[d_min, 1)`` (``d_min = 0.025`` by default) and trains the sub-network that keeps,
  in every sparsified layer, the ``n_kept(d, layer size)`` weights largest in magnitude over the
  whole layer (``minidress.masks.layerwise_topk_mask``): one forward and one backward per step.
* Deployed at any density ``d``: the same layer-wise top-k of the trained weights.

What we chose
-------------
* Which layers are sparsified: the same as DRESS's (``minidress.dress.sparsifiable_layers``
  with DRESS's ``dense_first_last`` and ``dense_layers``, which the comparison passes on), so
  both prune the same weights and a MACs column means the same layers for both.
* The masks are recomputed from the current weights at every step (a full sort per layer, cheap
  at these sizes), not cached.
* Batch norm: one shared set of affine parameters and running statistics for every density;
  the running statistics mix all densities, so every evaluation recalibrates them for the
  density at hand (``minidress.dress.recalibrate_batchnorm``) from training batches.
* Warm-up length: a caller's choice (``warmup_steps``); the comparison uses 10% of the steps.
  The comparison starts every method from the same pre-trained dense network, so the warm-up
  there is a short dense fine-tuning.

Note that layer-wise top-k masks of one fixed weight set are nested too (a sparser density
keeps a subset), but rows keep very different numbers of weights, which a row-balanced kernel
cannot exploit; see ``tutorials/06_anytime_peers.ipynb``.
"""
from __future__ import annotations

from ..dress import DENSE_LAYERS, DressOptions, sparsifiable_layers
from ..masks import check_density, layerwise_topk_mask
from ..nn.train import dense_step
from ..validate import check_int
from .common import Peer, batchnorms_of, check_seed, forget_recalibration, step_rng

DEFAULT_D_MIN = 0.025


def check_dense_layers(dense_layers) -> str:
    """``dense_layers`` as given, or a ValueError unless it is one of DRESS's rules
    (``minidress.dress.DENSE_LAYERS``)."""
    if dense_layers not in DENSE_LAYERS:
        raise ValueError(f"dense_layers must be one of {DENSE_LAYERS}, got {dense_layers!r}")
    return dense_layers


def check_d_min(d_min) -> float:
    d = check_density(d_min, "d_min")
    if d >= 1.0:
        raise ValueError(f"d_min must be below 1 (the densest end is 1), got {d_min!r}")
    return d


class LCSPoint(Peer):
    """LCS+P on ``model`` (modified in place: shared one-slot batch norms, a step counter).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    d_min : float in (0, 1), the sparsest trained density (default 0.025)
    warmup_steps : int >= 0, dense steps before the random densities start
    dense_first_last : bool, keep some layers dense (False: sparsify every layer), as DRESS
    dense_layers : str, which layers stay dense when ``dense_first_last`` holds: "small" or
        "first_last" (``minidress.dress.sparsifiable_layers``); default DRESS's default, and
        the comparison passes DRESS's value
    seed : int >= 0, seeds the density drawn at every step

    Attributes
    ----------
    layers : dict name -> Linear/Conv2d, the sparsified layers
    density : float, the density last set by ``use``
    """

    kind = "lcs_point"
    counter = "lcs_step"
    before_recorded = {"dense_layers": "first_last"}     # the only rule before it was an option

    def __init__(self, model, d_min=DEFAULT_D_MIN, warmup_steps=0, dense_first_last=True,
                 dense_layers=DressOptions.dense_layers, seed=0):
        self.d_min = check_d_min(d_min)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps")
        self.seed = check_seed(seed)
        self.dense_first_last = bool(dense_first_last)
        self.dense_layers = check_dense_layers(dense_layers)
        self.model = self.net = model
        self.layers = sparsifiable_layers(model, self.dense_first_last, self.dense_layers)
        self.batchnorms = batchnorms_of(model)
        self._start_counter()
        self.density = 1.0

    def options(self) -> dict:
        return {"d_min": self.d_min, "warmup_steps": self.warmup_steps,
                "dense_first_last": self.dense_first_last, "dense_layers": self.dense_layers,
                "seed": self.seed}

    def sample_density(self, step) -> float:
        """The density trained at ``step``: 1 during the warm-up, then uniform on [d_min, 1)."""
        if step < self.warmup_steps:
            return 1.0
        return float(step_rng(self.seed, step).uniform(self.d_min, 1.0))

    def use(self, density):
        """Every sparsified layer keeps its ``n_kept(density, size)`` largest-magnitude weights."""
        d = check_density(density)
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.mask = layerwise_topk_mask(w, d).astype(w.dtype)
        forget_recalibration(self.batchnorms)
        self.density = d
        return self

    def step(self, model, xb, yb):
        """One LCS+P step: one random density, one forward and backward (``fit``'s signature)."""
        self.use(self.sample_density(self._advance()))
        return dense_step(model, xb, yb)

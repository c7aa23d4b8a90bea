"""DRESS: Dynamic REal-time Sparse Subnets (Qu et al., CVPR 2022 ECV workshop, arXiv:2207.00670).

One backbone holds K nested sparse sub-networks ("levels"). The abstract names four ingredients;
each has one obvious place below:

1. **Row-based unstructured sparsity.** Every row of a sparsified weight (a Linear output
   neuron; a Conv output channel over ``C_in*kh*kw``) keeps the same number of weights, chosen by
   magnitude (``minidress.masks``).
2. **Nested sub-networks / parameter reusing.** One int array of per-row ranks per layer encodes
   every level: level ``d`` keeps ``rank < n_kept(d, row_len)``, so a sparser level's kept set is
   a subset of every denser one's (``Dress.sample``, ``Dress.use``).
3. **Joint training in parallel with a weighted loss.** Every step runs all K sub-networks on the
   same batch and descends ``sum_k lambda_k * loss_k`` on the shared weights; each level's
   gradient reaches only the weights it keeps, and shared weights add up contributions
   (``Dress.joint_step``).
4. **Row-based fine-grained sampling and real-time switching.** Any density in (0, 1] is a
   per-row prefix of the same ranking (``Dress.use``); batch-norm statistics for a density that
   was not trained can be recalibrated on a few batches (``recalibrate_batchnorm``).

The paper's body is not available to us, only the abstract, so everything it leaves open is a
named option here, never a claim about the paper:

* ``lambdas``: ``"uniform"``, ``"density"`` (proportional to d), ``"inverse_density"``
  (proportional to 1/d), or an explicit list. Named schemes are normalised to average 1 (sum
  K), so ``"uniform"`` is the plain ``sum_k loss_k``: each level's loss then moves the weights as
  a single network's loss would at the same learning rate. (Normalising to sum 1 instead divides
  every level's step by K; ``benchmarks/choose_defaults.py`` measured that it costs the sparsest
  level about a point on digits.) An explicit list is used as given.
* ``resample_every``: re-rank every row from the current weights every N joint steps (0 = rank
  once, from the pre-trained weights, and never again).
* ``ramp``: ``"none"``, or ``"cubic"`` (Zhu & Gupta, 2017): over ``ramp_steps`` steps each sparse
  level's density falls from 1 to its target as ``d + (1 - d) * (1 - t/T)**3``.
* ``norm``: ``"per_level"`` (separate batch-norm statistics and affine parameters per level),
  ``"per_level_stats"`` (shared affine, separate statistics) or ``"shared"``.
* ``dense_first_last``: keep the first sparsifiable layer and the classifier dense (biases and
  norms are always dense).

One option is about speed, not the method: ``kernel_max_density`` trains the sparsified Linear
layers of every level at or below that density on their kept weights alone, through the
row-sparse kernels (``Linear.kept``), instead of a dense product with the mask. The numbers are
the same up to the order of additions; 0 (the default) never does.

State that must survive a checkpoint lives in the model itself (as ``torch.nn.utils.prune``
keeps ``weight_mask`` as a buffer): each sparsified layer's ``buffers["ranks"]`` and the model's
``buffers["dress_step"]``. Resuming a DRESS run is then as exact as resuming any other.
"""
from __future__ import annotations

import numpy as np

from .layers import BatchNorm, Conv2d, LevelBatchNorm, Linear, Sequential
from .losses import softmax_cross_entropy
from .masks import check_density, n_kept, row_ranks
from .metrics import index_dtype
from .train import evaluate

LAMBDAS = ("uniform", "density", "inverse_density")
NORMS = ("per_level", "per_level_stats", "shared")
RAMPS = ("none", "cubic")
DEFAULT_LEVELS = (1.0, 0.5, 0.25, 0.1)


def resolve_lambdas(lambdas, levels) -> np.ndarray:
    """Loss weights ``[K]`` (float64) from a scheme name or an explicit list."""
    d = np.asarray(levels, np.float64)
    if isinstance(lambdas, str):
        if lambdas not in LAMBDAS:
            raise ValueError(f"lambdas must be one of {LAMBDAS} or a list of {len(d)} numbers, got {lambdas!r}")
        w = {"uniform": np.ones_like(d), "density": d, "inverse_density": 1 / d}[lambdas]
        return w / w.mean()
    w = np.asarray(lambdas, np.float64)
    if w.shape != d.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"lambdas must be {len(d)} finite non-negative numbers (one per level) "
                         f"with a positive sum, got {list(np.atleast_1d(lambdas))}")
    return w


def cubic_density(target, step, ramp_steps) -> float:
    """Zhu & Gupta's cubic schedule, from dense at step 0 to ``target`` at ``ramp_steps``."""
    frac = 1.0 if ramp_steps <= 0 else min(step / ramp_steps, 1.0)
    return target + (1.0 - target) * (1.0 - frac) ** 3


def check_options(levels, lambdas="uniform", resample_every=0, ramp="none", norm="per_level",
                  kernel_max_density=0.0):
    """Validate DRESS options (errors name the option); return ``(levels, lambdas [K])``."""
    levels = tuple(check_density(d, "levels") for d in levels)
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct densities, at least one, got {list(levels)}")
    if int(resample_every) < 0:
        raise ValueError(f"resample_every must be >= 0 (0 = never), got {resample_every}")
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not 0.0 <= float(kernel_max_density) <= 1.0:
        raise ValueError(f"kernel_max_density must be in [0, 1] (0 = never use the kernels), "
                         f"got {kernel_max_density!r}")
    return levels, resolve_lambdas(lambdas, levels)


def sparsifiable_layers(model, dense_first_last=True) -> dict:
    """The Linear and Conv2d layers DRESS sparsifies, by name, in forward order (the order of
    ``model.named_layers``); with ``dense_first_last`` the first and the last stay dense."""
    found = [(name.rstrip("."), layer) for name, layer in model.named_layers()
             if isinstance(layer, (Linear, Conv2d))]
    if dense_first_last:
        found = found[1:-1]
    if not found:
        raise ValueError("the model has no layer to sparsify (with dense_first_last=True it "
                         "needs at least three Linear/Conv2d layers)")
    return dict(found)


def replace_batchnorms(layer, make):
    """Replace every ``BatchNorm`` below ``layer`` by ``make(bn)``, in place."""
    for name, child in layer.children():
        if isinstance(child, BatchNorm):
            new = make(child)
            if isinstance(layer, Sequential):
                layer.layers[int(name)] = new
            else:
                setattr(layer, name, new)
        else:
            replace_batchnorms(child, make)


class Dress:
    """Turn ``model`` (usually pre-trained dense) into a DRESS backbone with nested levels.

    Parameters
    ----------
    model : minidress.layers.Sequential (modified in place: rank buffers, level batch norms)
    levels : sequence of float in (0, 1]
        Trained densities (kept fractions), distinct; default ``(1.0, 0.5, 0.25, 0.1)``.
    lambdas, resample_every, ramp, ramp_steps, norm, dense_first_last, kernel_max_density
        See the module docstring.

    Attributes
    ----------
    layers : dict name -> Linear/Conv2d, the sparsified layers
    lambdas : ndarray [K]
    last_losses : ndarray [K], each level's loss in the last joint step
    """

    def __init__(self, model, levels=DEFAULT_LEVELS, lambdas="uniform", resample_every=0,
                 ramp="none", ramp_steps=0, norm="per_level", dense_first_last=True,
                 kernel_max_density=0.0):
        self.levels, self.lambdas = check_options(levels, lambdas, resample_every, ramp, norm,
                                                  kernel_max_density)
        self.kernel_max_density = float(kernel_max_density)
        self.model, self.resample_every, self.ramp, self.ramp_steps = model, int(resample_every), ramp, ramp_steps
        self.norm = norm
        k = len(self.levels)
        replace_batchnorms(model, lambda bn: LevelBatchNorm.from_batchnorm(
            bn, k, per_level_stats=norm != "shared", per_level_affine=norm == "per_level"))
        self.batchnorms = [m for _, m in model.named_layers() if isinstance(m, LevelBatchNorm)]
        self.layers = sparsifiable_layers(model, dense_first_last)
        model.buffers.setdefault("dress_step", np.zeros((), np.int64))
        for layer in self.layers.values():
            layer.buffers["ranks"] = np.zeros(layer.params["weight"].reshape(len(layer.params["weight"]), -1).shape, np.int32)
        self.sample()
        self.last_losses = np.zeros(k)

    # 2. Sample: rank every row of every sparsified layer by magnitude -----------------------
    def sample(self):
        """(Re-)rank every row from the current weights; all levels follow from these ranks."""
        for layer in self.layers.values():
            layer.buffers["ranks"][...] = row_ranks(layer.params["weight"])
        self._masks = {}   # density -> {layer name: mask}; valid until the next re-ranking

    def load_state(self, state):
        """Load a DRESS model's state (weights, statistics, ranks, step) and forget cached masks."""
        self.model.load_state(state)
        self._masks = {}

    def level_densities(self, step=None) -> tuple:
        """Each level's density at joint step ``step`` (the targets once any ramp is over)."""
        step = int(self.model.buffers["dress_step"]) if step is None else step
        if self.ramp == "cubic":
            return tuple(cubic_density(d, step, self.ramp_steps) for d in self.levels)
        return self.levels

    # 4. Switch: any density is a per-row prefix of the ranking -------------------------------
    def use(self, density, level=None):
        """Make the model compute the sub-network at ``density``.

        Every sparsified layer's mask becomes ``ranks < n_kept(density, row_len)``. Batch norms use
        the slot of ``level`` if given, else that of the trained level nearest to ``density``
        (ties: the denser). Any recalibrated statistics are dropped.
        """
        d = check_density(density)
        if level is None:
            level = min(range(len(self.levels)), key=lambda i: (abs(self.levels[i] - d), -self.levels[i]))
        if d not in self._masks:
            if len(self._masks) > 4 * len(self.levels):   # a ramp visits a new density every step
                self._masks.clear()
            self._masks[d] = {name: self._mask_and_kept(layer, d) for name, layer in self.layers.items()}
        for name, layer in self.layers.items():
            layer.mask, kept = self._masks[d][name]
            if isinstance(layer, Linear):
                layer.kept = kept
        for bn in self.batchnorms:
            bn.level, bn.stats_override = level, None
        self.density = d
        return self

    def _mask_and_kept(self, layer, d):
        """The layer's mask at density ``d`` and, where the kernels are used, its kept columns
        in rank order (``[rows, n_kept]``, the layout the kernels read)."""
        ranks, w = layer.buffers["ranks"], layer.params["weight"]
        k = n_kept(d, ranks.shape[1])
        mask = (ranks < k).reshape(w.shape).astype(w.dtype)
        kept = None
        if isinstance(layer, Linear) and d <= self.kernel_max_density:
            kept = np.argsort(ranks, axis=1, kind="stable")[:, :k].astype(index_dtype(ranks.shape[1]))
        return mask, kept

    # 3. Train jointly: all levels on the same batch, one weighted loss ------------------------
    def joint_step(self, model, xb, yb):
        """One DRESS step: forward and backward of every level on ``(xb, yb)``.

        The gradient of ``sum_k lambda_k * loss_k`` is the lambda-weighted sum of the levels'
        gradients; each is already masked to the weights its level keeps.

        Returns (the ``step`` signature of ``minidress.train.fit``)
        -------
        loss : float, ``sum_k lambda_k * loss_k``
        n_correct : float, correct predictions averaged over the levels
        grads : dict[str, ndarray]
        """
        step = int(model.buffers["dress_step"])
        if self.resample_every and step > 0 and step % self.resample_every == 0:
            self.sample()
        total, loss, correct = {}, 0.0, 0.0
        for k, (d, lam) in enumerate(zip(self.level_densities(step), self.lambdas)):
            self.use(d, level=k)
            logits = model.forward(xb)
            self.last_losses[k], dlogits = softmax_cross_entropy(logits, yb)
            model.backward(dlogits * dlogits.dtype.type(lam))
            for name, g in model.gradients().items():
                if k == 0:
                    total[name] = g.copy()
                else:
                    total[name] += g
            loss += lam * self.last_losses[k]
            correct += (logits.argmax(axis=1) == yb).sum() / len(self.levels)
        model.buffers["dress_step"][...] = step + 1
        return float(loss), float(correct), total

    def evaluate(self, x, y, density, level=None):
        """``(loss, accuracy)`` of the sub-network at ``density`` (see ``use``)."""
        self.use(density, level)
        return evaluate(self.model, x, y)


def recalibrate_batchnorm(dress: Dress, x, density, n_batches=10, batch_size=128, seed=0):
    """Estimate batch-norm statistics for the sub-network at ``density`` from training data.

    Runs ``n_batches`` random batches of ``x`` through the sub-network in training mode, averages
    each layer's batch means and (unbiased) variances, and installs them as the statistics used
    in eval mode until the next ``dress.use``. Running statistics and weights are untouched.
    """
    dress.use(density)
    model = dress.model
    rng = np.random.default_rng(seed)
    saved = [(bn.momentum, {k: v.copy() for k, v in bn.buffers.items()}) for bn in dress.batchnorms]
    was_training = model.training
    model.train()
    try:
        for i in range(n_batches):
            for bn in dress.batchnorms:
                bn.momentum = 1.0 / (i + 1)     # running value = mean over the batches so far
            model.forward(x[rng.choice(len(x), size=min(batch_size, len(x)), replace=False)])
        for bn in dress.batchnorms:
            s = bn.level if bn.buffers["running_mean"].shape[0] > 1 else 0
            bn.stats_override = (bn.buffers["running_mean"][s].copy(), bn.buffers["running_var"][s].copy())
    finally:
        model.train(was_training)
        for bn, (momentum, buffers) in zip(dress.batchnorms, saved):
            bn.momentum = momentum
            for k, v in buffers.items():
                bn.buffers[k][...] = v
    return dress

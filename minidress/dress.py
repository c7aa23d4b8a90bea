"""DRESS: Dynamic REal-time Sparse Subnets (Qu et al., CVPR 2022 ECV workshop, arXiv:2207.00670).

One backbone holds K nested sparse sub-networks ("levels"). The abstract names four ingredients;
this module holds them in that order:

1. **Row-based unstructured sparsity.** Every row of a sparsified weight (a Linear output
   neuron; a Conv output channel over ``C_in*kh*kw``) keeps the same number of weights, chosen by
   magnitude (``Dress.rank``, with the rules of ``minidress.masks``).
2. **Nested sub-networks / parameter reusing.** One int array of per-row ranks per layer encodes
   every level: level ``d`` keeps ``rank < n_kept(d, row_len)``, so a sparser level's kept set is
   a subset of every denser one's (``Dress.use``).
3. **Joint training in parallel with a weighted loss.** Every step runs all K sub-networks on the
   same batch and descends ``sum_k lambda_k * loss_k`` on the shared weights; each level's
   gradient reaches only the weights it keeps, and shared weights add up contributions
   (``Dress.joint_step``).
4. **Row-based fine-grained sampling and real-time switching.** Any density in (0, 1] is a
   per-row prefix of the same ranking (``Dress.use``); batch-norm statistics for a density that
   was not trained can be recalibrated on a few batches (``recalibrate_batchnorm``).

Everything the abstract leaves open is a named field of ``DressOptions``, our choice and never a
claim about the paper (README, "DRESS in minidress", says how each default was chosen).

State that must survive a checkpoint lives in the model itself (as ``torch.nn.utils.prune``
keeps ``weight_mask`` as a buffer): each sparsified layer's ``buffers["ranks"]`` and the model's
``buffers["dress_step"]``. Resuming a DRESS run is then as exact as resuming any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

from .kernels import index_dtype
from .masks import check_density, n_kept, nearest_level, row_ranks
from .nn.layers import BatchNorm, Conv2d, Linear, in_slot
from .nn.losses import softmax_cross_entropy
from .nn.models import build_model
from .nn.train import evaluate

LAMBDAS = ("uniform", "density", "inverse_density")
NORMS = ("per_level", "per_level_stats", "shared")
RAMPS = ("none", "cubic")
DEFAULT_LEVELS = (1.0, 0.5, 0.25, 0.1)


def _numbers(text):
    return tuple(float(v) for v in text.split(",") if v.strip())


def _lambdas_from_text(text):
    return text if text in LAMBDAS else _numbers(text)


def _option(default, help, **cli):
    """A ``DressOptions`` field: its default, its documentation, and how the command line reads
    it (``text``: str -> value, ``form``: what that text must look like; ``flag``: the flag's
    name, None for none; ``invert``: the flag stores False)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class DressOptions:
    """Every choice DRESS leaves open: declared, documented, defaulted and validated here only.

    ``RunConfig``, the ``minidress train`` flags (generated from these fields) and checkpoint
    metadata (``from_config``) all read this class. Invalid values raise a ``ValueError`` naming
    the option when the object is made.
    """

    levels: tuple = _option(DEFAULT_LEVELS, "trained densities (kept fractions), distinct, in (0, 1]",
                            text=_numbers, form="comma-separated numbers in (0, 1]")
    lambdas: object = _option(
        "uniform", "loss weights: uniform, density (proportional to d), inverse_density (to 1/d), "
        "or one number per level. Named schemes average 1, so uniform is the plain sum of the "
        "levels' losses; a list is used as given", text=_lambdas_from_text,
        form=f"one of {LAMBDAS} or comma-separated numbers")
    resample_every: int = _option(0, "re-rank every row from the current weights every N joint "
                                     "steps (0 = rank once, never again)", text=int,
                                 form="an integer >= 0")
    ramp: str = _option("none", "none, or cubic (Zhu & Gupta 2017): each sparse level's density "
                                "falls from 1 to its target as d + (1 - d) * (1 - t/T)**3",
                        choices=RAMPS)
    ramp_steps: int = _option(0, "T of the cubic ramp, in joint steps (minidress train sets it "
                                 "from --ramp-epochs)", flag=None)
    norm: str = _option("per_level", "batch norm: per_level (statistics and affine per level), "
                                     "per_level_stats (shared affine) or shared", choices=NORMS)
    dense_first_last: bool = _option(True, "sparsify the first layer and the classifier too",
                                     flag="--sparsify-all", invert=True)
    kernel_max_density: float = _option(
        0.0, "train the Linear layers of levels at or below this density on their kept weights "
             "through the row-sparse kernels (speed only, same numbers up to the order of "
             "additions; 0 = never)", text=float, form="a number in [0, 1]")

    def __post_init__(self):
        levels = tuple(check_density(d, "levels") for d in np.atleast_1d(self.levels).tolist())
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct densities, at least one, got {list(levels)}")
        object.__setattr__(self, "levels", levels)
        if not isinstance(self.lambdas, str):
            object.__setattr__(self, "lambdas", tuple(float(v) for v in np.atleast_1d(self.lambdas)))
        resolve_lambdas(self.lambdas, levels)
        for name in ("resample_every", "ramp_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {self.ramp!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= float(self.kernel_max_density) <= 1.0:
            raise ValueError(f"kernel_max_density must be in [0, 1] (0 = never use the kernels), "
                             f"got {self.kernel_max_density!r}")

    @classmethod
    def from_config(cls, config: dict) -> "DressOptions":
        """The options recorded in a run's ``config`` metadata (other keys are ignored; options a
        run from an older version did not record take their defaults)."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def lambda_weights(self) -> np.ndarray:
        return resolve_lambdas(self.lambdas, self.levels)


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
                         f"with a positive sum, got {np.atleast_1d(lambdas).tolist()}")
    return w


def cubic_density(target, step, ramp_steps) -> float:
    """Zhu & Gupta's cubic schedule, from dense at step 0 to ``target`` at ``ramp_steps``."""
    frac = 1.0 if ramp_steps <= 0 else min(step / ramp_steps, 1.0)
    return target + (1.0 - target) * (1.0 - frac) ** 3


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


class Dress:
    """Turn ``model`` (usually pre-trained dense) into a DRESS backbone with nested levels.

    Parameters
    ----------
    model : minidress.nn.layers.Sequential
        Modified in place: rank buffers, one batch-norm slot per level.
    options : DressOptions, optional (default ``DressOptions()``)
    **changes
        Options to change, e.g. ``Dress(model, levels=(1.0, 0.5), norm="shared")``.

    Attributes
    ----------
    options : DressOptions;  levels : tuple of float;  lambdas : ndarray [K]
    layers : dict name -> Linear/Conv2d, the sparsified layers
    batchnorms : list of BatchNorm, each with K slots
    density : float, the density in use
    last_losses : ndarray [K], each level's loss in the last joint step
    """

    def __init__(self, model, options: DressOptions | None = None, **changes):
        self.options = o = replace(options or DressOptions(), **changes)
        self.model, self.levels, self.lambdas = model, o.levels, o.lambda_weights()
        self.batchnorms = [m for _, m in model.named_layers() if isinstance(m, BatchNorm)]
        for bn in self.batchnorms:
            bn.set_slots(len(self.levels), per_slot_stats=o.norm != "shared",
                         per_slot_affine=o.norm == "per_level")
        self.layers = sparsifiable_layers(model, o.dense_first_last)
        model.buffers.setdefault("dress_step", np.zeros((), np.int64))
        self.rank()
        self.density = None     # dense until the first ``use``
        self.last_losses = np.zeros(len(self.levels))

    @classmethod
    def from_store(cls, store) -> "Dress":
        """Rebuild the DRESS model a ``minidress.deploy.Store`` was packed from. The sparsified
        weights hold the stored entries (zero elsewhere); with rank order the ranks of the stored
        entries are exact, so every density evaluates as before packing."""
        dress = build_dress(store.meta["model"], DressOptions.from_config(store.meta["config"]),
                            store.dtype)
        dress.load_state({**store.dense, **store.sparse_state(),
                          "dress_step": dress.model.buffers["dress_step"]})
        return dress

    # 1. Rank: every row of every sparsified layer, by magnitude ------------------------------
    def rank(self):
        """(Re-)rank every row from the current weights; all levels follow from these ranks."""
        for layer in self.layers.values():
            ranks = row_ranks(layer.params["weight"])
            if "ranks" in layer.buffers:
                layer.buffers["ranks"][...] = ranks      # in place: the buffer is the model's state
            else:
                layer.buffers["ranks"] = ranks
        self._masks = {}   # density -> {layer name: (mask, kept)}; valid until the next ranking

    def load_state(self, state):
        """Load a DRESS model's state (weights, statistics, ranks, step) and forget cached masks."""
        self.model.load_state(state)
        self._masks = {}

    # 2. Nest: level d keeps rank < n_kept(d); any density is a prefix of the same ranking ----
    def use(self, density, level=None):
        """Make the model compute the sub-network at ``density``.

        Every sparsified layer's mask becomes ``ranks < n_kept(density, row_len)``. Batch norms use
        the slot of ``level`` if given, else that of the trained level nearest to ``density``
        (``minidress.masks.nearest_level``). Any recalibrated statistics are dropped.
        """
        d = check_density(density)
        if d not in self._masks:
            if len(self._masks) > 4 * len(self.levels):   # a ramp visits a new density every step
                self._masks.clear()
            self._masks[d] = {name: self._mask_and_kept(layer, d) for name, layer in self.layers.items()}
        for name, layer in self.layers.items():
            layer.mask, kept = self._masks[d][name]
            if isinstance(layer, Linear):
                layer.kept = kept
        for bn in self.batchnorms:
            bn.slot = nearest_level(self.levels, d) if level is None else level
            bn.stats_override = None
        self.density = d
        return self

    def _mask_and_kept(self, layer, d):
        """The layer's mask at density ``d`` and, where the kernels are used, its kept columns
        in rank order (``[rows, n_kept]``, the layout the kernels read)."""
        ranks, w = layer.buffers["ranks"], layer.params["weight"]
        k = n_kept(d, ranks.shape[1])
        mask = (ranks < k).reshape(w.shape).astype(w.dtype)
        kept = None
        if isinstance(layer, Linear) and d <= self.options.kernel_max_density:
            kept = np.argsort(ranks, axis=1, kind="stable")[:, :k].astype(index_dtype(ranks.shape[1]))
        return mask, kept

    def level_densities(self, step=None) -> tuple:
        """Each level's density at joint step ``step`` (the targets once any ramp is over)."""
        step = int(self.model.buffers["dress_step"]) if step is None else step
        if self.options.ramp == "cubic":
            return tuple(cubic_density(d, step, self.options.ramp_steps) for d in self.levels)
        return self.levels

    # 3. Train jointly: all levels on the same batch, one weighted loss ------------------------
    def joint_step(self, model, xb, yb):
        """One DRESS step: forward and backward of every level on ``(xb, yb)``.

        ``model`` must be ``self.model`` (the ``step`` signature of ``minidress.nn.train.fit``).
        The gradient of ``sum_k lambda_k * loss_k`` is the lambda-weighted sum of the levels'
        gradients; each is already masked to the weights its level keeps.

        Returns
        -------
        loss : float, ``sum_k lambda_k * loss_k``
        n_correct : float, correct predictions averaged over the levels
        grads : dict[str, ndarray]
        """
        step = int(model.buffers["dress_step"])
        every = self.options.resample_every
        if every and step > 0 and step % every == 0:
            self.rank()
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

    # 4. Switch: evaluate any density; recalibrate batch norm where no level was trained -------
    def evaluate(self, x, y, density, level=None):
        """``(loss, accuracy)`` of the sub-network at ``density`` (see ``use``)."""
        self.use(density, level)
        return evaluate(self.model, x, y)


def recalibrate_batchnorm(net, x, density, n_batches=10, batch_size=128, seed=0):
    """Estimate batch-norm statistics for the sub-network at ``density`` from training data.

    ``net`` is a ``Dress`` or any peer with ``use``, ``model`` and ``batchnorms``. Runs
    ``n_batches`` random batches of ``x`` through the sub-network in training mode, averages each
    layer's batch means and (unbiased) variances, and installs them as the statistics used in
    eval mode until the next ``use``. Running statistics and weights are untouched.
    """
    net.use(density)
    model = net.model
    rng = np.random.default_rng(seed)
    saved = [(bn.momentum, {k: v.copy() for k, v in bn.buffers.items()}) for bn in net.batchnorms]
    was_training = model.training
    model.train()
    try:
        for i in range(n_batches):
            for bn in net.batchnorms:
                bn.momentum = 1.0 / (i + 1)     # running value = mean over the batches so far
            model.forward(x[rng.choice(len(x), size=min(batch_size, len(x)), replace=False)])
        for bn in net.batchnorms:
            bn.stats_override = (in_slot(bn.buffers["running_mean"], bn.slot).copy(),
                                 in_slot(bn.buffers["running_var"], bn.slot).copy())
    finally:
        model.train(was_training)
        for bn, (momentum, buffers) in zip(net.batchnorms, saved):
            bn.momentum = momentum
            for k, v in buffers.items():
                bn.buffers[k][...] = v
    return net


def build_dress(spec, options: DressOptions, dtype=np.float32) -> Dress:
    """An (untrained) DRESS model from a model ``spec`` (``minidress.nn.models.build_model``) and
    its options; load a checkpoint's state into it with ``dress.load_state``."""
    return Dress(build_model(spec, dtype=dtype), options)

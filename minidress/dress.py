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
   was not trained can be recalibrated on a few batches (``recalibrate_batchnorm``). Training can
   also sample densities between and below the levels (``DressOptions.sample_prob``,
   ``Dress.pass_plan``), within the same K passes per step.

Everything the abstract leaves open is a named field of ``DressOptions``, our choice and never a
claim about the paper (README, "DRESS in minidress", says how each default was chosen).

State that must survive a checkpoint lives in the model itself (as ``torch.nn.utils.prune``
keeps ``weight_mask`` as a buffer): each sparsified layer's ``buffers["ranks"]`` and the model's
``buffers["dress_step"]``. Resuming a DRESS run is then as exact as resuming any other.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from numbers import Real

import numpy as np

from .kernels.rowsparse import kept_columns
from .masks import check_density, n_kept, nearest_level, row_ranks
from .nn.layers import BatchNorm, Conv2d, Linear, in_slot
from .nn.losses import log_softmax, softmax_cross_entropy
from .nn.models import build_model
from .nn.train import evaluate

LAMBDAS = ("uniform", "density", "inverse_density", "sqrt_inverse_density")
NORMS = ("per_level", "per_level_stats", "shared")
RAMPS = ("none", "cubic")
DISTILL = ("none", "densest")
STRATA = ("nearest", "below")
DENSE_LAYERS = ("first_last", "small")
SMALL_ROW = 27      # dense_layers="small": a first layer with rows this short stays dense
DEFAULT_LEVELS = (1.0, 0.5, 0.25, 0.1)
# What runs from before these options existed did, so that their checkpoints resume as they ran.
BEFORE_RECORDED = {"resample_until": 0, "sample_prob": 0.0, "dense_layers": "first_last",
                   "strata": "nearest", "densest_weight": "scheme"}


def _numbers(text):
    return tuple(float(v) for v in text.split(",") if v.strip())


def _lambdas_from_text(text):
    return text if text in LAMBDAS else _numbers(text)


def _weight_from_text(text):       # densest_weight: "scheme" or a number
    return text if text == "scheme" else float(text)


def _until_from_text(text):
    """``resample_until`` from the command line: "0.5" is a fraction of the run, "110" a step."""
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


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
        "sqrt_inverse_density", "loss weights: uniform, density (proportional to d), "
        "inverse_density (to 1/d), sqrt_inverse_density (to 1/sqrt(d), the default: measured, it "
        "lifts the densities at and below the sparsest level; docs/results.md), or one number per "
        "level. Named schemes average 1 (uniform is the plain sum of the levels' losses), then "
        "densest_weight sets the densest level's; a list is used as given", text=_lambdas_from_text,
        form=f"one of {LAMBDAS} or comma-separated numbers")
    densest_weight: object = _option(
        1.0, "the densest level's weight under a named lambdas scheme: a number (default 1, as a "
             "single network's loss; measured, it keeps the ResNet's dense end) or scheme (the "
             "scheme's own, 0.53 for sqrt_inverse_density at the default levels)",
        text=_weight_from_text, form="a number >= 0, or scheme")
    resample_every: int = _option(20, "re-rank every row from the current weights every N joint "
                                      "steps (0 = rank once, never again)", text=int,
                                  form="an integer >= 0")
    resample_until: float = _option(
        0, "re-rank (every resample_every steps) only before this point, so the rest of training "
           "keeps one ranking: 0 (the default) = all run long; a number in (0, 1) is that "
           "fraction of the run's joint steps (run_steps; all run long while that is 0), a whole "
           "number >= 1 that joint step",
        text=_until_from_text, form="0, a number in (0, 1) or a whole number >= 1")
    run_steps: int = _option(0, "the run's number of joint steps, of which a fractional "
                                "resample_until is a fraction (minidress train sets it from "
                                "--epochs; 0 = unknown)", flag=None)
    sample_prob: float = _option(
        0.5, "fine-grained sampling: each step, the pass of every level but the densest trains, "
             "with this probability, a density drawn uniformly from the level's stratum (strata; "
             "the sparsest level's reaches down to d_min) instead of the level; still K passes per "
             "step (0 = the levels only; below 1, so every level's batch-norm statistics update)",
        text=float, form="a number in [0, 1)")
    strata: str = _option(
        "below", "the densities each level's pass may draw (sample_prob): below (the default), from "
                 "the level down to the next sparser one, where the curve dips; or nearest, those "
                 "nearer to it than to any other level; the sparsest level's reach down to d_min",
        choices=STRATA)
    d_min: float = _option(0.0, "the sparsest density fine-grained sampling draws (0 = a quarter "
                                "of the sparsest level)", text=float,
                           form="a number in [0, 1], at most the sparsest level")
    sample_seed: int = _option(0, "seeds the drawn densities: joint step t draws from "
                                  "numpy.random.default_rng([sample_seed, t])", text=int,
                               form="an integer >= 0")
    distill: str = _option("none", "in-place distillation: none, or densest (every other level "
                                   "learns from the densest level's predictions on the same batch, "
                                   "soft targets without gradient, instead of from the labels)",
                           choices=DISTILL)
    ramp: str = _option("none", "none, or cubic (Zhu & Gupta 2017): each sparse level's density "
                                "falls from 1 to its target as d + (1 - d) * (1 - t/T)**3",
                        choices=RAMPS)
    ramp_steps: int = _option(0, "T of the cubic ramp, in joint steps (minidress train sets it "
                                 "from --ramp-epochs)", flag=None)
    norm: str = _option("per_level", "batch norm: per_level (statistics and affine per level), "
                                     "per_level_stats (shared affine) or shared", choices=NORMS)
    dense_first_last: bool = _option(True, "sparsify every layer (dense_layers is then unused)",
                                     flag="--sparsify-all", invert=True)
    dense_layers: str = _option(
        "small", "which layers stay dense (unless --sparsify-all): small (the default), the "
                 f"classifier and a first layer with rows of at most {SMALL_ROW} weights (a 3x3 conv "
                 "on 1-3 channels), so an MLP's first layer, most of its MACs, is sparsified; "
                 "first_last, the first layer and the classifier (the default until this version)",
        choices=DENSE_LAYERS)
    kernel_max_density: float = _option(
        0.0, "Linear layers of levels at or below this density train through the row-sparse kernels "
             "where measured faster than dense masked products (speed only, same numbers up to the "
             "order of additions; 0 = never: dense, bit-reproducible)", text=float, form="a number in [0, 1]")

    def __post_init__(self):
        levels = tuple(check_density(d, "levels") for d in np.atleast_1d(self.levels).tolist())
        if not levels or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct densities, at least one, got {list(levels)}")
        object.__setattr__(self, "levels", levels)
        if not isinstance(self.lambdas, str):
            object.__setattr__(self, "lambdas", tuple(float(v) for v in np.atleast_1d(self.lambdas)))
        w = self.densest_weight
        if w != "scheme":
            if not isinstance(w, Real) or isinstance(w, bool) or not (np.isfinite(w) and w >= 0):
                raise ValueError(f"densest_weight must be a number >= 0 or 'scheme', got {w!r}")
            object.__setattr__(self, "densest_weight", float(w))
        if self.lambda_weights().sum() <= 0:
            raise ValueError(f"the loss weights must not all be 0, got {self.lambda_weights().tolist()}")
        until = self.resample_until
        if not (until == 0 or 0 < until < 1 or (until >= 1 and until == int(until))):
            raise ValueError(f"resample_until must be 0, a fraction of the run in (0, 1) or a whole "
                             f"number of joint steps >= 1, got {until!r}")
        if until >= 1 or until == 0:
            object.__setattr__(self, "resample_until", int(until))    # steps, as recorded before
        if not isinstance(self.dense_first_last, (bool, np.bool_)):     # "False" would be true
            raise ValueError(f"dense_first_last must be True or False, got {self.dense_first_last!r}")
        for name in ("resample_every", "ramp_steps", "run_steps", "sample_seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, allowed in (("ramp", RAMPS), ("norm", NORMS), ("distill", DISTILL),
                              ("dense_layers", DENSE_LAYERS), ("strata", STRATA)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.sample_prob) < 1.0:
            raise ValueError(f"sample_prob must be in [0, 1) (at 1 no level's running statistics "
                             f"would ever be updated), got {self.sample_prob!r}")
        if not 0.0 <= float(self.d_min) <= min(levels):
            raise ValueError(f"d_min must be in [0, {min(levels)}] (at most the sparsest level; 0 "
                             f"= a quarter of it), got {self.d_min!r}")
        if not 0.0 <= float(self.kernel_max_density) <= 1.0:
            raise ValueError(f"kernel_max_density must be in [0, 1] (0 = never use the kernels), "
                             f"got {self.kernel_max_density!r}")

    @classmethod
    def from_config(cls, config: dict) -> "DressOptions":
        """The options recorded in a run's ``config`` metadata (other keys are ignored). An option
        a run from an older version did not record takes the value that version behaved as
        (``BEFORE_RECORDED``: no sampling, no stop to re-ranking), else its default."""
        recorded = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        return cls(**{**BEFORE_RECORDED, **recorded})

    def lambda_weights(self) -> np.ndarray:
        """Each level's loss weight ``[K]``: the scheme's (``resolve_lambdas``), with the densest
        level's replaced by ``densest_weight`` unless that is "scheme" or the lambdas a list."""
        w = resolve_lambdas(self.lambdas, self.levels)
        if isinstance(self.lambdas, str) and self.densest_weight != "scheme":
            w[int(np.argmax(self.levels))] = self.densest_weight
        return w


def resolve_lambdas(lambdas, levels) -> np.ndarray:
    """Loss weights ``[K]`` (float64) from a scheme name or an explicit list."""
    d = np.asarray(levels, np.float64)
    if isinstance(lambdas, str):
        if lambdas not in LAMBDAS:
            raise ValueError(f"lambdas must be one of {LAMBDAS} or a list of {len(d)} numbers, got {lambdas!r}")
        w = d ** {"uniform": 0.0, "density": 1.0, "inverse_density": -1.0, "sqrt_inverse_density": -0.5}[lambdas]
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


def sparsifiable_layers(model, dense_first_last=True, dense_layers="first_last") -> dict:
    """The Linear and Conv2d layers DRESS sparsifies, by name, in forward order (the order of
    ``model.named_layers``).

    With ``dense_first_last`` the classifier (the last) stays dense, and the first layer too
    with ``dense_layers="first_last"``; with ``"small"`` the first stays dense only if its rows
    hold at most ``SMALL_ROW`` weights. Why: a 3x3 conv on one channel keeps one weight per row
    at density 0.05 and costs few MACs anyway, while an MLP's first layer holds most of its MACs.
    ``DressOptions`` defaults to ``"small"``; this function's default stays ``"first_last"``, the
    rule of callers that pass ``dense_first_last`` only (``minidress.pruning``).
    """
    found = [(name.rstrip("."), layer) for name, layer in model.named_layers()
             if isinstance(layer, (Linear, Conv2d))]
    if dense_first_last and found:
        short_rows = found[0][1].params["weight"][0].size <= SMALL_ROW
        found = found[int(dense_layers == "first_last" or short_rows):-1]
    if not found:
        raise ValueError(f"the model has no layer to sparsify with dense_first_last="
                         f"{dense_first_last} and dense_layers={dense_layers!r}")
    return dict(found)


def strata(levels, d_min, rule="nearest") -> list:
    """Each level's stratum ``(low, high)``. ``nearest``: the densities whose nearest level it is
    (bounds at the midpoints between neighbouring levels, as ``nearest_level`` decides), the
    densest level's reaching up to 1. ``below``: from the level down to the next sparser one. The
    sparsest level's reaches down to ``d_min``."""
    order = sorted(levels, reverse=True)
    if rule == "below":
        bounds = dict(zip(order, zip(order[1:] + [d_min], order)))
    else:
        cuts = [1.0] + [(a + b) / 2 for a, b in zip(order, order[1:])] + [d_min]
        bounds = {d: (cuts[i + 1], cuts[i]) for i, d in enumerate(order)}
    return [bounds[d] for d in levels]


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
    strata : list of (low, high), the densities each level's pass may draw (``sample_prob``)
    density : float, the density in use
    last_losses : ndarray [K], each level's loss in the last joint step
    last_plan : list of (density, drawn), what each level's pass trained in the last joint step
    """

    def __init__(self, model, options: DressOptions | None = None, **changes):
        self.options = o = replace(options or DressOptions(), **changes)
        self.model, self.levels, self.lambdas = model, o.levels, o.lambda_weights()
        self.batchnorms = [m for _, m in model.named_layers() if isinstance(m, BatchNorm)]
        for bn in self.batchnorms:
            bn.set_slots(len(self.levels), per_slot_stats=o.norm != "shared",
                         per_slot_affine=o.norm == "per_level")
        self.layers = sparsifiable_layers(model, o.dense_first_last, o.dense_layers)
        model.buffers.setdefault("dress_step", np.zeros((), np.int64))
        self.rank()
        self.density = None     # dense until the first ``use``
        self.strata = strata(self.levels, o.d_min or min(self.levels) / 4, o.strata)
        self.densest = int(np.argmax(self.levels))
        # Distillation needs the teacher's pass first; otherwise the levels run in the given order.
        rest = [k for k in range(len(self.levels)) if k != self.densest]
        self.order = [self.densest, *rest] if o.distill != "none" else list(range(len(self.levels)))
        self.last_losses = np.zeros(len(self.levels))
        self.last_plan = []

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
            kept = kept_columns(ranks, k)
        return mask, kept

    def rerank_stop(self, run_steps=None):
        """The joint step before which re-ranking happens (None: all run long).

        A fractional ``resample_until`` is that fraction of ``run_steps`` (default: the option
        ``run_steps``) joint steps, rounded to the nearest step; while ``run_steps`` is 0 it stops
        nothing. A whole ``resample_until`` is the step itself."""
        until = self.options.resample_until
        run_steps = self.options.run_steps if run_steps is None else run_steps
        if until >= 1:
            return int(until)
        if until == 0 or not run_steps:
            return None
        return int(np.floor(until * run_steps + 0.5))

    def rerank_due(self, step, run_steps=None) -> bool:
        """Whether joint step ``step`` re-ranks first: every ``resample_every`` steps after the
        first, and only before ``rerank_stop(run_steps)`` if that is set."""
        every, stop = self.options.resample_every, self.rerank_stop(run_steps)
        return bool(every) and step > 0 and step % every == 0 and (stop is None or step < stop)

    def pass_plan(self, step) -> list:
        """What each level's pass trains at joint step ``step``: ``(density, drawn)`` per level.

        With ``sample_prob`` p, every level but the densest (the sandwich rule's fixed top, and
        the distillation teacher) trains, with probability p, a density drawn uniformly from its
        stratum (``strata``) instead of its own, in the batch-norm slot it is deployed with
        (``use_pass``). The draws come from
        ``default_rng([sample_seed, step])``: a function of the seed and the step only, so a
        resumed run draws what an uninterrupted one does. While a ramp runs, nothing is drawn
        (the strata are those of the target levels).
        """
        densities = self.level_densities(step)
        p = self.options.sample_prob
        if not p or (self.options.ramp != "none" and step < self.options.ramp_steps):
            return [(d, False) for d in densities]
        rng = np.random.default_rng([self.options.sample_seed, int(step)])
        coins, u = rng.random(len(densities)), rng.random(len(densities))
        return [(float(lo + (hi - lo) * u[k]), True) if k != self.densest and coins[k] < p else (d, False)
                for k, (d, (lo, hi)) in enumerate(zip(densities, self.strata))]

    def use_pass(self, k, density, drawn):
        """``use`` for level ``k``'s pass of ``pass_plan``: the level's own batch-norm slot, or for
        a drawn density the slot of its nearest level, the one it is deployed with (under
        ``strata="nearest"`` that is level ``k`` again)."""
        return self.use(density, level=None if drawn else k)

    @contextmanager
    def frozen_statistics(self, frozen=True):
        """Within the block (if ``frozen``), training-mode forward passes normalise with their
        batch statistics as always but leave every running statistic as it is. A drawn density
        runs so: its slot's statistics stay those of the level itself, and a density that is not
        a level gets recalibrated statistics when deployed (``recalibrate_batchnorm``)."""
        saved = [bn.momentum for bn in self.batchnorms]
        try:
            for bn in self.batchnorms if frozen else ():
                bn.momentum = 0.0          # running = (1 - 0) * running + 0 * batch
            yield
        finally:
            for bn, momentum in zip(self.batchnorms, saved):
                bn.momentum = momentum

    def level_densities(self, step=None) -> tuple:
        """Each level's density at joint step ``step`` (the targets once any ramp is over)."""
        step = int(self.model.buffers["dress_step"]) if step is None else step
        if self.options.ramp == "cubic":
            return tuple(cubic_density(d, step, self.options.ramp_steps) for d in self.levels)
        return self.levels

    # 3. Train jointly: all levels on the same batch, one weighted loss ------------------------
    def joint_step(self, model, xb, yb):
        """One DRESS step: forward and backward of every level on ``(xb, yb)``, K passes.

        ``model`` must be ``self.model`` (the ``step`` signature of ``minidress.nn.train.fit``).
        The gradient of ``sum_k lambda_k * loss_k`` is the lambda-weighted sum of the levels'
        gradients; each is already masked to the weights its level keeps. Level k's pass trains
        ``pass_plan(step)[k]``. ``loss_k`` is the cross-entropy against the labels, or with
        ``distill="densest"``, for every level but the densest, against the densest level's
        softmax on this batch (computed first; a constant, no gradient flows into it).

        Returns
        -------
        loss : float, ``sum_k lambda_k * loss_k``
        n_correct : float, correct predictions averaged over the levels
        grads : dict[str, ndarray]
        """
        step = int(model.buffers["dress_step"])
        if self.rerank_due(step):
            self.rank()
        self.last_plan = plan = self.pass_plan(step)
        total, loss, correct, teacher = {}, 0.0, 0.0, None
        for k in self.order:
            (d, drawn), lam = plan[k], self.lambdas[k]
            self.use_pass(k, d, drawn)
            with self.frozen_statistics(drawn):
                logits = model.forward(xb)
            if teacher is None:
                self.last_losses[k], dlogits = softmax_cross_entropy(logits, yb)
                if self.options.distill != "none":
                    teacher = np.exp(log_softmax(logits))
            else:       # soft-target cross-entropy; the teacher's rows sum to 1
                logp = log_softmax(logits)
                self.last_losses[k] = -(teacher * logp).sum() / len(xb)
                dlogits = (np.exp(logp) - teacher) / logits.dtype.type(len(xb))
            model.backward(dlogits * dlogits.dtype.type(lam), input_grad=False)
            for name, g in model.gradients().items():
                if name in total:
                    total[name] += g
                else:
                    total[name] = g.copy()
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

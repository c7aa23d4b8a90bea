"""The main job: pre-train, DRESS, the baselines, and the accuracy-vs-density picture.

``run_experiment(RunConfig(...))`` is what ``minidress train`` runs. Every network starts from
the same pre-trained dense weights and sees the same data in the same order:

* **DRESS**: all levels trained jointly for ``epochs`` epochs (K sub-network passes per step).
* **single compressed**: for each level, the pre-trained network pruned row-wise at that density
  (same ranking rule, same options) and fine-tuned alone for the same ``epochs``: the same
  per-network budget, and in total the same number of sub-network passes as DRESS.
* **one-shot**: the pre-trained network pruned at each density with no training; its batch-norm
  statistics are recalibrated on training batches (without that, dense statistics on a sparse
  network say more about the statistics than about the pruning).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np

from ..data import load_dataset
from ..data.batching import standardize
from ..deploy import Store, device_memory
from ..dress import Dress, DressOptions, recalibrate_batchnorm
from ..nn.metrics import kept_parameters, macs
from ..data.batching import train_val_split
from ..masks import check_density
from ..nn.models import MODELS, build_model
from ..nn.optim import SGD, make_schedule
from ..nn.train import evaluate, fit, steps_per_epoch
from ..validate import check_int, check_number


@dataclass
class RunConfig:
    """Everything that defines a run; stored (flat, ``to_json``) in its checkpoint and metrics.

    ``dress`` holds DRESS's options (``minidress.dress.DressOptions``); ``ramp_epochs`` is the
    length of its cubic ramp in epochs, which becomes ``DressOptions.ramp_steps`` once the number
    of steps per epoch is known (``dress_for``).
    """
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    hidden: tuple = (300, 100)
    dress: DressOptions = field(default_factory=DressOptions)
    ramp_epochs: float = 0.0
    pretrain_epochs: int = 10
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    baselines: bool = True
    grid: tuple = tuple(np.round(np.arange(0.05, 1.0001, 0.05), 2))
    recalibrate_batches: int = 10
    train_subset: int | None = None
    test_subset: int | None = None
    val_fraction: float = 0.0
    quiet: bool = False

    def __post_init__(self):
        # Fail before minutes of pre-training, not after.
        if not isinstance(self.dress, DressOptions):
            raise TypeError(f"dress must be a DressOptions, got {type(self.dress).__name__}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        self.hidden = tuple(check_int(h, "hidden widths", 1) for h in self.hidden)
        for name, low in (("pretrain_epochs", 0), ("epochs", 0), ("batch_size", 1),
                          ("recalibrate_batches", 1), ("seed", 0)):
            check_int(getattr(self, name), name, low)
        for name in ("lr", "finetune_lr"):
            check_number(name, getattr(self, name), "> 0", lambda v: v > 0)
        check_number("momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        check_number("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)
        check_number("ramp_epochs", self.ramp_epochs, ">= 0", lambda v: v >= 0)
        check_number("val_fraction", self.val_fraction, "in [0, 1) (0 = no validation split)",
                     lambda v: 0 <= v < 1)
        self.grid = tuple(check_density(d, "grid") for d in self.grid)
        if not self.grid:
            raise ValueError("grid must hold at least one density")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1, what="None (everything) or an integer >= 1")

    @property
    def levels(self) -> tuple:
        return self.dress.levels

    def dress_for(self, steps_per_epoch) -> DressOptions:
        """DRESS's options for a phase of ``steps_per_epoch`` steps an epoch (sets the ramp, and
        the run's length ``run_steps`` that a fractional ``resample_until`` is a fraction of)."""
        return replace(self.dress, ramp_steps=int(self.ramp_epochs * steps_per_epoch),
                       run_steps=int(self.epochs * steps_per_epoch))

    def to_json(self, steps_per_epoch) -> dict:
        """The run's config as flat JSON (DRESS's options beside the others), as checkpoints,
        stores and metrics record it; ``DressOptions.from_config`` reads it back."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dress"}
        return {**asdict(self.dress_for(steps_per_epoch)), **flat}


SUBSET_SEED = 12345


def subset_indices(n_total, n_keep, name):
    """Sorted indices of a fixed random subset of ``n_keep`` of ``n_total`` examples (all if None).

    The subset depends on ``SUBSET_SEED`` only, never on the run's seed, so every seed and every
    method of a comparison sees the same examples.
    """
    if n_keep is None:
        return np.arange(n_total)
    if not 1 <= n_keep <= n_total:
        raise ValueError(f"{name} must be an integer in [1, {n_total}], got {n_keep!r}")
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n_total)[:n_keep])


def load_data(cfg: RunConfig):
    """The data set, standardised by the training set's per-channel statistics.

    With ``cfg.train_subset`` / ``cfg.test_subset``, a fixed random subset of each split
    (``subset_indices``), for backbones too slow to train on everything in NumPy. The statistics
    are those of the whole training set, so a subset sees the same inputs a full run sees.

    Returns
    -------
    ds : Dataset (its arrays subset, not standardised)
    x_train : [N_train, ...] standardised training inputs
    x_test : [N_test, ...] standardised test inputs
    """
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed)
    (x_train, x_test), _ = standardize(ds.x_train, ds.x_test)
    if cfg.train_subset is None and cfg.test_subset is None:
        return ds, x_train, x_test
    tr = subset_indices(len(x_train), cfg.train_subset, "train_subset")
    te = subset_indices(len(x_test), cfg.test_subset, "test_subset")
    ds = replace(ds, x_train=ds.x_train[tr], y_train=ds.y_train[tr], x_test=ds.x_test[te],
                 y_test=ds.y_test[te])
    return ds, x_train[tr], x_test[te]


def train_phase(model, cfg, x, y, xv, yv, epochs, lr, step=None, checkpoint_path=None, meta=None,
                label="", resume=False):
    """SGD (Nesterov momentum, weight decay) with a cosine schedule over ``epochs``; with
    ``resume``, continue from ``checkpoint_path`` if it exists (``minidress.nn.train.fit``)."""
    opt = SGD(lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    steps = max(1, epochs * steps_per_epoch(len(x), cfg.batch_size))
    kw = {"step": step} if step is not None else {}
    start = checkpoint_path if resume and checkpoint_path is not None and Path(checkpoint_path).exists() else None
    return fit(model, opt, x, y, xv, yv, epochs=epochs, batch_size=cfg.batch_size,
               schedule=make_schedule("cosine", lr, steps), seed=cfg.seed, quiet=cfg.quiet,
               checkpoint_path=checkpoint_path, meta=meta, label=label, resume=start, **kw)


def model_spec(model_name, hidden, ds, x_train) -> dict:
    """The model spec (``minidress.nn.models.build_model``) of a run on ``ds``."""
    return {"name": model_name, "input_shape": list(x_train.shape[1:]), "n_classes": ds.n_classes,
            "hidden": list(hidden)}


class Run(NamedTuple):
    """What ``run_experiment`` returns: the JSON-ready ``metrics`` and the trained objects."""
    metrics: dict
    dress: Dress            # the trained DRESS model
    pretrained: object      # a copy of the pre-trained dense network, the start of every method


def _log(cfg, msg):
    if not cfg.quiet:
        print(msg, flush=True)


def run_experiment(cfg: RunConfig, run_dir=None, resume=False) -> Run:
    """Run DRESS and (optionally) its baselines; returns a ``Run``.

    With ``run_dir``, the pre-training and the joint training write checkpoints there after every
    epoch (``pretrain.npz``, ``checkpoint.npz``); with ``resume``, they continue from them. A
    resumed run ends with the same numbers as an uninterrupted one: every phase after the
    checkpoints is a function of the trained weights and the seed.
    """
    t_start = time.perf_counter()
    ds, x_train, x_test = load_data(cfg)
    y_train, y_test = ds.y_train, ds.y_test
    x_val = y_val = None
    if cfg.val_fraction:                # held out of every training phase, reported per epoch
        x_train, y_train, x_val, y_val = train_val_split(x_train, y_train, cfg.val_fraction, cfg.seed)
    spec = model_spec(cfg.model, cfg.hidden, ds, x_train)
    per_epoch = steps_per_epoch(len(x_train), cfg.batch_size)
    options = cfg.dress_for(per_epoch)
    model = build_model(spec, cfg.seed)
    result = {"config": cfg.to_json(per_epoch), "model": spec, "dataset": ds.name,
              "n_train": len(x_train), "n_val": 0 if x_val is None else len(x_val), "n_test": len(x_test)}
    meta = {"model": spec, "dataset": ds.name, "config": result["config"]}
    path = (lambda name: None) if run_dir is None else (lambda name: Path(run_dir) / name)

    # 1. Pre-train the dense backbone.
    _log(cfg, f"[1/4] pre-training the dense {cfg.model} for {cfg.pretrain_epochs} epochs on "
              f"{len(x_train)} examples" + (f" ({len(x_val)} held out for validation)" if x_val is not None else ""))
    t0 = time.perf_counter()
    result["pretrain_history"] = train_phase(model, cfg, x_train, y_train, x_val, y_val,
                                             cfg.pretrain_epochs, cfg.lr, checkpoint_path=path("pretrain.npz"),
                                             meta=meta, label="pre-training", resume=resume)
    result["dense_acc"] = evaluate(model, x_test, y_test)[1]
    result["seconds"] = {"pretrain": time.perf_counter() - t0}
    pretrained = copy.deepcopy(model)

    # 2. Rank and nest the levels, train them jointly.
    _log(cfg, f"[2/4] DRESS: levels {list(cfg.levels)}, joint training for {cfg.epochs} epochs")
    t0 = time.perf_counter()
    dress = Dress(model, options)
    result["dress_history"] = train_phase(model, cfg, x_train, y_train, None, None, cfg.epochs,
                                          cfg.finetune_lr, step=dress.joint_step,
                                          checkpoint_path=path("checkpoint.npz"), meta=meta,
                                          label="DRESS, loss = sum over levels of lambda_k * loss_k",
                                          resume=resume)
    result["seconds"]["dress"] = time.perf_counter() - t0
    levels = {}
    for d in cfg.levels:
        dress.use(d)
        levels[str(d)] = {"density": d, "dress_acc": evaluate(model, x_test, y_test)[1],
                          "macs": macs(model, x_train.shape[1:]),
                          "kept_params": kept_parameters(model)}
    result["passes"] = {"pretrain": cfg.pretrain_epochs * per_epoch,
                        "dress": cfg.epochs * per_epoch * len(cfg.levels)}
    store = Store.from_dress(dress, meta={"model": spec, "config": result["config"]})
    result["bytes"] = store.accounting()
    # What a device needs per level: parameters, peak activations and scratch at batch 1 and 32.
    result["memory"] = {str(d): m for d, m in device_memory(store).items()}
    result["batchnorm_layers"] = len(dress.batchnorms)

    # 3. Any density: the fine grid, with the nearest level's norms and with recalibration.
    _log(cfg, f"[3/4] evaluating {len(cfg.grid)} densities between {min(cfg.grid)} and {max(cfg.grid)}")
    curve = []
    for d in cfg.grid:
        near = dress.evaluate(x_test, y_test, d)[1]
        recalibrate_batchnorm(dress, x_train, d, cfg.recalibrate_batches, cfg.batch_size, cfg.seed)
        curve.append({"density": float(d), "nearest_norm_acc": near,
                      "recalibrated_acc": evaluate(model, x_test, y_test)[1]})
    result["curve"] = curve

    # 4. The baselines, from the same pre-trained weights.
    if cfg.baselines:
        _log(cfg, f"[4/4] baselines: {len(cfg.levels)} single compressed networks, one-shot pruning")
        t0 = time.perf_counter()
        for d in cfg.levels:
            levels[str(d)].update(single_level_baselines(cfg, options, pretrained, d, x_train, y_train,
                                                         x_test, y_test))
        result["passes"]["single_each"] = cfg.epochs * per_epoch
        result["seconds"]["baselines"] = time.perf_counter() - t0
    result["levels"] = list(levels.values())
    result["seconds"]["total"] = time.perf_counter() - t_start
    return Run(result, dress, pretrained)


def single_level_baselines(cfg, options, pretrained, d, x_train, y_train, x_test, y_test) -> dict:
    """Test accuracies at density ``d`` of the two baselines, each from a copy of ``pretrained``:
    ``single_acc``, pruned row-wise at ``d`` (DRESS's ranking and options, one level) and
    fine-tuned alone for ``cfg.epochs``; ``one_shot_acc``, pruned with no training, batch-norm
    statistics recalibrated."""
    one_level = replace(options, levels=(d,), lambdas="uniform")
    single = Dress(copy.deepcopy(pretrained), one_level)
    train_phase(single.model, cfg, x_train, y_train, None, None, cfg.epochs, cfg.finetune_lr,
                step=single.joint_step, label=f"single compressed at density {d:g}")
    shot = Dress(copy.deepcopy(pretrained), one_level)
    recalibrate_batchnorm(shot, x_train, d, cfg.recalibrate_batches, cfg.batch_size, cfg.seed)
    return {"single_acc": single.evaluate(x_test, y_test, d)[1],
            "one_shot_acc": evaluate(shot.model, x_test, y_test)[1]}


def run_dense(cfg: RunConfig, optimizer, epochs, schedule_for=None, checkpoint_path=None,
              resume=None, config=None, log=print) -> tuple:
    """Train one dense network (``minidress train --dense``): ``cfg``'s data, model, seed and
    batch size, with ``optimizer`` for ``epochs``; ``schedule_for(total_steps)`` makes the
    learning-rate schedule (None: constant). Returns ``(metrics, model)``."""
    t0 = time.perf_counter()
    ds, x_train, x_test = load_data(cfg)
    spec = model_spec(cfg.model, cfg.hidden, ds, x_train)
    model = build_model(spec, cfg.seed)
    total = epochs * steps_per_epoch(len(x_train), cfg.batch_size)
    log(f"minidress train: {ds.summary()}")
    log(f"model {cfg.model}: {sum(p.size for p in model.parameters().values()):,} parameters; "
        f"{epochs} epochs, batch {cfg.batch_size}")
    history = fit(model, optimizer, x_train, ds.y_train, x_test, ds.y_test, epochs=epochs,
                  batch_size=cfg.batch_size, schedule=schedule_for and schedule_for(total),
                  seed=cfg.seed, quiet=cfg.quiet, checkpoint_path=checkpoint_path, resume=resume,
                  meta={"model": spec, "dataset": cfg.dataset, "config": config})
    test_loss, test_acc = evaluate(model, x_test, ds.y_test)
    metrics = {"dataset": cfg.dataset, "model": spec, "config": config, "history": history,
               "test_loss": test_loss, "test_acc": test_acc, "seconds": time.perf_counter() - t0}
    return metrics, model

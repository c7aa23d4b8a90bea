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
from dataclasses import asdict, dataclass, replace

import numpy as np

from .data import load_dataset
from .data.batching import standardize
from .dress import DEFAULT_LEVELS, Dress, check_options, recalibrate_batchnorm
from .metrics import kept_parameters, macs, storage_bytes
from .models import build_model
from .optim import SGD, make_schedule
from .train import evaluate, fit


@dataclass
class RunConfig:
    """Everything that defines a run; stored in its checkpoint and metrics."""
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "cnn"
    hidden: tuple = (300, 100)
    levels: tuple = DEFAULT_LEVELS
    lambdas: object = "uniform"
    resample_every: int = 0
    ramp: str = "none"
    ramp_epochs: float = 0.0
    norm: str = "per_level"
    dense_first_last: bool = True
    kernel_max_density: float = 0.0
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
    quiet: bool = False

    def __post_init__(self):
        # Fail before minutes of pre-training, not after.
        check_options(self.levels, self.lambdas, self.resample_every, self.ramp, self.norm,
                      self.kernel_max_density)
        for name in ("train_subset", "test_subset"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
                raise ValueError(f"{name} must be None (everything) or an integer >= 1, got {n!r}")

    def dress_options(self, steps_per_epoch):
        return dict(lambdas=self.lambdas, resample_every=self.resample_every, ramp=self.ramp,
                    ramp_steps=int(self.ramp_epochs * steps_per_epoch), norm=self.norm,
                    dense_first_last=self.dense_first_last, kernel_max_density=self.kernel_max_density)


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


def train_phase(model, cfg, x, y, xv, yv, epochs, lr, step=None, checkpoint_path=None, meta=None):
    """SGD (Nesterov momentum, weight decay) with a cosine schedule over ``epochs``."""
    opt = SGD(lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    steps = max(1, epochs * -(-len(x) // cfg.batch_size))
    kw = {"step": step} if step is not None else {}
    return fit(model, opt, x, y, xv, yv, epochs=epochs, batch_size=cfg.batch_size,
               schedule=make_schedule("cosine", lr, steps), seed=cfg.seed, quiet=cfg.quiet,
               checkpoint_path=checkpoint_path, meta=meta, **kw)


def model_spec(cfg, ds, x_train):
    return {"name": cfg.model, "input_shape": list(x_train.shape[1:]), "n_classes": ds.n_classes,
            "hidden": list(cfg.hidden)}


def build_dress(spec, cfg_dict, dtype=np.float32):
    """Rebuild an (untrained) DRESS model from a checkpoint's ``model`` and ``config`` metadata;
    load the state into it with ``dress.load_state``."""
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["n_classes"],
                        hidden=tuple(spec["hidden"]), dtype=dtype)
    return Dress(model, levels=cfg_dict["levels"], lambdas=cfg_dict["lambdas"],
                 resample_every=cfg_dict["resample_every"], ramp=cfg_dict["ramp"],
                 ramp_steps=cfg_dict.get("ramp_steps", 0), norm=cfg_dict["norm"],
                 dense_first_last=cfg_dict["dense_first_last"],
                 kernel_max_density=cfg_dict.get("kernel_max_density", 0.0))


def _log(cfg, msg):
    if not cfg.quiet:
        print(msg, flush=True)


def run_experiment(cfg: RunConfig, checkpoint_path=None) -> dict:
    """Run DRESS and (optionally) its baselines.

    Returns a dict of JSON-ready numbers, plus two objects to pop before writing it as JSON:
    ``dress`` (the trained ``Dress``) and ``pretrained`` (a copy of the pre-trained dense model,
    the common start of DRESS and every baseline).
    """
    t_start = time.perf_counter()
    ds, x_train, x_test = load_data(cfg)
    y_train, y_test = ds.y_train, ds.y_test
    spec = model_spec(cfg, ds, x_train)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    model = build_model(cfg.model, tuple(spec["input_shape"]), ds.n_classes, cfg.seed,
                        hidden=tuple(cfg.hidden))
    result = {"config": {**asdict(cfg), "ramp_steps": int(cfg.ramp_epochs * steps_per_epoch)},
              "model": spec, "dataset": ds.name}

    # 1. Pre-train the dense backbone.
    _log(cfg, f"[1/4] pre-training the dense {cfg.model} for {cfg.pretrain_epochs} epochs")
    t0 = time.perf_counter()
    result["pretrain_history"] = train_phase(model, cfg, x_train, y_train, x_test, y_test,
                                             cfg.pretrain_epochs, cfg.lr)
    result["dense_acc"] = evaluate(model, x_test, y_test)[1]
    result["seconds"] = {"pretrain": time.perf_counter() - t0}
    pretrained = copy.deepcopy(model)

    # 2-3. Sample nested levels, train them jointly.
    _log(cfg, f"[2/4] DRESS: levels {list(cfg.levels)}, joint training for {cfg.epochs} epochs")
    t0 = time.perf_counter()
    dress = Dress(model, cfg.levels, **cfg.dress_options(steps_per_epoch))
    meta = {"model": spec, "dataset": ds.name, "config": result["config"]}
    result["dress_history"] = train_phase(model, cfg, x_train, y_train, None, None, cfg.epochs,
                                          cfg.finetune_lr, step=dress.joint_step,
                                          checkpoint_path=checkpoint_path, meta=meta)
    result["seconds"]["dress"] = time.perf_counter() - t0
    levels = {}
    for d in cfg.levels:
        dress.use(d)
        levels[str(d)] = {"density": d, "dress_acc": evaluate(model, x_test, y_test)[1],
                          "macs": macs(model, x_train.shape[1:]),
                          "kept_params": kept_parameters(model)}
    result["passes"] = {"pretrain": cfg.pretrain_epochs * steps_per_epoch,
                        "dress": cfg.epochs * steps_per_epoch * len(cfg.levels)}
    result["bytes"] = storage_bytes(dress)

    # 4. Any density: the fine grid, with the nearest level's norms and with recalibration.
    _log(cfg, f"[3/4] evaluating {len(cfg.grid)} densities between {min(cfg.grid)} and {max(cfg.grid)}")
    curve = []
    for d in cfg.grid:
        near = dress.evaluate(x_test, y_test, d)[1]
        recalibrate_batchnorm(dress, x_train, d, cfg.recalibrate_batches, cfg.batch_size, cfg.seed)
        curve.append({"density": float(d), "nearest_norm_acc": near,
                      "recalibrated_acc": evaluate(model, x_test, y_test)[1]})
    result["curve"] = curve
    result["dress"] = dress
    result["pretrained"] = pretrained

    if cfg.baselines:
        _log(cfg, f"[4/4] baselines: {len(cfg.levels)} single compressed networks, one-shot pruning")
        t0 = time.perf_counter()
        for d in cfg.levels:
            single = copy.deepcopy(pretrained)
            sd = Dress(single, (d,), **{**cfg.dress_options(steps_per_epoch), "lambdas": "uniform"})
            train_phase(single, cfg, x_train, y_train, None, None, cfg.epochs, cfg.finetune_lr,
                        step=sd.joint_step)
            levels[str(d)]["single_acc"] = sd.evaluate(x_test, y_test, d)[1]
            shot = Dress(copy.deepcopy(pretrained), (d,), **cfg.dress_options(steps_per_epoch))
            recalibrate_batchnorm(shot, x_train, d, cfg.recalibrate_batches, cfg.batch_size, cfg.seed)
            levels[str(d)]["one_shot_acc"] = evaluate(shot.model, x_test, y_test)[1]
        result["passes"]["single_each"] = cfg.epochs * steps_per_epoch
        result["seconds"]["baselines"] = time.perf_counter() - t0
    result["levels"] = list(levels.values())
    result["seconds"]["total"] = time.perf_counter() - t_start
    return result


def format_table(result) -> str:
    """The per-level table printed by ``minidress train``."""
    rows = ["| density | DRESS | single compressed | one-shot | MACs | kept params |",
            "|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    for lv in result["levels"]:
        rows.append(f"| {lv['density']:g} | {pct(lv['dress_acc'])} | {pct(lv.get('single_acc'))} | "
                    f"{pct(lv.get('one_shot_acc'))} | {lv['macs']:,} | {lv['kept_params']:,} |")
    b = result["bytes"]
    k = len(result["levels"])
    rows.append("")
    rows.append(f"stored bytes: one nested copy {b['nested']:,} (all {k} levels); {k} separate models: "
                f"row-sparse {b['separate']:,} ({b['separate'] / b['nested']:.2f}x), CSR "
                f"{b['separate_csr']:,} ({b['separate_csr'] / b['nested']:.2f}x), dense "
                f"{b['separate_dense']:,} ({b['separate_dense'] / b['nested']:.2f}x); one dense model {b['dense']:,}")
    p = result["passes"]
    line = f"training passes (sub-network forward+backward): pre-train {p['pretrain']:,}, DRESS {p['dress']:,}"
    if "single_each" in p:
        line += f", single compressed {p['single_each']:,} each ({p['single_each'] * k:,} for all {k})"
    rows.append(line)
    return "\n".join(rows)


def plot_curve(result, path):
    """Accuracy vs density: DRESS over the grid (nearest-level norms and recalibrated), the
    trained levels marked, and the baselines at the levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import save_figure
    c = result["curve"]
    d = [p["density"] for p in c]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(d, [100 * p["recalibrated_acc"] for p in c], "-", label="DRESS, any density (recalibrated BN)")
    ax.plot(d, [100 * p["nearest_norm_acc"] for p in c], ":", label="DRESS, any density (nearest level's BN)")
    lv = result["levels"]
    ax.plot([v["density"] for v in lv], [100 * v["dress_acc"] for v in lv], "o", color="C0",
            label="DRESS, trained levels")
    if "single_acc" in lv[0]:
        ax.plot([v["density"] for v in lv], [100 * v["single_acc"] for v in lv], "s", mfc="none",
                color="C3", label="single compressed")
        ax.plot([v["density"] for v in lv], [100 * v["one_shot_acc"] for v in lv], "x", color="C2",
                label="one-shot (recalibrated BN)")
    ax.set(xlabel="density (kept fraction of each row)", ylabel="test accuracy (%)", xscale="log",
           title=f"{result['dataset']} / {result['model']['name']}")
    ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0], ["0.05", "0.1", "0.25", "0.5", "1"])
    ax.set_ylim(max(0, min(100 * p["nearest_norm_acc"] for p in c) - 5), 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)

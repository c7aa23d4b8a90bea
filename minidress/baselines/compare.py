"""DRESS beside its any-time peers: the same backbone, data, seed and training budget.

``run_comparison(cfg)`` runs, for one ``minidress.experiment.RunConfig``:

1. ``minidress.experiment.run_experiment(cfg)`` unchanged: dense pre-training, DRESS with the
   options of ``cfg`` (so DRESS's defaults are whatever ``RunConfig`` says), the single
   compressed networks and one-shot pruning;
2. from a copy of the same pre-trained dense network (``run_experiment``'s ``pretrained``),
   every peer (``minidress.baselines``): alternating training of DRESS's levels, LCS+P, LCS+L
   and US-Nets.

The budget is counted in sub-network forward/backward passes after pre-training. DRESS makes K
per step (one per level) for ``cfg.epochs`` epochs; the peers that make one pass per step
(alternating, LCS+P, LCS+L) get K times the epochs; US-Nets makes ``n = K`` per step for
``cfg.epochs`` epochs; the K single compressed networks get ``cfg.epochs`` each. Everyone
fine-tunes with ``cfg.finetune_lr`` through ``minidress.experiment.train_phase`` (SGD, Nesterov,
cosine schedule over its own steps). ``run_comparison`` checks that the passes agree.

Evaluation, at the densities ``densities`` (default 1, 0.5, 0.25, 0.1, 0.05):

* DRESS and alternating: a trained level with its own batch norm; any other density with
  recalibrated batch-norm statistics (``recalibrate_batchnorm``, ``cfg.recalibrate_batches``
  training batches), as ``run_experiment`` evaluates its grid;
* LCS+P, LCS+L: their one set of batch-norm statistics is recalibrated at every density;
* US-Nets: at the width whose MACs match DRESS's at that density (the largest width that costs
  no more), statistics recalibrated (US-Nets' post-training statistics);
* single compressed and one-shot: only at DRESS's trained levels, as ``run_experiment`` reports
  them ("-" elsewhere).

Stored bytes: what each method keeps to serve all of its points. DRESS and alternating: one
nested store (``minidress.store.Store.accounting``, ``nested``); single compressed: K separate
row-sparse models (``separate``); one-shot: one dense model (``dense``), pruned on the device;
LCS+P, US-Nets: one dense model plus recalibrated statistics per point (``Peer.held_bytes``);
LCS+L: both ends of every parameter plus those statistics.

``cfg.train_subset`` and ``cfg.test_subset`` (``RunConfig``) train and test on a fixed random
subset, the same for every seed and method, for backbones too slow to train on everything in
NumPy.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace

import numpy as np

from .. import experiment
from ..metrics import macs, storage_bytes
from .alternating import Alternating
from .lcs_line import LCSLine, check_beta
from .lcs_point import DEFAULT_D_MIN, LCSPoint, check_d_min
from .slimmable import USNet, WidthPlan, width_for_macs

EVAL_DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
PEERS = ("alternating", "LCS+P", "LCS+L", "US-Nets")
METHODS = ("DRESS", *PEERS, "single compressed", "one-shot")


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

def _check_densities(densities, d_min):
    """The densities as floats; 1.0 must be among them (it is the dense reference of the MACs)."""
    try:
        ds = tuple(float(d) for d in densities)
    except (TypeError, ValueError):
        ds = ()
    if (not ds or len(set(ds)) != len(ds) or not all(d_min <= d <= 1.0 for d in ds)
            or 1.0 not in ds):
        raise ValueError(f"densities must be distinct numbers in [d_min, 1] = [{d_min}, 1], "
                         f"1.0 among them, got {densities!r}")
    return ds


def _make_peer(name, model, cfg, shape, steps_per_epoch, dress_macs, d_min, beta, warmup_fraction):
    """Wrap ``model`` (a copy of the pre-trained network) as the peer ``name``.

    Returns ``(peer, epochs, widths)``: the epochs that give it DRESS's number of passes, and
    for US-Nets the width matched to each density's MACs (else None).
    """
    k = len(cfg.levels)
    if name == "alternating":
        peer = Alternating(model, cfg.levels, **cfg.dress_options(steps_per_epoch * k))
        return peer, cfg.epochs * k, None
    if name in ("LCS+P", "LCS+L"):
        options = {"d_min": d_min, "warmup_steps": round(warmup_fraction * cfg.epochs * k * steps_per_epoch),
                   "dense_first_last": cfg.dense_first_last, "seed": cfg.seed}
        peer = LCSPoint(model, **options) if name == "LCS+P" else LCSLine(model, beta=beta, **options)
        return peer, cfg.epochs * k, None
    plan = WidthPlan(copy.deepcopy(model), shape)
    widths = {d: width_for_macs(plan, target) for d, target in dress_macs.items()}
    peer = USNet(model, shape, width_min=min(widths.values()), n_per_step=k, seed=cfg.seed)
    return peer, cfg.epochs, widths


def run_comparison(cfg: experiment.RunConfig, densities=EVAL_DENSITIES, peers=PEERS,
                   d_min=DEFAULT_D_MIN, beta=1.0, warmup_fraction=0.1, log=None) -> dict:
    """Train DRESS, its baselines and ``peers`` on ``cfg``; return every number (JSON-ready).

    Parameters
    ----------
    cfg : RunConfig; DRESS's options are taken from it as they are
    densities : the evaluated densities, in [d_min, 1]
    peers : subset of ``PEERS``
    d_min, beta : LCS's sparsest density and regulariser weight
    warmup_fraction : LCS's warm-up, as a fraction of its training steps
    log : callable taking a message, or None

    Returns
    -------
    dict with ``config``, ``dense_acc``, ``pretrain`` (passes, seconds), ``densities`` and
    ``methods``: name -> ``points`` (one per density: ``density``, ``width`` (US-Nets), ``acc``
    or None, ``macs``), ``bytes``, ``passes``, ``seconds`` (training wall time).
    """
    say = log or (lambda msg: None)
    # Everything is checked here, before minutes of pre-training, not when the peer is built.
    d_min, beta = check_d_min(d_min), check_beta(beta)
    densities = _check_densities(densities, d_min)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"peers must be among {PEERS}, got {unknown}")
    k = len(cfg.levels)
    if k < 2:
        raise ValueError(f"the comparison needs at least 2 DRESS levels (K passes per step), "
                         f"got {cfg.levels}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    say(f"DRESS, single compressed, one-shot (run_experiment; levels {list(cfg.levels)})")
    main = experiment.run_experiment(replace(cfg, grid=tuple(sorted(densities))))
    ds, x_train, x_test = experiment.load_data(cfg)
    y_train, y_test = ds.y_train, ds.y_test
    shape = x_train.shape[1:]
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    pretrained = main["pretrained"]

    dress = main["dress"]
    dress_macs = {}
    for d in densities:
        dress.use(d)
        dress_macs[d] = macs(dress.model, shape)
    by_level = {lv["density"]: lv for lv in main["levels"]}
    curve = {c["density"]: c["recalibrated_acc"] for c in main["curve"]}
    dress_passes = main["passes"]["dress"]

    def points(accs, point_macs, widths=None):
        return [{"density": d, "width": None if widths is None else widths[d], "acc": accs.get(d),
                 "macs": int(point_macs[d])} for d in densities]

    dress_accs = {d: by_level[d]["dress_acc"] if d in by_level else curve[d] for d in densities}
    methods = {"DRESS": {"points": points(dress_accs, dress_macs), "bytes": main["bytes"]["nested"],
                         "passes": dress_passes, "seconds": main["seconds"]["dress"]}}

    for name in peers:
        peer, epochs, widths = _make_peer(name, copy.deepcopy(pretrained), cfg, shape, steps_per_epoch,
                                          dress_macs, d_min, beta, warmup_fraction)
        say(f"{name}: {epochs} epochs, {peer.passes_per_step} pass(es) per step")
        t0 = time.perf_counter()
        experiment.train_phase(peer.model, cfg, x_train, y_train, None, None, epochs, cfg.finetune_lr,
                               step=peer.step)
        seconds = time.perf_counter() - t0
        passes = peer.steps_done * peer.passes_per_step
        if passes != dress_passes:
            raise RuntimeError(f"{name} made {passes} passes, DRESS {dress_passes}: the budgets differ")
        accs, point_macs = {}, {}
        for d in densities:
            point = d if widths is None else widths[d]
            peer.use(point)
            point_macs[d] = macs(peer.model, shape)
            accs[d] = peer.evaluate(x_test, y_test, point, x_train, cfg.recalibrate_batches,
                                    cfg.batch_size, cfg.seed)[1]
        stored = (storage_bytes(peer.dress)["nested"] if name == "alternating"
                  else peer.held_bytes(len(densities)))
        methods[name] = {"points": points(accs, point_macs, widths), "bytes": stored,
                         "passes": passes, "seconds": seconds}
        if name == "LCS+L":
            methods[name]["end_cosines"] = peer.end_cosines()

    if "single_each" in main["passes"]:
        # run_experiment times the two baselines together; one-shot only recalibrates.
        for name, key, size, passes, seconds in (
                ("single compressed", "single_acc", "separate", main["passes"]["single_each"] * k,
                 main["seconds"]["baselines"]),
                ("one-shot", "one_shot_acc", "dense", 0, 0.0)):
            accs = {d: by_level[d][key] for d in densities if d in by_level}
            methods[name] = {"points": points(accs, dress_macs), "bytes": main["bytes"][size],
                             "passes": passes, "seconds": seconds}
    return {"config": {**asdict(cfg), "densities": list(densities), "d_min": d_min, "beta": beta,
                       "warmup_fraction": warmup_fraction},
            "dataset": main["dataset"], "model": main["model"], "dense_acc": main["dense_acc"],
            "n_train": len(x_train), "n_test": len(x_test),
            "pretrain": {"passes": main["passes"]["pretrain"], "seconds": main["seconds"]["pretrain"]},
            "densities": list(densities), "methods": methods}


# ---------------------------------------------------------------------------------------------
# Reporting several seeds of one setting
# ---------------------------------------------------------------------------------------------

def _spread(values, fmt):
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt(v[0])
    return f"{fmt(np.mean(v))} ({fmt(min(v))}-{fmt(max(v))})"


def summarize(runs) -> dict:
    """Mean, min and max over seeds of every accuracy; ``runs`` are ``run_comparison`` results
    of one setting. Returns method -> list (per density) of dicts."""
    out = {}
    for name in [m for m in METHODS if m in runs[0]["methods"]]:
        rows = []
        for i, d in enumerate(runs[0]["densities"]):
            accs = [r["methods"][name]["points"][i]["acc"] for r in runs]
            accs = [a for a in accs if a is not None]
            p = runs[0]["methods"][name]["points"][i]
            rows.append({"density": d, "width": p["width"], "macs": p["macs"],
                         "mean": float(np.mean(accs)) if accs else None,
                         "min": min(accs) if accs else None, "max": max(accs) if accs else None})
        out[name] = rows
    return out


def format_comparison(runs) -> str:
    """Markdown tables of ``runs`` (one setting, one result per seed): accuracy per density (mean
    and min-max over seeds), stored bytes, training passes and training wall time; then MACs per
    sample at every point (US-Nets: with its matched width). Alternating, single compressed and
    one-shot use DRESS's row-based masks, so they share DRESS's MACs and are left out there."""
    first = runs[0]
    dens = first["densities"]
    pct = lambda v: f"{100 * v:.2f}"
    head = " | ".join(f"{d:g}" for d in dens)
    lines = [f"| method | {head} | stored bytes | training passes | train time (s) |",
             "|---|" + "---|" * (len(dens) + 3)]
    for name in [m for m in METHODS if m in first["methods"]]:
        cells = []
        for i in range(len(dens)):
            cells.append(_spread([r["methods"][name]["points"][i]["acc"] for r in runs], pct))
        m = first["methods"][name]
        secs = _spread([r["methods"][name]["seconds"] for r in runs], lambda v: f"{v:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['bytes']:,} | {m['passes']:,} | {secs} |")
    dense_macs = first["methods"]["DRESS"]["points"][dens.index(1.0)]["macs"] if 1.0 in dens else None
    lines += ["", f"| MACs per sample | {head} |", "|---|" + "---|" * len(dens)]
    for name in [m for m in METHODS if m in first["methods"]]:
        if name in ("single compressed", "one-shot", "alternating"):
            continue                          # the same row-based masks as DRESS
        cells = []
        for p in first["methods"][name]["points"]:
            rel = [f"{100 * p['macs'] / dense_macs:.1f}%"] if dense_macs else []
            rel += [f"width {p['width']:.3f}"] if p["width"] is not None else []
            cells.append(f"{p['macs']:,}" + (f" ({', '.join(rel)})" if rel else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(runs, path, title=None):
    """Test accuracy against MACs (fraction of the dense network's), mean over seeds with
    min-max bars, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from ..fileio import save_figure
    summary = summarize(runs)
    dense = max(p["macs"] for p in summary["DRESS"])
    styles = {"DRESS": ("o-", "C0"), "alternating": ("v--", "C1"), "LCS+P": ("^-.", "C2"),
              "LCS+L": ("D:", "C4"), "US-Nets": ("s-", "C5"), "single compressed": ("s", "C3"),
              "one-shot": ("x", "C7")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    low, xs = 100.0, []
    for name, rows in summary.items():
        rows = [r for r in rows if r["mean"] is not None]
        x = [r["macs"] / dense for r in rows]
        xs += x
        y = np.array([100 * r["mean"] for r in rows])
        err = np.array([[100 * (r["mean"] - r["min"]), 100 * (r["max"] - r["mean"])] for r in rows]).T
        fmt, color = styles[name]
        ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=2, ms=5,
                    mfc="none" if name == "single compressed" else None, label=name)
        low = min(low, y.min())
    # A log axis spreads out small MAC fractions; over a narrow range (the MLP, whose dense first
    # layer holds most MACs) it would only crowd the tick labels.
    if max(xs) / min(xs) > 3:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (0.05, 0.1, 0.25, 0.5, 1.0) if min(xs) * 0.9 <= t <= 1.0])
    ax.set(xlabel="MACs per sample (fraction of the dense network's)",
           ylabel="test accuracy (%)", title=title or f"{runs[0]['dataset']} / {runs[0]['model']['name']}")
    ax.set_ylim(max(0.0, low - 3), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)

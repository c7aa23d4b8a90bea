"""DRESS beside its any-time peers: the same backbone, data, seed and training budget.

``run_comparison(cfg)`` runs, for one ``minidress.app.experiment.RunConfig``:

1. ``minidress.app.experiment.run_experiment(cfg)`` unchanged: dense pre-training, DRESS with the
   options of ``cfg`` (so DRESS's defaults are whatever ``RunConfig`` says), the single
   compressed networks and one-shot pruning;
2. from a copy of the same pre-trained dense network (``run_experiment``'s ``pretrained``),
   every peer (``minidress.baselines``): alternating training of DRESS's levels, LCS+P, LCS+L
   and US-Nets.

Every weight-sparse method sparsifies DRESS's layers: alternating and the single compressed
networks take DRESS's options, and LCS+P and LCS+L get its ``dense_first_last`` and
``dense_layers`` (``minidress.dress.sparsifiable_layers``), so a column compares the same layers.

The budget is counted in sub-network forward/backward passes after pre-training. DRESS makes K
per step (one per level) for ``cfg.epochs`` epochs; the peers that make one pass per step
(alternating, LCS+P, LCS+L) get K times the epochs; US-Nets makes ``n = K`` per step for
``cfg.epochs`` epochs; the K single compressed networks get ``cfg.epochs`` each. Everyone
fine-tunes with ``cfg.finetune_lr`` through ``minidress.app.experiment.train_phase`` (SGD, Nesterov,
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
nested store (``minidress.deploy.Store.accounting``, ``nested``); single compressed: K separate
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
from dataclasses import replace

from ..baselines.alternating import Alternating
from ..baselines.lcs_line import LCSLine, check_beta
from ..baselines.lcs_point import DEFAULT_D_MIN, LCSPoint, check_d_min
from ..baselines.slimmable import USNet, WidthPlan, width_for_macs
from ..deploy.store import Store
from ..nn.metrics import macs
from ..nn.train import steps_per_epoch as count_steps
from . import experiment

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
        peer = Alternating(model, cfg.dress_for(steps_per_epoch * k))
        return peer, cfg.epochs * k, None
    if name in ("LCS+P", "LCS+L"):
        options = {"d_min": d_min, "warmup_steps": round(warmup_fraction * cfg.epochs * k * steps_per_epoch),
                   "dense_first_last": cfg.dress.dense_first_last,
                   "dense_layers": cfg.dress.dense_layers, "seed": cfg.seed}
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
    dict with ``config`` (``cfg``'s, DRESS's options among them, plus ``densities``, LCS's
    ``lcs_d_min`` and ``beta``, ``warmup_fraction``), ``dense_acc``, ``pretrain`` (passes,
    seconds), ``densities`` and ``methods``: name -> ``points`` (one per density: ``density``, ``width`` (US-Nets), ``acc``
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
    run = experiment.run_experiment(replace(cfg, grid=tuple(sorted(densities))))
    main = run.metrics
    ds, x_train, x_test = experiment.load_data(cfg)
    y_train, y_test = ds.y_train, ds.y_test
    shape = x_train.shape[1:]
    steps_per_epoch = count_steps(len(x_train), cfg.batch_size)
    pretrained, dress = run.pretrained, run.dress
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
        stored = (Store.from_dress(peer.dress).accounting()["nested"] if name == "alternating"
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
    # LCS's d_min under its own name: "d_min" is DRESS's (sampling's sparsest density).
    return {"config": {**cfg.to_json(steps_per_epoch), "densities": list(densities), "lcs_d_min": d_min,
                       "beta": beta, "warmup_fraction": warmup_fraction},
            "dataset": main["dataset"], "model": main["model"], "dense_acc": main["dense_acc"],
            "n_train": len(x_train), "n_test": len(x_test),
            "pretrain": {"passes": main["passes"]["pretrain"], "seconds": main["seconds"]["pretrain"]},
            "densities": list(densities), "methods": methods}

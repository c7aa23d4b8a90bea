"""DRESS beside its any-time peers (alternating training, LCS+P, LCS+L, US-Nets) and the single
compressed / one-shot baselines: the same backbone, data, seed and number of sub-network
forward/backward passes (``minidress.app.compare.run_comparison``).

    python benchmarks/compare_anytime.py --jobs 2 --data-dir ../shared/data/mnist      # all three
    python benchmarks/compare_anytime.py --settings cnn --seeds 0,1,2 --jobs 2         # digits only
    python benchmarks/compare_anytime.py --settings resnet --epochs 2 --train-subset 2000
    python benchmarks/compare_anytime.py --step-times                 # ms per training pass only
    python benchmarks/compare_anytime.py --settings cnn --seeds 0,1,2 --densities grid --jobs 2
    python benchmarks/compare_anytime.py --settings cnn --seeds 0,1,2 --densities grid \\
        --dress-options sample_prob=0 --peers "" --no-baselines         # DRESS alone, other options
    python benchmarks/compare_anytime.py --combine runs/a/cnn.json runs/b/cnn.json  # side by side

Settings (DRESS's options are ``RunConfig()``'s defaults unless ``--dress-options`` changes
some, which the output then says; only the data, the backbone and the budget are set here):

* ``cnn``: digits (1347 training, 450 test images) + the small CNN; RunConfig's budget
  (10 pre-training epochs, then 10 epochs of DRESS).
* ``mlp``: MNIST + MLP 784-300-100-10; RunConfig's budget.
* ``resnet``: MNIST + the tiny pre-activation ResNet (widths 16/32/64). A NumPy ResNet epoch
  over all 60000 images takes minutes on two cores, so this setting trains on a fixed random
  subset of ``--train-subset`` training images (the same for every seed and method), for few
  epochs, and tests on a fixed random subset of ``--test-subset`` test images. The output says so.

Each (setting, seed) is one independent job; ``--jobs N`` runs N at a time, each with one BLAS
thread (the fastest use of two cores). For every setting the script prints a markdown table
(test accuracy at each density: mean and min-max over the seeds; stored bytes; training passes;
training wall time), a table of MACs per sample, and writes ``<out>/<setting>.json`` (every
number of every seed) and ``<out>/<setting>.png`` (accuracy against MACs). Nothing is asserted.

``--densities grid`` evaluates every method on ``RunConfig``'s fine grid 0.05, 0.1, ..., 1 (not
only at 1, 0.5, 0.25, 0.1, 0.05) and adds a table of the grid: DRESS's mean, the best peer's mean
(alternating, LCS+P, LCS+L, US-Nets; US-Nets at matched MACs) and DRESS's gap to it. Training is
the same; only the evaluation grows.

Training wall times depend on whatever else the machine runs at that moment. ``--step-times``
measures instead, for every setting's backbone, the milliseconds per sub-network pass of each
method's training step plus its SGD update, on one fixed random batch, timed in interleaved
rounds (``common.interleaved_medians``) so that load drifts hit every method alike; it trains
nothing. (The single compressed networks train with the alternating step's cost per pass: one
level, one update.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import DEFAULT_DATA_DIR, set_thread_env

SETTINGS = {
    "cnn": {"config": {"dataset": "digits", "model": "cnn"}, "seeds": "0,1,2,3,4",
            "title": "digits / small CNN"},
    "mlp": {"config": {"dataset": "mnist", "model": "mlp", "hidden": (300, 100)}, "seeds": "0,1,2",
            "title": "MNIST / MLP 784-300-100-10"},
    "resnet": {"config": {"dataset": "mnist", "model": "resnet", "pretrain_epochs": 4, "epochs": 3,
                          "train_subset": 4000, "test_subset": 2000},
               "seeds": "0,1", "title": "MNIST subset / pre-activation ResNet 16-32-64"},
}


EVAL_DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)      # minidress.app.compare's, the main table's
PEER_NAMES = ("alternating", "LCS+P", "LCS+L", "US-Nets")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="cnn,mlp,resnet", help=f"comma-separated, from {list(SETTINGS)}")
    p.add_argument("--seeds", default=None, help="comma-separated; default per setting "
                   + ", ".join(f"{k}: {v['seeds']}" for k, v in SETTINGS.items()))
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: "
                   "../shared/data/mnist if present, else minidress downloads them)")
    p.add_argument("--epochs", type=int, default=None, help="DRESS epochs (overrides every setting's)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None, help="resnet: training images")
    p.add_argument("--test-subset", type=int, default=None, help="resnet: test images")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--densities", default="main", choices=["main", "grid"],
                   help="main: 1, 0.5, 0.25, 0.1, 0.05; grid: RunConfig's fine grid 0.05-1")
    p.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated peers to train "
                   "(empty: DRESS and its baselines only, e.g. to rerun DRESS with other options)")
    p.add_argument("--no-baselines", action="store_true", help="skip the single compressed "
                   "networks and one-shot pruning (RunConfig.baselines=False)")
    p.add_argument("--dress-options", default="", help="DressOptions changed from the defaults, "
                   "comma-separated name=value (e.g. sample_prob=0,lambdas=1,1,1.5,2.5)")
    p.add_argument("--step-times", action="store_true", help="only time one training step per method")
    p.add_argument("--out", default="runs/compare-anytime")
    p.add_argument("--combine", nargs="+", metavar="JSON", default=None, help="train nothing: "
                   "put the <setting>.json files of earlier runs (the same seeds) side by side, "
                   "each file's DRESS labelled by its options, the peers taken from the files "
                   "that trained them")
    args = p.parse_args(argv)
    args.settings = args.settings.split(",")
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if args.data_dir is None and DEFAULT_DATA_DIR.is_dir():
        args.data_dir = str(DEFAULT_DATA_DIR)
    try:
        args.dress_changes = dress_changes(args.dress_options)
    except (TypeError, ValueError) as e:
        p.error(f"--dress-options: {e}")
    return args


def dress_changes(text) -> dict:
    """``name=value,...`` -> DressOptions changes, each value read as its command-line flag
    reads it (``DressOptions`` field metadata); the options are checked by making them. A value
    may itself hold commas (``levels=1,0.5,0.2,0.05``): a comma starts a new option only where
    ``name=`` follows it."""
    import re
    from dataclasses import fields

    from minidress.dress import DressOptions
    known = {f.name: f for f in fields(DressOptions)}
    changes = {}
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*=)", text)):
        name, _, value = item.partition("=")
        if name not in known:
            raise ValueError(f"unknown option {name!r}; choose from {sorted(known)}")
        default = known[name].default
        if isinstance(default, bool):       # a flag on the command line; here true/false
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            changes[name] = value.lower() in ("true", "1")
        else:
            changes[name] = known[name].metadata.get("text", str)(value)
    DressOptions(**changes)
    return changes


def config_for(args, setting, seed):
    from minidress.app.experiment import RunConfig
    kw = dict(SETTINGS[setting]["config"])
    keys = ("epochs", "pretrain_epochs") + (("train_subset", "test_subset") if setting == "resnet" else ())
    kw.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    if kw["dataset"] != "digits":
        kw["data_dir"] = args.data_dir
    from minidress.dress import DressOptions
    return RunConfig(seed=seed, quiet=True, dress=DressOptions(**args.dress_changes),
                     baselines=not args.no_baselines, **kw)


def run_one(task):
    setting, cfg, densities, peers = task
    from minidress.app.compare import run_comparison
    t0 = time.perf_counter()

    def log(msg):
        print(f"  [{setting} seed {cfg.seed}, {time.perf_counter() - t0:5.0f} s] {msg}", flush=True)

    result = run_comparison(cfg, densities=densities, peers=peers, log=log)
    result["seconds_total"] = time.perf_counter() - t0
    log(f"done in {result['seconds_total']:.0f} s")
    return setting, result


def report(setting, runs, out: Path, args_note=""):
    from minidress.app.report import format_comparison, plot_comparison
    from minidress.fileio import atomic_write_bytes
    runs = sorted(runs, key=lambda r: r["config"]["seed"])
    c = runs[0]["config"]
    seeds = [r["config"]["seed"] for r in runs]
    subset = ""
    if c["train_subset"] or c["test_subset"]:
        subset = (f" Training on a fixed random subset of {runs[0]['n_train']} training images and "
                  f"testing on {runs[0]['n_test']} test images (not the full data set).")
    dense = [100 * r["dense_acc"] for r in runs]
    print(f"\n## {SETTINGS[setting]['title']}\n")
    print(f"Seeds {seeds} (accuracy: mean, and min-max over the seeds). Dense pre-training "
          f"{c['pretrain_epochs']} epochs ({runs[0]['pretrain']['passes']:,} passes, "
          f"{sum(r['pretrain']['seconds'] for r in runs) / len(runs):.0f} s), then every method "
          f"gets the passes in the table; DRESS {c['epochs']} epochs, batch {c['batch_size']}, "
          f"fine-tuning lr {c['finetune_lr']}; DRESS options: levels "
          f"{c['levels']}, lambdas {c['lambdas']!r}, norm {c['norm']!r}, ramp {c['ramp']!r}, "
          f"resample_every {c['resample_every']}, resample_until {c['resample_until']}, "
          f"sample_prob {c['sample_prob']} (d_min {c['d_min']}), distill {c['distill']!r}, "
          f"dense_first_last {c['dense_first_last']}, dense_layers {c['dense_layers']!r}"
          f"{' (changed by --dress-options: ' + args_note + ')' if args_note else ''}.{subset} "
          f"Pre-trained dense network: {min(dense):.2f}-{max(dense):.2f}%. Wall time per seed "
          f"(everything, one BLAS thread): "
          + ", ".join(f"{r['seconds_total']:.0f} s" for r in runs) + ".\n")
    main = [d for d in EVAL_DENSITIES if d in runs[0]["densities"]]
    print(format_comparison([only_densities(r, main) for r in runs]))
    if len(runs[0]["densities"]) > len(main) and set(PEER_NAMES) & set(runs[0]["methods"]):
        print(format_grid(runs))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{setting}.json", json.dumps(runs, indent=1).encode())
    plot_comparison(runs, out / f"{setting}.png", SETTINGS[setting]["title"])
    print(f"\n(written: {out / f'{setting}.json'}, {out / f'{setting}.png'})")


def only_densities(run, densities):
    """A copy of a ``run_comparison`` result holding only the points at ``densities``."""
    keep = [i for i, d in enumerate(run["densities"]) if d in densities]
    methods = {name: {**m, "points": [m["points"][i] for i in keep]} for name, m in run["methods"].items()}
    return {**run, "densities": [run["densities"][i] for i in keep], "methods": methods}


def format_grid(runs) -> str:
    """Markdown table of the fine grid: per density DRESS's mean (min-max), every peer's mean,
    the best peer and DRESS's gap to it; then the largest shortfall."""
    from minidress.app.report import summarize
    summary = summarize(runs)
    peers = [p for p in PEER_NAMES if p in summary]     # at least one (``report``)
    lines = ["", "Fine grid (mean over seeds; DRESS with min-max; gap = DRESS - best peer):", "",
             "| density | DRESS | " + " | ".join(peers) + " | best peer | gap |",
             "|---|---|" + "---|" * (len(peers) + 2)]
    gaps = []
    for i, row in enumerate(summary["DRESS"]):
        means = {p: summary[p][i]["mean"] for p in peers}
        best = max(means, key=means.get)
        gaps.append((100 * (row["mean"] - means[best]), row["density"], best))
        lines.append(f"| {row['density']:g} | {100 * row['mean']:.2f} ({100 * row['min']:.2f}-"
                     f"{100 * row['max']:.2f}) | " + " | ".join(f"{100 * means[p]:.2f}" for p in peers)
                     + f" | {best} | {gaps[-1][0]:+.2f} |")
    worst = min(gaps)
    lines += ["", f"Largest shortfall of DRESS below the best peer on the grid: {-worst[0]:.2f} points "
                  f"at density {worst[1]:g} ({worst[2]})" if worst[0] < 0 else
              "DRESS is at or above the best peer at every grid point."]
    return "\n".join(lines)


def combine(paths) -> int:
    """Print one table of DRESS variants and peers from several runs' JSON files: accuracy at
    the main densities (mean and min-max over seeds), the lowest point of each mean curve, and
    each DRESS variant's largest shortfall below the best peer on the common grid."""
    import numpy as np

    from minidress.dress import DressOptions
    files = [json.loads(Path(p).read_text()) for p in paths]
    seeds = [[r["config"]["seed"] for r in runs] for runs in files]
    dense = [[r["dense_acc"] for r in runs] for runs in files]
    if any(s != seeds[0] for s in seeds) or any(d != dense[0] for d in dense):
        raise SystemExit("--combine needs runs of the same seeds from the same pre-trained networks")
    defaults = vars(DressOptions())
    ignore = {"ramp_steps", "run_steps"}    # set by the run's length
    methods, density_sets = {}, []
    for runs in files:
        # as a run resumes: an option its version did not record takes the value it behaved as
        recorded = vars(DressOptions.from_config(runs[0]["config"]))
        changed = [f"{k}={v}" for k, v in recorded.items() if k not in ignore and v != defaults[k]]
        label = "DRESS" + (f" ({', '.join(changed)})" if changed else " (defaults)")
        methods[label] = [r["methods"]["DRESS"] for r in runs]
        for name in PEER_NAMES:
            if name in runs[0]["methods"]:
                methods.setdefault(name, [r["methods"][name] for r in runs])
        density_sets.append(runs[0]["densities"])
    grid = sorted(set.intersection(*map(set, density_sets)), reverse=True)

    def accs(per_seed, d):
        return [next(p["acc"] for p in m["points"] if p["density"] == d) for m in per_seed]

    pct = lambda v: f"{100 * np.mean(v):.2f} ({100 * min(v):.2f}-{100 * max(v):.2f})"
    peers = [m for m in methods if m in PEER_NAMES]
    best = {d: max(np.mean(accs(methods[p], d)) for p in peers) for d in grid} if peers else {}
    main = [d for d in EVAL_DENSITIES if d in grid]
    print(f"Seeds {seeds[0]}; test accuracy (%), mean (min-max) over the seeds; grid: "
          f"{len(grid)} densities from {min(grid):g} to {max(grid):g}.\n")
    print("| method | " + " | ".join(f"{d:g}" for d in main) + " | lowest on grid (at) | "
          "largest shortfall below the best peer on grid (at) | training passes |")
    print("|---|" + "---|" * (len(main) + 3))
    for name, per_seed in methods.items():
        means = {d: np.mean(accs(per_seed, d)) for d in grid}
        low = min(means, key=means.get)
        short = "" if name in PEER_NAMES or not best else \
            "{:+.2f} ({:g})".format(*min((100 * (means[d] - best[d]), d) for d in grid))
        print(f"| {name} | " + " | ".join(pct(accs(per_seed, d)) for d in main)
              + f" | {pct(accs(per_seed, low))} ({low:g}) | {short} | {per_seed[0]['passes']:,} |")
    if best:
        print("\n| density | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
        for d in grid:
            print(f"| {d:g} | " + " | ".join(f"{100 * np.mean(accs(methods[m], d)):.2f}" for m in methods) + " |")
    return 0


def step_times(args):
    """Median ms per sub-network pass of each method's step + SGD update, interleaved."""
    import copy

    import numpy as np

    from common import interleaved_medians
    from minidress.baselines import Alternating, LCSLine, LCSPoint, USNet
    from minidress.dress import Dress
    from minidress.nn.models import build_model
    from minidress.nn.optim import SGD
    for setting in args.settings:
        cfg = config_for(args, setting, 0)
        shape = (1, 8, 8) if cfg.dataset == "digits" else (1, 28, 28)
        base = build_model({"name": cfg.model, "input_shape": list(shape), "n_classes": 10,
                            "hidden": list(cfg.hidden)}, 0)
        rng = np.random.default_rng(0)
        xb = rng.standard_normal((cfg.batch_size, *shape)).astype(np.float32)
        yb = rng.integers(0, 10, cfg.batch_size)
        k, steps = len(cfg.levels), 100
        layers = {"dense_first_last": cfg.dress.dense_first_last,      # DRESS's sparsified layers
                  "dense_layers": cfg.dress.dense_layers}
        peers = {"DRESS": Dress(copy.deepcopy(base), cfg.dress_for(steps)),
                 "alternating": Alternating(copy.deepcopy(base), cfg.dress_for(k * steps)),
                 "LCS+P": LCSPoint(copy.deepcopy(base), **layers),
                 "LCS+L": LCSLine(copy.deepcopy(base), **layers),
                 "US-Nets": USNet(copy.deepcopy(base), shape, width_min=0.25, n_per_step=k)}
        fns, passes = {}, {}
        for name, peer in peers.items():
            step = peer.joint_step if name == "DRESS" else peer.step
            passes[name] = k if name in ("DRESS", "US-Nets") else 1
            opt = SGD(lr=1e-4, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)

            def one(peer=peer, step=step, opt=opt):
                _, _, grads = step(peer.model, xb, yb)
                opt.step(peer.model.parameters(), grads)
            fns[name] = one
        medians = interleaved_medians(fns, rounds=7)
        print(f"\n## {SETTINGS[setting]['title']}: ms per training pass (step + SGD update, batch "
              f"{cfg.batch_size}, one thread, median of 7 interleaved rounds)\n")
        print("| method | passes per step | ms per step | ms per pass |\n|---|---|---|---|")
        for name, sec in medians.items():
            print(f"| {name} | {passes[name]} | {1000 * sec:.1f} | {1000 * sec / passes[name]:.1f} |")
    return 0


def main(argv=None):
    args = parse_args(argv)
    set_thread_env(1)
    if args.step_times:
        return step_times(args)
    if args.combine:
        return combine(args.combine)
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.perf_counter()
    from minidress.app.experiment import RunConfig
    densities = EVAL_DENSITIES if args.densities == "main" else tuple(sorted(RunConfig().grid, reverse=True))
    peers = tuple(filter(None, args.peers.split(",")))
    tasks = [(s, config_for(args, s, int(seed)), densities, peers)
             for s in args.settings for seed in (args.seeds or SETTINGS[s]["seeds"]).split(",")]
    order = {"resnet": 0, "mlp": 1, "cnn": 2}                 # longest first: better packing
    tasks.sort(key=lambda t: order[t[0]])
    print(f"# compare_anytime: {len(tasks)} runs, {args.jobs} at a time "
          f"(OMP/OPENBLAS/NUMBA threads {os.environ['OMP_NUM_THREADS']})", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, tasks))
    for setting in args.settings:
        report(setting, [r for s, r in results if s == setting], Path(args.out), args.dress_options)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s for {len(tasks)} runs, {args.jobs} at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DRESS beside its any-time peers (alternating training, LCS+P, LCS+L, US-Nets) and the single
compressed / one-shot baselines: the same backbone, data, seed and number of sub-network
forward/backward passes (``minidress.app.compare.run_comparison``).

    python benchmarks/compare_anytime.py --jobs 2 --data-dir ../shared/data/mnist      # all three
    python benchmarks/compare_anytime.py --settings cnn --seeds 0,1,2 --jobs 2         # digits only
    python benchmarks/compare_anytime.py --settings resnet --epochs 2 --train-subset 2000
    python benchmarks/compare_anytime.py --step-times                 # ms per training pass only

Settings (DRESS's options are always ``RunConfig()``'s defaults; only the data, the backbone and
the budget are set here):

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
    p.add_argument("--step-times", action="store_true", help="only time one training step per method")
    p.add_argument("--out", default="runs/compare-anytime")
    args = p.parse_args(argv)
    args.settings = args.settings.split(",")
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if args.data_dir is None and DEFAULT_DATA_DIR.is_dir():
        args.data_dir = str(DEFAULT_DATA_DIR)
    return args


def config_for(args, setting, seed):
    from minidress.app.experiment import RunConfig
    kw = dict(SETTINGS[setting]["config"])
    keys = ("epochs", "pretrain_epochs") + (("train_subset", "test_subset") if setting == "resnet" else ())
    kw.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    if kw["dataset"] != "digits":
        kw["data_dir"] = args.data_dir
    return RunConfig(seed=seed, quiet=True, **kw)


def run_one(task):
    setting, cfg = task
    from minidress.app.compare import run_comparison
    t0 = time.perf_counter()

    def log(msg):
        print(f"  [{setting} seed {cfg.seed}, {time.perf_counter() - t0:5.0f} s] {msg}", flush=True)

    result = run_comparison(cfg, log=log)
    result["seconds_total"] = time.perf_counter() - t0
    log(f"done in {result['seconds_total']:.0f} s")
    return setting, result


def report(setting, runs, out: Path):
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
          f"fine-tuning lr {c['finetune_lr']}; DRESS options from RunConfig(): levels "
          f"{c['levels']}, lambdas {c['lambdas']!r}, norm {c['norm']!r}, ramp {c['ramp']!r}, "
          f"resample_every {c['resample_every']}, dense_first_last {c['dense_first_last']}.{subset} "
          f"Pre-trained dense network: {min(dense):.2f}-{max(dense):.2f}%. Wall time per seed "
          f"(everything, one BLAS thread): "
          + ", ".join(f"{r['seconds_total']:.0f} s" for r in runs) + ".\n")
    print(format_comparison(runs))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{setting}.json", json.dumps(runs, indent=1).encode())
    plot_comparison(runs, out / f"{setting}.png", SETTINGS[setting]["title"])
    print(f"\n(written: {out / f'{setting}.json'}, {out / f'{setting}.png'})")


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
        dense_first_last = cfg.dress.dense_first_last
        peers = {"DRESS": Dress(copy.deepcopy(base), cfg.dress_for(steps)),
                 "alternating": Alternating(copy.deepcopy(base), cfg.dress_for(k * steps)),
                 "LCS+P": LCSPoint(copy.deepcopy(base), dense_first_last=dense_first_last),
                 "LCS+L": LCSLine(copy.deepcopy(base), dense_first_last=dense_first_last),
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
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.perf_counter()
    tasks = [(s, config_for(args, s, int(seed)))
             for s in args.settings for seed in (args.seeds or SETTINGS[s]["seeds"]).split(",")]
    order = {"resnet": 0, "mlp": 1, "cnn": 2}                 # longest first: better packing
    tasks.sort(key=lambda t: order[t[0]])
    print(f"# compare_anytime: {len(tasks)} runs, {args.jobs} at a time "
          f"(OMP/OPENBLAS/NUMBA threads {os.environ['OMP_NUM_THREADS']})", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, tasks))
    for setting in args.settings:
        report(setting, [r for s, r in results if s == setting], Path(args.out))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s for {len(tasks)} runs, {args.jobs} at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

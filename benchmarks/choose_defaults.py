"""The measurement behind DRESS's default options: vary one option at a time from the default
configuration, over several seeds, and print per-level test accuracy (mean and spread) next to
the single compressed networks trained with the same budget.

    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2        # digits, small CNN, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2 --dataset mnist \\
        --data-dir ../shared/data/mnist --model mlp --seeds 0,1 --variants base,lambdas=inverse_density

Runs are independent, so ``--jobs N`` runs N at a time (one BLAS thread each is fastest on two
cores). The "base" variant (the defaults) always runs, with the baselines. Prints a markdown
table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields, replace

import numpy as np

from minidress.app.experiment import RunConfig, run_experiment
from minidress.dress import DressOptions

VARIANTS = {
    "base": {},
    "lambdas=inverse_density": {"lambdas": "inverse_density"},
    "lambdas=density": {"lambdas": "density"},
    "lambdas sum to 1 (uniform/K)": {"lambdas": None},
    "norm=per_level_stats": {"norm": "per_level_stats"},
    "norm=shared": {"norm": "shared"},
    "resample_every=50": {"resample_every": 50},
    "ramp=cubic (half the epochs)": {"ramp": "cubic", "ramp_epochs": None},
    "finetune_lr x0.5": {"finetune_lr": 0.5},
    "finetune_lr x2": {"finetune_lr": 2.0},
}


DRESS_FIELDS = {f.name for f in fields(DressOptions)}


def config_for(base: RunConfig, name: str, seed: int) -> RunConfig:
    opts = dict(VARIANTS[name])
    if "ramp_epochs" in opts:
        opts["ramp_epochs"] = base.epochs / 2
    if "finetune_lr" in opts:
        opts["finetune_lr"] = base.finetune_lr * opts["finetune_lr"]
    if "lambdas" in opts and opts["lambdas"] is None:
        opts["lambdas"] = [1 / len(base.levels)] * len(base.levels)
    dress = replace(base.dress, **{k: v for k, v in opts.items() if k in DRESS_FIELDS})
    rest = {k: v for k, v in opts.items() if k not in DRESS_FIELDS}
    return replace(base, seed=seed, baselines=(name == "base"), dress=dress, **rest)


def run_one(task):
    name, cfg = task
    t0 = time.perf_counter()
    r = run_experiment(cfg).metrics
    print(f"# {name}, seed {cfg.seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return name, cfg.seed, r["levels"], min(c["recalibrated_acc"] for c in r["curve"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--hidden", default="300,100")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = ["base"] + [n for n in args.variants.split(",") if n != "base"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    base = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                     hidden=tuple(int(h) for h in args.hidden.split(",")),
                     pretrain_epochs=args.pretrain_epochs, epochs=args.epochs,
                     grid=(0.05, 0.15, 0.35, 0.75), quiet=True)
    tasks = [(name, config_for(base, name, seed)) for name in names for seed in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, tasks))
    acc, single, curve_min = {}, {}, {}
    for name, seed, levels, lowest in results:
        for lv in levels:
            acc.setdefault((name, lv["density"]), []).append(lv["dress_acc"])
            if name == "base":
                single.setdefault(lv["density"], []).append(lv["single_acc"])
        curve_min.setdefault(name, []).append(lowest)
    levels = base.levels
    fmt = lambda v: f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"
    print(f"\n{args.dataset} / {args.model}, seeds {seeds}, pre-train {args.pretrain_epochs} + "
          f"{args.epochs} epochs; test accuracy (%), mean ± std over seeds\n")
    print("| variant | " + " | ".join(f"d={d:g}" for d in levels) +
          " | mean gap to single | worst gap to single | lowest on grid (0.05) |")
    print("|---|" + "---|" * (len(levels) + 3))
    print("| single compressed | " + " | ".join(fmt(single[d]) for d in levels) + " | | | |")
    for name in names:
        gaps = [100 * (np.mean(acc[(name, d)]) - np.mean(single[d])) for d in levels]
        print(f"| {name} | " + " | ".join(fmt(acc[(name, d)]) for d in levels) +
              f" | {np.mean(gaps):+.2f} | {min(gaps):+.2f} | {fmt(curve_min[name])} |")


if __name__ == "__main__":
    main()

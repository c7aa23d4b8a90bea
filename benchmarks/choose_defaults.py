"""The measurement behind DRESS's default options: vary one option at a time from a base
configuration, over several seeds, and print per-level test accuracy (mean and spread) next to
the single compressed networks trained with the same budget.

    python benchmarks/choose_defaults.py                       # digits, small CNN, 3 seeds
    python benchmarks/choose_defaults.py --dataset mnist --data-dir ../shared/data/mnist \
        --model mlp --seeds 0 --pretrain-epochs 5 --epochs 5

Prints a markdown table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from minidress.experiment import RunConfig, run_experiment

VARIANTS = {
    "base": {},
    "lambdas=inverse_density": {"lambdas": "inverse_density"},
    "lambdas=density": {"lambdas": "density"},
    "norm=per_level_stats": {"norm": "per_level_stats"},
    "norm=shared": {"norm": "shared"},
    "resample_every=50": {"resample_every": 50},
    "ramp=cubic (half the epochs)": {"ramp": "cubic", "ramp_epochs": None},
    "finetune_lr=0.05": {"finetune_lr": 0.05},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                     pretrain_epochs=args.pretrain_epochs, epochs=args.epochs, grid=(0.05, 0.15, 0.35, 0.75),
                     quiet=True)
    names = args.variants.split(",")
    acc = {}        # (variant, level) -> list over seeds
    single = {}     # level -> list over seeds (from the base variant)
    curve_min = {}
    for name in names:
        opts = dict(VARIANTS[name])
        if opts.get("ramp_epochs", 0) is None:
            opts["ramp_epochs"] = args.epochs / 2
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = replace(base, seed=seed, baselines=(name == "base"), **opts)
            r = run_experiment(cfg)
            for lv in r["levels"]:
                acc.setdefault((name, lv["density"]), []).append(lv["dress_acc"])
                if name == "base":
                    single.setdefault(lv["density"], []).append(lv["single_acc"])
            curve_min.setdefault(name, []).append(min(c["recalibrated_acc"] for c in r["curve"]))
            print(f"# {name}, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    levels = base.levels
    fmt = lambda v: f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"
    print(f"\n{args.dataset} / {args.model}, seeds {seeds}, pre-train {args.pretrain_epochs} + "
          f"{args.epochs} epochs; test accuracy (%), mean ± std over seeds\n")
    print("| variant | " + " | ".join(f"d={d:g}" for d in levels) + " | mean gap to single | lowest on grid |")
    print("|---|" + "---|" * (len(levels) + 2))
    print("| single compressed | " + " | ".join(fmt(single[d]) for d in levels) + " | | |")
    for name in names:
        gaps = [100 * (np.mean(acc[(name, d)]) - np.mean(single[d])) for d in levels] if single else []
        gap = f"{np.mean(gaps):+.2f}" if gaps else "-"
        print(f"| {name} | " + " | ".join(fmt(acc[(name, d)]) for d in levels) +
              f" | {gap} | {fmt(curve_min[name])} |")


if __name__ == "__main__":
    main()

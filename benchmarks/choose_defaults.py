"""The measurement behind DRESS's default options: vary one option at a time from the default
configuration, over several seeds, and print per-level test accuracy (mean and spread) next to
the single compressed networks trained with the same budget.

    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2        # digits, small CNN, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2 --dataset mnist \\
        --data-dir ../shared/data/mnist --model mlp --seeds 0,1 --variants base,lambdas=inverse_density
    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2 --variants fine    # the
        # fine-grained options: sampling, distillation, re-ranking schedules
    OMP_NUM_THREADS=1 python benchmarks/choose_defaults.py --jobs 2 --variants back    # each
        # default option back to its earlier value, one at a time, and the previous defaults

Runs are independent, so ``--jobs N`` runs N at a time (one BLAS thread each is fastest on two
cores). The "base" variant (the defaults) always runs, with the baselines. Every variant makes
the same number of sub-network passes (K per step; fine-grained sampling draws within them).
Prints a markdown table: accuracy at the levels and at 0.05 (below the sparsest level), and the
lowest point of the mean curve on ``RunConfig``'s fine grid 0.05-1 (recalibrated batch-norm
statistics off the levels); nothing is asserted. ``--base`` changes the starting point, e.g.
``--base sample_prob=0.5`` to vary options from a candidate default.
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
    # The fine-grained options (README, "Choosing the defaults").
    "resample_every=50 until half": {"resample_every": 50, "resample_until": 0.5},
    "sample_prob=0.5": {"sample_prob": 0.5},
    "sample_prob=1": {"sample_prob": 1.0},
    "distill=densest": {"distill": "densest"},
    "sample_prob=0.5 + distill": {"sample_prob": 0.5, "distill": "densest"},
    "sample_prob=0.5 + resample_every=50": {"sample_prob": 0.5, "resample_every": 50},
    "sample_prob=0.5 + resample_every=50 until half": {"sample_prob": 0.5, "resample_every": 50,
                                                       "resample_until": 0.5},
}
# One at a time back from the defaults (docs/results.md, "Fine-grained DRESS: the current
# defaults", chose them on digits, the MNIST MLP and the ResNet; compare_anytime.py measures the
# peers beside them).
BACK = {"sample_prob=0": {"sample_prob": 0.0}, "resample_every=0": {"resample_every": 0},
        "lambdas=uniform": {"lambdas": "uniform"}, "strata=nearest": {"strata": "nearest"},
        # the defaults of the version before densest_weight (the densest level at 0.53)
        "densest_weight=scheme": {"densest_weight": "scheme"},
        # The stop as a fraction of the run scales with its length: 0.5 is 110 of digits' 220
        # steps and 4,690 of MNIST's 9,380; a whole number counts steps.
        "resample_until=0.5": {"resample_until": 0.5},
        "resample_until=110 (steps)": {"resample_until": 110},
        "previous defaults": {"resample_every": 50, "resample_until": 0.5, "strata": "nearest",
                              "lambdas": "uniform"}}
VARIANTS.update(BACK)
GROUPS = {"fine": [name for name in VARIANTS if "sample" in name or "distill" in name],
          "back": list(BACK)}


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
    return name, cfg.seed, r["levels"], {c["density"]: c["recalibrated_acc"] for c in r["curve"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--hidden", default="300,100")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated names, or a group: {list(GROUPS)}")
    p.add_argument("--base", default="", help="DressOptions changes every variant starts from, "
                   "comma-separated name=value (e.g. sample_prob=0.5)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--skip-base", action="store_true", help="do not run the base variant and its "
                   "baselines (when they were measured already; no gaps to single are printed)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for group in args.variants.split(",") for n in GROUPS.get(group, [group])]
    names = list(dict.fromkeys(([] if args.skip_base else ["base"]) + names))   # each once
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)} or {list(GROUPS)}")
    changes = dict(item.split("=", 1) for item in args.base.split(",") if item)
    options = {f.name: f for f in fields(DressOptions)}
    if set(changes) - set(options):
        p.error(f"--base names unknown options {sorted(set(changes) - set(options))}")
    base = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                     hidden=tuple(int(h) for h in args.hidden.split(",")),
                     pretrain_epochs=args.pretrain_epochs, epochs=args.epochs, quiet=True,
                     dress=DressOptions(**{k: options[k].metadata.get("text", str)(v)
                                           for k, v in changes.items()}))
    tasks = [(name, config_for(base, name, seed)) for name in names for seed in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, tasks))
    acc, single, curve = {}, {}, {}
    for name, seed, levels, points in results:
        for lv in levels:
            acc.setdefault((name, lv["density"]), []).append(lv["dress_acc"])
            if name == "base":
                single.setdefault(lv["density"], []).append(lv["single_acc"])
        for d, a in points.items():
            curve.setdefault(name, {}).setdefault(d, []).append(a)
    levels = base.levels
    fmt = lambda v: f"{100 * np.mean(v):.2f} ± {100 * np.std(v):.2f}"
    print(f"\n{args.dataset} / {args.model}, seeds {seeds}, pre-train {args.pretrain_epochs} + "
          f"{args.epochs} epochs, base options {base.dress}; test accuracy (%), mean ± std over "
          f"seeds\n")
    print("| variant | " + " | ".join(f"d={d:g}" for d in levels) + " | d=0.05 | lowest on grid "
          "(at) | mean gap to single | worst gap to single |")
    print("|---|" + "---|" * (len(levels) + 4))
    if single:
        print("| single compressed | " + " | ".join(fmt(single[d]) for d in levels) + " | | | | |")
    for name in names:
        gaps = [100 * (np.mean(acc[(name, d)]) - np.mean(single[d])) if single else np.nan
                for d in levels]
        # The lowest point of the mean curve, with that density's spread over the seeds.
        low = min(curve[name], key=lambda d: np.mean(curve[name][d]))
        print(f"| {name} | " + " | ".join(fmt(acc[(name, d)]) for d in levels) +
              f" | {fmt(curve[name][0.05])} | {fmt(curve[name][low])} ({low:g}) | "
              f"{np.mean(gaps):+.2f} | {min(gaps):+.2f} |")


if __name__ == "__main__":
    main()

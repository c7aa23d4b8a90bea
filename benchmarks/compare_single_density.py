"""The pruning families (``minidress.pruning``) beside DRESS at single densities: the same
backbone, data, pre-trained start and training passes per network.

    nice -n 19 python benchmarks/compare_single_density.py --seeds 0,1,2 --jobs 1
    nice -n 19 python benchmarks/compare_single_density.py --setting mlp --seeds 0 \\
        --data-dir ../shared/data/mnist --train-subset 20000 --out runs/sd-mlp-0
    python benchmarks/compare_single_density.py --combine runs/sd-mlp-0/single_density.json \\
        runs/sd-mlp-1/single_density.json          # one report of several runs' seeds

For every seed: ``minidress.app.experiment.run_experiment`` (dense pre-training, DRESS with
``RunConfig()``'s defaults, the single compressed networks), then, from a copy of the same
pre-trained network, every family at each density 0.5, 0.25, 0.1, 0.05 with the budget of one
single compressed network (``RunConfig.epochs`` epochs, one pass per step: DRESS's K levels x
epochs passes spread over its K levels). DRESS at 0.05, below its sparsest level, is
``Dress.use(0.05)`` with recalibrated batch norm, as ``compare.py`` evaluates it; the single
compressed network at 0.05 is trained by ``experiment.single_level_baselines`` like the others.

Families and settings (our choices; each module's docstring says why):

* ADMM (row / layer): 60% of the steps ADMM (rho0 0.3, x1.5 at every Z/U update, one update
  every half epoch), then the hard projection and masked retraining.
* lottery ticket (row / layer): 2 prunings, 3 segments, rewinding to 10% of the first segment,
  the cosine schedule restarted every segment; "class-dep." adds the class-weighted loss
  (classes ``--important``, weight 4).
* low-rank: nuclear-norm prox (``--tau``, 3) for 60% of the steps, then retraining at the rank whose
  factors hold the density's share of the weights; "+ rows": the same prox, then DRESS's row
  mask at the density and masked retraining.
* learned thresholds: their density is learned, not set; one run per ``--lams`` value, reported
  at the density it reached, beside DRESS at that density (recalibrated batch norm).

Settings (``--setting``), as in ``compare_anytime.py``:

* ``cnn``: digits + the small CNN; DRESS and every family keep the first conv and the classifier
  dense (DRESS's default).
* ``mlp``: MNIST + MLP 784-300-100-10 with **every layer sparse** (DRESS with
  ``dense_first_last=False``, every family with ``dense_first_last=False``).
  ``--train-subset N`` trains every method on the same fixed random subset of N training images
  (``RunConfig.train_subset``) when a full run does not fit; the output says so.

Prints markdown tables (accuracy: mean and min-max over seeds) and
writes ``<out>/single_density.json``. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from common import set_thread_env

DENSITIES = (0.5, 0.25, 0.1, 0.05)
SETTINGS = {
    "cnn": {"config": {"dataset": "digits", "model": "cnn"}, "dense_first_last": True,
            "title": "digits / small CNN (first conv and classifier dense)"},
    "mlp": {"config": {"dataset": "mnist", "model": "mlp", "hidden": (300, 100)},
            "dense_first_last": False, "title": "MNIST / MLP 784-300-100-10, every layer sparse"},
}
METHODS = ("ADMM (row)", "ADMM (layer)", "lottery (row)", "lottery (layer)",
           "lottery class-dep. (row)", "low-rank (rank r)", "low-rank + rows")
ROW_BALANCED = {"ADMM (row)", "lottery (row)", "lottery class-dep. (row)", "low-rank + rows",
                "single compressed", "DRESS"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (RunConfig's by default)")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--important", default="3,8", help="classes the class-dependent loss protects")
    p.add_argument("--lams", default="0.1,0.3,1,3", help="learned thresholds' regulariser weights")
    p.add_argument("--tau", type=float, default=3.0, help="the low-rank families' nuclear-norm weight "
                   "(3, chosen on digits' 220 steps; its total shrinkage grows with the steps: "
                   "3 * 220 / steps keeps digits' total)")
    p.add_argument("--setting", default="cnn", choices=sorted(SETTINGS))
    p.add_argument("--data-dir", default=None, help="folder with the MNIST files (mlp; default: "
                   "../shared/data/mnist if present, else minidress downloads them)")
    p.add_argument("--train-subset", type=int, default=None, help="training images (all by default)")
    p.add_argument("--test-subset", type=int, default=None, help="test images (all by default)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="print one report of these single_density.json files (same setting) and exit")
    p.add_argument("--out", default="runs/single-density")
    return p.parse_args(argv)


def make_family(name, model, d, steps, per_epoch, cfg, important, dense_first_last=True, tau=3.0):
    """``(pruner, schedule or None)`` for ``name`` at density ``d`` with ``steps`` steps
    (``tau``: the low-rank families' nuclear-norm weight)."""
    from minidress.nn.optim import make_schedule
    from minidress.pruning import ADMMPruner, CompressionAware, LotteryTicket, rounds_for
    if name.startswith("ADMM"):
        proj = "row" if "row" in name else "layer"
        return ADMMPruner(model, d, int(0.6 * steps), proj, rho0=0.3, growth=1.5, rho_max=10.0,
                          update_every=max(1, per_epoch // 2), dense_first_last=dense_first_last), None
    if name.startswith("lottery"):
        seg = rounds_for(steps, 2)
        ticket = LotteryTicket(model, d, 2, seg, rewind_step=round(0.1 * seg),
                               granularity="row" if "row" in name else "layer",
                               important=important if "class" in name else (), class_weight=4.0,
                               dense_first_last=dense_first_last)
        return ticket, ticket.segment_schedule(make_schedule("cosine", cfg.finetune_lr, seg))
    return CompressionAware(model, d, tau, int(0.6 * steps), cfg.finetune_lr, steps,
                            row_density=d if "rows" in name else None,
                            dense_first_last=dense_first_last), None


def train(pruner, schedule, cfg, x, y, epochs):
    """``fit`` with ``train_phase``'s optimizer; ``schedule`` None = its cosine."""
    from minidress.app import experiment
    from minidress.nn.optim import SGD
    from minidress.nn.train import fit
    if schedule is None:
        experiment.train_phase(pruner.model, cfg, x, y, None, None, epochs, cfg.finetune_lr, step=pruner.step)
    else:
        opt = SGD(lr=cfg.finetune_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                  weight_decay=cfg.weight_decay)
        fit(pruner.model, opt, x, y, epochs=epochs, batch_size=cfg.batch_size, schedule=schedule,
            seed=cfg.seed, quiet=True, step=pruner.step)
    return pruner.finish()


def class_numbers(pred, y, important, n_classes=10):
    from minidress.pruning import class_report
    r = class_report(pred, y, n_classes)
    return {"recall": {int(c): float(r["recall"][c]) for c in important},
            "false_negatives": {int(c): int(r["false_negatives"][c]) for c in important}}


def run_seed(task):
    seed, args = task
    from minidress.dress import DressOptions
    from minidress.app import experiment
    from minidress.dress import recalibrate_batchnorm, sparsifiable_layers
    from minidress.masks import row_topk_mask
    from minidress.nn.metrics import macs
    from minidress.nn.train import predict_logits, steps_per_epoch
    from minidress.pruning import LearnedThresholds, stored_bytes
    t0 = time.perf_counter()
    setting = SETTINGS[args.setting]
    dfl = setting["dense_first_last"]
    kw = {k: getattr(args, k) for k in ("epochs", "pretrain_epochs", "data_dir", "train_subset",
                                        "test_subset") if getattr(args, k) is not None}
    cfg = experiment.RunConfig(seed=seed, quiet=True, grid=DENSITIES, **setting["config"],
                               dress=DressOptions(dense_first_last=dfl), **kw)
    important = tuple(int(c) for c in args.important.split(","))
    run = experiment.run_experiment(cfg)
    ds, x, xt = experiment.load_data(cfg)
    y, yt, shape = ds.y_train, ds.y_test, x.shape[1:]
    per_epoch = steps_per_epoch(len(x), cfg.batch_size)
    steps = cfg.epochs * per_epoch
    dress, pretrained = run.dress, run.pretrained
    levels = {lv["density"]: lv for lv in run.metrics["levels"]}
    out = {"seed": seed, "setting": args.setting, "n_train": len(x),
           "train_subset": cfg.train_subset, "dense_first_last": dfl, "dense_acc": run.metrics["dense_acc"], "steps": steps, "n_test": len(xt),
           "dress_passes": run.metrics["passes"]["dress"], "dress_bytes": run.metrics["bytes"]["nested"],
           "important": list(important), "config": run.metrics["config"], "tau": args.tau, "cells": {}}

    def dress_at(d):
        """DRESS's accuracy and per-class numbers at ``d`` (a level's own batch norm, else
        recalibrated), and its MACs."""
        dress.use(d)
        if d not in dress.levels:
            recalibrate_batchnorm(dress, x, d, cfg.recalibrate_batches, cfg.batch_size, cfg.seed)
        pred = predict_logits(dress.model, xt).argmax(axis=1)
        return float((pred == yt).mean()), class_numbers(pred, yt, important), macs(dress.model, shape)

    def cell(method, d, acc, nbytes, n_macs, passes, **extra):
        out["cells"].setdefault(method, {})[str(d)] = {"acc": acc, "bytes": int(nbytes),
                                                      "macs": int(n_macs), "passes": int(passes), **extra}

    options = cfg.dress_for(per_epoch)
    for d in DENSITIES:
        acc, classes, n_macs = dress_at(d)
        cell("DRESS", d, acc, out["dress_bytes"], n_macs, out["dress_passes"], classes=classes)
        single = (levels[d]["single_acc"] if d in levels else experiment.single_level_baselines(
            cfg, options, pretrained, d, x, y, xt, yt)["single_acc"])
        alone = copy.deepcopy(pretrained)
        layers = sparsifiable_layers(alone, dfl)
        for layer in layers.values():
            layer.mask = row_topk_mask(layer.params["weight"], d).astype(layer.params["weight"].dtype)
        cell("single compressed", d, single, stored_bytes(alone, layers, "rows"), macs(alone, shape), steps)
        for name in METHODS:
            pruner, schedule = make_family(name, copy.deepcopy(pretrained), d, steps, per_epoch, cfg,
                                           important, dfl, args.tau)
            train(pruner, schedule, cfg, x, y, cfg.epochs)
            acc = pruner.evaluate(xt, yt)[1]
            extra = {"classes": class_numbers(pruner.predict(xt), yt, important),
                     "density": pruner.density(), "row_balanced": pruner.row_balanced()}
            if name == "low-rank (rank r)":
                thin = pruner.factorized()
                cell(name, d, acc, stored_bytes(thin, {}, "dense"), macs(thin, shape), pruner.steps_done,
                     ranks=pruner.ranks, parameters=pruner.factor_parameters(), **extra)
            else:
                cell(name, d, acc, pruner.stored_bytes(), pruner.macs(shape), pruner.steps_done, **extra)
        print(f"  [seed {seed}, {time.perf_counter() - t0:5.0f} s] density {d} done", flush=True)
    out["thresholds"] = []
    for lam in (float(v) for v in args.lams.split(",")):
        pruner = LearnedThresholds(copy.deepcopy(pretrained), lam, int(0.6 * steps), dense_first_last=dfl)
        train(pruner, None, cfg, x, y, cfg.epochs)
        d = pruner.density()
        dress_acc, _, dress_macs = dress_at(d)
        out["thresholds"].append({"lam": lam, "density": d, "layer_densities": pruner.layer_densities(),
                                  "acc": pruner.evaluate(xt, yt)[1], "bytes": pruner.stored_bytes(),
                                  "macs": pruner.macs(shape), "passes": pruner.steps_done,
                                  "dress_acc": dress_acc, "dress_macs": dress_macs})
    out["seconds"] = time.perf_counter() - t0
    print(f"  [seed {seed}] done in {out['seconds']:.0f} s", flush=True)
    return out


def spread(values):
    v = [100 * a for a in values]
    return f"{sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"


def _by_class(numbers, c):
    """``numbers[c]``, in memory (int keys) or read back from JSON (str keys)."""
    return numbers[c] if c in numbers else numbers[str(c)]


def report(runs):
    first = runs[0]
    setting = first.get("setting", "cnn")
    if any(r.get("setting", "cnn") != setting for r in runs):
        raise SystemExit("--combine: the runs are of different settings")
    subset = (f"training on a fixed subset of {first['n_train']:,} training images; "
              if first.get("train_subset") else "")
    print(f"\n## {SETTINGS[setting]['title']}, single densities\n\nSeeds {[r['seed'] for r in runs]}; "
          f"{subset}{first['n_test']:,} test images (one image = {100 / first['n_test']:.2f} points); "
          f"each family and single compressed network {first['steps']} passes per density; DRESS "
          f"{first['dress_passes']} passes for all its levels; pre-trained dense network "
          f"{spread([r['dense_acc'] for r in runs])}%. Accuracy in %: mean (min-max over seeds). "
          f"Bytes and MACs of seed {first['seed']}; * = row-balanced (a row-sparse store can "
          f"serve it).\n")
    print("| method | " + " | ".join(f"d={d}" for d in DENSITIES) + " |\n|---|" + "---|" * len(DENSITIES))
    methods = ["DRESS", "single compressed", *METHODS]
    for m in methods:
        cells = [spread([r["cells"][m][str(d)]["acc"] for r in runs]) for d in DENSITIES]
        print(f"| {m}{' *' if m in ROW_BALANCED else ''} | " + " | ".join(cells) + " |")
    print("\n| method | " + " | ".join(f"d={d}: bytes / MACs" for d in DENSITIES) + " | passes |\n|---|"
          + "---|" * (len(DENSITIES) + 1))
    for m in methods:
        c = first["cells"][m]
        print(f"| {m} | " + " | ".join(f"{c[str(d)]['bytes']:,} / {c[str(d)]['macs']:,}" for d in DENSITIES)
              + f" | {c[str(DENSITIES[0])]['passes']:,} |")
    lr = first["cells"]["low-rank (rank r)"]
    print("\nlow-rank ranks per sparsified layer: " + "; ".join(
        f"d={d}: {lr[str(d)]['ranks']} ({lr[str(d)]['parameters']:,} parameters)" for d in DENSITIES))
    imp = first["important"]
    print(f"\nImportant classes {imp}: recall in % (mean over seeds) and false negatives (sum over "
          f"seeds), per density\n")
    print("| method | " + " | ".join(f"d={d}" for d in DENSITIES) + " |\n|---|" + "---|" * len(DENSITIES))
    for m in ("DRESS", "ADMM (row)", "lottery (row)", "lottery class-dep. (row)"):
        cells = []
        for d in DENSITIES:
            cl = [r["cells"][m][str(d)]["classes"] for r in runs]
            cells.append(", ".join(f"{c}: {100 * sum(_by_class(x['recall'], c) for x in cl) / len(cl):.1f}% / "
                                   f"{sum(_by_class(x['false_negatives'], c) for x in cl)} FN" for c in imp))
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nLearned thresholds (density learned, not set), every seed:\n")
    print("| seed | lam | density reached | per layer | accuracy | DRESS at that density | bytes | MACs (DRESS's) |\n|---|---|---|---|---|---|---|---|")
    for r in runs:
        for t in r["thresholds"]:
            per_layer = ", ".join(f"{v:.3f}" for v in t["layer_densities"].values())
            print(f"| {r['seed']} | {t['lam']:g} | {t['density']:.3f} | {per_layer} | {100 * t['acc']:.2f} | "
                  f"{100 * t['dress_acc']:.2f} | {t['bytes']:,} | {t['macs']:,} ({t['dress_macs']:,}) |")


def main(argv=None):
    args = parse_args(argv)
    if args.combine:
        runs = [r for f in args.combine for r in json.loads(Path(f).read_text())]
        report(sorted(runs, key=lambda r: r["seed"]))
        return 0
    set_thread_env(1)
    if args.setting == "mlp" and args.data_dir is None:
        from common import DEFAULT_DATA_DIR
        args.data_dir = str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.exists() else None
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# compare_single_density: seeds {seeds}, {args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run_seed, [(s, args) for s in seeds]))
    report(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "single_density.json").write_text(json.dumps(runs, indent=1))
    print(f"\n(written: {out / 'single_density.json'}; total wall time {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

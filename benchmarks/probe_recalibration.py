"""Is a dip of DRESS's fine-grid curve the batch-norm recalibration's doing, or the weights'?

Trains DRESS once on one of ``compare_anytime.py``'s settings (its budget and DRESS's default
options unless ``--dress-options`` changes some), then evaluates each density four ways on the
test set: with the level's own batch-norm slot (at a trained level only), with statistics
recalibrated on 10 and on 50 training batches (``recalibrate_batchnorm``), and with the nearest
level's statistics as they are. If the recalibrated accuracy at a trained level is close to the
slot's, recalibration is not what costs accuracy between the levels.

    OMP_NUM_THREADS=1 python benchmarks/probe_recalibration.py --setting resnet --seed 0 \\
        --data-dir ../shared/data/mnist                       # about 3 minutes
    python benchmarks/probe_recalibration.py --setting cnn --densities 0.5,0.45,0.4

Prints a markdown table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from compare_anytime import SETTINGS, config_for, dress_changes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="resnet", choices=sorted(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--densities", default="1,0.5,0.45,0.4,0.3,0.25,0.1")
    p.add_argument("--dress-options", default="", help="as compare_anytime.py's")
    args = p.parse_args(argv)
    densities = [float(d) for d in args.densities.split(",")]
    from minidress.app import experiment
    from minidress.dress import recalibrate_batchnorm
    from minidress.nn.train import evaluate
    # compare_anytime's configuration of the setting, at its own budget, without the baselines
    setting_args = argparse.Namespace(epochs=None, pretrain_epochs=None, train_subset=None,
                                      test_subset=None, data_dir=args.data_dir, no_baselines=True,
                                      dress_changes=dress_changes(args.dress_options))
    cfg = replace(config_for(setting_args, args.setting, args.seed), grid=(0.5,))
    t0 = time.perf_counter()
    dress = experiment.run_experiment(cfg).dress
    ds, x_train, x_test = experiment.load_data(cfg)
    print(f"{args.setting}, seed {args.seed}, DRESS trained in {time.perf_counter() - t0:.0f} s; "
          f"test accuracy (%):\n")
    print("| density | own slot | recalibrated, 10 batches | recalibrated, 50 batches | nearest level's |")
    print("|---|---|---|---|---|")
    for d in densities:
        slot = f"{100 * dress.evaluate(x_test, ds.y_test, d)[1]:.2f}" if d in dress.levels else "-"
        recal = []
        for n_batches in (10, 50):
            recalibrate_batchnorm(dress, x_train, d, n_batches, cfg.batch_size, cfg.seed)
            recal.append(100 * evaluate(dress.model, x_test, ds.y_test)[1])
        nearest = 100 * dress.evaluate(x_test, ds.y_test, d)[1]     # use(d): the nearest level's slot
        print(f"| {d:g} | {slot} | {recal[0]:.2f} | {recal[1]:.2f} | {nearest:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Does training a sparse level through the row-sparse kernels make a joint DRESS step faster?

Times ``Dress.joint_step`` (forward and backward of every level on one batch) of the MNIST MLP
784-300-100-10, with ``kernel_max_density`` = 0 (every level a dense product with its mask) and
with the kernels for the levels at or below 0.1, 0.25, 0.5 and 1. Two variants of the model:
every layer sparsified, and the default (first layer and classifier dense). float32, random
inputs of MNIST's shape (the time does not depend on the values), the same weights for every
setting; medians of interleaved rounds (``common.interleaved_medians``).

    python benchmarks/bench_dress_step.py
    python benchmarks/bench_dress_step.py --batch 64 --threads 1

Nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys

from common import blas_threads_report, interleaved_medians, set_thread_env

SETTINGS = (0.0, 0.1, 0.25, 0.5, 1.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    applied = set_thread_env(args.threads)
    import numba
    import numpy as np
    numba.set_num_threads(args.threads)
    from minidress.dress import Dress
    from minidress.nn.models import mlp
    print(blas_threads_report(args.threads, applied))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    for dense_first_last in (False, True):
        label = "first layer and classifier dense" if dense_first_last else "every layer sparsified"
        steps = {}
        for kmd in SETTINGS:
            dress = Dress(mlp([784, 300, 100, 10], seed=0), kernel_max_density=kmd,
                          dense_first_last=dense_first_last)
            steps[kmd] = (lambda d=dress: d.joint_step(d.model, x, y))
        t = interleaved_medians(steps, rounds=args.rounds)
        print(f"\n### MLP 784-300-100-10, {label}, levels {list(dress.levels)}, batch {args.batch}\n")
        print("| kernels for levels at or below | joint step (ms) | vs dense masked |\n|---|---|---|")
        for kmd, s in t.items():
            print(f"| {'none (dense masked products)' if kmd == 0 else kmd} | {1000 * s:.2f} | "
                  f"{t[0.0] / s:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())

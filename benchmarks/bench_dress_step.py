"""How much does one joint DRESS step cost against one dense step, and where do the kernels pay?

Times ``Dress.joint_step`` (forward and backward of every level on one batch) against
``nn.train.dense_step`` (one dense network, the same batch) on:

* the MNIST MLP 784-300-100-10 (batch 128), every layer sparsified and with the default dense
  first layer and classifier, with the sparse levels' Linear layers run three ways: dense
  products with the mask (``kernel_max_density=0``, what golden pins), the row-sparse kernels
  where measured faster (``kernel_max_density=1`` with ``rowsparse.ROUTING = "measured"``), and
  the kernels for every sparsified layer (``ROUTING = "always"``);
* the digits small CNN (8x8 inputs, batch 128), default options.

Levels 1, 0.5, 0.25, 0.1: the work of a joint step is 1.85 dense steps. float32, random inputs
(the time does not depend on the values), the same weights for every setting, no fine-grained
draws (``sample_prob=0``: the same k every step); medians of interleaved rounds
(``common.interleaved_medians``). The crossovers the measured routing chose are printed.

    python benchmarks/bench_dress_step.py --threads 1
    python benchmarks/bench_dress_step.py --batch 64 --threads 2

Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys

from common import blas_threads_report, interleaved_medians, set_thread_env


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
    from minidress.kernels import rowsparse
    from minidress.nn.models import mlp, small_cnn
    from minidress.nn.train import dense_step
    print(blas_threads_report(args.threads, applied))
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rng = np.random.default_rng(0)

    def routed(dress, mode):
        def step():
            rowsparse.ROUTING = mode
            return dress.joint_step(dress.model, xb, yb)
        return step

    cases = [("MLP 784-300-100-10, every layer sparsified", lambda: mlp([784, 300, 100, 10], seed=0),
              (1, 28, 28), {"dense_first_last": False}),
             ("MLP 784-300-100-10, first layer and classifier dense", lambda: mlp([784, 300, 100, 10], seed=0),
              (1, 28, 28), {}),
             ("digits small CNN", lambda: small_cnn(seed=0), (1, 8, 8), {})]
    for label, build, shape, opts in cases:
        xb = rng.standard_normal((args.batch, *shape)).astype(np.float32)
        yb = rng.integers(0, 10, args.batch)
        dense_model = build()
        steps = {"dense step (one network)": lambda m=dense_model: dense_step(m, xb, yb)}
        for name, kmd, mode in (("joint, dense masked products", 0.0, "never"),
                                ("joint, kernels where measured faster", 1.0, "measured"),
                                ("joint, kernels for every sparse level", 1.0, "always")):
            dress = Dress(build(), kernel_max_density=kmd, sample_prob=0.0, **opts)
            steps[name] = routed(dress, mode)
        t = interleaved_medians(steps, rounds=args.rounds)
        rowsparse.ROUTING = "measured"
        base = t["dense step (one network)"]
        print(f"\n### {label}, levels {list(dress.levels)}, batch {args.batch}\n")
        print("| step | ms | / dense step |\n|---|---|---|")
        for name, s in t.items():
            print(f"| {name} | {1000 * s:.2f} | {s / base:.2f}x |", flush=True)
    print("\ncrossovers measured (rows, in_features, batch, dtype: the kernels run for k <= this):")
    for key, k in rowsparse.CROSSOVER.items():
        print(f"  {key}: {k:.0f} of {key[1]}")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())

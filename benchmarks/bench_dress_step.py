"""How much does one joint DRESS step cost against one dense step, and where do the kernels pay?

Times ``Dress.joint_step`` (forward and backward of every level on one batch) against
``nn.train.dense_step`` (one dense network, the same batch) on:

* the MNIST MLP 784-300-100-10 (batch 128), every layer sparsified and with the default dense
  layers (``dense_layers="small"``: the classifier only, as the first layer's rows of 784
  weights are longer than ``SMALL_ROW``), with the sparse levels' Linear layers run three ways: dense
  products with the mask (``kernel_max_density=0``, what golden pins), the row-sparse kernels
  where measured faster (``kernel_max_density=1`` with ``rowsparse.ROUTING = "measured"``), and
  the kernels for every sparsified layer (``ROUTING = "always"``);
* the digits small CNN (8x8 inputs, batch 128), default options.

Levels 1, 0.5, 0.25, 0.1: the work of a joint step is 1.85 dense steps. float32, random inputs
(the time does not depend on the values), the same weights for every setting, no fine-grained
draws (``sample_prob=0``: the same k every step); medians of interleaved rounds
(``common.interleaved_medians``). The crossovers the measured routing chose are printed, then
each product of a sparse level (forward, input gradient, kept values' gradient) timed as a
row-sparse kernel against dense BLAS per kept multiply-add (``product_costs``).

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
    from bench_serving import machine_report
    print(machine_report(args.threads))        # CPU model, widest vector ISA, load average
    print(blas_threads_report(args.threads, applied) + f"; numba {numba.get_num_threads()} threads")
    rng = np.random.default_rng(0)

    def routed(dress, mode):
        def step():
            rowsparse.ROUTING = mode
            return dress.joint_step(dress.model, xb, yb)
        return step

    cases = [("MLP 784-300-100-10, every layer sparsified", lambda: mlp([784, 300, 100, 10], seed=0),
              (1, 28, 28), {"dense_first_last": False}),
             ("MLP 784-300-100-10, classifier dense (the default dense_layers)", lambda: mlp([784, 300, 100, 10], seed=0),
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
    product_costs(np, rowsparse, args)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def product_costs(np, rowsparse, args):
    """Each product of a sparse level's training step, row-sparse kernel against dense BLAS,
    per kept multiply-add: why the joint step's goal of 2.5 dense steps (work 1.85) is out of
    reach with these kernels. With the densest level one dense step, the three sparse levels
    (work 0.85) may cost 1.5 dense steps: their three products must cost at most 1.5 / 0.85 = 1.76x
    BLAS per kept multiply-add on average. (Training takes the values' gradient from one dense
    product, gathered, which costs 1 / density per kept multiply-add.)"""
    rng = np.random.default_rng(0)
    b = args.batch
    print(f"\n### Cost per kept multiply-add, row-sparse kernel / dense BLAS (float32, batch {b})\n")
    print("| layer | density | forward | input gradient | values' gradient |\n|---|---|---|---|---|")
    for rows, n_in in ((300, 784), (100, 300)):
        w = rng.standard_normal((rows, n_in)).astype(np.float32)
        x = rng.standard_normal((b, n_in)).astype(np.float32)
        xt, dyt = np.ascontiguousarray(x.T), rng.standard_normal((rows, b)).astype(np.float32)
        for d in (0.5, 0.25, 0.1):
            k = int(round(d * n_in))
            cols = np.ascontiguousarray(np.argsort(rng.random((rows, n_in)), axis=1)[:, :k]
                                        .astype(rowsparse.index_dtype(n_in)))
            values = np.take_along_axis(w, cols.astype(np.intp), axis=1)
            t = interleaved_medians({
                "forward": lambda: x @ w.T, "input": lambda: dyt.T @ w, "values": lambda: dyt @ x,
                "k forward": lambda: rowsparse.rowsparse_matmul(values, cols, k, xt, check=False),
                "k input": lambda: rowsparse.rowsparse_matmul_input_grad(values, cols, k, dyt, n_in,
                                                                         check=False),
                "k both": lambda: rowsparse.rowsparse_matmul_grads(values, cols, k, xt, dyt, check=False)},
                rounds=args.rounds)
            per_mac = {name: t["k " + name] / (d * t[name]) for name in ("forward", "input")}
            per_mac["values"] = (t["k both"] - t["k input"]) / (d * t["values"])
            print(f"| {rows}x{n_in} | {d:g} | {per_mac['forward']:.2f}x | {per_mac['input']:.2f}x "
                  f"| {per_mac['values']:.2f}x |", flush=True)
    print("\nthe joint step's goal (2.5 dense steps, work 1.85) needs the three products at most 1.76x "
          "on average")


if __name__ == "__main__":
    sys.exit(main())

"""The element-wise training layers, NumPy reference against kernel: ReLU and batch norm.

``minidress.nn.layers`` runs ``relu_forward``/``relu_backward`` and ``batchnorm_forward``/
``batchnorm_backward`` through Numba kernels (``kernels.activation``, ``kernels.batchnorm``)
that give the reference's bytes; this script times both paths of each, forward and backward, on
the activations of the training benchmarks (``bench_train.py``: the small CNN at batch 128 and
the ResNet at batch 64 on 28x28 images), float32, one thread, in interleaved rounds
(``common.interleaved_medians``) so that load drifts hit both paths alike.

    python benchmarks/bench_layers.py             # ~20 s

Nothing is asserted; the end-to-end effect on a training step is ``bench_train.py``'s.
"""
from __future__ import annotations

import argparse
import sys

from common import blas_threads_report, interleaved_medians, set_thread_env

# (what, shape): the largest activations of bench_train.py's convolutional models
SHAPES = (("small CNN, 32 x 28 x 28, batch 128", (128, 32, 28, 28)),
          ("ResNet, 16 x 28 x 28, batch 64", (64, 16, 28, 28)),
          ("ResNet, 64 x 7 x 7, batch 64", (64, 64, 7, 7)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    applied = set_thread_env(1)
    import numpy as np
    from bench_serving import machine_report
    from minidress.nn import layers as L
    print(machine_report(1))
    print(blas_threads_report(1, applied))
    rng = np.random.default_rng(0)
    print("\n| activation | layer | pass | reference (ms) | kernel (ms) | speed-up |\n|---|---|---|---|---|---|")
    for what, shape in SHAPES:
        x, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        # as a convolution's input gradient arrives: a view into its zero-padded buffer
        padded = np.zeros(shape[:2] + (shape[2] + 2, shape[3] + 2), np.float32)
        padded[:, :, 1:-1, 1:-1] = dout
        dview = padded[:, :, 1:-1, 1:-1]
        gamma, beta = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(2))
        relu_cache, bn_cache = L.relu_forward(x)[1], L.batchnorm_forward(x, gamma, beta)[1]
        pairs = {
            ("ReLU", "forward"): (lambda: L.relu_forward_reference(x), lambda: L.relu_forward(x)),
            ("ReLU", "backward"): (lambda: L.relu_backward_reference(dout, relu_cache),
                                   lambda: L.relu_backward(dout, relu_cache)),
            ("ReLU", "backward, strided dout"): (lambda: L.relu_backward_reference(dview, relu_cache),
                                                 lambda: L.relu_backward(dview, relu_cache)),
            ("batch norm", "forward"): (lambda: L.batchnorm_forward_reference(x, gamma, beta),
                                        lambda: L.batchnorm_forward(x, gamma, beta)),
            ("batch norm", "backward"): (lambda: L.batchnorm_backward_reference(dout, bn_cache),
                                         lambda: L.batchnorm_backward(dout, bn_cache)),
        }
        fns = {(key, path): fn for key, both in pairs.items() for path, fn in zip(("ref", "kernel"), both)}
        t = interleaved_medians(fns, rounds=args.rounds)
        for layer, pas in pairs:
            ref, ker = t[(layer, pas), "ref"], t[(layer, pas), "kernel"]
            print(f"| {what} | {layer} | {pas} | {1e3 * ref:.2f} | {1e3 * ker:.2f} | {ref / ker:.2f}x |", flush=True)
    print(machine_report(1).split("; ")[1] + " (at the end)")


if __name__ == "__main__":
    sys.exit(main())

"""Would a fast mode pay? The serving kernels compiled exact (the default) against ``fastmath``.

Issue 11 asks for an opt-in fast mode only if allowing fused multiply-adds and reassociation
"buys a clear speed-up". This script measures exactly that: the two serving kernels
(``matvec_t``, one sample over the transposed layout; ``matmul_t``'s loop, a batch of 32) are
compiled twice from the same Python source, once as shipped and once with ``fastmath=True``,
and timed in interleaved rounds on random row-sparse layers (float32, one thread). It also
prints the largest difference the fast build makes, relative to the output's scale.

    python benchmarks/bench_fastmath.py

Nothing is asserted. The result decides whether minidress offers a fast mode (see the closing
line it prints).
"""
from __future__ import annotations

import argparse
import sys

from common import blas_threads_report, interleaved_medians, set_thread_env

CLEAR = 1.2        # what we would call a clear speed-up, given 10-20% noise between runs
SHAPES = ((300, 784, 0.1), (512, 512, 0.1), (300, 784, 0.3), (100, 300, 0.1))   # rows, row_len, density


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    applied = set_thread_env(1)
    import numpy as np
    from numba import njit
    from bench_serving import machine_report
    from minidress.kernels import rowsparse, serving
    print(machine_report(1))
    print(blas_threads_report(1, applied))

    def build(fn, fast):
        return njit(cache=False, fastmath=fast, pipeline_class=serving._NoAliasCompiler)(fn)
    mv = {fast: build(serving.matvec_t.py_func, fast) for fast in (False, True)}
    mm = {fast: build(rowsparse._matmul_rows.py_func, fast) for fast in (False, True)}
    rng = np.random.default_rng(0)
    print(f"\n| layer | density | matvec_t exact (us) | fast (us) | speed-up | matmul batch {args.batch} exact (us) "
          "| fast (us) | speed-up | max rel. difference |\n|---|---|---|---|---|---|---|---|---|")
    gains = []
    for rows, row_len, d in SHAPES:
        k = max(1, int(d * row_len))
        values = rng.standard_normal((rows, k)).astype(np.float32)
        cols = np.stack([rng.choice(row_len, k, replace=False) for _ in range(rows)]).astype(np.uint16)
        vt, ct = serving.transpose_rowsparse(values, cols)
        x1, y1 = rng.standard_normal(row_len).astype(np.float32), np.empty(rows, np.float32)
        xb, yb = rng.standard_normal((row_len, args.batch)).astype(np.float32), np.empty((rows, args.batch), np.float32)
        fns = {}
        for fast in (False, True):
            fns["mv", fast] = lambda f=mv[fast]: f(vt, ct, k, x1, y1)
            fns["mm", fast] = lambda f=mm[fast]: f(values, cols, k, xb, yb, 0, rows, 0, args.batch)
        exact = serving.matvec_t_reference(vt, ct, k, x1)
        fns["mv", True]()
        diff = float(np.max(np.abs(y1 - exact)) / np.max(np.abs(exact)))
        t = interleaved_medians(fns, rounds=args.rounds)
        g_mv, g_mm = t["mv", False] / t["mv", True], t["mm", False] / t["mm", True]
        gains += [g_mv, g_mm]
        print(f"| {rows}x{row_len} | {d:g} | {1e6 * t['mv', False]:.1f} | {1e6 * t['mv', True]:.1f} | {g_mv:.2f}x "
              f"| {1e6 * t['mm', False]:.1f} | {1e6 * t['mm', True]:.1f} | {g_mm:.2f}x | {diff:.1e} |", flush=True)
    median = float(np.median(gains))
    verdict = (f"a clear speed-up (median >= {CLEAR}x): a fast mode would pay" if median >= CLEAR else
               f"no clear speed-up (median below {CLEAR}x): the exact kernels are as fast, to within the noise")
    print(f"\nspeed-up of fastmath: median {median:.2f}x, range {min(gains):.2f}-{max(gains):.2f}x; {verdict}")
    print(machine_report(1).split("; ")[1] + " (at the end)")


if __name__ == "__main__":
    sys.exit(main())

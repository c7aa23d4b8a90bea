"""Row-sparse kernels against dense BLAS and CSR libraries: a table of median times.

For every weight shape, batch and density, the same product ``y = (W * M) x`` is computed by

* ``minidress``: the Numba row-sparse kernel on a rank-ordered store that holds every density
  (``values``/``cols`` with all ``row_len`` entries per row; the density only sets the prefix),
  gather kernel at batch 1, feature-major kernel otherwise (``minidress.kernels``); at batch 1
  also ``minidress transposed``, the deployed model's kernel on the ``[kmax, rows]`` layout
  (``minidress.kernels.serving.matvec_t``, vector gathers, one thread; with a batch
  ``matmul_t``, two output rows per pass up to ``PAIRS_MAX_COLUMNS`` columns);
* ``numpy``: dense ``W * M`` times ``x`` (OpenBLAS);
* ``scipy csr``: a ``scipy.sparse`` CSR matrix of ``W * M`` times ``x``;
* ``torch`` and ``torch csr``: the same in PyTorch CPU (skipped when torch is not installed).

All in float32, with the same number of threads (``--threads``, default 2). Every method is
warmed up, then the methods are timed in interleaved rounds and the median is reported
(``common.interleaved_medians``). The conv case is a 3x3 conv from 64 to 64 channels on 8x8
maps as im2col: ``W [64, 576]`` times ``cols [576, batch*64]``.

    python benchmarks/bench_kernels.py                 # the full table (a few minutes)
    python benchmarks/bench_kernels.py --quick         # two shapes, fewer rounds
    python benchmarks/bench_kernels.py --orders        # also rank vs level-major order

Nothing is asserted; the end of the output compares the speed-ups with the targets of issue 4.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from common import blas_threads_report, interleaved_medians, set_thread_env

SHAPES = {"300x784": (300, 784, 1), "512x512": (512, 512, 1), "1024x1024": (1024, 1024, 1),
          "conv 64x576": (64, 576, 64)}          # (rows, row_len, columns per sample)
BATCHES = (1, 32, 256)
DENSITIES = (0.5, 0.3, 0.1, 0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--orders", action="store_true", help="also time level-major order at the levels")
    p.add_argument("--quick", action="store_true", help="300x784 and conv, 5 rounds")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds = "300x784,conv 64x576", 5
    args.shapes = [s.strip() for s in args.shapes.split(",")]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; choose from {list(SHAPES)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.densities = [float(d) for d in args.densities.split(",")]
    return args


def build(rows, row_len, densities, order, rng):
    """A random layer, its rank-ordered (or level-major) store arrays and the prefix lengths."""
    import numpy as np
    from minidress.masks import n_kept, row_ranks
    from minidress.deploy.store import pack_rows
    w = rng.standard_normal((rows, row_len)).astype(np.float32)
    prefix = [row_len] + [n_kept(d, row_len) for d in densities]
    values, cols = pack_rows(w, row_ranks(w), prefix, order)
    return w, values, cols


def methods(w, values, cols, k, xt, torch):
    """name -> zero-argument callable computing the product, for every available library."""
    import numpy as np
    import scipy.sparse
    from minidress.kernels import rowsparse_matmul, rowsparse_matvec
    from minidress.deploy.store import RowSparse
    wm = RowSparse(w.shape, values, cols, np.array([k])).dense(k)
    csr = scipy.sparse.csr_matrix(wm)
    vec = xt.shape[1] == 1
    x = np.ascontiguousarray(xt[:, 0]) if vec else xt
    if vec:
        ours = lambda: rowsparse_matvec(values, cols, k, x, check=False)
    else:
        ours = lambda: rowsparse_matmul(values, cols, k, xt, check=False)
    fns = {"minidress": ours, "numpy": lambda: wm @ x, "scipy csr": lambda: csr @ x}
    if vec:       # the single-threaded loop too: is waking the second thread worth it here?
        from minidress.kernels.rowsparse import _matvec_rows
        from minidress.kernels.serving import matvec_t, transpose_rowsparse
        y = np.empty(len(values), values.dtype)
        fns["minidress 1 thread"] = lambda: _matvec_rows(values, cols, k, x, y, 0, len(values))
        # the deployed model's batch-1 kernel: transposed layout, vector gathers, one thread
        vt, ct = transpose_rowsparse(values, cols)
        fns["minidress transposed"] = lambda: matvec_t(vt, ct, k, x, y)
    else:         # the deployed model's batched kernel: the same layout, SIMD over the batch
        from minidress.kernels.serving import matmul_t, transpose_rowsparse
        vt, ct = transpose_rowsparse(values, cols)
        yt = np.empty((len(values), xt.shape[1]), values.dtype)
        fns["minidress transposed"] = lambda: matmul_t(vt, ct, k, xt, yt)
    if torch is not None:
        tw, tx = torch.from_numpy(wm), torch.from_numpy(x)
        with warnings.catch_warnings():       # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            tcsr = tw.to_sparse_csr()
        fns["torch"] = (lambda: torch.mv(tw, tx)) if vec else (lambda: torch.mm(tw, tx))
        fns["torch csr"] = lambda: tcsr @ tx
    return fns


def main(argv=None):
    args = parse_args(argv)
    applied = set_thread_env(args.threads)
    import numba
    import numpy as np
    numba.set_num_threads(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    print(blas_threads_report(args.threads, applied))
    print(f"numba {numba.__version__} ({args.threads} threads, layer {numba.config.THREADING_LAYER}), "
          f"numpy {np.__version__}" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
                                       if torch else ", torch not installed"))
    from minidress.masks import n_kept
    rng = np.random.default_rng(0)
    speedups = {}
    for shape in args.shapes:
        rows, row_len, per_sample = SHAPES[shape]
        w, values, cols = build(rows, row_len, args.densities, "rank", rng)
        lm = build(rows, row_len, args.densities, "level_major", np.random.default_rng(0))[1:] if args.orders else None
        names = None
        print(f"\n### {shape} (rows {rows}, row length {row_len}"
              + (f", {per_sample} columns per sample)" if per_sample > 1 else ")"))
        for batch in args.batches:
            xt = rng.standard_normal((row_len, batch * per_sample)).astype(np.float32)
            for d in args.densities:
                k = n_kept(d, row_len)
                fns = methods(w, values, cols, k, xt, torch)
                if lm is not None:
                    lm_fns = methods(w, lm[0], lm[1], k, xt, None)
                    fns["minidress level-major"] = lm_fns["minidress"]
                t = interleaved_medians(fns, rounds=args.rounds)
                if names != list(t):
                    names = list(t)
                    print("\n| batch | density | " + " | ".join(f"{n} (us)" for n in names) +
                          " | vs numpy | vs scipy csr |" + (" vs torch | vs torch csr |" if torch else ""))
                    print("|---" * (len(names) + 4 + (2 if torch else 0)) + "|")
                base = t["minidress"]
                ratio = {n: t[n] / base for n in t}
                speedups[(shape, batch, d)] = ratio
                print(f"| {batch} | {d:g} | " + " | ".join(f"{1e6 * t[n]:.1f}" for n in names) +
                      f" | {ratio['numpy']:.2f}x | {ratio['scipy csr']:.2f}x |" +
                      (f" {ratio['torch']:.2f}x | {ratio['torch csr']:.2f}x |" if torch else ""), flush=True)
    report_targets(speedups)


def report_targets(speedups):
    """How the measured speed-ups (other library's time / minidress's) compare with issue 4's goals."""
    def show(label, keys, lib, goal):
        got = [(k, speedups[k][lib]) for k in keys if k in speedups]
        if not got:
            return
        worst = min(got, key=lambda kv: kv[1])
        print(f"- {label}: goal >= {goal}x; measured " + ", ".join(f"{k[0]} b{k[1]}: {v:.2f}x" for k, v in got)
              + (" -> met" if worst[1] >= goal else f" -> NOT met (worst {worst[1]:.2f}x)"))

    print("\nTargets (speed-up = other time / minidress time, medians of this run):")
    shapes = sorted({k[0] for k in speedups})
    for b in (1, 256):
        show(f"density 0.1, batch {b}, vs numpy dense", [(s, b, 0.1) for s in shapes], "numpy", 3)
        show(f"density 0.1, batch {b}, vs scipy CSR", [(s, b, 0.1) for s in shapes], "scipy csr", 3)
    show("density 0.05, batch 256, vs numpy dense", [(s, 256, 0.05) for s in shapes], "numpy", 5)
    show("density 0.3, every batch, vs numpy dense", [k for k in speedups if k[2] == 0.3], "numpy", 1)


if __name__ == "__main__":
    sys.exit(main())

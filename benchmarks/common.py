"""What the benchmark scripts share: thread settings that take effect, and interleaved timing.

Threads: OpenBLAS reads ``OPENBLAS_NUM_THREADS`` (and friends) only when NumPy loads it, so a
script parses its arguments with nothing but argparse/os/sys imported, calls ``set_thread_env``,
and imports NumPy afterwards.

Timing: ``interleaved_medians`` times several functions in rounds (A, B, C, A, B, C, ...) and
returns the median seconds per call. Interleaving makes slow drift of a shared machine hit every
method alike, so the ratios between them are steadier than the absolute times. Each sample is
long enough to be above the timer's resolution (``min_sample_s``) and is preceded by untimed
calls for ``settle_s``: after a call, a threaded library keeps its threads spinning for a while
(libgomp spins for about a millisecond, OpenBLAS yields in a loop), and on two cores those
threads slow down whichever library runs next, by up to 6x in our measurements. The untimed
calls absorb that, so each library is timed as if it ran alone.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/mnist"


def set_thread_env(n: int) -> bool:
    """Set the BLAS/OpenMP/Numba thread variables; True if NumPy is not loaded yet (so they apply)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    return "numpy" not in sys.modules


def blas_threads_report(n: int, env_applied: bool) -> str:
    """One line on the native thread pools in effect (limits them to ``n`` if the environment
    came too late)."""
    try:
        import threadpoolctl
    except ImportError:
        return ("NumPy BLAS threads: set through the environment" if env_applied else
                "WARNING: NumPy was imported before the thread variables were set and "
                "threadpoolctl is missing: the BLAS thread count is NOT controlled")
    if not env_applied:
        threadpoolctl.threadpool_limits(n)   # kept for the life of the process
    info = threadpoolctl.threadpool_info()
    parts = [f"{i['internal_api']} {Path(i['filepath']).name}: {i['num_threads']}" for i in info]
    how = "environment" if env_applied else "threadpoolctl (NumPy was already imported)"
    return f"native thread pools (via {how}): " + ("; ".join(parts) or "none found")


def interleaved_medians(fns: dict, rounds=15, min_sample_s=1e-3, settle_s=0.02) -> dict:
    """Median seconds per call of every function in ``fns`` (name -> callable), timed in rounds."""
    import time

    import numpy as np
    loops = {}
    for name, fn in fns.items():
        fn()                                   # warm-up: compilation, caches, allocations
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if time.perf_counter() - t0 >= min_sample_s or n >= 1 << 16:
                break
            n *= 2
        loops[name] = n
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = loops[name]
            t_end = time.perf_counter() + settle_s
            while time.perf_counter() < t_end:
                fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: float(np.median(s)) for name, s in samples.items()}

"""minidress: a NumPy/Numba reference implementation of DRESS (Dynamic REal-time Sparse Subnets)."""
import os
import sys

__version__ = "0.1.0"

# Numba's default threading layer here is GNU OpenMP, which kills a child process forked after a
# parallel kernel ran (multiprocessing, a server's worker processes) and, on a busy 2-core machine,
# stalled a 300x784 row-sparse product at batch 128 for 12-16 ms where the fork-safe layer
# (workqueue here, when TBB is absent) took 0.36-0.42 ms. A user's own NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ["NUMBA_THREADING_LAYER"] = "forksafe"
    if "numba" in sys.modules:          # imported before us: its configuration is already read
        sys.modules["numba"].config.THREADING_LAYER = "forksafe"

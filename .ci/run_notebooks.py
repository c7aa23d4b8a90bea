"""Execute every tutorial notebook top to bottom (MINIDRESS_FAST=1); fail if any raised.

CI does not run this script: building the documentation site (docs/conf.py) executes every
notebook the same way and fails on an error. This is the quick check without the docs extra.
"""
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

os.environ["MINIDRESS_FAST"] = "1"
root = Path(__file__).resolve().parents[1]
notebooks = sorted((root / "tutorials").glob("*.ipynb"))
failed = 0
for path in notebooks:
    t0 = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        print(f"{path.name}: ok ({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # report every notebook, then fail
        failed += 1
        print(f"{path.name}: FAILED ({time.perf_counter() - t0:.1f} s)\n{e}")
print(f"{len(notebooks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)

"""A run without PyTorch or ONNX says, at its end, how many cross-checks did not run and the one
command that runs them (tests/conftest.py), instead of skipping them silently."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python with torch, onnx and onnxruntime made unimportable, then pytest on two test files.
BLOCKED = ("import sys; sys.modules.update(dict.fromkeys(['torch', 'onnx', 'onnxruntime']));"
           "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
           "'tests/test_vs_torch.py', 'tests/test_export.py']))")
SUMMARY = re.compile(r'^(\d+) PyTorch cross-checks and (\d+) ONNX cross-checks did not run \(not '
                     r'installed\); run them with: pip install "\.\[torch,onnx\]" && python -m pytest -q$')


def test_the_run_ends_by_counting_the_cross_checks_that_did_not_run():
    run = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stdout[-2000:]
    counted = SUMMARY.match(lines[-2])
    skipped = re.search(r"(\d+) passed, (\d+) skipped", lines[-1])
    assert counted and skipped, lines[-2:]
    n_torch, n_onnx = map(int, counted.groups())
    # Every test of test_vs_torch.py counts on its own (it used to be one module-level skip).
    assert n_torch > 17 + 10 and n_onnx >= 5 and n_torch + n_onnx == int(skipped.group(2))

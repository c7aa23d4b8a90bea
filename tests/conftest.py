import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Cross-checks against optional libraries: marker -> (modules they need, what to call them, the
# pyproject extra that installs them). A test with the marker is skipped when a module is missing,
# and the run ends by counting what did not run, so that a skip is never silent.
OPTIONAL = {
    "torch": (("torch",), "PyTorch", "torch"),
    "onnx": (("onnx", "onnxruntime"), "ONNX", "onnx"),
}


def _installed(module) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):        # a module set to None in sys.modules, a broken spec
        return False


def _missing(marker) -> list:
    return [m for m in OPTIONAL[marker][0] if not _installed(m)]


def pytest_configure(config):
    for marker, (modules, label, _) in OPTIONAL.items():
        config.addinivalue_line("markers", f"{marker}: a cross-check with {label} ({', '.join(modules)}); "
                                           f"skipped, and counted at the end of the run, without it")


def pytest_collection_modifyitems(config, items):
    for marker in OPTIONAL:
        missing = _missing(marker)
        if missing:
            skip = pytest.mark.skip(reason=f"{' and '.join(missing)} not installed")
            for item in items:
                if item.get_closest_marker(marker):
                    item.add_marker(skip)


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_terminal_summary(terminalreporter):
    """One line before pytest's own last line: how many cross-checks did not run, and the one
    command that runs them. Counts marked tests and ``pytest.importorskip`` skips alike."""
    reasons = [_skip_reason(r) for r in terminalreporter.stats.get("skipped", [])]
    counts = {}
    for marker, (modules, label, extra) in OPTIONAL.items():
        n = sum(any(f"{m} not installed" in why or f"could not import '{m}'" in why for m in modules)
                for why in reasons)
        if n:
            counts[marker] = n
    if counts:
        what = " and ".join(f"{n} {OPTIONAL[m][1]} cross-checks" for m, n in counts.items())
        extras = ",".join(OPTIONAL[m][2] for m in counts)
        terminalreporter.write_line(f"{what} did not run (not installed); run them with: "
                                    f'pip install ".[{extras}]" && python -m pytest -q', yellow=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

"""Test helpers shared by the test modules."""
import numpy as np


def assert_close(ours, ref, name, atol, label="torch"):
    """Assert ``max |ours - ref| <= atol``; on failure print "ours vs <label>, max abs diff"."""
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{name}: ours {ours.shape} vs {label} {ref.shape}"
    diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    assert diff <= atol, f"{name}: ours vs {label}, max abs diff {diff:.3e} > {atol:.0e}"

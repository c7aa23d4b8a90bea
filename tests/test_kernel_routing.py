"""The measured routing of a joint step's sparse Linear layers (``kernels.rowsparse``:
``rowsparse_wins``, ``measure_crossover``, ``kept_columns``): whichever path a layer takes, the
step equals the dense masked step up to the order of the additions.

Tolerances: the two paths add the same products in different orders, so they agree to a few
units in the last place of the largest term: relative 1e-12 in float64, 1e-4 in float32 (a
loss over a batch of 32 and three layers of rounding; measured differences were near 1e-6).
"""
import numpy as np
import pytest

from minidress.dress import Dress
from minidress.kernels import rowsparse
from minidress.masks import row_ranks
from minidress.nn.models import mlp


@pytest.fixture
def routing():
    """Start from no measured crossover; restore the module's routing afterwards."""
    before = rowsparse.ROUTING
    rowsparse.CROSSOVER.clear()
    yield
    rowsparse.ROUTING = before
    rowsparse.CROSSOVER.clear()


def test_kept_columns_is_the_stable_argsort_of_the_ranks(rng):
    w = rng.standard_normal((7, 300)).astype(np.float32)
    w[:, ::5] = 0.5                                   # ties: the lower column ranks first
    ranks = row_ranks(w)
    for k in (0, 1, 30, 300):
        kept = rowsparse.kept_columns(ranks, k)
        want = np.argsort(ranks, axis=1, kind="stable")[:, :k]
        assert kept.dtype == rowsparse.index_dtype(300) and kept.flags.c_contiguous
        assert np.array_equal(kept, want)


def test_forced_routing_and_the_jit_fallback(routing, monkeypatch):
    rowsparse.ROUTING = "always"
    assert rowsparse.rowsparse_wins(5, 10, 20, 8, np.float32)
    rowsparse.ROUTING = "never"
    assert not rowsparse.rowsparse_wins(1, 10, 20, 8, np.float32)
    rowsparse.ROUTING = "measured"
    monkeypatch.setattr(rowsparse.numba_config, "DISABLE_JIT", True)
    assert not rowsparse.rowsparse_wins(1, 10, 20, 8, np.float32)
    assert not rowsparse.CROSSOVER                    # nothing measured without the JIT


def test_measured_crossover_is_decided_once_per_shape(routing, monkeypatch):
    rowsparse.ROUTING = "measured"
    monkeypatch.setattr(rowsparse.numba_config, "DISABLE_JIT", False)
    calls = []
    monkeypatch.setattr(rowsparse, "measure_crossover", lambda *a: calls.append(a) or 12.0)
    assert [rowsparse.rowsparse_wins(k, 30, 40, 16, np.float64) for k in (12, 13, 1)] == [True, False, True]
    assert calls == [(30, 40, 16, np.float64)]
    rowsparse.rowsparse_wins(3, 30, 40, 17, np.float64)     # another batch size: measured anew
    assert len(calls) == 2


def test_measure_crossover_returns_a_k(routing):
    k = rowsparse.measure_crossover(20, 40, 16, np.float32, repeats=1)
    assert isinstance(k, float) and k >= 0


def joint_steps(dtype, routing_mode, x, y, kmd=1.0):
    rowsparse.ROUTING = routing_mode
    rowsparse.CROSSOVER.clear()
    dress = Dress(mlp([64, 48, 32, 10], seed=0, dtype=dtype), levels=(1.0, 0.5, 0.25, 0.1),
                  kernel_max_density=kmd, dense_first_last=False)
    out = []
    for _ in range(2):                                # the second step starts from updated weights
        loss, _, grads = dress.joint_step(dress.model, x, y)
        out.append((loss, {n: g.copy() for n, g in grads.items()}))
        for name, p in dress.model.parameters().items():
            p -= 0.05 * grads[name]
        dress.model.buffers["dress_step"] += 1
    return out


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("mode", ["always", "measured"])
def test_routed_joint_step_equals_the_dense_masked_step(routing, rng, dtype, rtol, mode):
    x = rng.standard_normal((32, 64)).astype(dtype)
    y = rng.integers(0, 10, 32)
    dense = joint_steps(dtype, "never", x, y, kmd=0.0)
    routed = joint_steps(dtype, mode, x, y)
    for (l0, g0), (l1, g1) in zip(dense, routed):
        assert l1 == pytest.approx(l0, rel=rtol)
        for name in g0:
            scale = np.abs(g0[name]).max()
            assert np.abs(g1[name] - g0[name]).max() <= rtol * scale, name

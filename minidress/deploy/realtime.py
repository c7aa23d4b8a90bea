"""Real-time switching, demonstrated: requests arrive with a time budget that changes (a battery
drains, other work loads the device), and the model picks its density per request.

``budget_trace`` makes a seeded trace of budgets; ``serve`` answers every request with a
``minidress.deploy.runtime.DeployedModel`` and records, per request, the density used, the time spent
switching, the total latency, whether the deadline was missed and whether the answer was right.
Policies: ``"adaptive"`` (the densest profiled density that fits the budget, switching whenever
that changes) and ``"fixed"`` (one density throughout, never switching).
"""
from __future__ import annotations

import time

import numpy as np


def budget_trace(n_requests=600, reference_ms=1.0, seed=0) -> np.ndarray:
    """Budgets in ms, ``[n_requests]``, as multiples of ``reference_ms`` (e.g. the dense model's
    latency), so the same trace is as demanding on any machine.

    Four phases of equal length: plugged in (3x, some jitter), battery draining (from 2x down to
    0.6x), load spikes (1.5x with random bursts at 0.5x), recovering (back up to 2.5x).
    """
    rng = np.random.default_rng(seed)
    q = n_requests // 4
    rest = n_requests - 3 * q
    plugged = 3.0 + 0.2 * rng.standard_normal(q)
    draining = np.linspace(2.0, 0.6, q) + 0.05 * rng.standard_normal(q)
    spikes = np.full(q, 1.5)
    for start in rng.integers(0, max(1, q - 15), size=max(1, q // 40)):
        spikes[start:start + 15] = 0.5
    recovering = np.linspace(0.6, 2.5, rest)
    return np.clip(np.concatenate([plugged, draining, spikes, recovering]), 0.05, None) * reference_ms


def serve(model, budgets_ms, x, y, policy="adaptive", density=1.0, batch=1) -> dict:
    """Answer one request per budget: ``batch`` samples of ``x`` (cycling), within its budget.

    Parameters
    ----------
    model : DeployedModel; the adaptive policy needs its ``latency_profile`` first
    budgets_ms : ndarray [R]
    x, y : test inputs and labels
    policy : "adaptive" or "fixed"
    density : the density of the fixed policy

    Returns
    -------
    dict of per-request arrays ``density, switch_s`` (time in ``set_density``), ``latency_s``
    (arrival to answer: choosing, switching and predicting), ``missed, correct`` (the fraction
    right in the request's batch) and a ``summary`` dict.
    """
    if policy not in ("adaptive", "fixed"):
        raise ValueError(f"policy must be 'adaptive' or 'fixed', got {policy!r}")
    model.set_density(density)
    r = len(budgets_ms)
    out = {k: np.zeros(r) for k in ("density", "switch_s", "latency_s", "correct")}
    for i, budget in enumerate(budgets_ms):
        idx = np.arange(i * batch, (i + 1) * batch) % len(x)
        t0 = t1 = time.perf_counter()
        if policy == "adaptive":
            d = model.choose_density(budget)
            t1 = time.perf_counter()
            if d != model.density:
                model.set_density(d)
        t2 = time.perf_counter()
        logits = model.predict(x[idx])
        t3 = time.perf_counter()
        out["density"][i], out["switch_s"][i], out["latency_s"][i] = model.density, t2 - t1, t3 - t0
        out["correct"][i] = np.mean(logits.argmax(axis=1) == y[idx])
    out["missed"] = 1000 * out["latency_s"] > np.asarray(budgets_ms)
    switches = int(np.count_nonzero(np.diff(out["density"]))) if r > 1 else 0
    out["summary"] = {
        "requests": r, "missed": int(out["missed"].sum()), "miss_rate": float(out["missed"].mean()),
        "accuracy": float(out["correct"].mean()), "mean_density": float(out["density"].mean()),
        "switches": switches, "switch_s_total": float(out["switch_s"].sum()),
        "switch_s_max": float(out["switch_s"].max()),
        "median_latency_ms": float(1000 * np.median(out["latency_s"])),
    }
    return out

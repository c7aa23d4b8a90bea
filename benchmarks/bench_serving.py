"""Whole-model serving latency: the compiled DRESS model against fixed dense models.

For each model (random weights, every layer sparsified, levels 1, 0.5, 0.25, 0.1), batch and
density, one ``predict`` of

* ``dress``: ``DeployedModel.from_store(store)`` (one compiled call, each layer on the faster
  of the row-sparse kernel and BLAS, ``paths="auto"``), after ``latency_profile`` at that batch
  size, as a budget controller runs it (which also checks every density against BLAS);
* ``dress sparse``: the same with ``paths="sparse"`` (the row-sparse kernels everywhere: the
  curve whose crossover with dense we report);
* ``numpy dense``: the fixed dense model, layer by layer in NumPy (``backend="dense"`` at
  density 1; im2col + BLAS for convs);
* ``torch dense``: the same network in PyTorch (skipped if torch is not installed).

Each model's header also prints the crossovers ``calibrate`` chose and, per sparse layer, which
one-sample loop it chose (``matvec_t`` with vector gathers or ``matvec_t_no_gather``, the same
numbers) with the two times it compared. Also the whole-model switch (``set_density`` between
0.1 and 0.5). Times are medians of
interleaved rounds (``common.interleaved_medians``), one thread for every library by default.
The header prints CPU, vector ISA, thread pools and the machine's load. Nothing is asserted:
the end compares the measurements with the targets of issue 11.

    python benchmarks/bench_serving.py                 # ~3 minutes
    python benchmarks/bench_serving.py --quick         # fewer rounds and densities
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from common import blas_threads_report, interleaved_medians, set_thread_env

MODELS = {"mlp 784-300-100-10": ({"name": "mlp", "input_shape": [1, 28, 28], "n_classes": 10, "hidden": [300, 100]}),
          "mlp 64-512-512-10": ({"name": "mlp", "input_shape": [1, 8, 8], "n_classes": 10, "hidden": [512, 512]}),
          "small cnn 8x8": ({"name": "cnn", "input_shape": [1, 8, 8], "n_classes": 10}),
          "lenet5 28x28": ({"name": "lenet5", "input_shape": [1, 28, 28], "n_classes": 10})}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.densities = 7, "0.1,0.3,1.0"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.densities = [float(d) for d in args.densities.split(",")]
    args.models = [m.strip() for m in args.models.split(",")]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    return args


def machine_report(threads):
    """CPU model, the widest vector ISA, load average."""
    cpu, flags = platform.processor() or "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = next((name for name in ("avx512f", "avx2", "sse4_2") if f" {name}" in flags), "unknown")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"CPU: {cpu}, {os.cpu_count()} cores, widest ISA {isa}; load average (1, 5, 15 min) {load}"


def random_store(spec):
    """A store of an untrained model with every layer sparsified (random weights and ranks)."""
    import numpy as np
    from minidress.deploy.store import Store
    from minidress.dress import DressOptions, build_dress
    config = {"levels": [1.0, 0.5, 0.25, 0.1], "lambdas": "uniform", "resample_every": 0, "ramp": "none",
              "norm": "per_level", "dense_first_last": False}
    dress = build_dress(spec, DressOptions.from_config(config), np.float32)
    return Store.from_dress(dress, "rank", {"model": spec, "config": config})


def torch_model(store, torch):
    """The dense network of the store at density 1 in PyTorch (eval mode), for timing."""
    from minidress.nn import layers as L
    from minidress.nn.models import build_model
    from minidress.masks import nearest_level
    skeleton = build_model(store.meta["model"])
    nn, flat = torch.nn, [False]               # flat: past the Flatten (1-D batch norms)

    def convert(layer, name):
        if isinstance(layer, L.Sequential):
            return nn.Sequential(*(convert(c, f"{name}{n}.") for n, c in layer.children()))
        if isinstance(layer, (L.Linear, L.Conv2d)):
            key = name.rstrip(".")
            w = store.sparse[key].dense() if key in store.sparse else store.dense[f"{key}.weight"]
            b = store.dense.get(f"{key}.bias")
            if isinstance(layer, L.Linear):
                m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            else:
                m = nn.Conv2d(w.shape[1], w.shape[0], layer.kernel_size, layer.stride, layer.padding, bias=b is not None)
            m.weight.data = torch.from_numpy(w.copy())
            if b is not None:
                m.bias.data = torch.from_numpy(b.copy())
            return m
        if isinstance(layer, L.BatchNorm):       # eval mode, the statistics of density 1's slot
            arrays = {k: store.dense[f"{name}{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
            slot = nearest_level(store.levels, 1.0) if len(arrays["weight"]) > 1 else 0
            m = (nn.BatchNorm2d if flat[0] is False else nn.BatchNorm1d)(arrays["weight"].shape[-1], eps=layer.eps)
            for k, v in arrays.items():
                getattr(m, k).data = torch.from_numpy(v[slot].copy())
            return m
        if isinstance(layer, L.Flatten):
            flat[0] = True
        simple = {L.ReLU: lambda: nn.ReLU(), L.Flatten: lambda: nn.Flatten(),
                  L.MaxPool2d: lambda: nn.MaxPool2d(layer.k, layer.stride)}
        return simple[type(layer)]()
    return convert(skeleton, "").eval()


def main(argv=None):
    args = parse_args(argv)
    applied = set_thread_env(args.threads)
    import numba
    import numpy as np
    numba.set_num_threads(args.threads)
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            torch = None
    from minidress.deploy.runtime import DeployedModel
    print(machine_report(args.threads))
    print(blas_threads_report(args.threads, applied))
    print(f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", torch: not used"))
    results, switch = {}, {}
    for name in args.models:
        store = random_store(MODELS[name])
        t0 = time.perf_counter()
        auto = DeployedModel.from_store(store)
        report = auto.calibrate()
        sparse = DeployedModel.from_store(store, paths="sparse")
        dense = DeployedModel.from_store(store, "dense").set_density(1.0)
        tm = torch_model(store, torch) if torch else None
        print(f"\n### {name}: {store.nbytes():,} bytes stored, serving copy "
              f"{auto.memory_bytes()['serving']:,} bytes (load + calibration {time.perf_counter() - t0:.2f} s)")
        print("crossover prefix (one sample | batch), per layer: " + ", ".join(
            f"{p['name']} {auto._compiled.crossover[0, i]}|{auto._compiled.crossover[1, i]} of {p['row_len']}"
            for i, p in enumerate(auto._compiled.products)))
        print("one-sample loop per sparse layer (calibrate: gathers | no gathers, us at a tenth and all of the prefix): "
              + ", ".join(f"{name} {'no gathers' if t[1] < t[0] else 'gathers'} ({1e6 * t[0]:.1f} | {1e6 * t[1]:.1f})"
                          for name, t in ((n, r["gathers"]) for n, r in report.items() if "gathers" in r)))
        rng = np.random.default_rng(0)
        print("\n| batch | density | dress (us) | dress sparse (us) | numpy dense (us) | torch dense (us) "
              "| dress vs numpy | dress vs torch | sparse vs numpy |\n|---|---|---|---|---|---|---|---|---|")
        for batch in args.batches:
            # as a budget controller would: the profile also checks each density against BLAS
            auto.latency_profile(args.densities, batch=batch, repeats=20)
            x = rng.standard_normal((batch, *auto.input_shape)).astype(np.float32)
            tx = torch.from_numpy(x) if torch else None
            for d in args.densities:
                auto.set_density(d)
                sparse.set_density(d)
                fns = {"dress": lambda: auto.predict(x), "sparse": lambda: sparse.predict(x),
                       "numpy": lambda: dense.predict(x)}
                if torch:
                    def run_torch():
                        with torch.inference_mode():
                            return tm(tx)
                    fns["torch"] = run_torch
                t = interleaved_medians(fns, rounds=args.rounds)
                results[name, batch, d] = t
                tt = t.get("torch", float("nan"))
                print(f"| {batch} | {d:g} | {1e6 * t['dress']:.1f} | {1e6 * t['sparse']:.1f} | {1e6 * t['numpy']:.1f} "
                      f"| {1e6 * tt:.1f} | {t['numpy'] / t['dress']:.2f}x | {tt / t['dress']:.2f}x "
                      f"| {t['numpy'] / t['sparse']:.2f}x |", flush=True)
        state = {"d": 0.1}

        def flip():
            state["d"] = 0.5 if state["d"] == 0.1 else 0.1
            auto.set_density(state["d"])
        switch[name] = interleaved_medians({"switch": flip}, rounds=args.rounds)["switch"]
        print(f"\nwhole-model switch 0.1 <-> 0.5: {1e6 * switch[name]:.3f} us")
    report_targets(results, switch, args)
    print("\n" + machine_report(args.threads).split("; ")[1] + " (at the end)")


def crossover(results, name, batch, densities):
    """The largest density at which the all-sparse model is at least as fast as numpy dense,
    with every sparser density also at least as fast."""
    best = 0.0
    for d in sorted(densities):
        t = results.get((name, batch, d))
        if t is None or t["sparse"] > t["numpy"]:
            break
        best = d
    return best


def report_targets(results, switch, args):
    print("\n## Targets of issue 11 (speed-up = other time / dress time)\n")

    def line(label, cases, other, goal):
        got = [(k, results[k][other] / results[k]["dress"]) for k in cases if k in results and other in results[k]]
        if not got:
            return
        worst = min(v for _, v in got)
        verdict = "met" if worst >= goal else f"MISSED by {100 * (1 - worst / goal):.0f}% (worst {worst:.2f}x)"
        print(f"- {label}: goal >= {goal}x; " + ", ".join(f"b{k[1]} {v:.2f}x" for k, v in got) + f" -> {verdict}")

    mlp, digits, cnns = "mlp 784-300-100-10", "mlp 64-512-512-10", ("small cnn 8x8", "lenet5 28x28")
    line("MLP 784 batch 1 d=0.1 vs numpy", [(mlp, 1, 0.1)], "numpy", 2.5)
    line("MLP 784 batch 1 d=0.1 vs torch", [(mlp, 1, 0.1)], "torch", 3)
    line("MLP 784 batch 32 d=0.1 vs numpy", [(mlp, 32, 0.1)], "numpy", 2)
    line("MLP 784 batch 32 d=0.1 vs torch", [(mlp, 32, 0.1)], "torch", 2)
    line("digits MLP batch 1 and 32 d=0.1 vs numpy", [(digits, 1, 0.1), (digits, 32, 0.1)], "numpy", 2.5)
    for c in cnns:
        line(f"{c} batch 1 d=0.1 vs numpy im2col", [(c, 1, 0.1)], "numpy", 2)
        line(f"{c} batch 1 d=0.1 vs torch", [(c, 1, 0.1)], "torch", 1.5)
    for name in args.models:
        for b in args.batches:
            cross = crossover(results, name, b, args.densities)
            worst = max(results[k]["dress"] / results[k]["numpy"] for k in results if k[:2] == (name, b))
            print(f"- {name} batch {b}: end-to-end crossover density {cross:g} (goal >= 0.3 at batch 1 and 32); "
                  f"dress at most {worst:.2f}x the fixed dense model over the densities (goal <= 1.1x)")
        print(f"- {name}: whole-model switch {1e6 * switch[name]:.3f} us (goal < 1 us)")


if __name__ == "__main__":
    sys.exit(main())

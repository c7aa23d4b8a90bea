"""Real-time switching: what a switch costs, what re-sampling masks costs, and a budget trace.

1. **Switch cost**: ``DeployedModel.set_density`` on the compiled row-sparse model (a lookup and
   two assignments) against the rebuilding backends: a dense masked matrix per layer, a scipy
   CSR matrix built from ``W * M`` (what a general sparse library does), and, for reference,
   CSR built directly from the store's prefix (the cheapest CSR can be).
2. **Re-sampling on the device**: deriving the mask of a new density from dense weights, with a
   per-row partial sort (``np.argpartition``), a full per-row sort (``row_ranks``) and one sort of
   the whole layer (what a layer-wide top-k needs).
3. **A budget trace** (``minidress.deploy.realtime``) at every ``--batches`` size: requests with
   a changing time budget, served by DRESS switching per request, a fixed dense model (NumPy,
   and PyTorch if installed), a fixed model at the sparsest level, and a CSR model that must be
   rebuilt to switch. Deadline misses, accuracy and switch cost per model, and a plot of
   latency against density for every backend (``--plot``).

The model: a store from ``--store`` (e.g. ``runs/dress-.../store.npz``), or else a DRESS MLP
trained here on ``--dataset`` (digits by default, ~20 s) with every layer sparsified.

    python benchmarks/bench_switch.py                              # batches 1, 32, 256
    python benchmarks/bench_switch.py --dataset mnist --data-dir ../shared/data/mnist --batches 16
    python benchmarks/bench_switch.py --store runs/dress-digits-cnn-seed0/store.npz

One thread for every library by default (``--threads``): on a shared 2-core machine a second
thread mostly waits for a core. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import DEFAULT_DATA_DIR, blas_threads_report, interleaved_medians, set_thread_env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hidden", default="512,512")
    p.add_argument("--epochs", type=int, default=5, help="pre-train and joint epochs of the quick model")
    p.add_argument("--batches", default="1,32,256", help="samples per request, one trace each")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default="runs/bench-switch/latency_vs_density.png",
                   help="where to write the plot (its folder is made if missing); '' for no plot")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.dataset == "mnist" and args.data_dir is None and DEFAULT_DATA_DIR.is_dir():
        args.data_dir = str(DEFAULT_DATA_DIR)
    return args


def quick_store(args):
    """Train a small DRESS MLP with every layer sparsified; return its store."""
    from minidress.app.experiment import RunConfig, run_experiment
    from minidress.deploy.store import Store
    from minidress.dress import DressOptions
    cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model="mlp",
                    hidden=tuple(int(h) for h in args.hidden.split(",")),
                    dress=DressOptions(dense_first_last=False),
                    pretrain_epochs=args.epochs, epochs=args.epochs, baselines=False, grid=(1.0,),
                    batch_size=128, quiet=True)
    run = run_experiment(cfg)
    r = run.metrics
    return Store.from_dress(run.dress, meta={"model": r["model"], "config": r["config"], "dataset": r["dataset"]})


def main(argv=None):
    args = parse_args(argv)
    applied = set_thread_env(args.threads)
    import numba
    import numpy as np
    import scipy.sparse
    numba.set_num_threads(args.threads)
    from minidress.app.experiment import RunConfig, load_data
    from minidress.masks import n_kept, row_ranks, row_ranks_reference
    from minidress.deploy.runtime import DeployedModel
    from minidress.deploy.store import Store
    from bench_serving import machine_report
    print(machine_report(args.threads))
    print(blas_threads_report(args.threads, applied))

    store = Store.load(args.store) if args.store else quick_store(args)
    spec = store.meta["model"]
    print(f"model: {spec['name']} on {store.meta.get('dataset')}, levels {list(store.levels)}, "
          f"sparsified layers {', '.join(f'{n} {rs.shape}' for n, rs in store.sparse.items())}")
    models = {b: DeployedModel.from_store(store, b) for b in ("rowsparse", "dense", "csr")}

    # 1. Switch cost --------------------------------------------------------------------------
    lo, hi = min(store.levels), sorted(store.levels)[-2] if len(store.levels) > 1 else max(store.levels)

    def flip(model):
        state = {"d": lo}

        def run():
            state["d"] = hi if state["d"] == lo else lo
            model.set_density(state["d"])
        return run

    def csr_from_prefix():
        for rs in store.sparse.values():
            k = n_kept(lo, rs.row_len)
            rows = rs.shape[0]
            scipy.sparse.csr_matrix((rs.values[:, :k].ravel(), rs.cols[:, :k].ravel(),
                                     np.arange(0, rows * k + 1, k)), shape=(rows, rs.row_len))

    t = interleaved_medians({"DRESS (prefix lengths)": flip(models["rowsparse"]),
                             "dense masked (rebuild)": flip(models["dense"]),
                             "scipy CSR from W*M (rebuild)": flip(models["csr"]),
                             "scipy CSR from the prefix": csr_from_prefix}, rounds=11)
    print(f"\n## 1. Switch cost (densities {lo} <-> {hi}, whole model, median)\n")
    print("| switch by | time (us) | vs DRESS |\n|---|---|---|")
    for name, s in t.items():
        print(f"| {name} | {1e6 * s:,.2f} | {s / t['DRESS (prefix lengths)']:,.0f}x |")

    # 2. Re-sampling masks on the device ------------------------------------------------------
    print("\n## 2. Deriving a new density's mask from dense weights (median)\n")
    print("| weight | density | per-row partial sort (us) | per-row full sort (us) | "
          "the same, stable argsort (us) | layer-wide sort (us) |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for rows, row_len in ((300, 784), (512, 512), (1024, 1024)):
        w = rng.standard_normal((rows, row_len)).astype(np.float32)
        for d in (0.5, 0.1):
            k = n_kept(d, row_len)
            m = interleaved_medians({
                "partial": lambda: np.argpartition(-np.abs(w), k - 1, axis=1)[:, :k],
                "full": lambda: row_ranks(w) < k,
                "stable": lambda: row_ranks_reference(w) < k,
                "layer": lambda: np.argsort(-np.abs(w).ravel(), kind="stable")[:k * rows]}, rounds=5)
            print(f"| {rows}x{row_len} | {d} | {1e6 * m['partial']:,.0f} | {1e6 * m['full']:,.0f} | "
                  f"{1e6 * m['stable']:,.0f} | {1e6 * m['layer']:,.0f} |")
    print("(The partial sort keeps the top k of a row but not their order, and breaks ties "
          "arbitrarily; the full sort gives the ranks that serve every density: ``row_ranks``, one sort "
          "of distinct integer keys for float32, and beside it the stable argsort it equals.)")

    # 3. A budget trace per batch size -----------------------------------------------------------
    ds, _, x_test = load_data(RunConfig(dataset=store.meta.get("dataset", args.dataset), data_dir=args.data_dir))
    x_test, y_test = x_test.astype(store.dtype), ds.y_test
    # Densities between the sparsest trained level and 1: below its sparsest level a DRESS model
    # was never trained and loses its accuracy (README), so a controller should not go there.
    sparsest = min(store.levels)
    extra = [d for d in (0.15, 0.2, 0.35, 0.75) if d > sparsest]
    densities = sorted({*store.levels, *extra} if store.order == "rank" else store.levels)
    torch_net = None if args.no_torch else torch_dense(store, args.threads)
    curves = {}
    for batch in args.batches:
        curves[batch] = trace(args, store, models, torch_net, densities, sparsest, batch, x_test, y_test)
    if args.plot:
        plot(curves, args.plot)
        print(f"\nlatency against density: {args.plot}")


def trace(args, store, models, torch_net, densities, sparsest, batch, x_test, y_test):
    """One budget trace at ``batch`` samples per request; returns the latency curves (ms)."""
    from minidress.deploy.realtime import budget_trace, serve
    for name in ("rowsparse", "csr"):
        models[name].latency_profile(densities, batch=batch)
    curves = {"DRESS (compiled)": models["rowsparse"].profile["seconds"],
              "CSR (without rebuilds)": models["csr"].profile["seconds"],
              "numpy dense, density 1": models["dense"].latency_profile([1.0], batch=batch)}
    if torch_net is not None:
        curves["torch dense, density 1"] = torch_net.latency_profile([1.0], batch=batch)
    # the trace's unit: the dense model's median latency (one slow call would stretch a 90th percentile)
    dense_ms = 1000 * models["dense"].latency_profile([1.0], batch=batch, quantile=0.5)[1.0]
    budgets = budget_trace(args.requests, reference_ms=dense_ms, seed=0)
    print(f"\n## 3. Budget trace: {args.requests} requests of {batch} sample(s), budgets "
          f"{budgets.min():.3f}-{budgets.max():.3f} ms (numpy dense model, median: {dense_ms:.3f} ms)\n")
    for name, prof in curves.items():
        print(f"latency profile, {name} (ms): " + ", ".join(f"{d:g}: {1000 * t:.3f}" for d, t in prof.items()))
    runs = {"DRESS, switching per request": serve(models["rowsparse"], budgets, x_test, y_test, batch=batch),
            "numpy dense model, fixed": serve(models["dense"], budgets, x_test, y_test, "fixed", 1.0, batch),
            f"DRESS fixed at the sparsest level ({sparsest:g})":
                serve(models["rowsparse"], budgets, x_test, y_test, "fixed", sparsest, batch),
            "CSR, rebuilt to switch": serve(models["csr"], budgets, x_test, y_test, batch=batch)}
    if torch_net is not None:
        runs["torch dense model, fixed"] = serve(torch_net, budgets, x_test, y_test, "fixed", 1.0, batch)
    print("\n| model | deadline misses | accuracy | mean density | switches | switch time total (ms) "
          "| largest switch (ms) | median latency (ms) |\n|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        s = r["summary"]
        print(f"| {name} | {s['missed']} ({100 * s['miss_rate']:.1f}%) | {100 * s['accuracy']:.2f}% | "
              f"{s['mean_density']:.3f} | {s['switches']} | {1000 * s['switch_s_total']:.3f} | "
              f"{1000 * s['switch_s_max']:.3f} | {s['median_latency_ms']:.3f} |")
    return curves


class torch_dense:
    """The store's network at density 1 in PyTorch, with the interface ``serve`` needs (a model
    that never switches). None of the DRESS machinery: the fixed dense model a PyTorch user has."""

    def __new__(cls, store, threads):
        try:
            import torch
        except ImportError:
            return None
        self = super().__new__(cls)
        torch.set_num_threads(threads)
        from bench_serving import torch_model
        self.torch, self.net, self.density = torch, torch_model(store, torch), 1.0
        self.input_shape = tuple(store.meta["model"]["input_shape"])
        return self

    def set_density(self, d):
        return self

    def predict(self, x):
        with self.torch.inference_mode():
            return self.net(self.torch.from_numpy(x)).numpy()

    def latency_profile(self, densities, batch, repeats=30, quantile=0.9):
        """As ``DeployedModel.latency_profile``: a warm-up, then the ``quantile`` of ``repeats``."""
        import numpy as np

        from minidress.deploy.runtime import timed_calls
        x = np.random.default_rng(0).standard_normal((batch, *self.input_shape)).astype(np.float32)
        return {1.0: float(np.quantile(timed_calls(self.predict, x, repeats), quantile))}


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidress.fileio import save_figure
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (batch, cs) in zip(axes[0], curves.items()):
        for i, (name, prof) in enumerate(cs.items()):
            d, t = list(prof), [1000 * v for v in prof.values()]
            if len(d) == 1:
                ax.axhline(t[0], color=f"C{i}", ls="--", label=name)
            else:
                ax.plot(d, t, "o-", color=f"C{i}", label=name)
        ax.set(xlabel="density", ylabel="latency per request (ms, 90th percentile)", xscale="log",
               yscale="log", title=f"{batch} sample(s) per request")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)         # atomic: an interrupted run leaves no half-written file


if __name__ == "__main__":
    sys.exit(main())

"""Compressing the nested store: accuracy, bytes, memory and latency per method and level.

Trains one DRESS model (``--setting cnn``: digits + small CNN; ``mlp``: MNIST + MLP 784-300-100-10
with every layer sparsified; ``run_experiment``), then compares, at every trained level (and
the fine grid, for accuracy): the float32 nested store; int8 and int4 stores
(``minidress.deploy.quantized``); int4 and int8 after quantization-aware fine-tuning
(``minidress.quantize.qat``); universal compression (dithered lattice, fine-tuning, lossless
coder: ``minidress.quantize.universal``); ADMM quantization (``minidress.quantize.admm``: one
int8 model per level, ADMM from the pre-trained dense network onto that level's row-balanced
set and grid, so K separate models, not a nested store); and, for bytes, K separate int8 models
and one dense float32 model. Bytes at rest count every array (dense layers and batch norms
included); the ratio is to one dense float32 model. Memory per level:
``minidress.deploy.memory.device_memory``. Latency: the deployed model (``paths="auto"``) at batch 1,
the methods timed in interleaved rounds (``latencies``).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 nice -n 19 \\
        python benchmarks/compress_store.py --setting cnn --seed 0 [--cache /tmp/run.pkl] [--json out.json]
    ... --setting mlp --data-dir ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import copy
import json
import pickle
import time
from pathlib import Path

import numpy as np

from minidress.app.experiment import RunConfig, load_data, run_experiment
from minidress.deploy.memory import device_memory
from minidress.deploy.quantized import QuantizedStore
from minidress.deploy.runtime import DeployedModel, timed_calls
from minidress.deploy.store import RowSparse, Store
from minidress.dress import DressOptions
from minidress.quantize import qat, universal


SETTINGS = {"cnn": "digits + small CNN", "mlp": "MNIST + MLP 784-300-100-10, every layer sparse"}


def config(setting, seed, data_dir=None):
    """The benchmark's DRESS run: digits + small CNN, or MNIST + MLP with every layer sparsified."""
    if setting == "cnn":
        return RunConfig(dataset="digits", model="cnn", pretrain_epochs=10, epochs=10, baselines=False,
                         seed=seed, quiet=True)
    return RunConfig(dataset="mnist", data_dir=data_dir, model="mlp", hidden=(300, 100), pretrain_epochs=5,
                     epochs=5, batch_size=128, baselines=False, seed=seed, quiet=True,
                     dress=DressOptions(dense_first_last=False))


def trained(cfg, cache):
    """``(dress, pretrained, meta, data)`` of the benchmark's DRESS run (cached in ``cache``)."""
    if cache and Path(cache).exists():
        saved = pickle.loads(Path(cache).read_bytes())
    else:
        run = run_experiment(cfg)
        saved = {"dress": run.dress, "metrics": run.metrics, "pretrained": run.pretrained}
        if cache:
            Path(cache).write_bytes(pickle.dumps(saved))
    ds, x_train, x_test = load_data(cfg)
    meta = {"model": saved["metrics"]["model"], "config": saved["metrics"]["config"]}
    return saved["dress"], saved["pretrained"], meta, (x_train, ds.y_train, x_test, ds.y_test)


def accuracy(store, densities, x, y):
    """``{density: test accuracy in %}`` of the deployed store (the row-sparse kernels)."""
    model = DeployedModel.from_store(store, paths="sparse")
    return {d: float(100 * (model.set_density(d).predict(x).argmax(1) == y).mean()) for d in densities}


def latencies(stores, levels, repeats, rounds=7):
    """``{method: {level: seconds}}`` of each deployed store (default ``paths="auto"``, its paths
    chosen by its own ``latency_profile`` first) at batch 1, timed in interleaved rounds: per
    level and round, ``repeats`` calls of every method in turn, the 10th percentile of each;
    reported, the median over the rounds. (Other processes only ever add time on a shared
    machine; interleaving gives every method the same machine.)"""
    models = {}
    for name, store in stores.items():
        models[name] = DeployedModel.from_store(store)
        models[name].latency_profile(levels, batch=1, repeats=20)
    shape = tuple(next(iter(stores.values())).meta["model"]["input_shape"])
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    out = {name: {} for name in models}
    for d in levels:
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                model.set_density(d)
                times[name].append(np.quantile(timed_calls(model.predict, x, repeats), 0.1))
        for name in models:
            out[name][d] = float(np.median(times[name]))
    return out


def universal_store(dress, meta, data, fraction, seed, epochs):
    """Fine-tune on the dithered lattice, code it, decode it: ``(float Store, UniversalCode)``."""
    d = copy.deepcopy(dress)
    steps = universal.layer_steps(Store.from_dress(d).sparse, fraction)
    if epochs:
        qat.finetune(d, data[0], data[1], universal.dithered_quantizer(d, steps, seed), epochs=epochs)
    store = Store.from_dress(d, "rank", meta)
    code = universal.encode(store.sparse, steps, seed)
    decoded = universal.decode(code, store.dtype)
    sparse = {n: RowSparse(rs.shape, decoded[n][0], rs.cols, rs.prefix) for n, rs in store.sparse.items()}
    return Store(store.levels, store.order, sparse, dict(store.dense), store.per_level, store.meta).validate(), code


def admm_levels(pretrained, cfg, data, levels, bits, epochs):
    """``{level: test accuracy in %}`` of one ADMM-quantized model per level (module docstring);
    the hyper-parameters of ``compare_single_density.py``'s ADMM (60% of the steps ADMM)."""
    from minidress.app.experiment import train_phase
    from minidress.nn.train import steps_per_epoch
    from minidress.quantize.admm import ADMMQuantizer
    per_epoch = steps_per_epoch(len(data[0]), cfg.batch_size)
    out = {}
    for d in levels:
        q = ADMMQuantizer(copy.deepcopy(pretrained), d, int(0.6 * epochs * per_epoch), bits=bits, rho0=0.3,
                          growth=1.5, rho_max=10.0, update_every=max(1, per_epoch // 2),
                          dense_first_last=cfg.dress.dense_first_last)
        train_phase(q.model, cfg, data[0], data[1], None, None, epochs, cfg.finetune_lr, step=q.step)
        out[d] = 100 * q.finish().evaluate(data[2], data[3])[1]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cnn")
    ap.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST files (--setting mlp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="pickle of the trained run (written if missing)")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--admm-epochs", type=int, default=None, help="per level (default: the run's epochs)")
    ap.add_argument("--step-fraction", type=float, default=0.25, help="universal: delta / std")
    ap.add_argument("--repeats", type=int, default=200, help="latency: calls per method, level and round")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = config(args.setting, args.seed, args.data_dir)
    dress, pretrained, meta, data = trained(cfg, args.cache)
    x_test, y_test = data[2], data[3]
    f32 = Store.from_dress(dress, "rank", meta)
    levels = sorted(f32.levels, reverse=True)
    grid = [d for d in np.round(np.arange(0.05, 1.0001, 0.05), 2).tolist() if d <= max(levels)]

    def tuned(bits):
        d = copy.deepcopy(dress)
        qat.finetune(d, data[0], data[1], qat.grid_quantizer(d, bits), epochs=args.qat_epochs, seed=args.seed)
        return QuantizedStore.from_store(Store.from_dress(d, "rank", meta), bits)

    uni, code = universal_store(dress, meta, data, args.step_fraction, args.seed, args.qat_epochs)
    methods = {"float32": f32, "int8": QuantizedStore.from_store(f32, 8), "int4": QuantizedStore.from_store(f32, 4),
               "int8+QAT": tuned(8), "int4+QAT": tuned(4), "universal": uni}
    dense_bytes = f32.accounting()["dense"]
    rows, out = [], {"setting": args.setting, "seed": args.seed, "levels": levels, "dense_float32_bytes": dense_bytes,
                     "methods": {}}
    lats = latencies(methods, levels, args.repeats)
    for name, store in methods.items():
        acc, fine = accuracy(store, levels, x_test, y_test), accuracy(store, grid, x_test, y_test)
        mem, lat = device_memory(store, levels, (1, 32)), lats[name]
        at_rest = mem[levels[0]]["params_store"]
        if name == "universal":     # the coded streams replace the sparse values and columns
            at_rest = at_rest - sum(rs.values.nbytes + rs.cols.nbytes for rs in store.sparse.values()) + code.nbytes()
        out["methods"][name] = {"accuracy": acc, "grid": fine, "bytes": at_rest, "memory": mem, "latency": lat}
        for d in levels:
            rows.append((name, d, acc[d], at_rest, mem[d]["activations"][1], mem[d]["activations"][32],
                         mem[d]["macs"], f"{1e6 * lat[d]:.1f} ({lat[d] / lats['float32'][d]:.2f}x)"))
    i8mem = device_memory(methods["int8"], levels, (1, 32))
    separate = sum(i8mem[d]["params_level"] for d in levels)
    admm = admm_levels(pretrained, cfg, data, levels, 8, args.admm_epochs or cfg.epochs)
    out["methods"]["ADMM int8"] = {"accuracy": admm, "bytes": separate}
    for d in levels:     # K models: their bytes together; latency as int8's kernels at that level
        rows.append(("ADMM int8 (one model per level)", d, admm[d], separate, i8mem[d]["activations"][1],
                     i8mem[d]["activations"][32], i8mem[d]["macs"], "as int8"))
    out["separate_int8_bytes"], out["universal_sizes"] = separate, code.sizes
    print(f"{SETTINGS[args.setting]}, seed {args.seed}; dense float32 model {dense_bytes} B; "
          f"K={len(levels)} separate int8 models {separate} B ({separate / dense_bytes:.3f}x); "
          f"universal coders {code.sizes} (chosen {code.coder})\n")
    print("| method | level | acc % | bytes at rest (x dense f32) | peak act. B=1 | B=32 | MACs | latency B=1, us (x float32) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d, a, b, a1, a32, macs, us in rows:
        print(f"| {name} | {d} | {a:.2f} | {b} ({b / dense_bytes:.3f}x) | {a1} | {a32} | {macs} | {us} |")
    f, i8 = methods["float32"], methods["int8"]
    sp = lambda s: sum(rs.values.nbytes + rs.cols.nbytes for rs in s.sparse.values())   # noqa: E731
    print(f"\nsparse values+indices: float32 {sp(f)} B; int8 {i8.sparse_nbytes()} B "
          f"({i8.sparse_nbytes() / sp(f):.3f}x); int4 {methods['int4'].sparse_nbytes()} B "
          f"({methods['int4'].sparse_nbytes() / sp(f):.3f}x); universal {code.nbytes()} B ({code.nbytes() / sp(f):.3f}x)")
    print(f"whole store at rest: int8 {i8.nbytes(at_rest=True)} B ({i8.nbytes(at_rest=True) / f.nbytes():.3f}x "
          f"the float32 store's {f.nbytes()} B)")
    for name in methods:
        worst = max(abs(out["methods"][name]["grid"][d] - out["methods"]["float32"]["grid"][d]) for d in grid)
        print(f"{name}: largest |accuracy - float32| on the fine grid {worst:.2f} points")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

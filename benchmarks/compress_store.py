"""Compressing the nested store: accuracy, bytes, memory and latency per method and level.

Trains one DRESS model (digits, small CNN; ``run_experiment``), then compares, at every trained
level (and the fine grid, for accuracy): the float32 nested store; int8 and int4 stores
(``minidress.deploy.quantized``); int4 and int8 after quantization-aware fine-tuning
(``minidress.quantize.qat``); universal compression (dithered lattice, fine-tuning, lossless
coder: ``minidress.quantize.universal``); and, for bytes, K separate int8 models and one dense
float32 model. Bytes at rest count every array (dense layers and batch norms included); the
ratio is to one dense float32 model. Memory per level: ``minidress.deploy.memory.device_memory``.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 nice -n 19 \\
        python benchmarks/compress_store.py --seed 0 [--cache /tmp/run.pkl] [--json out.json]
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
from minidress.deploy.runtime import DeployedModel
from minidress.deploy.store import RowSparse, Store
from minidress.quantize import qat, universal


def trained(seed, cache):
    """``(dress, meta, data)`` of the benchmark's DRESS run (cached in ``cache`` if given)."""
    cfg = RunConfig(dataset="digits", model="cnn", pretrain_epochs=10, epochs=10, baselines=False,
                    seed=seed, quiet=True)
    if cache and Path(cache).exists():
        saved = pickle.loads(Path(cache).read_bytes())
    else:
        run = run_experiment(cfg)
        saved = {"dress": run.dress, "metrics": run.metrics}
        if cache:
            Path(cache).write_bytes(pickle.dumps(saved))
    ds, x_train, x_test = load_data(cfg)
    meta = {"model": saved["metrics"]["model"], "config": saved["metrics"]["config"]}
    return saved["dress"], meta, (x_train, ds.y_train, x_test, ds.y_test)


def accuracy(store, densities, x, y):
    """``{density: test accuracy in %}`` of the deployed store (the row-sparse kernels)."""
    model = DeployedModel.from_store(store, paths="sparse")
    return {d: float(100 * (model.set_density(d).predict(x).argmax(1) == y).mean()) for d in densities}


def latency(store, levels, repeats):
    """``{level: seconds}`` of the deployed model (default ``paths="auto"``) at batch 1: the 10th
    percentile of ``repeats`` calls (other processes only ever add time on a shared machine)."""
    return DeployedModel.from_store(store).latency_profile(levels, batch=1, repeats=repeats, quantile=0.1)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="pickle of the trained run (written if missing)")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--step-fraction", type=float, default=0.25, help="universal: delta / std")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dress, meta, data = trained(args.seed, args.cache)
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
    rows, out = [], {"seed": args.seed, "levels": levels, "dense_float32_bytes": dense_bytes, "methods": {}}
    for name, store in methods.items():
        acc, fine = accuracy(store, levels, x_test, y_test), accuracy(store, grid, x_test, y_test)
        mem, lat = device_memory(store, levels, (1, 32)), latency(store, levels, args.repeats)
        at_rest = mem[levels[0]]["params_store"]
        if name == "universal":     # the coded streams replace the sparse values and columns
            at_rest = at_rest - sum(rs.values.nbytes + rs.cols.nbytes for rs in store.sparse.values()) + code.nbytes()
        out["methods"][name] = {"accuracy": acc, "grid": fine, "bytes": at_rest, "memory": mem, "latency": lat}
        for d in levels:
            rows.append((name, d, acc[d], at_rest, mem[d]["activations"][1], mem[d]["activations"][32],
                         mem[d]["macs"], 1e6 * lat[d]))
    separate = sum(device_memory(methods["int8"], [d])[d]["params_level"] for d in levels)
    out["separate_int8_bytes"], out["universal_sizes"] = separate, code.sizes
    print(f"digits + small CNN, seed {args.seed}; dense float32 model {dense_bytes} B; "
          f"K={len(levels)} separate int8 models {separate} B ({separate / dense_bytes:.3f}x); "
          f"universal coders {code.sizes} (chosen {code.coder})\n")
    print("| method | level | acc % | bytes at rest (x dense f32) | peak act. B=1 | B=32 | MACs | latency B=1 (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d, a, b, a1, a32, macs, us in rows:
        print(f"| {name} | {d} | {a:.2f} | {b} ({b / dense_bytes:.3f}x) | {a1} | {a32} | {macs} | {us:.1f} |")
    f, i8 = methods["float32"], methods["int8"]
    sp = lambda s: sum(rs.values.nbytes + rs.cols.nbytes for rs in s.sparse.values())   # noqa: E731
    print(f"\nsparse values+indices: float32 {sp(f)} B; int8 {i8.sparse_nbytes()} B "
          f"({i8.sparse_nbytes() / sp(f):.3f}x); int4 {methods['int4'].sparse_nbytes()} B "
          f"({methods['int4'].sparse_nbytes() / sp(f):.3f}x); universal {code.nbytes()} B ({code.nbytes() / sp(f):.3f}x)")
    for name in methods:
        worst = max(abs(out["methods"][name]["grid"][d] - out["methods"]["float32"]["grid"][d]) for d in grid)
        print(f"{name}: largest |accuracy - float32| on the fine grid {worst:.2f} points")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Time per training epoch: minidress vs PyTorch CPU (MLP, LeNet-5, small CNN and ResNet on MNIST).

Both frameworks get the same architecture (the torch model is translated layer by layer from the
minidress one and starts from the same weights), the same pre-batched float32 arrays in the same
order, SGD with momentum 0.9, and the same number of threads.

What is timed: the training step only, ``forward + loss + backward + optimizer step`` over
batches that were shuffled and gathered beforehand. The minidress step is exactly what
``minidress.nn.train.fit`` runs per batch (``dense_step`` then ``optimizer.step(model.parameters(),
grads)``); the torch step does the same work (``zero_grad``, forward, ``cross_entropy``,
``backward``, ``step``, plus ``loss.item()`` and the number of correct predictions, which
``dense_step`` also returns). The time of the shuffle + gather (``iterate_minibatches``) is
measured once and printed separately; it is not in the table.

Threads: ``--threads N`` (default 2) sets ``torch.set_num_threads(N)`` and, for NumPy's BLAS,
``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``. OpenBLAS reads those variables
only when it is loaded, so this script parses its arguments with nothing but argparse/os/sys
imported, sets the variables, and only then imports NumPy. If NumPy was already imported (the
script was imported rather than run), it falls back to ``threadpoolctl`` when available and
says so. The thread count actually in effect is printed from ``threadpoolctl``.

Noise: each repeat runs every framework once, the order alternating between repeats
(minidress, torch / torch, minidress / ...), and the ratio is taken per repeat (paired), so slow
drift of a shared machine cancels out. The table gives the median and the min over repeats and
the range of the paired ratios. Nothing is asserted on the times.

Usage (from the repository root)::

    python benchmarks/bench_train.py                     # all four models, full epochs, 3 repeats
    python benchmarks/bench_train.py --models mlp --repeats 5
    python benchmarks/bench_train.py --steps 100         # 100 steps per epoch, extrapolated
    python benchmarks/bench_train.py --quick             # smoke run: few steps, 1 repeat
    python benchmarks/bench_train.py --threads 1

MNIST is read from ``<repo>/../shared/data/mnist`` or ``--data-dir``; if it is not there, random
data of MNIST's shape is used instead (the output says so; times per epoch are the same).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common import DEFAULT_DATA_DIR, blas_threads_report, set_thread_env

MODELS = ("mlp", "lenet5", "cnn", "resnet")
# The pre-activation ResNet 16-32-64 is timed at batch 64 (its target), the others at --batch-size.
MODEL_BATCH = {"resnet": 64}
QUICK_STEPS, QUICK_REPEATS, QUICK_WARMUP = 10, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2,
                   help="threads for torch and for NumPy's BLAS (default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="time only this many steps per epoch and extrapolate to a full epoch")
    p.add_argument("--repeats", type=int, default=None, help="timed epochs per framework (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_STEPS} steps, {QUICK_REPEATS} repeat, {QUICK_WARMUP} "
                        f"warm-up steps (explicit --steps/--repeats/--warmup still win)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help=f"folder with the MNIST idx files (default {DEFAULT_DATA_DIR})")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="time minidress only")
    p.add_argument("--numba-threads", type=int, default=None,
                   help="threads of the Numba pool (pooling, col2im and row-sparse kernels) while "
                        "training (default: --threads); see minidress.kernels.conv_train.training_threads")
    p.add_argument("--thread-policy", action="store_true",
                   help="instead of the epoch table: ms per minidress training step (dense step + "
                        "SGD) of each --models model with BLAS and the Numba pool at 1 or 2 threads "
                        "each, interleaved in one process (what chose conv_train.TRAINING_THREADS)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="BLAS threads while minidress trains (Linear layers and the convolutions' "
                        "GEMMs; default: --threads, as torch gets; threadpoolctl)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else 3
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else 10
    if args.steps is None and args.quick:
        args.steps = QUICK_STEPS
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models must be a comma-separated subset of {','.join(MODELS)}, got {bad or '[]'}")
    for name in ("batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.steps is not None and args.steps < 1) or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# Everything below runs after the thread variables are set (NumPy is imported inside functions).
# ---------------------------------------------------------------------------------------------

def load_data(data_dir: Path, seed: int):
    """Standardised MNIST train images ``float32 [60000, 1, 28, 28]`` and labels, or random data
    of the same shape when the files are missing. Returns ``(x, y, description)``."""
    import numpy as np
    from minidress.data import DataError, load_mnist, standardize

    try:
        ds = load_mnist(data_dir, download=False)
        x, y = ds.x_train, ds.y_train
        what = f"MNIST train set, load_mnist({str(data_dir)!r}, download=False)"
    except (FileNotFoundError, DataError) as e:
        rng = np.random.default_rng(seed)
        x = rng.random((60000, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, 60000)
        first = str(e).splitlines()[0]
        first = first if len(first) <= 100 else first[:97] + "..."
        what = (f"RANDOM data of MNIST's shape (60000 x 1 x 28 x 28, 10 classes), because MNIST "
                f"could not be loaded from {data_dir} ({type(e).__name__}: {first})")
    (x,), _ = standardize(x)
    return x.astype(np.float32, copy=False), y, what


def make_batches(x, y, batch_size: int, seed: int):
    """One epoch of shuffled batches exactly as ``fit`` draws them (epoch 0), and the seconds
    that the shuffle + gather took."""
    import time

    import numpy as np
    from minidress.data import iterate_minibatches

    t0 = time.perf_counter()
    batches = list(iterate_minibatches(x, y, batch_size, np.random.default_rng([seed, 0])))
    return batches, time.perf_counter() - t0


def build_minidress(name: str, seed: int):
    import numpy as np
    from minidress.nn.models import lenet5, mlp, preact_resnet, small_cnn

    if name == "mlp":
        return mlp([784, 300, 100, 10], seed=seed, dtype=np.float32)
    if name == "cnn":
        return small_cnn((1, 28, 28), seed=seed, dtype=np.float32)
    if name == "digits-cnn":                                  # --thread-policy only: 8x8 inputs
        return small_cnn((1, 8, 8), seed=seed, dtype=np.float32)
    if name == "resnet":
        return preact_resnet((1, 28, 28), widths=(16, 32, 64), seed=seed, dtype=np.float32)
    return lenet5((1, 28, 28), seed=seed, dtype=np.float32)


def to_torch(model):
    """The same network in torch, layer by layer, starting from the same weights."""
    import torch
    from minidress.nn import layers as L

    class PreAct(torch.nn.Module):
        def __init__(self, parts):
            super().__init__()
            self.p = torch.nn.ModuleDict(parts)

        def forward(self, x):
            p = self.p
            a = p["relu1"](p["bn1"](x))
            out = p["conv2"](p["relu2"](p["bn2"](p["conv1"](a))))
            return out + (p["proj"](a) if "proj" in p else x)

    class GlobalAvg(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    return torch.nn.Sequential(*[_torch_layer(layer, torch, L, PreAct, GlobalAvg)
                                 for layer in model.layers]).float()


def _torch_layer(layer, torch, L, PreAct, GlobalAvg):
    if isinstance(layer, L.PreActBlock):
        return PreAct({n: _torch_layer(c, torch, L, PreAct, GlobalAvg) for n, c in layer.children()})
    if isinstance(layer, L.Linear):
        m = torch.nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
    elif isinstance(layer, L.Conv2d):
        m = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                            layer.stride, layer.padding, bias="bias" in layer.params)
    elif isinstance(layer, L.BatchNorm):
        m = torch.nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    elif isinstance(layer, L.ReLU):
        m = torch.nn.ReLU()
    elif isinstance(layer, L.MaxPool2d):
        m = torch.nn.MaxPool2d(layer.k, layer.stride)
    elif isinstance(layer, L.GlobalAvgPool):
        m = GlobalAvg()
    elif isinstance(layer, L.Flatten):
        m = torch.nn.Flatten()
    else:
        raise TypeError(f"no torch translation for {layer!r}")
    with torch.no_grad():
        for pname, arr in layer.params.items():
            getattr(m, pname).copy_(torch.from_numpy(arr.reshape(getattr(m, pname).shape)))
    return m


class MinidressRunner:
    name = "minidress"

    def __init__(self, model_name, batches, lr, seed):
        from minidress.nn.optim import SGD
        from minidress.nn.train import dense_step

        self.model = build_minidress(model_name, seed).train()
        self.opt = SGD(lr, momentum=0.9)
        self.step_fn = dense_step
        self.batches = batches

    blas_threads = None

    def run(self, n_steps):
        """Train on the first ``n_steps`` batches; returns the mean loss (a sanity check)."""
        import threadpoolctl

        with threadpoolctl.threadpool_limits(self.blas_threads):
            return self._run(n_steps)

    def _run(self, n_steps):
        model, opt, step = self.model, self.opt, self.step_fn
        total = 0.0
        for xb, yb in self.batches[:n_steps]:
            loss, _correct, grads = step(model, xb, yb)
            opt.step(model.parameters(), grads)
            total += loss
        return total / n_steps


class TorchRunner:
    name = "torch"

    def __init__(self, model_name, batches, lr, seed):
        import torch

        self.torch = torch
        self.model = to_torch(build_minidress(model_name, seed)).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        # torch.from_numpy shares memory: the very same arrays minidress trains on.
        self.batches = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in batches]

    def run(self, n_steps):
        model, opt, F = self.model, self.opt, self.torch.nn.functional
        total = 0.0
        for xb, yb in self.batches[:n_steps]:
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            total += loss.item()
            _correct = int((logits.detach().argmax(1) == yb).sum())   # as dense_step does
        return total / n_steps


def stats(xs):
    import statistics
    return statistics.median(xs), min(xs), max(xs)


def thread_policy(args, batches) -> int:
    """Print ms per training step (``dense_step`` + SGD, one batch) of each model under every
    (BLAS, Numba) thread pair in {1, 2}^2, interleaved (``common.interleaved_medians``)."""
    from common import interleaved_medians
    from minidress.kernels.conv_train import TRAINING_THREADS, training_threads

    pairs = [(1, 1), (1, 2), (2, 1), (2, 2)]
    print(f"thread policy: ms per training step, median of {args.repeats * 5} interleaved rounds; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; the library trains with "
          f"TRAINING_THREADS = {TRAINING_THREADS} for both pools\n")
    print("| model | batch | " + " | ".join(f"BLAS {b}, Numba {n}" for b, n in pairs) + " |")
    print("|---|---|" + "---|" * len(pairs))
    import numpy as np
    rng = np.random.default_rng(args.seed)
    digits = [(rng.standard_normal((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 64))]
    for model_name in ["digits-cnn"] + args.models:        # + the small CNN on 8x8 digits
        data = digits if model_name == "digits-cnn" else batches[:1]
        runner = MinidressRunner(model_name, data, args.lr, args.seed)

        def in_threads(blas, nb):
            def step():
                with training_threads(nb, blas):
                    runner._run(1)
            return step
        times = interleaved_medians({pair: in_threads(*pair) for pair in pairs}, rounds=args.repeats * 5)
        print(f"| {model_name} | {len(runner.batches[0][1])} | "
              + " | ".join(f"{times[pair] * 1e3:.1f}" for pair in pairs) + " |", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    env_applied = set_thread_env(args.threads)

    import platform
    import time

    import numpy as np

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: timing minidress only")
    if torch is not None:
        torch.set_num_threads(args.threads)

    x, y, data_what = load_data(args.data_dir, args.seed)
    batches, shuffle_s = make_batches(x, y, args.batch_size, args.seed)
    steps_per_epoch = len(batches)
    n_steps = steps_per_epoch if args.steps is None else min(args.steps, steps_per_epoch)
    scale = steps_per_epoch / n_steps
    if args.warmup > steps_per_epoch:
        args.warmup = steps_per_epoch

    load0 = os.getloadavg()
    print(f"data: {data_what}")
    print(f"python {platform.python_version()}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch else "")
          + f"; {os.cpu_count()} CPUs, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"threads: --threads {args.threads}; "
          + (f"torch.get_num_threads() = {torch.get_num_threads()}; " if torch else "")
          + blas_threads_report(args.threads, env_applied))
    print(f"timed: forward + loss + backward + SGD(momentum 0.9, lr {args.lr}) step, float32, "
          f"from pre-batched arrays"
          + (" (same batches, same order for both frameworks)" if torch else "")
          + f"; warm-up {args.warmup} steps; {args.repeats} repeat(s)"
          + (", frameworks interleaved" if torch else ""))
    if args.steps is None:
        print(f"epoch: {len(x)} samples = {steps_per_epoch} steps of batch {args.batch_size} "
              f"(full epoch timed)")
    else:
        print(f"epoch: EXTRAPOLATED from {n_steps} timed steps x {steps_per_epoch}/{n_steps} "
              f"(a full epoch is {steps_per_epoch} steps of batch {args.batch_size})")
    print(f"not timed: shuffle + gather of one epoch (iterate_minibatches) took {shuffle_s:.3f} s")
    if load0[0] > (os.cpu_count() or 1):
        print(f"note: the machine is busy (load {load0[0]:.1f} > {os.cpu_count()} CPUs): times are "
              f"noisy, and multi-threaded runs (BLAS, OpenMP) slow down most when cores are "
              f"oversubscribed; --threads 1 gives steadier numbers")
    print(flush=True)

    import numba
    from minidress.kernels.conv_train import training_threads

    if args.thread_policy:
        return thread_policy(args, batches)

    n_numba = args.threads if args.numba_threads is None else args.numba_threads
    if args.blas_threads is None:
        args.blas_threads = args.threads
    MinidressRunner.blas_threads = args.blas_threads
    print(f"minidress while training: BLAS {args.blas_threads} thread(s); "
          f"Numba pool (conv/pooling kernels): {n_numba} of {numba.config.NUMBA_NUM_THREADS} "
          f"threads, threading layer {numba.config.THREADING_LAYER}", flush=True)
    runner_types = [MinidressRunner] + ([TorchRunner] if torch else [])
    rows = []
    all_batches, all_steps, all_scale = batches, n_steps, scale
    for model_name in args.models:
        bs = MODEL_BATCH.get(model_name, args.batch_size)
        batches, n_steps, scale = all_batches, all_steps, all_scale
        if bs != args.batch_size:
            batches, _ = make_batches(x, y, bs, args.seed)
            n_steps = len(batches) if args.steps is None else min(args.steps, len(batches))
            scale = len(batches) / n_steps
            print(f"{model_name}: batch {bs}, {len(batches)} steps per epoch", flush=True)
        runners = [R(model_name, batches, args.lr, args.seed) for R in runner_types]
        numba_pool = training_threads(n_numba, None)     # BLAS: MinidressRunner.blas_threads
        numba_pool.__enter__()
        for r in runners:
            if args.warmup:
                r.run(args.warmup)
        times = {r.name: [] for r in runners}
        losses = {r.name: [] for r in runners}
        for rep in range(args.repeats):
            order = runners if rep % 2 == 0 else runners[::-1]
            for r in order:
                t0 = time.perf_counter()
                loss = r.run(n_steps)
                times[r.name].append((time.perf_counter() - t0) * scale)
                losses[r.name].append(loss)
            print(f"  {model_name} repeat {rep + 1}/{args.repeats}: "
                  + ", ".join(f"{r.name} {times[r.name][-1]:.3f} s/epoch (mean loss "
                              f"{losses[r.name][-1]:.4f})" for r in runners), flush=True)
        numba_pool.__exit__(None, None, None)
        rows.append((model_name, bs, times))

    load1 = os.getloadavg()
    label = "s/epoch" if args.steps is None else "s/epoch (extrap.)"
    has_torch = torch is not None
    header = ["model", "batch", f"minidress {label} median [min]"]
    if has_torch:
        header += [f"torch {label} median [min]", "ratio minidress/torch median [range]"]
    table = [header]
    for model_name, bs, times in rows:
        md = stats(times["minidress"])
        row = [model_name, str(bs), f"{md[0]:.3f} [{md[1]:.3f}]"]
        if has_torch:
            tt = stats(times["torch"])
            ratios = stats([a / b for a, b in zip(times["minidress"], times["torch"])])
            row += [f"{tt[0]:.3f} [{tt[1]:.3f}]",
                    f"{ratios[0]:.2f} [{ratios[1]:.2f}-{ratios[2]:.2f}]"]
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    if has_torch:
        print("\nratios are paired per repeat (each repeat runs both frameworks back to back, "
              "order alternating); [range] is their min-max over the repeats")
    print(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``minidress`` command.

    minidress train [options]          train a model, write a run folder, print a summary
    minidress eval CHECKPOINT          rebuild a model from its checkpoint and evaluate it
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .data import load_dataset
from .data.batching import standardize
from .fileio import atomic_open, atomic_write_bytes
from .models import MODELS, build_model
from .optim import SGD, Adam, make_schedule
from .train import evaluate, fit


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def add_data_args(p):
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist", "cifar10"])
    p.add_argument("--data-dir", default=None,
                   help="directory holding the standard files (default: $MINIDRESS_DATA or "
                        "~/.cache/minidress, downloading what is missing)")
    p.add_argument("--seed", type=int, default=0)


def add_train_args(p):
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--hidden", default="300,100", help="hidden widths of the MLP, comma-separated")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 on digits, 10 otherwise")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 for SGD, 1e-3 for Adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["constant", "step", "cosine"])
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-seed<seed>)")
    p.add_argument("--resume", default=None, help="continue from this run's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_normalised(dataset, data_dir, seed):
    """The data set with inputs standardised by the training set's per-channel statistics."""
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    (x_train, x_test), _ = standardize(ds.x_train, ds.x_test)
    return ds, x_train, x_test


def make_optimizer(args):
    if args.optimizer == "adam":
        return Adam(lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    return SGD(lr=args.lr or 0.05, momentum=args.momentum, nesterov=args.momentum > 0,
               weight_decay=args.weight_decay)


def cmd_train(args):
    t0 = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else (20 if args.dataset == "digits" else 10)
    ds, x_train, x_test = load_normalised(args.dataset, args.data_dir, args.seed)
    spec = {"name": args.model, "input_shape": list(x_train.shape[1:]), "n_classes": ds.n_classes,
            "hidden": [int(h) for h in args.hidden.split(",") if h]}
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["n_classes"], args.seed,
                        hidden=tuple(spec["hidden"]))
    opt = make_optimizer(args)
    steps = epochs * -(-len(x_train) // args.batch_size)
    schedule = make_schedule(args.schedule, opt.lr, steps, warmup=args.warmup)
    out = Path(args.out or f"runs/{args.dataset}-{args.model}-seed{args.seed}")
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"epochs": epochs}
    print(f"minidress train: {ds.summary()}")
    print(f"model {args.model}: {sum(p.size for p in model.parameters().values()):,} parameters; "
          f"{epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {opt.lr}, {args.schedule}")
    history = fit(model, opt, x_train, ds.y_train, x_test, ds.y_test, epochs=epochs,
                  batch_size=args.batch_size, schedule=schedule, seed=args.seed, quiet=args.quiet,
                  checkpoint_path=out / "checkpoint.npz", resume=args.resume,
                  meta={"model": spec, "dataset": args.dataset, "config": config})
    test_loss, test_acc = evaluate(model, x_test, ds.y_test)
    metrics = {"dataset": args.dataset, "model": spec, "config": config, "history": history,
               "test_loss": test_loss, "test_acc": test_acc,
               "seconds": time.perf_counter() - t0}
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    plot_history(history, out / "curves.png", f"{args.dataset} / {args.model}")
    print(f"test accuracy {test_acc:.4f} (loss {test_loss:.4f}) after {len(history)} epochs, "
          f"{metrics['seconds']:.1f} s")
    print(f"run folder: {out}/ (checkpoint.npz, metrics.json, curves.png)")
    return 0


def plot_history(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    b.plot(ep, [h["train_acc"] for h in history], label="train")
    if history and "val_loss" in history[0]:
        a.plot(ep, [h["val_loss"] for h in history], label="test")
        b.plot(ep, [h["val_acc"] for h in history], label="test")
    a.set(xlabel="epoch", ylabel="loss", yscale="log")
    b.set(xlabel="epoch", ylabel="accuracy")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def cmd_eval(args):
    meta = load_checkpoint(args.checkpoint)
    spec = meta["model"]
    state = meta["model_state"]
    dtype = next(iter(state.values())).dtype
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["n_classes"],
                        hidden=tuple(spec["hidden"]), dtype=dtype)
    model.load_state(state)
    dataset = args.dataset or meta["dataset"]
    ds, _, x_test = load_normalised(dataset, args.data_dir, meta.get("seed", 0))
    loss, acc = evaluate(model, x_test.astype(dtype), ds.y_test)
    print(f"{args.checkpoint}: {dataset} test accuracy {acc:.4f} (loss {loss:.4f})")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minidress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model and write a run folder")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on its data set's test split")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the data set it was trained on")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"minidress {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``minidress`` command.

    minidress train [options]              DRESS on digits with the small CNN (the main job)
    minidress train --dense [options]      train one dense network instead
    minidress eval CHECKPOINT [--density D] [--recalibrate]
    minidress inspect STORE                what a DRESS store holds, and what it saves
    minidress golden --out FILE.npz | --check FILE.npz [--case NAME]
    minidress export CHECKPOINT [--density D] --onnx FILE.onnx | --torch FILE.pt
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path



from ..checkpoint import load_checkpoint
from ..deploy import STORE_VERSION, DeployedModel, Store, device_memory
from ..dress import DressOptions, build_dress, recalibrate_batchnorm
from ..fileio import atomic_write_bytes
from ..nn.metrics import macs
from ..nn.models import MODELS, build_model
from ..nn.optim import SGD, Adam, make_schedule
from ..nn.train import RESUMABLE_CHANGES, evaluate
from ..validate import check_int
from .experiment import RunConfig, load_data, run_dense, run_experiment
from .export import export_onnx, load_network, to_torch
from .golden import (CASE_NAMES, GOLDEN_VERSION, READ_VERSIONS, V1_CASES, check_golden,
                     format_report, write_golden)
from .report import format_table, plot_curve, plot_history
from .runfolder import RunFolder, read_status


def _int_at_least(minimum):
    def parse(text):
        try:
            return check_int(int(text), "the value", minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _hidden(text):
    try:
        widths = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return widths


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_data_args(p):
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist", "cifar10"])
    p.add_argument("--data-dir", default=None,
                   help="directory holding the standard files (default: $MINIDRESS_DATA or "
                        "~/.cache/minidress, downloading what is missing)")
    p.add_argument("--seed", type=_non_negative_int, default=0)


def add_train_args(p):
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--hidden", default="300,100", type=_hidden,
                   help="hidden widths of the MLP, comma-separated positive integers")
    p.add_argument("--epochs", type=_non_negative_int, default=None,
                   help="DRESS: joint-training epochs (default 10); --dense: epochs (default 20 "
                        "on digits, 10 otherwise)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 for SGD, 1e-3 for Adam")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["constant", "step", "cosine"])
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--dense", action="store_true", help="train one dense network, no DRESS")
    g = p.add_argument_group("DRESS")
    add_dress_options(g)
    g.add_argument("--ramp-epochs", type=float, default=0.0, help="length of the cubic ramp, in epochs")
    g.add_argument("--pretrain-epochs", type=_non_negative_int, default=10, help="pre-training epochs")
    g.add_argument("--finetune-lr", type=float, default=0.01, help="learning rate of the joint phase")
    g.add_argument("--no-baselines", action="store_true", help="skip single compressed and one-shot")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold this fraction of the training set out for a validation score per "
                        "pre-training epoch (0: none; the test set is only used for the final table)")
    p.add_argument("--out", default=None, help="run folder (default: runs/dress-<dataset>-<model>-seed<seed>, "
                                               "runs/dense-... with --dense)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN",
                   help="continue the interrupted run in --out (or in the folder RUN, or the folder "
                        "of the checkpoint RUN); the configuration must be the same run's")
    p.add_argument("--force", action="store_true", help="replace a run the folder already holds")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def add_dress_options(group):
    """One flag per ``DressOptions`` field, from its metadata: name, help, default, parser."""
    for f in fields(DressOptions):
        cli = f.metadata
        flag = cli.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None:
            continue
        if cli.get("invert"):
            group.add_argument(flag, dest=f.name, action="store_false", help=cli["help"])
            continue
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        group.add_argument(flag, dest=f.name, default=default, choices=cli.get("choices"),
                           help=cli["help"])


def dress_options(args) -> DressOptions:
    """``DressOptions`` from the parsed flags; a value that does not parse names its flag."""
    values = {}
    for f in fields(DressOptions):
        if not hasattr(args, f.name):
            continue
        value, parse = getattr(args, f.name), f.metadata.get("text")
        if parse is not None and isinstance(value, str):
            try:
                value = parse(value)
            except ValueError:
                flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
                form = f.metadata.get("form", f"a {f.type}")
                raise ValueError(f"{flag} must be {form}, got {value!r}") from None
        values[f.name] = value
    return DressOptions(**values)


def make_optimizer(args):
    if args.optimizer == "adam":
        return Adam(lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    return SGD(lr=args.lr or 0.05, momentum=args.momentum, nesterov=args.momentum > 0,
               weight_decay=args.weight_decay)


def cmd_train(args):
    return cmd_train_dense(args) if args.dense else cmd_train_dress(args)


def run_folder(args, kind) -> Path:
    """The run folder: ``--resume RUN`` names it (or a checkpoint in it), else ``--out``."""
    if isinstance(args.resume, str):
        given = Path(args.resume)
        return given.parent if given.suffix == ".npz" else given
    return Path(args.out or f"runs/{kind}-{args.dataset}-{args.model}-seed{args.seed}")


def cmd_train_dress(args):
    cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                    hidden=args.hidden, dress=dress_options(args), ramp_epochs=args.ramp_epochs,
                    pretrain_epochs=args.pretrain_epochs,
                    epochs=10 if args.epochs is None else args.epochs, batch_size=args.batch_size,
                    lr=args.lr or 0.05, finetune_lr=args.finetune_lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, seed=args.seed, baselines=not args.no_baselines,
                    val_fraction=args.val_fraction, quiet=args.quiet)
    out = args.run_folder = run_folder(args, "dress")
    record = json.loads(json.dumps({k: v for k, v in cfg.to_json(0).items() if k not in ("ramp_steps", "run_steps")}))
    identity = set(record) - RESUMABLE_CHANGES
    with RunFolder(out, record, resume=bool(args.resume), force=args.force, identity=identity) as folder:
        print(f"minidress train: DRESS on {cfg.dataset} with the {cfg.model} model, seed {cfg.seed}"
              + (f" (resuming {out})" if args.resume else ""))
        run = run_experiment(cfg, run_dir=out, resume=bool(args.resume))
        result = run.metrics
        Store.from_dress(run.dress, meta={"model": result["model"], "config": result["config"],
                                          "dataset": result["dataset"]}).save(out / "store.npz")
        atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=2).encode())
        plot_curve(result, out / "accuracy_vs_density.png")
        folder.complete()
    print(f"\ndense pre-trained network: {100 * result['dense_acc']:.2f}% test accuracy\n")
    print(format_table(result))
    print(f"\nfine-grained curve ({len(result['curve'])} densities, recalibrated BN): " + curve_summary(result))
    print(f"run folder: {out}/ (run.json, pretrain.npz, checkpoint.npz, store.npz, metrics.json, "
          f"accuracy_vs_density.png); {result['seconds']['total']:.0f} s")
    return 0


def curve_summary(result) -> str:
    """The lowest accuracy on the grid between the trained levels (where a collapse would be a
    failure of DRESS), and below the sparsest level (never trained, so expected to fall)."""
    lo, hi = min(result["config"]["levels"]), max(result["config"]["levels"])
    parts = []
    for label, pts in (("between the trained levels", [p for p in result["curve"] if lo <= p["density"] <= hi]),
                       ("below the sparsest level", [p for p in result["curve"] if p["density"] < lo])):
        if pts:
            worst = min(pts, key=lambda p: p["recalibrated_acc"])
            parts.append(f"lowest {label} {100 * worst['recalibrated_acc']:.2f}% (at {worst['density']:g})")
    return "; ".join(parts)


def cmd_train_dense(args):
    epochs = args.epochs if args.epochs is not None else (20 if args.dataset == "digits" else 10)
    cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                    hidden=args.hidden, batch_size=args.batch_size, seed=args.seed, quiet=args.quiet)
    opt = make_optimizer(args)
    out = args.run_folder = run_folder(args, "dense")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "run_folder")} | {"epochs": epochs}
    config = json.loads(json.dumps(config, default=str))       # tuples become lists, as in the file
    identity = set(config) - RESUMABLE_CHANGES
    with RunFolder(out, config, resume=bool(args.resume), force=args.force, identity=identity) as folder:
        print(f"{args.optimizer} lr {opt.lr}, {args.schedule} schedule")
        ckpt = out / "checkpoint.npz"
        metrics, _ = run_dense(cfg, opt, epochs,
                               lambda total: make_schedule(args.schedule, opt.lr, total, warmup=args.warmup),
                               ckpt, ckpt if args.resume and ckpt.exists() else None, config)
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        plot_history(metrics["history"], out / "curves.png", f"{args.dataset} / {args.model}")
        folder.complete()
    print(f"test accuracy {metrics['test_acc']:.4f} (loss {metrics['test_loss']:.4f}) after "
          f"{len(metrics['history'])} epochs, {metrics['seconds']:.1f} s")
    print(f"run folder: {out}/ (run.json, checkpoint.npz, metrics.json, curves.png)")
    return 0


def cmd_eval(args):
    meta = load_checkpoint(args.checkpoint)
    spec, state = meta["model"], meta["model_state"]
    dtype = next(iter(state.values())).dtype
    is_dress = "dress_step" in state
    if is_dress:
        dress = build_dress(spec, DressOptions.from_config(meta["config"]), dtype)
        dress.load_state(state)
        model = dress.model
    else:
        if args.density is not None or args.recalibrate:
            raise ValueError(f"{args.checkpoint} is a dense checkpoint: --density needs a DRESS run")
        model = build_model(spec, dtype=dtype)
        model.load_state(state)
    recorded = meta.get("config") or {}
    cfg = RunConfig(dataset=args.dataset or meta["dataset"],
                    data_dir=args.data_dir or recorded.get("data_dir"), seed=meta.get("seed", 0))
    done, planned = len(meta.get("history", [])), recorded.get("epochs")
    status = read_status(Path(args.checkpoint).parent)
    if (status is not None and status["status"] != "complete") or (planned is not None and done < planned):
        print(f"note: {args.checkpoint} is from an incomplete run ({done} of {planned} epochs of its "
              f"last phase); continue it with minidress train --resume {Path(args.checkpoint).parent}")
    ds, x_train, x_test = load_data(cfg)
    densities = [args.density] if args.density is not None else (list(dress.levels) if is_dress else [None])
    for d in densities:
        if d is not None:
            dress.use(d)
            if args.recalibrate:
                recalibrate_batchnorm(dress, x_train, d, args.recalibrate_batches, 128, cfg.seed)
        loss, acc = evaluate(model, x_test, ds.y_test)
        where = f" at density {d:g}" if d is not None else ""
        extra = f", {macs(model, x_test.shape[1:]):,} MACs" if d is not None else ""
        print(f"{args.checkpoint}: {cfg.dataset} test accuracy{where} {acc:.4f} (loss {loss:.4f}{extra})")
    return 0


def cmd_inspect(args):
    store = Store.load(args.store)
    deployed = DeployedModel.from_store(store)
    spec = store.meta["model"]
    print(f"{args.store}: DRESS store (format {STORE_VERSION}), {spec['name']} on "
          f"{store.meta.get('dataset', '?')}, {store.dtype}, order {store.order!r}")
    print(f"levels {list(store.levels)}; {len(store.sparse)} row-sparse layers, "
          f"{len(store.dense)} dense arrays\n")
    print("| layer | weight | row length | column index | entries per row, by level |")
    print("|---|---|---|---|---|")
    for name, rs in store.sparse.items():
        print(f"| {name} | {'x'.join(map(str, rs.shape))} | {rs.row_len} | {rs.cols.dtype} | "
              f"{', '.join(map(str, rs.prefix))} |")
    memory = device_memory(store)
    print("\n| density | MACs per sample | parameter bytes of this level alone | peak activation bytes, "
          "batch 1 / 32 | im2col scratch, batch 1 / 32 |\n|---|---|---|---|---|")
    for d in sorted(store.levels, reverse=True):
        m = memory[d]
        print(f"| {d:g} | {deployed.set_density(d).macs():,} | {m['params_level']:,} | "
              f"{m['activations'][1]:,} / {m['activations'][32]:,} | {m['scratch'][1]:,} / {m['scratch'][32]:,} |")
    print("(weight sparsity shrinks parameters and MACs, not activations)")
    b = store.accounting()
    k = len(store.levels)
    print(f"\n| holding all {k} levels as | bytes | vs this store |\n|---|---|---|")
    for key, label in (("nested", "this store: one nested copy"), ("separate", f"{k} row-sparse models"),
                       ("separate_csr", f"{k} CSR models"), ("separate_dense", f"{k} dense models"),
                       ("dense", "(one dense model, one level only)")):
        print(f"| {label} | {b[key]:,} | {b[key] / b['nested']:.2f}x |")
    m = deployed.memory_bytes()
    extra = ", ".join(f"{name} {n:,}" for name, n in m["parts"].items())
    print(f"\nbytes at rest (this file's arrays): {m['store']:,}; in memory to serve it: {m['total']:,} "
          f"(the store plus {m['serving']:,} for serving: {extra}; dense matrices of layers served "
          f"by BLAS are added when a density first uses them)")
    return 0


def cmd_golden(args):
    if (args.out is None) == (args.check is None):
        raise ValueError("golden needs exactly one of --out FILE (write) or --check FILE (verify)")
    if args.out:
        cases = CASE_NAMES if args.format_version == GOLDEN_VERSION else V1_CASES
        path = write_golden(args.out, args.seed, [args.case] if args.case else cases, args.format_version)
        print(f"wrote {path} (format {args.format_version}; arrays documented in docs/golden-format.md)")
        return 0
    report = check_golden(args.check, args.case, args.seed, args.tol)
    print("\n".join(format_report(report)))
    return 0 if report.ok else 1


def cmd_export(args):
    if args.onnx is None and args.torch is None:
        raise ValueError("export needs at least one of --onnx FILE or --torch FILE")
    net, spec = load_network(args.checkpoint)
    what = "the model" if args.density is None else f"the sub-network at density {args.density:g}"
    try:
        if args.onnx:
            if "input_shape" not in spec:
                raise ValueError(f"{args.checkpoint}: its model spec has no input_shape; ONNX needs one")
            export_onnx(net, args.onnx, spec["input_shape"], args.density)
            print(f"wrote {args.onnx}: {what} as ONNX (masked weights stored densely: a portability "
                  f"format, not the fast path)")
        if args.torch:
            import torch  # optional dependency: only --torch needs it
            torch.save(to_torch(net, args.density).state_dict(), args.torch)
            print(f"wrote {args.torch}: {what} as a torch.nn.utils.prune state dict (weight_orig, "
                  f"weight_mask); load it with minidress.app.export.torch_module(spec, state_dict=...)")
    except ImportError as e:             # one line naming what to install, not a traceback
        raise ValueError(f"export needs the optional package {e.name!r}: pip install \".[torch,onnx]\"") from None
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minidress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train DRESS (or, with --dense, one network); write a run folder",
                       formatter_class=_HelpFormatter)
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on its data set's test split",
                       formatter_class=_HelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the data set it was trained on")
    p.add_argument("--data-dir", default=None, help="default: the folder the checkpoint's run read")
    p.add_argument("--density", type=float, default=None,
                   help="DRESS: evaluate the sub-network at this density (default: every trained level)")
    p.add_argument("--recalibrate", action="store_true",
                   help="DRESS: recalibrate batch-norm statistics at that density on training batches")
    p.add_argument("--recalibrate-batches", type=_positive_int, default=10)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("inspect", help="show what a DRESS store (store.npz) holds and saves")
    p.add_argument("store")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("golden", help="write or check golden vectors of DRESS steps (cross-checking)",
                       formatter_class=_HelpFormatter)
    p.add_argument("--out", default=None, help="write the golden file here")
    p.add_argument("--check", default=None,
                   help="check a golden file (minidress's or another implementation's): inputs "
                        "against the seed's, every other tensor against minidress's recomputation")
    p.add_argument("--case", default=None, choices=CASE_NAMES, help="write or check this case only")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the inputs; --check reads it from the file's __meta__ (this one "
                        "serves a file without __meta__)")
    p.add_argument("--tol", type=float, default=None,
                   help="absolute tolerance for every case (default: each case's documented one)")
    p.add_argument("--format-version", type=int, default=GOLDEN_VERSION, choices=READ_VERSIONS,
                   help="--out: format 1 writes the mlp and cnn cases as format 1 did")
    p.set_defaults(func=cmd_golden)
    p = sub.add_parser("export", help="export a checkpoint's sub-network to ONNX or a PyTorch state dict",
                       formatter_class=_HelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--density", type=float, default=None,
                   help="the sub-network to export (required for a DRESS checkpoint)")
    p.add_argument("--onnx", default=None, help="write the ONNX model here")
    p.add_argument("--torch", default=None, help="write the torch state dict (torch.save) here")
    p.set_defaults(func=cmd_export)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt        # unwinds like Ctrl-C: temporary files are removed, locks released


def main(argv=None):
    """The command line: every failure of a family we expect is one line on stderr and exit 2
    (ValueError covers ArchiveError, DataError, RunFolderError); an interrupt exits 130."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"minidress {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        folder = getattr(args, "run_folder", None)
        where = (f"; {folder} is incomplete: continue it with minidress train --resume {folder}"
                 if folder is not None else "")
        print(f"minidress {args.command}: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

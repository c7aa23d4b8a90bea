"""Reports: the tables and plots of ``minidress train`` and of the any-time comparison.

Matplotlib is imported inside the plotting functions, with the ``Agg`` backend: a run that
only prints tables never loads it.
"""
from __future__ import annotations

import numpy as np

from ..fileio import save_figure
from .compare import METHODS


def _pyplot():
    import matplotlib        # heavy optional import, loaded only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt    # heavy: only when a figure is drawn
    return plt


# ---------------------------------------------------------------------------------------------
# minidress train
# ---------------------------------------------------------------------------------------------

def format_table(result) -> str:
    """The per-level table printed by ``minidress train``."""
    rows = ["| density | DRESS | single compressed | one-shot | MACs | kept params |",
            "|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
    for lv in result["levels"]:
        rows.append(f"| {lv['density']:g} | {pct(lv['dress_acc'])} | {pct(lv.get('single_acc'))} | "
                    f"{pct(lv.get('one_shot_acc'))} | {lv['macs']:,} | {lv['kept_params']:,} |")
    b = result["bytes"]
    k = len(result["levels"])
    rows.append("")
    rows.append(f"stored bytes: one nested copy {b['nested']:,} (all {k} levels); {k} separate models: "
                f"row-sparse {b['separate']:,} ({b['separate'] / b['nested']:.2f}x), CSR "
                f"{b['separate_csr']:,} ({b['separate_csr'] / b['nested']:.2f}x), dense "
                f"{b['separate_dense']:,} ({b['separate_dense'] / b['nested']:.2f}x); one dense model {b['dense']:,}")
    p = result["passes"]
    line = f"training passes (sub-network forward+backward): pre-train {p['pretrain']:,}, DRESS {p['dress']:,}"
    if "single_each" in p:
        line += f", single compressed {p['single_each']:,} each ({p['single_each'] * k:,} for all {k})"
    rows.append(line)
    return "\n".join(rows)


def curve_ylim(result, margin=2.0) -> tuple:
    """The accuracy range (%) worth showing: from a little below the lowest accuracy of any
    method at or above the sparsest trained level, to 100. Points below it (a density far under
    every level, an untrained baseline) are drawn at the bottom edge and labelled, rather than
    squeezing the 97-99% curves into one line."""
    lo = min(result["config"]["levels"])
    values = [p[k] for p in result["curve"] if p["density"] >= lo
              for k in ("recalibrated_acc", "nearest_norm_acc")]
    values += [v[k] for v in result["levels"] for k in ("dress_acc", "single_acc", "one_shot_acc") if k in v]
    return max(0.0, 100 * min(values) - margin), 100.0


def sparsified_layers_note(result) -> str:
    config = result["config"]
    if not config["dense_first_last"]:
        return "every Linear/Conv2d layer sparse"
    if config.get("dense_layers", "first_last") == "first_last":     # runs before the option
        return "first layer and classifier dense, the others sparse"
    return "classifier (and a first layer of short rows) dense, the others sparse"


def plot_curve(result, path):
    """Accuracy vs density: DRESS over the grid (recalibrated batch-norm statistics, and, for a
    model with batch norm, the nearest level's), the trained levels marked, and the baselines at
    the levels. The y-axis shows ``curve_ylim``; lower points sit on its edge, labelled."""
    plt = _pyplot()
    bottom, top = curve_ylim(result)
    clip = lambda values: [max(100 * v, bottom) for v in values]
    c, lv = result["curve"], result["levels"]
    d = [p["density"] for p in c]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    has_bn = result.get("batchnorm_layers", 1) > 0       # without batch norm the two curves agree
    ax.plot(d, clip(p["recalibrated_acc"] for p in c), "-",
            label="DRESS, any density" + (" (recalibrated BN)" if has_bn else ""))
    if has_bn:
        ax.plot(d, clip(p["nearest_norm_acc"] for p in c), ":", label="DRESS, any density (nearest level's BN)")
    ax.plot([v["density"] for v in lv], clip(v["dress_acc"] for v in lv), "o", color="C0",
            label="DRESS, trained levels")
    if "single_acc" in lv[0]:
        ax.plot([v["density"] for v in lv], clip(v["single_acc"] for v in lv), "s", mfc="none",
                color="C3", label="single compressed")
        ax.plot([v["density"] for v in lv], clip(v["one_shot_acc"] for v in lv), "x", color="C2",
                label="one-shot" + (" (recalibrated BN)" if has_bn else ""))
    for p in c:                                             # what the bottom edge hides
        if 100 * p["recalibrated_acc"] < bottom:
            ax.annotate(f"{100 * p['recalibrated_acc']:.0f}%", (p["density"], bottom), fontsize=7,
                        xytext=(0, 4), textcoords="offset points", ha="center", color="C0")
    ax.set(xlabel="density (kept fraction of each row)", ylabel="test accuracy (%)", xscale="log",
           title=f"{result['dataset']} / {result['model']['name']}: {sparsified_layers_note(result)}")
    ax.title.set_fontsize(9)
    ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0], ["0.05", "0.1", "0.25", "0.5", "1"])
    ax.set_ylim(bottom - 0.5, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def plot_history(history, path, title):
    plt = _pyplot()
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
    save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------------------
# The any-time comparison: several seeds of one setting
# ---------------------------------------------------------------------------------------------

def _spread(values, fmt):
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt(v[0])
    return f"{fmt(np.mean(v))} ({fmt(min(v))}-{fmt(max(v))})"


def summarize(runs) -> dict:
    """Mean, min and max over seeds of every accuracy; ``runs`` are ``run_comparison`` results
    of one setting. Returns method -> list (per density) of dicts."""
    out = {}
    for name in [m for m in METHODS if m in runs[0]["methods"]]:
        rows = []
        for i, d in enumerate(runs[0]["densities"]):
            accs = [r["methods"][name]["points"][i]["acc"] for r in runs]
            accs = [a for a in accs if a is not None]
            p = runs[0]["methods"][name]["points"][i]
            rows.append({"density": d, "width": p["width"], "macs": p["macs"],
                         "mean": float(np.mean(accs)) if accs else None,
                         "min": min(accs) if accs else None, "max": max(accs) if accs else None})
        out[name] = rows
    return out


def format_comparison(runs) -> str:
    """Markdown tables of ``runs`` (one setting, one result per seed): accuracy per density (mean
    and min-max over seeds), stored bytes, training passes and training wall time; then MACs per
    sample at every point (US-Nets: with its matched width). Alternating, single compressed and
    one-shot use DRESS's row-based masks, so they share DRESS's MACs and are left out there."""
    first = runs[0]
    dens = first["densities"]
    pct = lambda v: f"{100 * v:.2f}"
    head = " | ".join(f"{d:g}" for d in dens)
    lines = [f"| method | {head} | stored bytes | training passes | train time (s) |",
             "|---|" + "---|" * (len(dens) + 3)]
    for name in [m for m in METHODS if m in first["methods"]]:
        cells = []
        for i in range(len(dens)):
            cells.append(_spread([r["methods"][name]["points"][i]["acc"] for r in runs], pct))
        m = first["methods"][name]
        secs = _spread([r["methods"][name]["seconds"] for r in runs], lambda v: f"{v:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['bytes']:,} | {m['passes']:,} | {secs} |")
    dense_macs = first["methods"]["DRESS"]["points"][dens.index(1.0)]["macs"] if 1.0 in dens else None
    lines += ["", f"| MACs per sample | {head} |", "|---|" + "---|" * len(dens)]
    for name in [m for m in METHODS if m in first["methods"]]:
        if name in ("single compressed", "one-shot", "alternating"):
            continue                          # the same row-based masks as DRESS
        cells = []
        for p in first["methods"][name]["points"]:
            rel = [f"{100 * p['macs'] / dense_macs:.1f}%"] if dense_macs else []
            rel += [f"width {p['width']:.3f}"] if p["width"] is not None else []
            cells.append(f"{p['macs']:,}" + (f" ({', '.join(rel)})" if rel else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(runs, path, title=None):
    """Test accuracy against MACs (fraction of the dense network's), mean over seeds with
    min-max bars, one line per method."""
    plt = _pyplot()
    import matplotlib.ticker    # with pyplot, only when drawing
    summary = summarize(runs)
    dense = max(p["macs"] for p in summary["DRESS"])
    styles = {"DRESS": ("o-", "C0"), "alternating": ("v--", "C1"), "LCS+P": ("^-.", "C2"),
              "LCS+L": ("D:", "C4"), "US-Nets": ("s-", "C5"), "single compressed": ("s", "C3"),
              "one-shot": ("x", "C7")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    low, xs = 100.0, []
    for name, rows in summary.items():
        rows = [r for r in rows if r["mean"] is not None]
        x = [r["macs"] / dense for r in rows]
        xs += x
        y = np.array([100 * r["mean"] for r in rows])
        # a mean of equal values can round a hair past them: clip, as matplotlib refuses yerr < 0
        err = np.maximum(0.0, [[100 * (r["mean"] - r["min"]), 100 * (r["max"] - r["mean"])] for r in rows]).T
        fmt, color = styles[name]
        ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=2, ms=5,
                    mfc="none" if name == "single compressed" else None, label=name)
        low = min(low, y.min())
    # A log axis spreads out small MAC fractions; over a narrow range (the MLP, whose dense first
    # layer holds most MACs) it would only crowd the tick labels.
    if max(xs) / min(xs) > 3:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (0.05, 0.1, 0.25, 0.5, 1.0) if min(xs) * 0.9 <= t <= 1.0])
    ax.set(xlabel="MACs per sample (fraction of the dense network's)",
           ylabel="test accuracy (%)", title=title or f"{runs[0]['dataset']} / {runs[0]['model']['name']}")
    ax.set_ylim(max(0.0, low - 3), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)

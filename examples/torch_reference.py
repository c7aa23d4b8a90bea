"""An independent PyTorch implementation of a minidress golden file (format 2).

Written from docs/golden-format.md alone, with torch and numpy only (nothing from minidress):
it reads the file's inputs, recomputes every case with autograd, and prints for every tensor
its name, the largest difference to the file and OK / NOT OK, with the first mismatching entries
of a tensor that is NOT OK (as llm.c's ``check_tensor``). Exit status 0 when every tensor is OK.

    minidress golden --out golden.npz
    python examples/torch_reference.py golden.npz               # every case
    python examples/torch_reference.py golden.npz --case ties   # one case
    python examples/torch_reference.py golden.npz --plant nhwc  # a wrong implementation: fails
    python examples/torch_reference.py golden.npz --write theirs.npz
    minidress golden --check theirs.npz                         # minidress checks this one

``--plant`` makes this implementation deliberately wrong in one documented rule (see PLANTS), to
show that the file catches that mistake: tests/test_torch_reference.py runs each one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

PLANTS = {
    "tie_high": "equal magnitudes rank the higher column first",
    "half_even": "row counts round half to even (Python's round) instead of half up",
    "nhwc": "flatten a [N, C, H, W] activation in (H, W, C) order",
    "relu_grad_at_zero": "ReLU passes the gradient at an input of exactly 0",
    "biased_running_var": "the running variance is updated with the biased batch variance",
    "grad_1e-9": "one gradient entry (first case, step 0, first parameter) is off by 1e-9",
    "last_max": "max-pool ties send the gradient to the last maximum",
}
N_SHOW = 5


def digest(arrays: dict) -> str:
    """The documented sha256 recipe: for each name in sorted order, ``name|dtype.str|shape|``
    and the array's C-order bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load(path) -> tuple[dict, dict, np.ndarray]:
    """The file's arrays, its metadata and the raw ``__meta__``; the sha256 is verified (it
    covers ``__meta__`` too)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    stored = arrays.pop("__sha256__").tobytes().decode()
    if digest(arrays) != stored:
        raise SystemExit(f"{path}: sha256 mismatch: the file is corrupt or was edited")
    raw_meta = arrays.pop("__meta__")
    meta = json.loads(raw_meta.tobytes())
    if meta.get("kind") != "minidress.golden" or meta.get("format_version") != 2:
        raise SystemExit(f"{path}: expected a minidress.golden file of format 2, got "
                         f"{meta.get('kind')!r} format {meta.get('format_version')!r}")
    return arrays, meta, raw_meta


class Checker:
    """Compares tensors to the file and prints one line per tensor; keeps ours (``self.ours``)."""

    def __init__(self, arrays):
        self.arrays, self.checked, self.failed, self.ours = arrays, set(), [], {}

    def __call__(self, name, ours, tol):
        theirs = self.arrays.get(name)
        self.checked.add(name)
        ours = ours.detach().numpy().copy() if torch.is_tensor(ours) else np.asarray(ours)
        self.ours[name] = ours
        if theirs is None or theirs.shape != ours.shape:
            got = "missing" if theirs is None else f"shape {theirs.shape}"
            print(f"{name:<42} NOT OK: the file's tensor is {got}, ours has shape {ours.shape}")
            self.failed.append(name)
            return
        if theirs.dtype.kind in "biu":
            tol = 0.0                                  # ranks, masks, labels: exactly equal
        a, b = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
        diff = np.abs(a - b)
        bad = ~(diff <= tol)                           # NaN is never OK
        worst = float("nan") if np.isnan(diff).any() else float(diff.max(initial=0.0))
        print(f"{name:<42} max diff {worst:.3e}  {'NOT OK' if bad.any() else 'OK'}")
        for i in np.flatnonzero(bad)[:N_SHOW]:
            print(f"{'':<42}   [{i}] torch {float(a[i])!r}  file {float(b[i])!r}")
        if bad.any():
            self.failed.append(name)


def row_ranks(w, plant):
    """Rank of each weight in its row of ``w.reshape(rows, -1)``: 0 for the largest magnitude,
    ties to the lower column (a stable sort of -|w|)."""
    rows = w.detach().reshape(len(w), -1).abs()
    if plant == "tie_high":
        order = rows.shape[1] - 1 - torch.argsort(-rows.flip(1), dim=1, stable=True)
    else:
        order = torch.argsort(-rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order))
    return ranks.to(torch.int32)


def n_kept(density, row_len, plant):
    """``max(1, floor(d * row_len + 0.5))`` in IEEE double (Python floats)."""
    x = float(density) * row_len
    return max(1, round(x) if plant == "half_even" else math.floor(x + 0.5))


def max_pool_last(h, k, s):
    """Max-pool sending ties to the last maximum of each window (a planted mistake)."""
    win = h.unfold(2, k, s).unfold(3, k, s)                    # [N, C, Ho, Wo, k, k]
    flat = win.reshape(*win.shape[:4], k * k)
    last = k * k - 1 - flat.flip(-1).argmax(-1, keepdim=True)
    return flat.gather(-1, last)[..., 0]


def batch_norm(h, layer, p, running, slot, plant):
    """Training-mode batch norm of level ``slot``: batch mean and biased variance normalise;
    the slot's running statistics move by ``momentum`` towards the batch mean and the unbiased
    batch variance."""
    name, eps, momentum = layer["name"], layer["eps"], layer["momentum"]
    dims = (0,) if h.dim() == 2 else (0, 2, 3)
    with torch.no_grad():
        mean = h.mean(dims)
        var = h.var(dims, correction=0 if plant == "biased_running_var" else 1)
        rm, rv = running[f"{name}.running_mean"], running[f"{name}.running_var"]
        rm[slot] = (1 - momentum) * rm[slot] + momentum * mean
        rv[slot] = (1 - momentum) * rv[slot] + momentum * var
    return F.batch_norm(h, None, None, p[f"{name}.weight"][slot], p[f"{name}.bias"][slot],
                        training=True, eps=eps)


def forward(layers, p, running, masks, slot, x, plant):
    """Level ``slot``'s logits: every Linear/Conv2d weight times its mask, biases dense."""
    h = x
    for layer in layers:
        name, kind = layer["name"], layer["type"]
        if kind in ("linear", "conv2d"):
            w, b = p[f"{name}.weight"] * masks[name], p.get(f"{name}.bias")
            h = F.linear(h, w, b) if kind == "linear" else F.conv2d(h, w, b, layer["stride"], layer["padding"])
        elif kind == "relu":
            h = torch.where(h >= 0, h, 0.0) if plant == "relu_grad_at_zero" else torch.relu(h)
        elif kind == "flatten":
            h = (h.permute(0, 2, 3, 1) if plant == "nhwc" and h.dim() == 4 else h).flatten(1)
        elif kind == "maxpool2d":
            k, s = layer["kernel_size"], layer["stride"]
            h = max_pool_last(h, k, s) if plant == "last_max" else F.max_pool2d(h, k, s)
        elif kind == "batchnorm":
            h = batch_norm(h, layer, p, running, slot, plant)
        else:
            raise SystemExit(f"unknown layer type {kind!r}")
    return h


def run_case(name, info, arrays, check, plant, perturb):
    """Recompute one case from its inputs, comparing every tensor on the way."""
    g = {k[len(name) + 1:]: v for k, v in arrays.items() if k.startswith(name + "/")}
    inputs = {k: v for k, v in g.items() if k in ("x", "y") or k.startswith(("param/", "buffer/"))}
    same = digest(inputs) == info["inputs_sha256"]
    print(f"== {name}: {info['exercises']}\n   inputs sha256 {'OK' if same else 'NOT OK'}")
    if not same:
        check.failed.append(f"{name}/inputs")
    tol, lr, levels = info["tolerance"], info["lr"], info["levels"]
    schemes = {"density": np.asarray(levels) / np.mean(levels), "uniform": np.ones(len(levels))}
    if info["lambdas"] not in schemes:
        raise SystemExit(f"{name}: unknown lambdas scheme {info['lambdas']!r}")
    lambdas = schemes[info["lambdas"]]
    check(f"{name}/levels", np.asarray(levels), tol)
    check(f"{name}/lambdas", lambdas, tol)
    x, y = torch.tensor(g["x"]), torch.tensor(g["y"])
    p = {k[6:]: torch.tensor(v) for k, v in g.items() if k.startswith("param/")}
    running = {k[7:]: torch.tensor(v) for k, v in g.items() if k.startswith("buffer/")}
    sparse = [layer["name"] for layer in info["layers"] if layer["type"] in ("linear", "conv2d")]
    every = info["resample_every"]
    for t in range(info["steps"]):
        s = f"{name}/step/{t}/"
        if t == 0 or (every and t % every == 0):
            masks = {}
            for L in sparse:
                ranks = row_ranks(p[f"{L}.weight"], plant)
                check(f"{s}ranks/{L}", ranks, 0)
                for k, d in enumerate(levels):
                    m = (ranks < n_kept(d, ranks.shape[1], plant)).reshape(p[f"{L}.weight"].shape)
                    check(f"{s}mask/{k}/{L}", m.to(torch.uint8), 0)
                    masks[k, L] = m.to(p[f"{L}.weight"].dtype)
        for v in p.values():
            v.requires_grad_(True)
        losses = []
        for k in range(len(levels)):
            logits = forward(info["layers"], p, running, {L: masks[k, L] for L in sparse}, k, x, plant)
            check(f"{s}logits/{k}", logits, tol)
            losses.append(F.cross_entropy(logits, y))
        total = sum(float(lam) * loss for lam, loss in zip(lambdas, losses))
        total.backward()
        check(f"{s}loss", torch.stack(losses), tol)
        check(f"{s}total_loss", total, tol)
        with torch.no_grad():
            for P, v in p.items():
                grad = v.grad
                if perturb and t == 0 and P == next(iter(p)):
                    grad = grad.clone()
                    grad.view(-1)[0] += 1e-9
                check(f"{s}grad/{P}", grad, tol)
                p[P] = v.detach() - lr * grad            # plain SGD
        for B, v in running.items():
            check(f"{s}buffer_after/{B}", v, tol)
    for P, v in p.items():
        check(f"{name}/param_after/{P}", v, tol)
    check.checked.update(f"{name}/{k}" for k in inputs)
    check.ours.update({f"{name}/{k}": v for k, v in inputs.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("golden", help="a golden file written by minidress golden --out")
    ap.add_argument("--case", default=None, help="check only this case")
    ap.add_argument("--plant", default=None, choices=sorted(PLANTS),
                    help="make this implementation wrong in one rule (to see the file catch it)")
    ap.add_argument("--write", default=None, metavar="THEIRS.npz",
                    help="also save every tensor this implementation computed, with the documented "
                         "names, for minidress golden --check")
    args = ap.parse_args(argv)
    arrays, meta, raw_meta = load(args.golden)
    cases = meta["cases"] if args.case is None else {args.case: meta["cases"][args.case]}
    if args.plant:
        print(f"planted mistake: {PLANTS[args.plant]}")
    check = Checker(arrays)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tensors this small only lose to a thread pool's overhead
    try:
        for i, (name, info) in enumerate(cases.items()):     # tensors keep the file's dtype
            run_case(name, info, arrays, check, args.plant, perturb=args.plant == "grad_1e-9" and i == 0)
    finally:
        torch.set_num_threads(threads)
    unchecked = sorted(k for k in arrays if k.split("/", 1)[0] in cases and k not in check.checked)
    for k in unchecked:
        print(f"{k:<42} NOT OK: in the file but not recomputed here")
    if args.write:                      # no __sha256__: minidress golden --check does not need one
        np.savez(args.write, __meta__=raw_meta, **check.ours)
        print(f"wrote {args.write}")
    failed = len(check.failed) + len(unchecked)
    print(f"{len(check.checked)} tensors in {len(cases)} cases: "
          + ("all OK" if not failed else f"{failed} NOT OK ({', '.join(check.failed[:8])}"
                                         f"{', ...' if len(check.failed) > 8 else ''})"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

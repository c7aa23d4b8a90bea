"""Golden vectors: every tensor of one DRESS step, for cross-checking other implementations.

``write_golden(path)`` runs one joint DRESS step (then one plain SGD step) on two tiny, fixed,
float64 networks and stores every input, weight, rank, mask, logit, loss and gradient in a
versioned archive (``minidress.checkpoint`` format, kind ``minidress.golden``).
``check_golden(path)`` recomputes everything from the stored inputs and weights and reports the
largest difference per tensor. ``docs/golden-format.md`` documents each array.

The networks (no batch norm, so that the file needs no mode or statistics conventions):

* ``mlp``: Linear(12, 10) - ReLU - Linear(10, 8) - ReLU - Linear(8, 4)
* ``cnn``: Conv2d(2, 3, k=3, s=1, p=1) - ReLU - Conv2d(3, 4, k=3, s=2, p=1) - ReLU - Flatten -
  Linear(4*3*3, 4), on 6x6 inputs

Every Linear and Conv2d is sparsified (``dense_first_last=False``) at levels
``(1.0, 0.5, 0.25)`` with lambdas proportional to density, so each has something to check.
"""
from __future__ import annotations

import numpy as np

from .checkpoint import read_archive, write_archive
from .dress import Dress
from .layers import Conv2d, Flatten, Linear, ReLU, Sequential

GOLDEN_KIND = "minidress.golden"
GOLDEN_VERSION = 1
LEVELS = (1.0, 0.5, 0.25)
LAMBDAS = "density"
LR = 0.1


def _architectures():
    return {
        "mlp": ((7, 12), [("linear", 12, 10), ("relu",), ("linear", 10, 8), ("relu",), ("linear", 8, 4)]),
        "cnn": ((5, 2, 6, 6), [("conv", 2, 3, 3, 1, 1), ("relu",), ("conv", 3, 4, 3, 2, 1), ("relu",),
                               ("flatten",), ("linear", 36, 4)]),
    }


def _build(layers, rng):
    made = []
    for spec in layers:
        kind = spec[0]
        if kind == "linear":
            made.append(Linear(spec[1], spec[2], rng, np.float64))
        elif kind == "conv":
            made.append(Conv2d(*spec[1:], rng=rng, dtype=np.float64))
        else:
            made.append(ReLU() if kind == "relu" else Flatten())
    return Sequential(*made)


def _layer_meta(layers):
    """The architecture as JSON: one dict per layer, with the name its parameters use."""
    out = []
    for i, spec in enumerate(layers):
        if spec[0] == "linear":
            out.append({"name": str(i), "type": "linear", "in": spec[1], "out": spec[2]})
        elif spec[0] == "conv":
            out.append({"name": str(i), "type": "conv2d", "in_channels": spec[1], "out_channels": spec[2],
                        "kernel_size": spec[3], "stride": spec[4], "padding": spec[5]})
        else:
            out.append({"name": str(i), "type": spec[0]})
    return out


def dress_step_tensors(model, x, y, levels=LEVELS, lambdas=LAMBDAS, lr=LR) -> dict:
    """Run one joint DRESS step and one SGD step on ``model``; return every tensor by name
    (names relative to one network; see docs/golden-format.md)."""
    t = {"x": x, "y": y}
    t.update({f"param/{k}": v.copy() for k, v in model.parameters().items()})
    dress = Dress(model, levels=levels, lambdas=lambdas, dense_first_last=False)
    t["levels"], t["lambdas"] = np.array(dress.levels), dress.lambdas
    for name, layer in dress.layers.items():
        t[f"ranks/{name}"] = layer.buffers["ranks"].copy()
    total, _, grads = dress.joint_step(model, x, y)
    for k, d in enumerate(dress.levels):
        dress.use(d, level=k)
        for name, layer in dress.layers.items():
            t[f"mask/{k}/{name}"] = layer.mask.astype(np.uint8)
        t[f"logits/{k}"] = model.forward(x)
    t["loss"] = dress.last_losses.copy()
    t["total_loss"] = np.array(total)
    for name, g in grads.items():
        t[f"grad/{name}"] = g
        t[f"param_after/{name}"] = t[f"param/{name}"] - lr * g
    return t


def golden_tensors(seed=0) -> tuple[dict, dict]:
    """All arrays (prefixed ``mlp/`` and ``cnn/``) and the metadata of the golden file."""
    arrays, meta = {}, {"levels": list(LEVELS), "lambdas": LAMBDAS, "lr": LR, "seed": seed,
                        "networks": {}}
    for i, (net, (x_shape, layers)) in enumerate(_architectures().items()):
        rng = np.random.default_rng([seed, i])
        model = _build(layers, rng)
        for name, p in model.parameters().items():
            if name.endswith("bias"):      # non-zero biases, so their gradients mean something
                p[...] = rng.standard_normal(p.shape) * 0.1
        x = rng.standard_normal(x_shape)
        y = rng.integers(0, 4, x_shape[0])
        arrays.update({f"{net}/{k}": v for k, v in dress_step_tensors(model, x, y).items()})
        meta["networks"][net] = {"layers": _layer_meta(layers), "input_shape": list(x_shape)}
    return arrays, meta


def write_golden(path, seed=0):
    arrays, meta = golden_tensors(seed)
    meta["description"] = ("one joint DRESS step and one SGD step (no momentum, no weight decay) "
                           "on two tiny float64 networks; see docs/golden-format.md")
    return write_archive(path, arrays, meta, GOLDEN_KIND, GOLDEN_VERSION)


def check_golden(path) -> dict[str, float]:
    """Recompute every tensor from the file's inputs and weights; max abs difference per name.

    Raises ``ValueError`` if the file's tensors do not match the recomputation's names/shapes.
    """
    stored, meta = read_archive(path, GOLDEN_KIND, {GOLDEN_VERSION})
    diffs = {}
    for net, info in meta["networks"].items():
        layers = [(_spec_from_meta(l)) for l in info["layers"]]
        model = _build(layers, np.random.default_rng(0))
        model.load_state({k[len(f"{net}/param/"):]: v for k, v in stored.items()
                          if k.startswith(f"{net}/param/")})
        fresh = dress_step_tensors(model, stored[f"{net}/x"], stored[f"{net}/y"],
                                   tuple(meta["levels"]), meta["lambdas"], meta["lr"])
        for k, v in fresh.items():
            name = f"{net}/{k}"
            if name not in stored or stored[name].shape != np.shape(v):
                raise ValueError(f"{path}: tensor {name} is missing or has the wrong shape")
            diffs[name] = float(np.max(np.abs(stored[name].astype(np.float64) - np.asarray(v, np.float64)), initial=0.0))
    return diffs


def _spec_from_meta(layer):
    if layer["type"] == "linear":
        return ("linear", layer["in"], layer["out"])
    if layer["type"] == "conv2d":
        return ("conv", layer["in_channels"], layer["out_channels"], layer["kernel_size"],
                layer["stride"], layer["padding"])
    return (layer["type"],)

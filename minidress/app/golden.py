"""Golden vectors: every tensor of one DRESS step, for cross-checking other implementations.

``write_golden(path)`` runs one joint DRESS step (then one plain SGD step) on two tiny, fixed,
float64 networks and stores every input, weight, rank, mask, logit, loss and gradient in a
versioned archive (``minidress.checkpoint`` format, kind ``minidress.app.golden``).
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

from ..checkpoint import read_archive, write_archive
from ..dress import Dress
from ..nn.models import build_model

GOLDEN_KIND = "minidress.golden"
GOLDEN_VERSION = 1
LEVELS = (1.0, 0.5, 0.25)
LAMBDAS = "density"
LR = 0.1


def _linear(i, n_in, n_out):
    return {"name": str(i), "type": "linear", "in": n_in, "out": n_out}


def _conv(i, c_in, c_out, k, stride, padding):
    return {"name": str(i), "type": "conv2d", "in_channels": c_in, "out_channels": c_out,
            "kernel_size": k, "stride": stride, "padding": padding}


def _architectures():
    """Each network's input shape and layers, in the model-spec format of
    ``minidress.nn.models.build_model`` (which is also the file's metadata)."""
    return {
        "mlp": ((7, 12), [_linear(0, 12, 10), {"name": "1", "type": "relu"}, _linear(2, 10, 8),
                          {"name": "3", "type": "relu"}, _linear(4, 8, 4)]),
        "cnn": ((5, 2, 6, 6), [_conv(0, 2, 3, 3, 1, 1), {"name": "1", "type": "relu"},
                               _conv(2, 3, 4, 3, 2, 1), {"name": "3", "type": "relu"},
                               {"name": "4", "type": "flatten"}, _linear(5, 36, 4)]),
    }


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
        model = build_model({"layers": layers}, dtype=np.float64, rng=rng)
        for name, p in model.parameters().items():
            if name.endswith("bias"):      # non-zero biases, so their gradients mean something
                p[...] = rng.standard_normal(p.shape) * 0.1
        x = rng.standard_normal(x_shape)
        y = rng.integers(0, 4, x_shape[0])
        arrays.update({f"{net}/{k}": v for k, v in dress_step_tensors(model, x, y).items()})
        meta["networks"][net] = {"layers": layers, "input_shape": list(x_shape)}
    return arrays, meta


def write_golden(path, seed=0):
    arrays, meta = golden_tensors(seed)
    meta["description"] = ("one joint DRESS step and one SGD step (no momentum, no weight decay) "
                           "on two tiny float64 networks; see docs/golden-format.md")
    return write_archive(path, arrays, meta, GOLDEN_KIND, GOLDEN_VERSION)


def check_golden(path, n_show=5) -> dict[str, dict]:
    """Recompute every tensor from the file's inputs and weights and compare, as llm.c's
    ``check_tensor`` does.

    Returns, per tensor name, ``{"max_diff": float, "first": [(index, ours, theirs), ...]}``:
    the largest absolute difference (NaN if either side holds a NaN where the other does not,
    so that a NaN never passes) and the first ``n_show`` entries in C order, each as
    (flat index, our value, the file's value). Raises ``ValueError`` if the file's tensors do
    not match the recomputation's names or shapes.
    """
    stored, meta = read_archive(path, GOLDEN_KIND, {GOLDEN_VERSION})
    report = {}
    for net, info in meta["networks"].items():
        model = build_model({"layers": info["layers"]}, dtype=np.float64)
        model.load_state({k[len(f"{net}/param/"):]: v for k, v in stored.items()
                          if k.startswith(f"{net}/param/")})
        fresh = dress_step_tensors(model, stored[f"{net}/x"], stored[f"{net}/y"],
                                   tuple(meta["levels"]), meta["lambdas"], meta["lr"])
        for k, v in fresh.items():
            name = f"{net}/{k}"
            if name not in stored or stored[name].shape != np.shape(v):
                raise ValueError(f"{path}: tensor {name} is missing or has the wrong shape")
            report[name] = compare_tensors(np.asarray(v, np.float64), stored[name].astype(np.float64), n_show)
    return report


def compare_tensors(ours, theirs, n_show=5) -> dict:
    """``{"max_diff", "first"}`` of two arrays of one shape (see ``check_golden``)."""
    diff = np.abs(ours - theirs).ravel()
    nan_mismatch = np.isnan(ours).ravel() != np.isnan(theirs).ravel()
    worst = float(np.nan) if nan_mismatch.any() or np.isnan(diff).any() else float(np.max(diff, initial=0.0))
    first = [(i, float(ours.flat[i]), float(theirs.flat[i])) for i in range(min(n_show, ours.size))]
    return {"max_diff": worst, "first": first}

"""What every pruning family shares: projections onto a sparsity set, masks kept as buffers, a
step counter, a penalised training step, and the accounting (density, MACs, stored bytes).

A *pruner* wraps a model (usually the pre-trained dense backbone, modified in place) and offers

* ``step(model, xb, yb) -> (loss, n_correct, grads)``: one training step, the ``step`` seam of
  ``minidress.nn.train.fit``, so every family trains through the same loop as DRESS;
* ``save(path)`` / ``load(path)``: a minidress checkpoint of the whole state;
* after training, a network whose sparsified layers compute ``weight * mask``.

State that must survive a checkpoint lives in the model (as ``torch.nn.utils.prune`` keeps
``weight_mask`` as a buffer): each sparsified layer's ``buffers["prune_mask"]`` (0/1, the
weight's dtype), which *is* the array ``layer.mask`` points to, so loading a state in place also
restores the mask; anything else a family needs (ADMM's ``Z`` and ``U``, the lottery ticket's
rewind point) in further buffers; the step counter in ``model.buffers["prune_step"]``. Every
phase change is a function of that counter, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json

import numpy as np

from ..checkpoint import load_checkpoint, save_checkpoint
from ..dress import sparsifiable_layers
from ..kernels import index_dtype
from ..masks import layerwise_topk_mask, row_topk_mask
from ..nn.layers import BatchNorm
from ..nn.losses import softmax_cross_entropy
from ..nn.metrics import macs
from ..nn.train import StepCounter, evaluate, predict_logits
from ..validate import check_int

# "row": DRESS's row-balanced set (every row keeps n_kept(d, row_len)); "layer": unstructured
# top-k over the whole layer.
PROJECTIONS = ("row", "layer")


def check_projection(projection, name="projection") -> str:
    if projection not in PROJECTIONS:
        raise ValueError(f"{name} must be one of {PROJECTIONS}, got {projection!r}")
    return projection


def projection_mask(weight, density, projection="row", importance_scores=None) -> np.ndarray:
    """Bool mask of the Euclidean projection of ``weight`` onto the sparsity set.

    Keeping the largest ``|w|`` is the projection: ``||W - Z||^2`` over every ``Z`` with the
    allowed support is smallest when the support holds the largest entries (the dropped
    entries' squares are all that remains).

    Parameters
    ----------
    weight : ndarray [rows, ...]
    density : float in (0, 1]
    projection : "row" (every row keeps ``n_kept(density, row_len)``) or "layer" (the layer keeps
        ``n_kept(density, size)``)
    importance_scores : ndarray, weight's shape, optional (default ``|weight|``)

    Returns
    -------
    mask : bool ndarray, weight's shape
    """
    rule = row_topk_mask if check_projection(projection) == "row" else layerwise_topk_mask
    return rule(weight, density, importance_scores)


def project(weight, density, projection="row") -> np.ndarray:
    """``proj_S(weight)``: the weight with everything outside the projection's mask set to 0."""
    return weight * projection_mask(weight, density, projection)


def surviving_scores(weight, mask) -> np.ndarray:
    """Importance ``|weight|`` where ``mask`` keeps, -1 where it prunes: a top-k of these never
    revives a pruned weight while survivors remain (iterative pruning prunes the survivors)."""
    return np.where(np.asarray(mask) != 0, np.abs(weight), -1.0)


def batch_accuracy(logits, y) -> int:
    return int((logits.argmax(axis=1) == y).sum())


def penalised_step(model, xb, yb, penalty_grads=None, loss_fn=softmax_cross_entropy):
    """One forward and backward pass with ``loss_fn``, plus extra gradient terms.

    Parameters
    ----------
    model : minidress.nn.layers.Layer
    xb : ndarray [N, ...];  yb : int ndarray [N]
    penalty_grads : callable ``() -> (penalty, {param name: gradient})`` or None; evaluated
        after the backward pass, its gradients are added to the loss's
    loss_fn : ``(logits, y) -> (loss, dlogits)``

    Returns
    -------
    loss : float (the data loss plus the penalty);  n_correct : int;  grads : dict[str, ndarray]
    """
    logits = model.forward(xb)
    loss, dlogits = loss_fn(logits, yb)
    model.backward(dlogits, input_grad=False)
    grads = model.gradients()
    if penalty_grads is not None:
        penalty, extra = penalty_grads()
        loss += penalty
        for name, g in extra.items():
            grads[name] = grads[name] + g
    return float(loss), batch_accuracy(logits, yb), grads


class Pruner(StepCounter):
    """Base class of the pruning families; see the module docstring.

    Subclasses set ``kind`` (stored in checkpoints), define ``options()`` and ``step``, and call
    ``_setup(model, dense_first_last)`` first in ``__init__``.

    Attributes
    ----------
    model : minidress.nn.layers.Sequential, what ``fit`` trains
    layers : dict name -> Linear/Conv2d, the sparsified layers (DRESS's, ``sparsifiable_layers``)
    batchnorms : list of BatchNorm
    """

    kind = "pruner"
    counter = "prune_step"

    def _setup(self, model, dense_first_last):
        self.model = model
        self.dense_first_last = bool(dense_first_last)
        self.layers = sparsifiable_layers(model, self.dense_first_last)
        self.batchnorms = [m for _, m in model.named_layers() if isinstance(m, BatchNorm)]
        self._start_counter()
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.buffers.setdefault("prune_mask", np.ones_like(w))
            layer.mask = layer.buffers["prune_mask"]     # the same array: loads restore it

    # -- masks -----------------------------------------------------------------------------------
    def masks(self) -> dict:
        """``{layer name: mask}`` (the buffers themselves, 0/1 in the weight's dtype)."""
        return {name: layer.buffers["prune_mask"] for name, layer in self.layers.items()}

    def set_masks(self, masks: dict) -> None:
        """Copy ``{layer name: bool or 0/1 array}`` into the mask buffers, in place."""
        for name, m in masks.items():
            self.layers[name].buffers["prune_mask"][...] = m

    def density(self) -> float:
        """Kept fraction of the sparsified layers' weights, all layers together."""
        kept = sum(int(np.count_nonzero(m)) for m in self.masks().values())
        return kept / sum(m.size for m in self.masks().values())

    def layer_densities(self) -> dict:
        return {n: float(np.count_nonzero(m)) / m.size for n, m in self.masks().items()}

    def row_balanced(self) -> bool:
        """True if every row of every sparsified layer keeps the same number of weights (then a
        row-balanced store, as ``minidress.deploy`` serves, holds the network without padding)."""
        for m in self.masks().values():
            counts = np.count_nonzero(m.reshape(len(m), -1), axis=1)
            if counts.min() != counts.max():
                return False
        return True

    # -- what the result costs -------------------------------------------------------------------
    def evaluate(self, x, y):
        """``(loss, accuracy)`` of the network as it now computes, on ``(x, y)``."""
        return evaluate(self.model, x, y)

    def predict(self, x) -> np.ndarray:
        """Predicted classes ``[N]`` (eval mode)."""
        return predict_logits(self.model, x).argmax(axis=1)

    def macs(self, input_shape) -> int:
        """Multiply-accumulates per sample, counting only kept weights."""
        return macs(self.model, input_shape)

    def stored_bytes(self, layout=None) -> int:
        """Bytes to deploy the pruned network: see ``stored_bytes``; ``layout`` defaults to
        "rows" when the masks are row-balanced, else "csr"."""
        layout = layout or ("rows" if self.row_balanced() else "csr")
        return stored_bytes(self.model, self.layers, layout)

    # -- files -----------------------------------------------------------------------------------
    def options(self) -> dict:
        raise NotImplementedError

    def step(self, model, xb, yb):
        raise NotImplementedError

    def finish(self):
        """Bring the network to its final form after ``fit`` (a family whose last step leaves
        something pending overrides this); returns self."""
        return self

    def save(self, path, meta=None):
        """Write the pruner's state (parameters, buffers, step counter) and options atomically."""
        return save_checkpoint(path, self.model, meta={**(meta or {}), "pruner": self.kind,
                                                       "options": _jsonable(self.options())})

    def load(self, path):
        """Load a checkpoint written by ``save`` (or by ``fit`` on ``self.model``) into this
        pruner, which must be of the same kind and options; returns the checkpoint's metadata."""
        meta = load_checkpoint(path)
        if meta.get("pruner", self.kind) != self.kind:
            raise ValueError(f"{path}: holds a {meta['pruner']!r} pruner, not a {self.kind!r}")
        stored, own = meta.get("options"), _jsonable(self.options())
        if stored is not None and stored != own:
            diff = sorted(k for k in set(stored) | set(own) if stored.get(k) != own.get(k))
            raise ValueError(f"{path}: options differ from this {self.kind}'s: "
                             + ", ".join(f"{k}: file {stored.get(k)!r}, here {own.get(k)!r}" for k in diff))
        self.model.load_state(meta["model_state"])
        return meta


def _jsonable(options: dict) -> dict:
    return json.loads(json.dumps(options))


LAYOUTS = ("dense", "rows", "csr")
# Training-only state: never deployed.
_TRAINING_ONLY = ("prune_mask", "admm_z", "admm_u", "prune_step")


def stored_bytes(model, sparse_layers: dict, layout="rows", weights=None) -> int:
    """Bytes of one deployed network, with the conventions of ``Store.accounting``.

    Every floating-point parameter and running statistic outside ``sparse_layers`` is stored
    dense. A sparsified layer's weight (mask = ``layer.mask``, or ``weights[name]`` if given) is

    * "dense": every entry;
    * "rows": ``rows x k`` values and column indices (the narrowest unsigned type), ``k`` the
      longest row, so every row is padded to it (no padding when rows are balanced); a row of
      full length is stored dense;
    * "csr": ``nnz`` values with int32 column indices, and ``rows + 1`` int32 row pointers.

    Training-only buffers (masks, ADMM's Z and U, rewind points, counters) are not counted.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sparse_ids = {id(layer) for layer in sparse_layers.values()}
    total = 0
    for _, layer in model.named_layers():
        for key, a in {**layer.params, **layer.buffers}.items():
            if a.dtype.kind != "f" or key in _TRAINING_ONLY or key.startswith("rewind_"):
                continue
            if key == "weight" and id(layer) in sparse_ids:
                total += _weight_bytes(a, layer.mask, layout)
            else:
                total += a.nbytes
    return int(total)


def _weight_bytes(w, mask, layout):
    rows, row_len = w.shape[0], w.size // w.shape[0]
    if mask is None or layout == "dense":
        return w.nbytes
    counts = np.count_nonzero(np.asarray(mask).reshape(rows, -1), axis=1)
    if layout == "csr":
        return int(counts.sum()) * (w.itemsize + 4) + (rows + 1) * 4
    k = int(counts.max())
    return w.nbytes if k == row_len else rows * k * (w.itemsize + index_dtype(row_len).itemsize)


def check_steps(value, name, minimum=0) -> int:
    return check_int(value, name, minimum)


__all__ = ["PROJECTIONS", "LAYOUTS", "Pruner", "projection_mask", "project", "penalised_step",
           "stored_bytes", "surviving_scores"]

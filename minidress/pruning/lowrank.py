"""Compression-aware training: a low-rank regulariser, then truncation and ``W = U V``.

Source: J. M. Alvarez, M. Salzmann, "Compression-aware Training of Deep Networks", NeurIPS 2017.
We know its published description (a nuclear-norm regulariser per layer, optimised with a
proximal step, so that the trained layers have low rank and truncate with little loss); no code
was copied.

The method
----------
Training minimises ``f(W) + tau * sum_l ||W_l||_*`` (nuclear norm: the sum of singular values of
the layer as a matrix ``[rows, row_len]``, a Conv's ``[C_out, C_in*kh*kw]``) by proximal
gradient: an SGD step on ``f``, then the prox of the nuclear norm with threshold
``lr_t * tau``, which is singular-value soft-thresholding (``svt``)::

    prox(W) = argmin_X 1/2 ||X - W||_F^2 + lr_t tau ||X||_*  =  P diag(max(s - lr_t tau, 0)) Q^T

for ``W = P diag(s) Q^T``. Then each layer is truncated to rank ``r`` (``truncate``) and factored
as ``W = U V`` (``U [rows, r]``, ``V [r, row_len]``; ``factorized_model`` builds the network of
two thin layers: a Conv ``C_in -> r`` with the original kernel, then a 1x1 Conv ``r -> C_out``).

``row_density`` (an option, our combination): the same regulariser, and then DRESS's row
sparsity instead of the truncation: the network is pruned row-wise at ``row_density`` and
retrained with the mask, so the result is row-balanced (a row-sparse store can serve it).

What we chose
-------------
* Layers: DRESS's (``sparsifiable_layers``); one ``tau`` for every layer.
* The rank for a density ``d``: ``r = max(1, floor(d * rows * row_len / (rows + row_len)))``,
  so that the factors hold no more than ``d`` of the layer's weights (and, for a Conv, cost no
  more than ``d`` of its MACs: both factors run at the output's positions). The description
  truncates at an energy threshold; we truncate at the budget, to compare at equal size.
* Phases: ``prox_steps`` proximal steps, then the rest of the budget projected onto rank ``r``
  after every step (projected SGD: retraining at the truncated rank), or, with ``row_density``,
  masked retraining.
* The prox (or the projection) of step ``t`` is applied at the start of step ``t + 1`` (the
  ``step`` seam runs before the optimizer's update), and that of the last step by ``finish()``.
  The threshold uses ``lr_t`` from the same schedule ``fit`` gets (``schedule``, ``lr``,
  ``total_steps``): with momentum, the prox after a momentum step is the usual heuristic.
"""
from __future__ import annotations

import copy

import numpy as np

from ..masks import check_density, row_topk_mask
from ..nn.layers import Conv2d, Linear, Sequential
from ..nn.optim import make_schedule
from ..validate import check_number
from .common import Pruner, check_steps, penalised_step

SCHEDULES = ("cosine", "constant")


def as_matrix(weight) -> np.ndarray:
    """The layer as a matrix ``[rows, row_len]`` (a view)."""
    return weight.reshape(weight.shape[0], -1)


def svt(matrix, threshold):
    """Singular-value soft-thresholding: the prox of ``threshold * ||.||_*`` at ``matrix``.

    Parameters
    ----------
    matrix : ndarray [m, n];  threshold : float >= 0

    Returns
    -------
    x : ndarray [m, n], ``argmin_X 1/2 ||X - matrix||_F^2 + threshold ||X||_*``
    s : ndarray [min(m, n)], the new singular values ``max(s - threshold, 0)``
    """
    p, s, qt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    s = np.maximum(s - threshold, 0.0)
    return ((p * s) @ qt).astype(matrix.dtype), s


def truncate(matrix, rank):
    """Best rank-``rank`` approximation (Eckart-Young) and its balanced factors.

    Returns
    -------
    x : ndarray [m, n] = u @ v;  u : ndarray [m, rank];  v : ndarray [rank, n]
    """
    p, s, qt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    u, v = p[:, :rank] * root, root[:, None] * qt[:rank]
    return (u @ v).astype(matrix.dtype), u.astype(matrix.dtype), v.astype(matrix.dtype)


def rank_for_density(shape, density) -> int:
    """``max(1, floor(d * m * n / (m + n)))`` for a layer of ``m`` rows of ``n``, capped at
    ``min(m, n)``: the largest rank whose factors hold at most ``d`` of the weights."""
    m, n = shape[0], int(np.prod(shape[1:]))
    return int(min(min(m, n), max(1, np.floor(check_density(density) * m * n / (m + n)))))


def nuclear_norm(matrix) -> float:
    return float(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False).sum())


class CompressionAware(Pruner):
    """Compression-aware training of ``model`` (modified in place; a step counter, masks).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    density : float in (0, 1]; the truncation rank of every sparsified layer is
        ``rank_for_density(shape, density)`` (ignored with ``row_density``)
    tau : float >= 0, the weight of the nuclear norms
    prox_steps : int >= 0, proximal steps before the truncated (or masked) retraining
    lr, total_steps, schedule : the learning rate ``fit`` uses ("cosine" over ``total_steps``
        from ``lr``, as ``train_phase`` makes it, or "constant"), for the prox threshold
    row_density : None, or a density: row-wise pruning instead of the truncation
    dense_first_last : bool

    Attributes
    ----------
    ranks : dict layer name -> int (the truncation ranks; the full rank with ``row_density``)
    """

    kind = "compression_aware"

    def __init__(self, model, density, tau, prox_steps, lr, total_steps, schedule="cosine",
                 row_density=None, dense_first_last=True):
        self.density_target = check_density(density)
        self.tau = check_number("tau", tau, ">= 0", lambda v: v >= 0)
        self.prox_steps = check_steps(prox_steps, "prox_steps")
        self.lr = check_number("lr", lr, "> 0", lambda v: v > 0)
        self.total_steps = check_steps(total_steps, "total_steps", 1)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.row_density = None if row_density is None else check_density(row_density, "row_density")
        self._lr_at = make_schedule(schedule, self.lr, self.total_steps)
        self._setup(model, dense_first_last)
        self.ranks = {n: (min(as_matrix(l.params["weight"]).shape) if self.row_density
                          else rank_for_density(l.params["weight"].shape, self.density_target))
                      for n, l in self.layers.items()}

    def options(self) -> dict:
        return {"density": self.density_target, "tau": self.tau, "prox_steps": self.prox_steps,
                "lr": self.lr, "total_steps": self.total_steps, "schedule": self.schedule,
                "row_density": self.row_density, "dense_first_last": self.dense_first_last}

    def singular_values(self) -> dict:
        """``{layer name: singular values [min(rows, row_len)]}`` of the current weights."""
        return {n: np.linalg.svd(as_matrix(l.params["weight"]).astype(np.float64), compute_uv=False)
                for n, l in self.layers.items()}

    def _after(self, t):
        """What follows the optimizer's update of step ``t``: the prox, or the projection."""
        for name, layer in self.layers.items():
            w = as_matrix(layer.params["weight"])
            if t < self.prox_steps:
                w[...] = svt(w, self._lr_at(t) * self.tau)[0]
            elif self.row_density is None:
                w[...] = truncate(w, self.ranks[name])[0]

    def step(self, model, xb, yb):
        """One step (``fit``'s signature): first the prox (or projection) owed to the previous
        step's update; at ``prox_steps``, the row mask if ``row_density``; then a plain pass."""
        t = self._advance()
        if t > 0:
            self._after(t - 1)
        if t == self.prox_steps and self.row_density is not None:
            self._mask_rows()
        return penalised_step(model, xb, yb)

    def _mask_rows(self):
        """DRESS's row mask at ``row_density`` of the current (regularised) weights."""
        self.set_masks({n: row_topk_mask(l.params["weight"], self.row_density)
                        for n, l in self.layers.items()})

    def finish(self):
        """After ``fit``: the last step's prox or projection; the truncation (or the row mask)
        if the run ended inside the proximal phase."""
        t = self.steps_done
        if t > 0:
            self._after(t - 1)
        if t <= self.prox_steps:
            if self.row_density is not None:
                self._mask_rows()
            else:
                for name, layer in self.layers.items():
                    w = as_matrix(layer.params["weight"])
                    w[...] = truncate(w, self.ranks[name])[0]
        return self

    def factor_parameters(self) -> int:
        """Parameters of the factored network: ``r (rows + row_len)`` per truncated layer
        (its dense size where ``r`` is the full rank), every other parameter as it is."""
        total = 0
        for _, layer in self.model.named_layers():
            for key, p in layer.params.items():
                name = next((n for n, l in self.layers.items() if l is layer), None)
                if key == "weight" and name is not None and self.row_density is None:
                    m, n = as_matrix(p).shape
                    r = self.ranks[name]
                    total += p.size if r == min(m, n) else r * (m + n)
                else:
                    total += p.size
        return total

    def factorized(self) -> Sequential:
        """The network of thin layers ``W = U V`` (``factorized_model`` at ``self.ranks``)."""
        if self.row_density is not None:
            raise ValueError("factorized needs the truncated network; this run used row_density "
                             f"= {self.row_density} (row sparsity, no truncation)")
        return factorized_model(self.model, {n: r for n, r in self.ranks.items()
                                             if r < min(as_matrix(self.layers[n].params["weight"]).shape)})


def factorized_model(model, ranks: dict) -> Sequential:
    """A copy of the flat ``Sequential`` ``model`` with each layer named in ``ranks`` replaced
    by two thin layers ``V`` then ``U`` from the rank-``r`` truncation of its weight.

    Linear ``[out, in]`` -> Linear ``in -> r`` (no bias), Linear ``r -> out`` (the bias);
    Conv ``[C_out, C_in, k, k]`` -> Conv ``C_in -> r`` (kernel k, the stride and padding, no bias),
    Conv 1x1 ``r -> C_out`` (the bias). Masks are applied before the factorisation.
    """
    if not isinstance(model, Sequential):
        raise ValueError(f"factorized_model needs a flat Sequential, got {type(model).__name__}")
    unknown = sorted(set(ranks) - {str(i) for i in range(len(model))})
    if unknown:
        raise ValueError(f"ranks names layers {unknown} that are not top-level layers of the model")
    layers = []
    for i, layer in enumerate(model.layers):
        if str(i) not in ranks:
            layers.append(copy.deepcopy(layer))
            continue
        w = layer.params["weight"] if layer.mask is None else layer.params["weight"] * layer.mask
        r = int(ranks[str(i)])
        _, u, v = truncate(as_matrix(w), r)
        bias = "bias" in layer.params
        if isinstance(layer, Linear):
            first, second = Linear(w.shape[1], r, dtype=w.dtype, bias=False), Linear(r, w.shape[0], dtype=w.dtype, bias=bias)
        elif isinstance(layer, Conv2d):
            first = Conv2d(w.shape[1], r, layer.kernel_size, layer.stride, layer.padding, dtype=w.dtype, bias=False)
            second = Conv2d(r, w.shape[0], 1, dtype=w.dtype, bias=bias)
        else:
            raise ValueError(f"layer {i} is a {type(layer).__name__}; only Linear and Conv2d factor")
        first.params["weight"][...] = v.reshape(first.params["weight"].shape)
        second.params["weight"][...] = u.reshape(second.params["weight"].shape)
        if bias:
            second.params["bias"][...] = layer.params["bias"]
        layers.append(Sequential(first, second))
    return Sequential(*layers)

"""US-Nets: universally slimmable networks, sub-networks by width (a prefix of every layer's units).

Sources: J. Yu, L. Yang, N. Xu, J. Yang, T. Huang, "Slimmable Neural Networks", ICLR 2019
(arXiv:1812.08928), and J. Yu, T. Huang, "Universally Slimmable Networks and Improved Training
Techniques", ICCV 2019 (arXiv:1903.05134). A width-``w`` sub-network keeps the first
``w`` fraction of the output units (neurons, channels) of every layer; the input of the network
and the classes it predicts stay whole. Slimmable networks train a fixed set of widths with a
private batch norm per width ("switchable batch norm"); US-Nets run at *any* width in a range
and train with two techniques:

* the **sandwich rule**: every step trains the largest width, the smallest width and ``n - 2``
  widths drawn at random in between, and sums their gradients;
* **in-place distillation**: the largest width learns from the labels; every other width learns
  from the largest width's predictions of the same batch (soft targets, no gradient into them);

and, since a batch norm per width is impossible for arbitrary widths, they compute a width's
batch-norm statistics after training from training data.

What we chose
-------------
* ``n`` (widths per step) = the number of DRESS levels K (4 by default), so a US-Nets step costs
  exactly as many forward/backward passes as a DRESS step.
* The width range ``[width_min, 1]``: the comparison compares at matched MACs, so it sets
  ``width_min`` to the width whose MACs match DRESS's sparsest evaluated density
  (``width_for_macs``), not to a fixed 0.25.
* Units kept at width ``w``: ``n_kept(w, C) = max(1, floor(w * C + 0.5))`` of a layer's ``C``
  output units (``minidress.masks.n_kept``, DRESS's rounding). A tensor of ``C`` channels
  always keeps the same prefix, so the two branches of a residual sum always agree.
* Batch norm: one shared set of affine parameters (as US-Nets) trained by every width; every
  evaluation recalibrates the running statistics for its width
  (``minidress.dress.recalibrate_batchnorm``, ``RunConfig.recalibrate_batches`` batches).
* Distillation loss: soft-target cross-entropy, ``-mean_n sum_c p_teacher[n, c] *
  log_softmax(z)[n, c]``, with the teacher's softmax taken from the widest width's training-mode
  logits of this step (``soft_cross_entropy_forward``/``_backward``, checked by central
  differences and against PyTorch).
* **Masks, not slicing.** A width is computed by the ``mask`` of every Linear/Conv2d: zero the
  rows of the inactive output units and the input columns that read inactive units of the
  layer before (``WidthPlan``). Slicing would run faster in NumPy, but masks keep every peer on
  the same layers and the same code path (so wall times compare methods, not two
  implementations), and batch norm, residual blocks, checkpoints and ``metrics.macs`` work
  unchanged. ``metrics.macs`` counts the kept weights, which for these block masks is exactly
  the MACs of the sliced network (``tests/test_baselines.py`` checks both the outputs and the
  MACs against a narrower network built and loaded by slicing).

Why the masked network equals the sliced one: an inactive unit's row is masked, so its
pre-activation is its bias (zero without one); a batch norm may shift it and a ReLU pass it on,
but every layer reading that unit has the column masked, so it never reaches an active unit;
residual sums add inactive channels only to inactive channels.
"""
from __future__ import annotations

import numpy as np

from ..nn.layers import Conv2d, Flatten, Linear, eval_mode
from ..nn.losses import log_softmax, softmax_cross_entropy
from ..masks import check_density, n_kept
from ..nn.metrics import macs
from ..validate import check_int
from .common import Peer, batchnorms_of, check_seed, forget_recalibration, step_rng


# ---------------------------------------------------------------------------------------------
# In-place distillation: cross-entropy against soft targets
# ---------------------------------------------------------------------------------------------

def soft_cross_entropy_forward(logits, targets):
    """Mean cross-entropy of ``softmax(logits)`` against target distributions.

    Parameters
    ----------
    logits : ndarray [N, C]
    targets : ndarray [N, C], rows are probability distributions (the teacher's softmax)

    Returns
    -------
    loss : float, ``-mean_n sum_c targets[n, c] * log_softmax(logits)[n, c]``
    cache : tuple for ``soft_cross_entropy_backward``
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits and targets must both be [N, C] of the same shape, got "
                         f"{logits.shape} and {np.shape(targets)}")
    if targets.dtype != logits.dtype:
        raise TypeError(f"targets must have the logits' dtype {logits.dtype}, got {targets.dtype}")
    logp = log_softmax(logits)
    loss = -(targets * logp).sum() / len(logits)
    return float(loss), (logp, targets)


def soft_cross_entropy_backward(dloss, cache):
    """``dloss`` (scalar) -> ``dlogits [N, C], dtargets [N, C]``.

    ``dlogits = dloss * (softmax(logits) * sum_c targets - targets) / N``, which is the familiar
    ``(softmax - targets) / N`` when every target row sums to 1; ``dtargets = -dloss * log_softmax
    (logits) / N`` (unused in training: the teacher gets no gradient).
    """
    logp, targets = cache
    n = len(logp)
    scale = logp.dtype.type(dloss / n)
    dlogits = (np.exp(logp) * targets.sum(axis=1, keepdims=True) - targets) * scale
    return dlogits, -logp * scale


# ---------------------------------------------------------------------------------------------
# Widths as masks
# ---------------------------------------------------------------------------------------------

class WidthPlan:
    """How every Linear/Conv2d of ``model`` shrinks with the width multiplier.

    Parameters
    ----------
    model : minidress.nn.layers.Layer
    input_shape : tuple, one sample's shape (``(C, H, W)`` or ``(features,)``)

    One eval-mode forward pass on zeros tells each ``Flatten`` the shape it flattens, so that a
    Linear reading a flattened ``[C, H, W]`` map knows that its columns come in ``C`` groups of
    ``H*W`` (channel-major; the active channels' columns are then a prefix). The first
    Linear/Conv2d reads the input (kept whole); the last is the classifier (its outputs kept
    whole).
    """

    def __init__(self, model, input_shape):
        self.model, self.input_shape = model, tuple(input_shape)
        w0 = next(iter(model.parameters().values()))
        with eval_mode(model):
            model.forward(np.zeros((1, *self.input_shape), w0.dtype))
        self.layers, group = [], 1           # (layer, columns per input unit)
        for _, layer in model.named_layers():
            if isinstance(layer, Flatten):
                group = int(np.prod(layer.shape[2:])) if len(layer.shape) == 4 else 1
            elif isinstance(layer, (Linear, Conv2d)):
                self.layers.append((layer, group if isinstance(layer, Linear) else 1))
                group = 1
        if len(self.layers) < 2:
            raise ValueError("a width plan needs at least two Linear/Conv2d layers (the first reads "
                             "the input, the last predicts the classes)")
        for layer, group in self.layers:
            if isinstance(layer, Linear) and layer.in_features % group:
                raise ValueError(f"{layer!r} reads {layer.in_features} features, not a multiple of the "
                                 f"{group} positions of the map flattened before it")

    def units(self, width) -> list:
        """``(kept output units, kept input units)`` of every Linear/Conv2d, in forward order."""
        w = check_density(width, "width")
        out = []
        for i, (layer, group) in enumerate(self.layers):
            rows, fan_in = layer.params["weight"].shape[:2]
            units_in = fan_in // group
            out.append((rows if i == len(self.layers) - 1 else n_kept(w, rows),
                        units_in if i == 0 else n_kept(w, units_in)))
        return out

    def apply(self, width):
        """Set every Linear/Conv2d's mask to the block of the width-``width`` sub-network."""
        for (layer, group), (rows, units_in) in zip(self.layers, self.units(width)):
            wt = layer.params["weight"]
            mask = np.zeros(wt.shape, wt.dtype)
            mask[:rows, :units_in * group] = 1     # Conv: channels (axis 1); Linear: a column prefix
            layer.mask = mask

    def clear(self):
        for layer, _ in self.layers:
            layer.mask = None

    def macs(self, width) -> int:
        """MACs of one sample through the width-``width`` sub-network (masks are left set)."""
        self.apply(width)
        return macs(self.model, self.input_shape)


def width_for_macs(plan: WidthPlan, target_macs, tol=1e-6) -> float:
    """The largest width whose MACs do not exceed ``target_macs`` (bisection; MACs never fall
    as the width grows). The model's masks are cleared afterwards.

    Raises ValueError if even the narrowest sub-network (one unit per layer) costs more.
    """
    try:
        if plan.macs(1.0) <= target_macs:
            return 1.0
        lo, hi = 0.0, 1.0
        if plan.macs(tol) > target_macs:
            raise ValueError(f"target_macs={target_macs} is below the narrowest sub-network's "
                             f"{plan.macs(tol)} MACs")
        lo = tol
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if plan.macs(mid) <= target_macs else (lo, mid)
        return lo
    finally:
        plan.clear()


# ---------------------------------------------------------------------------------------------
# The peer
# ---------------------------------------------------------------------------------------------

class USNet(Peer):
    """A universally slimmable network on ``model`` (modified in place: shared one-slot batch
    norms, width masks, a step counter).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    input_shape : tuple, one sample's shape
    width_min : float in (0, 1], the narrowest trained width (default 0.25)
    n_per_step : int >= 2, widths trained per step (sandwich rule: widest, narrowest, and
        ``n_per_step - 2`` random ones); default 4
    distill : bool, in-place distillation (else every width learns from the labels)
    seed : int >= 0, seeds the random widths

    Attributes
    ----------
    plan : WidthPlan
    width : float, the width last set by ``use``
    last_widths : list of float, the widths of the last step
    """

    kind = "us_net"
    counter = "us_step"

    def __init__(self, model, input_shape, width_min=0.25, n_per_step=4, distill=True, seed=0):
        self.width_min = check_density(width_min, "width_min")
        self.n_per_step = check_int(n_per_step, "n_per_step", 2)
        self.distill, self.seed = bool(distill), check_seed(seed)
        self.model = self.net = model
        self.batchnorms = batchnorms_of(model)
        self.plan = WidthPlan(model, input_shape)
        self.passes_per_step = self.n_per_step
        self._start_counter()
        self.width, self.last_widths = 1.0, []

    def options(self) -> dict:
        return {"input_shape": list(self.plan.input_shape), "width_min": self.width_min,
                "n_per_step": self.n_per_step, "distill": self.distill, "seed": self.seed}

    def use(self, width):
        """Compute the sub-network of the first ``n_kept(width, C)`` units of every layer."""
        self.plan.apply(width)
        forget_recalibration(self.batchnorms)
        self.width = float(width)
        return self

    def sample_widths(self, step) -> list:
        """The sandwich: widest, narrowest, then ``n_per_step - 2`` uniform in [width_min, 1)."""
        rest = step_rng(self.seed, step).uniform(self.width_min, 1.0, self.n_per_step - 2)
        return [1.0, self.width_min, *map(float, rest)]

    def step(self, model, xb, yb):
        """One US-Nets step (``fit``'s signature): the sandwich of widths, the widest learning
        from the labels and the others from its predictions; gradients summed.

        Returns the summed loss, the correct predictions averaged over the widths, the gradients.
        """
        self.last_widths = self.sample_widths(self._advance())
        total, loss_sum, correct, teacher = {}, 0.0, 0.0, None
        for i, width in enumerate(self.last_widths):
            self.use(width)
            logits = model.forward(xb)
            if teacher is None or not self.distill:
                loss, dlogits = softmax_cross_entropy(logits, yb)
                if teacher is None:
                    teacher = np.exp(log_softmax(logits))     # a constant: no gradient flows into it
            else:
                loss, cache = soft_cross_entropy_forward(logits, teacher)
                dlogits, _ = soft_cross_entropy_backward(1.0, cache)
            model.backward(dlogits, input_grad=False)
            for name, g in model.gradients().items():
                if i == 0:
                    total[name] = g.copy()
                else:
                    total[name] += g
            loss_sum += loss
            correct += (logits.argmax(axis=1) == yb).sum() / len(self.last_widths)
        return loss_sum, float(correct), total

"""LCS+L: a line of networks between two weight sets; position on the line sets the density.

Source: E. Nunez et al., "LCS: Learning Compressible Subspaces for Adaptive Network Compression
at Inference Time", arXiv:2110.04252 (2021), which builds on neural-network subspaces (lines of
networks between trained end points; Wortsman et al., "Learning Neural Network Subspaces",
ICML 2021). The LCS paper's body was not available to us; the recipe below is the one
minidress's issue 5 describes for LCS+L, and every detail it leaves open is marked "we chose".

The recipe
----------
* Two weight sets ``w0`` and ``w1`` (every parameter twice). The network at ``a`` in [0, 1] has
  the weights ``w(a) = (1 - a) * w0 + a * w1``.
* The kept fraction is tied to ``a``: ``d(a) = d_min + (1 - d_min) * a`` (we chose this linear
  map: ``a = 0`` is the sparsest end, ``d_min``; ``a = 1`` the dense end). Masks are the
  layer-wise magnitude top-k of ``w(a)`` (``minidress.masks.layerwise_topk_mask``), in the same
  layers as DRESS (its ``dense_first_last`` and ``dense_layers``, passed on by the comparison).
* Every step draws one ``a`` with biased end-point sampling: with probability ``endpoint_prob``
  (1/2) an end point, 0 or 1 with equal odds, otherwise uniform on [0, 1). One forward and one
  backward of ``w(a)`` per step; the chain rule sends ``(1 - a) * g`` to ``w0`` and ``a * g``
  to ``w1``.
* During the warm-up (``warmup_steps``) the kept fraction decays from dense to ``d(a)``; we chose
  a linear decay in the step number, ``1 - (1 - d(a)) * t / warmup_steps``.
* The subspace regulariser ``beta * cos^2(w0, w1)`` keeps the two ends from collapsing into one
  network. We chose one cosine per Linear/Conv2d weight tensor (the ends of a bias or a
  batch-norm parameter start equal, often all zero, where the cosine says little or is
  undefined), summed, with ``beta = 1``. ``cos2_forward``/``cos2_backward`` hold its
  derivative, checked by central differences and against PyTorch in ``tests/test_baselines.py``.

What else we chose
------------------
* Both ends start from the same weights (in the comparison: the shared pre-trained network).
  At ``w0 == w1`` the regulariser's gradient is exactly zero, but the ends still separate at
  once: ``w0`` gets ``(1 - a)`` of every gradient, ``w1`` gets ``a``.
* One set of batch-norm running statistics; every evaluation recalibrates them for its density.
* Memory: deploying any density needs both ends (the mix depends on the density), so LCS+L
  holds every parameter twice; ``held_bytes`` counts both.
"""
from __future__ import annotations

import numpy as np

from ..dress import DressOptions, sparsifiable_layers
from ..nn.layers import Conv2d, Layer, Linear
from ..masks import check_density, layerwise_topk_mask
from ..nn.train import dense_step
from ..validate import check_int, check_number
from .common import Peer, batchnorms_of, check_seed, forget_recalibration, step_rng
from .lcs_point import DEFAULT_D_MIN, check_d_min, check_dense_layers


# ---------------------------------------------------------------------------------------------
# The subspace regulariser: cos^2 of the angle between the two ends of one weight tensor
# ---------------------------------------------------------------------------------------------

def cos2_forward(w0, w1):
    """Squared cosine similarity of two weight tensors, taken as flat vectors.

    Parameters
    ----------
    w0, w1 : ndarray, same shape and dtype, neither all zero

    Returns
    -------
    out : float, ``(<w0, w1> / (|w0| |w1|))**2`` in [0, 1]
    cache : tuple for ``cos2_backward``
    """
    w0, w1 = np.asarray(w0), np.asarray(w1)
    if w0.shape != w1.shape or w0.dtype != w1.dtype:
        raise ValueError(f"w0 and w1 must have the same shape and dtype, got {w0.shape} {w0.dtype} "
                         f"and {w1.shape} {w1.dtype}")
    n0, n1 = np.linalg.norm(w0), np.linalg.norm(w1)
    if n0 == 0 or n1 == 0:
        raise ValueError("w0 and w1 must not be all zero: the cosine of a zero vector is undefined")
    cos = np.vdot(w0, w1) / (n0 * n1)
    return float(cos * cos), (w0, w1, n0, n1, cos)


def cos2_backward(dout, cache):
    """Gradients of ``cos2_forward``: ``dout`` (a scalar) -> ``dw0, dw1`` (shape of the inputs).

    With ``c = <w0, w1> / (|w0| |w1|)``: ``dc/dw0 = w1 / (|w0| |w1|) - c * w0 / |w0|^2`` (and
    symmetrically for ``w1``), and ``d(c^2) = 2 c dc``.
    """
    w0, w1, n0, n1, cos = cache
    k = w0.dtype.type(2 * dout) * cos
    dw0 = k * (w1 / (n0 * n1) - cos * w0 / (n0 * n0))
    dw1 = k * (w0 / (n0 * n1) - cos * w1 / (n1 * n1))
    return dw0, dw1


# ---------------------------------------------------------------------------------------------
# A network with two ends
# ---------------------------------------------------------------------------------------------


def check_beta(beta) -> float:
    """``beta`` as a float, or a ValueError if it is not a finite number >= 0."""
    return check_number("beta", beta, ">= 0", lambda b: b >= 0)


class LineNet(Layer):
    """Both ends of every parameter of ``net``, as one layer that ``fit`` can train.

    ``parameters()`` are the ends, named ``"end0.<name>"`` and ``"end1.<name>"`` after the
    parameter ``<name>`` of ``net``; ``net`` holds the mixed weights of the point last set by
    ``LCSLine.use`` (derived arrays, neither trained nor saved). ``forward``/``backward`` run
    ``net``; buffers (batch-norm statistics) are ``net``'s, named ``"net.<name>"``.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        for end in (0, 1):
            for name, p in net.parameters().items():
                self.params[f"end{end}.{name}"] = p.copy()

    def children(self):
        return [("net", self.net)]

    def parameters(self):
        return dict(self.params)

    def gradients(self):
        return dict(self.grads)

    def forward(self, x):
        return self.net.forward(x)

    def backward(self, dout, input_grad=True):
        return self.net.backward(dout, input_grad)

    def __repr__(self):
        return f"LineNet(two ends of {self.net!r})"


class LCSLine(Peer):
    """LCS+L on ``model`` (modified in place: shared one-slot batch norms; wrapped in a
    ``LineNet`` whose two ends start as copies of ``model``'s parameters).

    Parameters
    ----------
    model : minidress.nn.layers.Sequential, usually pre-trained dense
    d_min : float in (0, 1), the density at ``a = 0`` (default 0.025)
    beta : float >= 0, weight of the ``cos^2`` regulariser (default 1)
    warmup_steps : int >= 0
    endpoint_prob : float in [0, 1], probability of drawing an end point (default 0.5)
    dense_first_last : bool, keep some layers dense (False: sparsify every layer), as DRESS
    dense_layers : str, which layers stay dense when ``dense_first_last`` holds: "small" or
        "first_last" (``minidress.dress.sparsifiable_layers``); default DRESS's default, and
        the comparison passes DRESS's value
    seed : int >= 0, seeds the ``a`` drawn at every step

    Attributes
    ----------
    model : LineNet (what ``fit`` trains)
    net : the network computing ``w(a)``
    layers : dict name -> Linear/Conv2d, the sparsified layers of ``net``
    weight_names : names (in ``net``) of the Linear/Conv2d weights the regulariser covers
    last_regularizer : float, ``beta * sum cos^2`` of the last step
    """

    kind = "lcs_line"
    counter = "lcs_step"
    before_recorded = {"dense_layers": "first_last"}     # the only rule before it was an option

    def __init__(self, model, d_min=DEFAULT_D_MIN, beta=1.0, warmup_steps=0, endpoint_prob=0.5,
                 dense_first_last=True, dense_layers=DressOptions.dense_layers, seed=0):
        self.d_min = check_d_min(d_min)
        self.beta = check_beta(beta)
        self.endpoint_prob = check_number("endpoint_prob", endpoint_prob, "in [0, 1]",
                                          lambda p: 0.0 <= p <= 1.0)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps")
        self.seed = check_seed(seed)
        self.dense_first_last = bool(dense_first_last)
        self.dense_layers = check_dense_layers(dense_layers)
        self.net = model
        self.layers = sparsifiable_layers(model, self.dense_first_last, self.dense_layers)
        self.batchnorms = batchnorms_of(model)       # before the ends copy the parameters
        self.model = LineNet(model)
        self.weight_names = [f"{name}weight" for name, layer in model.named_layers()
                             if isinstance(layer, (Linear, Conv2d))]
        self._start_counter()
        self.alpha, self.density, self.last_regularizer = 1.0, 1.0, 0.0

    def options(self) -> dict:
        return {"d_min": self.d_min, "beta": self.beta, "warmup_steps": self.warmup_steps,
                "endpoint_prob": self.endpoint_prob, "dense_first_last": self.dense_first_last,
                "dense_layers": self.dense_layers, "seed": self.seed}

    # -- the line ------------------------------------------------------------------------------
    def density_at(self, alpha) -> float:
        """Kept fraction at ``a``: ``d_min + (1 - d_min) * a``."""
        return self.d_min + (1.0 - self.d_min) * float(alpha)

    def alpha_for(self, density) -> float:
        """The point ``a`` whose kept fraction is ``density`` (in [d_min, 1])."""
        d = check_density(density)
        if d < self.d_min:
            raise ValueError(f"density must be in [d_min, 1] = [{self.d_min}, 1] for LCS+L, "
                             f"got {density!r}")
        return (d - self.d_min) / (1.0 - self.d_min)

    def sample_alpha(self, step) -> float:
        """Biased end-point sampling: an end point (0 or 1) with probability ``endpoint_prob``,
        else uniform on [0, 1)."""
        rng = step_rng(self.seed, step)
        if rng.random() < self.endpoint_prob:
            return float(rng.integers(2))
        return float(rng.random())

    def train_density(self, alpha, step) -> float:
        """Kept fraction trained at ``step`` for ``a``: decays linearly from 1 during the warm-up."""
        d = self.density_at(alpha)
        if step < self.warmup_steps:
            return 1.0 - (1.0 - d) * step / self.warmup_steps
        return d

    def mix(self, alpha):
        """Write ``(1 - a) * w0 + a * w1`` into ``net``'s parameters (in place)."""
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        for name, p in self.net.parameters().items():
            np.multiply(self.model.params[f"end0.{name}"], 1.0 - a, out=p)
            p += a * self.model.params[f"end1.{name}"]
        self.alpha = a

    def _mask(self, density):
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.mask = layerwise_topk_mask(w, density).astype(w.dtype)
        forget_recalibration(self.batchnorms)
        self.density = density

    def use(self, density):
        """Compute the network at the point of the line whose kept fraction is ``density``."""
        self.mix(self.alpha_for(density))
        self._mask(check_density(density))
        return self

    # -- training ------------------------------------------------------------------------------
    def regularizer(self):
        """``beta * sum cos^2(w0, w1)`` over the weight tensors, and its gradient by end name."""
        total, grads = 0.0, {}
        for name in self.weight_names:
            c2, cache = cos2_forward(self.model.params[f"end0.{name}"], self.model.params[f"end1.{name}"])
            grads[f"end0.{name}"], grads[f"end1.{name}"] = cos2_backward(self.beta, cache)
            total += self.beta * c2
        return total, grads

    def end_cosines(self) -> dict:
        """``cos(w0, w1)`` of every regularised weight tensor, by name: how far the ends have
        separated (1 = parallel)."""
        out = {}
        for name in self.weight_names:
            _, cache = cos2_forward(self.model.params[f"end0.{name}"], self.model.params[f"end1.{name}"])
            out[name] = float(cache[-1])
        return out

    def step(self, model, xb, yb):
        """One LCS+L step (``fit``'s signature): draw ``a``, one forward and backward of ``w(a)``,
        chain rule to both ends, plus the regulariser. The loss returned includes it."""
        t = self._advance()
        a = self.sample_alpha(t)
        self.mix(a)
        self._mask(self.train_density(a, t))
        loss, correct, g = dense_step(self.net, xb, yb)
        grads = {}
        for name, gp in g.items():
            grads[f"end0.{name}"] = gp * gp.dtype.type(1.0 - a)
            grads[f"end1.{name}"] = gp * gp.dtype.type(a)
        if self.beta:
            self.last_regularizer, reg_grads = self.regularizer()
            for name, gr in reg_grads.items():
                grads[name] += gr
        return loss + self.last_regularizer, correct, grads

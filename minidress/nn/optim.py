"""Optimizers (SGD, Adam/AdamW) and learning-rate schedules.

Conventions
-----------
* Parameters and gradients are plain dicts of NumPy arrays keyed by name (``"0.weight"``), as
  returned by ``Layer.parameters()`` and ``Layer.gradients()``.
* ``opt.step(params, grads)`` updates every parameter array **in place**: the model holds the
  very same arrays, so rebinding ``params[name]`` would silently detach it from the model.
  The dtype is preserved (float32 stays float32).
* A gradient that is ``None`` or missing skips that parameter (its state does not advance,
  as in PyTorch). A NaN/inf gradient raises ``FloatingPointError`` before *any* parameter is
  touched, so a failed step leaves the model exactly as it was.
* Per-parameter state (momentum buffers, Adam moments) is keyed by the parameter's name.
  ``state_dict()`` flattens it, together with the step count and the hyper-parameters, into a
  ``dict[str, np.ndarray]`` ready for ``np.savez``; keys read ``"momentum_buffer/0.weight"``.
* The update rules are those of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (checked against
  them in float64 by ``tests/test_optim.py``).

Schedules are pure functions ``schedule(t) -> lr`` of a 0-based counter ``t``. The unit of ``t``
is up to the training loop (optimizer steps or epochs); ``total``, ``step_size`` and ``warmup``
are in that same unit. Being pure, a schedule needs nothing saved in a checkpoint besides
``t`` itself.
"""
from __future__ import annotations

import math

import numpy as np

from ..validate import check_number


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

class Optimizer:
    """Base class: argument checks, the step loop, scratch space and ``state_dict``.

    Subclasses define ``_configure(**hyperparams)``, ``hyperparams() -> dict``, the per-parameter
    state names ``_state_names`` and ``_update(name, p, g)``.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self):
        self.state: dict[str, dict] = {}       # param name -> {"momentum_buffer": array, ...}
        self.step_count = 0                    # number of calls to step()
        self._work: dict[tuple, np.ndarray] = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        # 0 is allowed: a cosine schedule ends there.
        self._lr = check_number("lr", value, ">= 0", lambda x: x >= 0)

    # -- the step loop -------------------------------------------------------------------------

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray | None]) -> None:
        """Update ``params`` in place from ``grads`` (same names and shapes)."""
        unknown = [name for name in grads if name not in params]
        if unknown:
            raise ValueError(f"grads has names that are not in params: {unknown}")
        # Check everything first, so that an error leaves every parameter untouched.
        work = []
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            if not (isinstance(p, np.ndarray) and p.dtype.kind == "f"):
                raise ValueError(f"params[{name!r}] must be a floating-point NumPy array "
                                 f"(it is updated in place), got {type(p).__name__} "
                                 f"{getattr(p, 'dtype', '')}")
            g = np.asarray(g)
            if g.shape != p.shape:
                raise ValueError(f"gradient for {name!r} has shape {g.shape} but the parameter "
                                 f"has shape {p.shape}")
            if not _all_finite(g):
                raise FloatingPointError(f"gradient for {name!r} contains NaN or inf")
            work.append((name, p, g))
        for name, p, g in work:
            self._update(name, p, g)
        self.step_count += 1

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def _scratch(self, p: np.ndarray, which: int = 0) -> np.ndarray:
        """A reusable work array shaped like ``p``, so the hot loop allocates nothing.

        One flat buffer per (dtype, which) sized for the largest parameter seen, handed out
        as a reshaped view: scratch memory costs one parameter, not one model.
        """
        key = (p.dtype, which)
        buf = self._work.get(key)
        if buf is None or buf.size < p.size:
            buf = self._work[key] = np.empty(p.size, dtype=p.dtype)
        return buf[:p.size].reshape(p.shape)

    def _buffer(self, name: str, key: str, p: np.ndarray) -> np.ndarray | None:
        st = self.state.get(name, {})
        buf = st.get(key)
        if buf is not None and buf.shape != p.shape:
            raise ValueError(f"optimizer state {key!r} for {name!r} has shape {buf.shape} but "
                             f"the parameter has shape {p.shape}")
        return buf

    # -- checkpoints ---------------------------------------------------------------------------

    def hyperparams(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as a flat dict of arrays (copies) for ``np.savez``.

        Keys: ``"optimizer"`` (class name), ``"step"`` (calls to ``step``), one 0-d array per
        hyper-parameter (``"lr"``, ``"momentum"``, ...) and ``"<state>/<param name>"`` per
        parameter, e.g. ``"momentum_buffer/0.weight"`` or ``"exp_avg/0.weight"``.
        """
        out = {"optimizer": np.array(type(self).__name__), "step": np.array(self.step_count)}
        for key, value in self.hyperparams().items():
            out[key] = np.array(value)
        for name, st in self.state.items():
            for key, value in st.items():
                out[f"{key}/{name}"] = np.array(value)   # a copy, not a live view of the buffer
        return out

    def load_state_dict(self, state) -> None:
        """Restore hyper-parameters, step count and per-parameter state from ``state_dict()``.

        ``state`` may be the dict itself or the ``np.load`` of an ``.npz`` holding it. Continuing
        after a load gives bit-identical results to never having stopped.
        """
        state = dict(state)
        kind = str(state.pop("optimizer", "<none>"))
        if kind != type(self).__name__:
            raise ValueError(f"state is for optimizer {kind!r}, cannot load it into "
                             f"{type(self).__name__}")
        missing = [k for k in ("step", *self.hyperparams()) if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; expected a state_dict() of "
                             f"{type(self).__name__}")
        step_count = int(state.pop("step"))
        hyper = {key: np.asarray(state.pop(key)).item() for key in self.hyperparams()}
        per_param: dict[str, dict] = {}
        for key, value in state.items():
            # Split at the first "/" only: state names never contain one, parameter names might.
            kind, _, name = key.partition("/")
            if kind not in self._state_names or not name:
                raise ValueError(f"unexpected key {key!r} in state; expected hyper-parameters "
                                 f"and '<state>/<param>' with <state> in {self._state_names}")
            value = np.array(value)                     # own copy, dtype kept
            per_param.setdefault(name, {})[kind] = value.item() if value.ndim == 0 else value
        self._configure(**hyper)
        self.step_count = step_count
        self.state = per_param

    def _configure(self, **hyperparams) -> None:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({args})"


def _all_finite(g: np.ndarray) -> bool:
    # One fast reduction instead of a boolean temporary the size of g: NaN/inf propagate into
    # the sum. The sum can also overflow with finite entries, so confirm before accusing.
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(g.sum())) or bool(np.isfinite(g).all())


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    With ``d = g + weight_decay * p`` (L2 decay joins the gradient)::

        buf = d                                   at the first step
        buf = momentum * buf + (1 - dampening) * d    afterwards
        p  -= lr * (d + momentum * buf)           nesterov
        p  -= lr * buf                            otherwise (p -= lr * d without momentum)

    Parameters
    ----------
    lr : float, >= 0
    momentum : float in [0, 1)
    nesterov : bool
        Needs ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float, >= 0
    dampening : float in [0, 1]

    Per-parameter state: ``"momentum_buffer"`` (shape of the parameter), once momentum > 0.
    """

    _state_names = ("momentum_buffer",)

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__()
        self._configure(lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, dampening=dampening)

    def _configure(self, lr, momentum, nesterov, weight_decay, dampening):
        self.lr = lr
        self.momentum = check_number("momentum", momentum, "in [0, 1)", lambda x: 0 <= x < 1)
        self.dampening = check_number("dampening", dampening, "in [0, 1]", lambda x: 0 <= x <= 1)
        self.weight_decay = check_number("weight_decay", weight_decay, ">= 0", lambda x: x >= 0)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(f"nesterov=True needs momentum > 0 and dampening == 0, got "
                             f"momentum={momentum!r}, dampening={dampening!r}")

    def hyperparams(self) -> dict:
        return dict(lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                    weight_decay=self.weight_decay, dampening=self.dampening)

    def _update(self, name, p, g):
        lr, mu = self.lr, self.momentum
        s = self._scratch(p)
        if self.weight_decay:
            np.multiply(p, self.weight_decay, out=s)
            s += g
            g = s
        if mu:
            buf = self._buffer(name, "momentum_buffer", p)
            if buf is None:
                # Like torch: the buffer starts at the first gradient (not at zero, undamped).
                buf = np.array(g, dtype=p.dtype)
                self.state.setdefault(name, {})["momentum_buffer"] = buf
            else:
                buf *= mu
                if self.dampening:
                    np.multiply(g, 1 - self.dampening, out=s)
                    buf += s
                else:
                    buf += g
            if self.nesterov:
                # p -= lr * (g + mu * buf), written as two in-place subtractions so that no
                # temporary is needed while g may still live in the scratch array.
                np.multiply(g, lr, out=s)
                p -= s
                np.multiply(buf, lr * mu, out=s)
                p -= s
                return
            g = buf
        np.multiply(g, lr, out=s)
        p -= s


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam``; ``decoupled=True`` gives ``torch.optim.AdamW``.

    At the parameter's ``t``-th update (t = 1, 2, ...)::

        g  += weight_decay * p                    L2 decay (decoupled=False)
        p  *= 1 - lr * weight_decay               decoupled decay (decoupled=True)
        m   = beta1 * m + (1 - beta1) * g
        v   = beta2 * v + (1 - beta2) * g**2
        p  -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Note that ``eps`` is added *after* the bias correction of ``sqrt(v)``, as torch does.

    Parameters
    ----------
    lr : float, >= 0
    betas : (float, float), each in [0, 1)
    eps : float, >= 0
    weight_decay : float, >= 0
    decoupled : bool
        Decay the weights directly (AdamW) instead of adding an L2 term to the gradient.

    Per-parameter state: ``"step"`` (int, that parameter's ``t``: a skipped parameter does not
    advance), ``"exp_avg"`` (m) and ``"exp_avg_sq"`` (v), both shaped like the parameter.
    """

    _state_names = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__()
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self._configure(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                        decoupled=decoupled)

    def _configure(self, lr, beta1, beta2, eps, weight_decay, decoupled):
        self.lr = lr
        self.beta1 = check_number("betas[0]", beta1, "in [0, 1)", lambda x: 0 <= x < 1)
        self.beta2 = check_number("betas[1]", beta2, "in [0, 1)", lambda x: 0 <= x < 1)
        self.eps = check_number("eps", eps, ">= 0", lambda x: x >= 0)
        self.weight_decay = check_number("weight_decay", weight_decay, ">= 0", lambda x: x >= 0)
        self.decoupled = bool(decoupled)

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2

    def hyperparams(self) -> dict:
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                    weight_decay=self.weight_decay, decoupled=self.decoupled)

    def _update(self, name, p, g):
        b1, b2, lr = self.beta1, self.beta2, self.lr
        m = self._buffer(name, "exp_avg", p)
        v = self._buffer(name, "exp_avg_sq", p)
        st = self.state.setdefault(name, {})
        if m is None or v is None:
            m = st["exp_avg"] = np.zeros_like(p)
            v = st["exp_avg_sq"] = np.zeros_like(p)
            st["step"] = 0
        st["step"] += 1
        t = st["step"]

        s = self._scratch(p)
        if self.weight_decay:
            if self.decoupled:
                p *= 1 - lr * self.weight_decay
            else:
                # g is still needed for v after s has been used for m, hence a second scratch.
                g2 = self._scratch(p, 1)
                np.multiply(p, self.weight_decay, out=g2)
                g2 += g
                g = g2
        # m += (1 - b1) * (g - m): torch's lerp_ form of  m = b1 * m + (1 - b1) * g
        np.subtract(g, m, out=s)
        s *= 1 - b1
        m += s
        v *= b2
        np.multiply(g, g, out=s)
        s *= 1 - b2
        v += s

        bias1 = 1 - b1 ** t
        bias2 = 1 - b2 ** t
        denom = np.sqrt(v, out=s)
        denom /= bias2 ** 0.5
        denom += self.eps
        np.divide(m, denom, out=s)
        s *= lr / bias1
        p -= s


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: schedule(t) -> lr, t = 0, 1, 2, ... (steps or epochs, caller's choice)
# ---------------------------------------------------------------------------------------------

def _t(t) -> float:
    return check_number("t", t, ">= 0", lambda x: x >= 0)


def constant(lr):
    """``lr`` at every ``t``."""
    lr = check_number("lr", lr, ">= 0", lambda x: x >= 0)

    def schedule(t):
        _t(t)
        return lr
    return schedule


def step_decay(lr, step_size, gamma=0.1):
    """``lr * gamma ** (t // step_size)``, as ``torch.optim.lr_scheduler.StepLR``."""
    lr = check_number("lr", lr, ">= 0", lambda x: x >= 0)
    step_size = check_number("step_size", step_size, "> 0", lambda x: x > 0)
    gamma = check_number("gamma", gamma, "> 0", lambda x: x > 0)

    def schedule(t):
        return lr * gamma ** (_t(t) // step_size)
    return schedule


def cosine(lr, total, min_lr=0.0):
    """Half a cosine from ``lr`` at ``t = 0`` down to ``min_lr`` at ``t = total``, then flat.

    Same values as ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total, eta_min=min_lr)``
    for ``0 <= t <= total`` (torch would rise again afterwards; we stay at ``min_lr``).
    """
    lr = check_number("lr", lr, ">= 0", lambda x: x >= 0)
    total = check_number("total", total, "> 0", lambda x: x > 0)
    min_lr = check_number("min_lr", min_lr, f"in [0, lr={lr}]", lambda x: 0 <= x <= lr)

    def schedule(t):
        t = min(_t(t), total)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / total)) / 2
    return schedule


def linear_warmup(schedule, warmup, start_factor=0.0, shift=True):
    """Ramp linearly up to ``schedule`` over the first ``warmup`` steps.

    ``lr(t) = f(t) * schedule(t')`` with ``f`` going linearly from ``start_factor`` at ``t = 0``
    to 1 at ``t = warmup`` (then staying at 1), like ``torch``'s ``LinearLR``.

    With ``shift=True`` (default) the wrapped schedule starts when the warm-up ends:
    ``t' = max(t - warmup, 0)``, so the ramp climbs to ``schedule(0)`` and the usual
    "warm up, then cosine over the remaining steps" is
    ``linear_warmup(cosine(lr, total - warmup), warmup)`` (what ``make_schedule`` builds).
    With ``shift=False``, ``t' = t``: the warm-up just scales the first steps of ``schedule``
    (handy for a step decay whose milestones count from 0).
    """
    warmup = check_number("warmup", warmup, ">= 0", lambda x: x >= 0)
    start_factor = check_number("start_factor", start_factor, "in [0, 1]", lambda x: 0 <= x <= 1)
    if warmup == 0:
        return schedule

    def warmed(t):
        t = _t(t)
        f = start_factor + (1 - start_factor) * min(t, warmup) / warmup
        return f * schedule(max(t - warmup, 0) if shift else t)
    return warmed




def make_schedule(name: str, lr, total, warmup=0, **kw):
    """Build a schedule from strings, for a command line.

    Parameters
    ----------
    name : {"constant", "step", "cosine"}
    lr : float
        Peak learning rate.
    total : int
        Length of training, in the unit of ``t`` (steps or epochs).
    warmup : int
        Linear warm-up length, same unit, ``0 <= warmup < total``. The main schedule runs over
        the ``total - warmup`` steps that follow (see ``linear_warmup``).
    **kw
        ``step``: ``step_size`` (required), ``gamma``; ``cosine``: ``min_lr``; any:
        ``start_factor`` of the warm-up.
    """
    total = check_number("total", total, "> 0", lambda x: x > 0)
    warmup = check_number("warmup", warmup, f"in [0, total={total:g})", lambda x: 0 <= x < total)
    start_factor = kw.pop("start_factor", 0.0)
    key = str(name).strip().lower()
    allowed = {"constant": (), "step": ("step_size", "gamma"), "cosine": ("min_lr",)}
    if key not in allowed:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(allowed)}")
    extra = sorted(set(kw) - set(allowed[key]))
    if extra:
        raise ValueError(f"schedule {key!r} got unexpected options {extra}; it accepts "
                         f"{list(allowed[key]) + ['start_factor']}")
    if key == "constant":
        main = constant(lr)
    elif key == "step":
        if "step_size" not in kw:
            raise ValueError("schedule 'step' needs step_size (decay every step_size steps)")
        main = step_decay(lr, kw["step_size"], kw.get("gamma", 0.1))
    else:
        main = cosine(lr, total - warmup, kw.get("min_lr", 0.0))
    return linear_warmup(main, warmup, start_factor)

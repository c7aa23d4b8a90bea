"""A deployed DRESS model: one store, every density, switched in constant time.

``DeployedModel.from_store(store)`` turns a ``minidress.deploy.store.Store`` into an inference-only
network. Its sparsified layers read the store's ``values``/``cols`` arrays themselves (no copy),
through the Numba row-sparse kernels; everything else is dense NumPy. ``set_density(d)``
changes one integer per sparsified layer (the prefix length ``n_kept(d, row_len)``) and one
batch-norm slot index: nothing is copied, sorted or re-laid, so a switch costs about a
microsecond whatever the model's size.

Activations stay **feature-major** from input to logits: ``[features, batch]`` for vectors and
``[C, N, H, W]`` for images (see ``minidress.kernels``). ``predict`` transposes once on the way
in and once on the way out.

Batch norm runs in eval mode, folded into a per-level ``scale, shift`` pair. A density between
trained levels uses the slot of the nearest level (ties: the denser), the rule ``Dress.use`` follows (``minidress.masks.nearest_level``).

For comparison the same network runs on two other backends, which must rebuild every sparsified
layer to switch: ``"dense"`` (a masked dense matrix, BLAS) and ``"csr"`` (scipy CSR).

Threads: the kernels use Numba's thread pool when a product is large enough to pay for it. On a
machine whose cores are busy with other processes, a multi-threaded call can wait a whole
scheduler quantum (milliseconds) for its second thread; for steady latency there, call
``numba.set_num_threads(1)`` before serving (it applies to the calling thread).
"""
from __future__ import annotations

import time

import numpy as np

from ..im2col import im2col_cnhw
from ..kernels import rowsparse_matmul, rowsparse_matvec
from ..masks import check_density, n_kept, nearest_level
from ..nn.layers import (AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d,
                         PreActBlock, ReLU, Sequential, avgpool_forward, fold_batchnorm, maxpool_forward)
from ..nn.models import build_model


BACKENDS = ("rowsparse", "dense", "csr")


class _Product:
    """``W @ x`` for a Linear (``x [in, N]``) or the im2col matrix of a conv.

    A layer the store keeps dense is a dense matrix. A sparsified layer, by ``backend``:

    * ``"rowsparse"``: the store's ``values``/``cols`` at prefix ``k``, through the Numba kernels;
      switching sets ``k``;
    * ``"dense"``: a dense masked matrix ``W * M``, rebuilt from the store at every switch;
    * ``"csr"``: a ``scipy.sparse`` CSR matrix of ``W * M``, rebuilt at every switch, as a user of
      a general sparse library would do.
    """

    def __init__(self, store, name, backend="rowsparse"):
        self.sparse, self.backend, self.k = store.sparse.get(name), backend, None
        if self.sparse is not None:
            self.rows, self.row_len = self.sparse.shape[0], self.sparse.row_len
            self.set_prefix(self.sparse.values.shape[1])
        else:
            w = store.dense[f"{name}.weight"]
            self.w = w.reshape(len(w), -1)
            self.rows, self.row_len = self.w.shape
            self.k = self.row_len
        self.bias = store.dense.get(f"{name}.bias")
        self.positions = 1      # output positions per sample (Ho*Wo for a conv), set by a dry run

    def set_prefix(self, k):
        if k == self.k and self.backend != "rowsparse":
            return                  # the matrices of this prefix are already built
        self.k = k
        if self.backend == "dense":
            self.w = self.sparse.dense(k).reshape(self.rows, -1)
        elif self.backend == "csr":
            import scipy.sparse    # only this baseline backend needs scipy
            self.w = scipy.sparse.csr_matrix(self.sparse.dense(k).reshape(self.rows, -1))

    def __call__(self, x):
        if self.sparse is None or self.backend != "rowsparse":
            y = self.w @ x
        elif x.shape[1] == 1:     # one sample: a gather per row
            y = rowsparse_matvec(self.sparse.values, self.sparse.cols, self.k, x[:, 0], check=False)[:, None]
        else:
            y = rowsparse_matmul(self.sparse.values, self.sparse.cols, self.k, x, check=False)
        if self.bias is not None:
            y += self.bias[:, None]
        return y

    def macs(self):
        return self.rows * self.k * self.positions


class _ConvOp:
    def __init__(self, product, layer):
        self.product, self.kernel, self.stride, self.padding = product, layer.kernel_size, layer.stride, layer.padding

    def __call__(self, x):                     # [C_in, N, H, W] -> [C_out, N, Ho, Wo]
        cols, (ho, wo) = im2col_cnhw(x, self.kernel, self.kernel, self.stride, self.padding)
        self.product.positions = ho * wo
        return self.product(cols).reshape(self.product.rows, x.shape[1], ho, wo)


class _BatchNormOp:
    """Eval-mode batch norm folded into ``y = x * scale[slot] + shift[slot]`` over axis 0, one
    pair per trained level (``minidress.nn.layers.fold_batchnorm``)."""

    def __init__(self, store, name, layer):
        arrays = [store.dense[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        folded = [fold_batchnorm(*arrays, layer.eps, slot) for slot in range(len(store.levels))]
        self.scale, self.shift = np.stack([f[0] for f in folded]), np.stack([f[1] for f in folded])
        self.slot = 0

    def __call__(self, x):
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x * self.scale[self.slot].reshape(shape) + self.shift[self.slot].reshape(shape)


class _Chain:
    def __init__(self, ops):
        self.ops = ops

    def __call__(self, x):
        for op in self.ops:
            x = op(x)
        return x


def _flatten(x):
    """``[C, N, H, W]`` -> ``[C*H*W, N]`` in NCHW feature order; ``[F, N]`` stays."""
    return x if x.ndim == 2 else np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, x.shape[1])


class _PreActOp:
    def __init__(self, bn1, conv1, bn2, conv2, proj):
        self.bn1, self.conv1, self.bn2, self.conv2, self.proj = bn1, conv1, bn2, conv2, proj

    def __call__(self, x):
        a = np.maximum(self.bn1(x), 0)
        out = self.conv2(np.maximum(self.bn2(self.conv1(a)), 0))
        return out + (self.proj(a) if self.proj else x)


class DeployedModel:
    """An inference-only DRESS network over one store.

    Attributes
    ----------
    store : minidress.deploy.store.Store
    density : float, the density in use
    input_shape : tuple, one sample's shape (``(C, H, W)``)
    """

    def __init__(self, store, net, products, batchnorms, input_shape, backend):
        self.store, self.net, self.input_shape, self.backend = store, net, tuple(input_shape), backend
        self._products, self._batchnorms = products, batchnorms
        self._sparse = [p for p in products if p.sparse is not None]
        self.dtype = store.dtype
        self.profile = None
        self._plans = {}
        self.set_density(max(store.levels))
        self.predict(np.zeros((1, *self.input_shape), self.dtype))     # learns conv output sizes

    @classmethod
    def from_store(cls, store, backend="rowsparse") -> "DeployedModel":
        """Build the network the store's metadata describes, reading the store's arrays.

        ``backend`` (see ``BACKENDS``): ``"rowsparse"`` is DRESS's deployment; ``"dense"`` and
        ``"csr"`` rebuild each sparsified layer at every switch and serve as baselines.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        skeleton = build_model(store.meta["model"], dtype=store.dtype)
        products, batchnorms = [], []

        def compile_layer(layer, name):
            if isinstance(layer, Sequential):
                return _Chain([compile_layer(c, f"{name}{n}.") for n, c in layer.children()])
            if isinstance(layer, (Linear, Conv2d)):
                products.append(_Product(store, name.rstrip("."), backend))
                return products[-1] if isinstance(layer, Linear) else _ConvOp(products[-1], layer)
            if isinstance(layer, BatchNorm):
                batchnorms.append(_BatchNormOp(store, name.rstrip("."), layer))
                return batchnorms[-1]
            if isinstance(layer, PreActBlock):
                return _PreActOp(*(compile_layer(getattr(layer, n), f"{name}{n}.") if getattr(layer, n) else None
                                   for n in ("bn1", "conv1", "bn2", "conv2", "proj")))
            simple = {ReLU: lambda x: np.maximum(x, 0), Flatten: _flatten,
                      GlobalAvgPool: lambda x: x.mean(axis=(2, 3)),
                      MaxPool2d: lambda x: maxpool_forward(x, layer.k, layer.stride)[0],
                      AvgPool2d: lambda x: avgpool_forward(x, layer.k, layer.stride)[0]}
            if type(layer) not in simple:
                raise ValueError(f"DeployedModel cannot run a {type(layer).__name__} layer")
            return simple[type(layer)]

        return cls(store, compile_layer(skeleton, ""), products, batchnorms,
                   store.meta["model"]["input_shape"], backend)

    # -- switching -------------------------------------------------------------------------------
    def set_density(self, density) -> "DeployedModel":
        """Use the sub-network at ``density`` (any value in (0, 1]): one prefix length per
        sparsified layer and a batch-norm slot. With the row-sparse backend no weight is copied
        or moved; the others rebuild their matrices here.

        The prefix lengths and slot of a density are worked out (and checked) the first time it
        is used and remembered, so switching among a few densities is a dictionary lookup and a
        handful of integer assignments.
        """
        plan = self._plans.get(density)
        if plan is None:
            plan = self._plans[density] = self._plan(density)
        d, slot, ks = plan
        for p, k in zip(self._sparse, ks):
            p.set_prefix(k)
        for bn in self._batchnorms:
            bn.slot = slot
        self.density = d
        return self

    def _plan(self, density):
        """``(density, batch-norm slot, prefix length per sparsified layer)`` for ``density``."""
        d = check_density(density)
        levels = self.store.levels
        if self.store.order == "level_major" and d not in levels:
            raise ValueError(f"density {d} is not a trained level {list(levels)}; a level-major "
                             f"store is exact only at its levels (use order='rank' for any density)")
        return d, nearest_level(levels, d), tuple(n_kept(d, p.row_len) for p in self._sparse)

    # -- inference ---------------------------------------------------------------------------------
    def predict(self, x, batch_size=1024) -> np.ndarray:
        """Logits ``[N, n_classes]`` of ``x [N, *input_shape]`` at the current density."""
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, self.input_shape))}], got {x.shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the model {self.dtype}")
        # feature-major: [C, N, H, W] for images, [F, N] for vectors
        axes = (1, 0, *range(2, x.ndim))
        out = [self.net(np.ascontiguousarray(x[i:i + batch_size].transpose(axes))).T
               for i in range(0, len(x), batch_size)]
        return np.ascontiguousarray(out[0] if len(out) == 1 else np.concatenate(out))

    def macs(self) -> int:
        """Multiply-accumulates of one sample at the current density (kept weights only)."""
        return int(sum(p.macs() for p in self._products))

    def weight_bytes(self) -> int:
        """Bytes of the weights in memory: the store (all levels), plus any matrices the
        ``dense``/``csr`` backends built for the current density."""
        extra = 0
        for p in self._sparse:
            if self.backend == "dense":
                extra += p.w.nbytes
            elif self.backend == "csr":
                extra += p.w.data.nbytes + p.w.indices.nbytes + p.w.indptr.nbytes
        return self.store.nbytes() + extra

    # -- latency ---------------------------------------------------------------------------------
    def latency_profile(self, densities, batch=1, repeats=30, seed=0, quantile=0.9) -> dict:
        """Seconds per ``predict`` of a random batch, per density, measured here and now.

        Each density is warmed up once (compilation, caches), then timed ``repeats`` times; the
        profile keeps the ``quantile`` of those times (default the 90th percentile: a deadline
        is missed by the slow calls, so a controller must plan for them, not for the median).
        It is kept in ``self.profile`` for ``choose_density``; the current density is restored.
        """
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        x = np.random.default_rng(seed).standard_normal((batch, *self.input_shape)).astype(self.dtype)
        before, prof = self.density, {}
        for d in sorted({check_density(d) for d in densities}):
            self.set_density(d)
            self.predict(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.predict(x)
                times.append(time.perf_counter() - t0)
            prof[d] = float(np.quantile(times, quantile))
        self.set_density(before)
        self.profile = {"batch": batch, "quantile": quantile, "seconds": prof}
        return prof

    def choose_density(self, budget_ms) -> float:
        """The densest profiled density whose latency fits ``budget_ms``; the sparsest one if
        none fits (the best the model can do). Needs ``latency_profile`` first."""
        if self.profile is None:
            raise ValueError("choose_density needs a latency profile: call latency_profile() first")
        prof = self.profile["seconds"]
        fits = [d for d, s in prof.items() if 1000 * s <= budget_ms]
        return max(fits) if fits else min(prof)

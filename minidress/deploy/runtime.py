"""A deployed DRESS model: one store, every density, switched in constant time.

``DeployedModel.from_store(store)`` turns a ``minidress.deploy.store.Store`` into an inference-only
network that runs as **one compiled call per request** (``minidress.deploy.compiled`` builds the
program, ``minidress.kernels.program`` runs it): no Python between layers. Its sparsified
layers run through the row-sparse kernels on a transposed copy of the store's entries (the
batch-1 layout, built at load), or, at densities where that is faster on this machine, through
BLAS on a masked dense matrix (``paths``). ``set_density(d)`` looks up the prefix lengths,
batch-norm slot and paths it worked out for ``d`` before and assigns them: nothing is copied,
sorted or re-laid, so a switch costs well under a microsecond whatever the model's size.

Activations stay **feature-major** from input to logits: ``[features, batch]`` for vectors and
``[C, N, H, W]`` for images (see ``minidress.kernels``). One sample, or a one-channel batch, is
already feature-major in memory; other batches are turned feature-major inside the compiled
call, or can be given feature-major (``predict(..., feature_major=True)``).

Batch norm runs in eval mode, folded into a per-level ``scale, shift`` pair. A density between
trained levels uses the slot of the nearest level (ties: the denser), the rule ``Dress.use`` follows (``minidress.masks.nearest_level``).

For comparison the same network runs on two other backends, layer by layer in Python, which
must rebuild every sparsified layer to switch: ``"dense"`` (a masked dense matrix, BLAS) and
``"csr"`` (scipy CSR).

Threads: the compiled call runs on the calling thread, one request per thread; only its BLAS
products (the dense path) may use BLAS's own pool. On a busy 2-core machine one thread per
request was fastest (``benchmarks/bench_serving.py``): limit BLAS to one thread
(``threadpoolctl.threadpool_limits(1)``, or ``OPENBLAS_NUM_THREADS=1`` before NumPy loads) and
serve parallel requests from separate threads instead.
"""
from __future__ import annotations

import time

import numpy as np

from numba import config as numba_config

from ..im2col import im2col_cnhw
from ..kernels.program import OP_FLATTEN
from ..masks import check_density, n_kept, nearest_level
from ..nn.layers import (AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d,
                         PreActBlock, ReLU, Sequential, avgpool_forward, fold_batchnorm, maxpool_forward)
from ..nn.models import build_model
from .compiled import CompiledNet


BACKENDS = ("rowsparse", "dense", "csr")


class _Product:
    """``W @ x`` for a Linear (``x [in, N]``) or the im2col matrix of a conv, in the baseline
    backends, which hold a sparsified layer as a matrix rebuilt from the store at every switch:
    ``"dense"`` a dense masked matrix ``W * M`` (BLAS), ``"csr"`` a ``scipy.sparse`` CSR matrix
    of it, as a user of a general sparse library would do. A layer the store keeps dense is a
    dense matrix in both."""

    def __init__(self, store, name, backend):
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
        if k == self.k:
            return                  # the matrices of this prefix are already built
        self.k = k
        self.w = self.sparse.dense(k).reshape(self.rows, -1)
        if self.backend == "csr":
            import scipy.sparse    # only this baseline backend needs scipy
            self.w = scipy.sparse.csr_matrix(self.w)

    def __call__(self, x):
        y = self.w @ x
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


def timed_calls(predict, x, repeats) -> list:
    """Seconds of ``repeats`` timed ``predict(x)`` calls, after one untimed call (warm-up)."""
    predict(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - t0)
    return times


class DeployedModel:
    """An inference-only DRESS network over one store.

    Attributes
    ----------
    store : minidress.deploy.store.Store
    density : float, the density in use
    input_shape : tuple, one sample's shape (``(C, H, W)``)
    backend : one of ``BACKENDS``
    """

    def __init__(self, store, backend, compiled=None, net=None, products=(), batchnorms=()):
        self.store, self.backend, self.dtype = store, backend, store.dtype
        self.input_shape = tuple(store.meta["model"]["input_shape"])
        c, h, w = self.input_shape
        self._one_sample = (1, c, h, w)                 # predict's shortest way
        self._compiled, self._net, self._products, self._batchnorms = compiled, net, list(products), list(batchnorms)
        self._sparse = [p for p in self._products if p.sparse is not None]
        self._row_lens = [p.row_len for p in self._sparse] if compiled is None else \
            [p["row_len"] for p in compiled.products if p["sparse"] is not None]
        self.profile = None
        self._plans = {}
        self._calibrated = compiled is None or compiled.paths == "dense"
        self.set_density(max(store.levels))
        if net is not None:
            self.predict(np.zeros((1, *self.input_shape), self.dtype))     # learns conv output sizes

    @classmethod
    def from_store(cls, store, backend="rowsparse", paths="auto") -> "DeployedModel":
        """Build the network the store's metadata describes, reading the store's arrays.

        Parameters
        ----------
        store : Store; validated first (``Store.validate``), as the kernels do not check bounds
        backend : one of ``BACKENDS``. ``"rowsparse"`` is DRESS's deployment: the whole network
            is one compiled call (``minidress.deploy.compiled``). ``"dense"`` and ``"csr"`` run
            layer by layer in NumPy/scipy and rebuild each sparsified layer at every switch:
            the baselines.
        paths : "auto", "sparse" or "dense" (``"rowsparse"`` only). Which product a sparsified
            layer uses: ``"sparse"`` always the row-sparse kernels (bit for bit their NumPy
            references); ``"dense"`` always BLAS on a masked dense matrix (built the first
            time a density is served, then kept); ``"auto"`` (default) per layer and density
            the faster of the two, as measured on this machine before the first ``predict``
            (``calibrate``), so that no density is served slower than by a dense model. BLAS
            and the kernels add in different orders, so results may differ in the last bits
            from one path to the other. With ``"sparse"`` and ``"auto"`` that first ``predict``
            also times each layer's two one-sample loops (the same numbers) and keeps the faster
            (tens of milliseconds: call ``calibrate`` first where the first request has a deadline).
        """
        store.validate()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "rowsparse":
            return cls(store, backend, compiled=CompiledNet(store, paths))
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

        return cls(store, backend, net=compile_layer(skeleton, ""), products=products, batchnorms=batchnorms)

    # -- switching -------------------------------------------------------------------------------
    def set_density(self, density) -> "DeployedModel":
        """Use the sub-network at ``density`` (any value in (0, 1], at most the densest stored
        level): one prefix length per sparsified layer and a batch-norm slot. With the
        row-sparse backend no weight is copied or moved; the others rebuild their matrices here.

        The prefix lengths, slot and paths of a density are worked out (and checked) the first
        time it is used and remembered, so switching among densities used before is a
        dictionary lookup and two assignments (``benchmarks/bench_switch.py`` times it).
        """
        plan = self._plans.get(density)
        if plan is None:
            plan = self._plans[density] = self._plan(density)
        self.density, self._plan_now = plan[0], plan
        if self._compiled is None:
            d, slot, ks, _ = plan
            for p, k in zip(self._sparse, ks):
                p.set_prefix(k)
            for bn in self._batchnorms:
                bn.slot = slot
        return self

    def _plan(self, density):
        """``[density, batch-norm slot, prefix lengths, program state or None]`` for ``density``.

        A density above the densest stored level is refused: the store holds only that level's
        entries per row, so a longer prefix does not exist (clamping would silently serve
        another network than the one asked for, with wrong MACs and accuracy)."""
        d = check_density(density)
        levels = self.store.levels
        if d > max(levels):
            raise ValueError(f"density {d} is above the densest stored level {max(levels)}: the "
                             f"store keeps only that level's entries per row")
        if self.store.order == "level_major" and d not in levels:
            raise ValueError(f"density {d} is not a trained level {list(levels)}; a level-major "
                             f"store is exact only at its levels (use order='rank' for any density)")
        ks = tuple(n_kept(d, n) for n in self._row_lens)
        return [d, nearest_level(levels, d), ks, None]

    def _state(self):
        """The compiled program's state of the current density, built on first use (after
        measuring the paths' crossovers, if not done yet)."""
        plan = self._plan_now
        if plan[3] is None:
            if not self._calibrated:
                self.calibrate()
            plan[3] = self._new_state(plan[0], plan[1])
        return plan[3]

    def _new_state(self, density, slot, **kwargs):
        """``CompiledNet.state``; if building it dropped the masked matrices, every state kept
        before points at moved offsets and is forgotten (rebuilt on next use)."""
        generation = self._compiled.generation
        state = self._compiled.state(density, slot, **kwargs)
        if self._compiled.generation != generation:
            for plan in self._plans.values():
                plan[3] = None
        return state

    def calibrate(self, batch=32) -> dict:
        """Time, per sparsified layer, the two one-sample loops (vector gathers or not: the same
        numbers) and, with ``paths="auto"``, the row-sparse kernel against BLAS for one sample
        and for ``batch`` samples, and use the faster from now on. Done automatically before the
        first ``predict``; call it again if the machine changes. Returns the timings
        (``CompiledNet.calibrate``)."""
        if self._compiled is None or self._compiled.paths == "dense":
            return {}
        report = {} if numba_config.DISABLE_JIT else self._compiled.calibrate(batch)
        self._calibrated = True
        for plan in self._plans.values():
            plan[3] = None                 # rebuilt with the new crossovers on next use
        return report

    # -- inference ---------------------------------------------------------------------------------
    def predict(self, x, batch_size=1024, feature_major=False) -> np.ndarray:
        """Logits ``[N, n_classes]`` at the current density.

        Parameters
        ----------
        x : ndarray ``[N, *input_shape]`` (batch-major), or with ``feature_major=True``
            ``[C, N, H, W]`` (for a model whose first layer is Flatten also ``[C*H*W, N]``),
            as a pipeline that keeps activations feature-major already holds them
        batch_size : requests larger than this are cut into batches (batch-major input only)
        """
        if type(x) is np.ndarray and x.shape == self._one_sample and x.dtype == self.dtype and not feature_major \
                and self._compiled is not None:
            # one sample, the real-time case, on the shortest way (the checks below, in one line;
            # `_state()` inlined: a method call is a tenth of the whole request)
            state = self._plan_now[3]
            return self._compiled.predict(self._state() if state is None else state, x)
        x = np.asarray(x)
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the model {self.dtype}")
        c, h, w = self.input_shape
        if feature_major:
            if self._compiled is None:
                raise ValueError("feature_major input needs the rowsparse backend")
            flat_ok = x.ndim == 2 and x.shape[0] == c * h * w and self._compiled.code[0, 0] == OP_FLATTEN
            if not (flat_ok or (x.ndim == 4 and (x.shape[0], *x.shape[2:]) == self.input_shape)):
                raise ValueError(f"feature-major x must have shape [{c}, N, {h}, {w}], got {x.shape}")
            shape = (x.shape[0], x.shape[1], 1, 1) if x.ndim == 2 else x.shape
            logits, (n_out, n, _, _) = self._compiled.run(self._state(), np.ascontiguousarray(x).reshape(-1), shape)
            # one sample: [n_classes, 1] is already the memory of [1, n_classes]; no copy
            return logits.reshape(1, n_out) if n == 1 else np.ascontiguousarray(logits.reshape(n_out, n).T)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, self.input_shape))}], got {x.shape}")
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if self._compiled is None:     # the baselines: layer by layer, feature-major
                out.append(np.ascontiguousarray(self._net(np.ascontiguousarray(xb.transpose(1, 0, 2, 3))).T))
            else:
                out.append(self._compiled.predict(self._state(), xb))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def macs(self) -> int:
        """Multiply-accumulates of one sample at the current density (kept weights only)."""
        if self._compiled is None:
            return int(sum(p.macs() for p in self._products))
        ks = iter(self._plan_now[2])
        return int(sum(p["rows"] * p["positions"] * (next(ks) if p["sparse"] is not None else p["row_len"])
                       for p in self._compiled.products))

    def memory_bytes(self) -> dict:
        """Bytes of the weights: ``store`` (the store's arrays: what is at rest in the file and
        in memory as loaded), ``serving`` (what this model adds while serving: for
        ``rowsparse`` the transposed copy of the sparse entries with biases and folded batch
        norms, and the dense matrices of the BLAS path, both in ``parts``; for ``dense``/``csr``
        the matrices built for the current density) and ``total``."""
        if self._compiled is not None:
            parts = self._compiled.nbytes()
        else:
            parts = {"matrices": sum(p.w.nbytes if self.backend == "dense" else
                                     p.w.data.nbytes + p.w.indices.nbytes + p.w.indptr.nbytes for p in self._sparse)}
        serving = int(sum(parts.values()))
        return {"store": self.store.nbytes(), "serving": serving, "total": self.store.nbytes() + serving,
                "parts": parts}

    def weight_bytes(self) -> int:
        """Bytes of the weights in memory while serving: ``memory_bytes()["total"]``."""
        return self.memory_bytes()["total"]

    # -- latency ---------------------------------------------------------------------------------
    def latency_profile(self, densities, batch=1, repeats=30, seed=0, quantile=0.9) -> dict:
        """Seconds per ``predict`` of a random batch, per density, measured here and now.

        Each density is warmed up once (compilation, caches), then timed ``repeats`` times; the
        profile keeps the ``quantile`` of those times (default the 90th percentile: a deadline
        is missed by the slow calls, so a controller must plan for them, not for the median).
        It is kept in ``self.profile`` for ``choose_density``; the current density is restored.
        With ``paths="auto"`` each density is also timed with every layer on BLAS, and served
        that way from then on (for one sample, or for batches, as ``batch``) if that was
        faster: the profile is never above the dense model's.
        """
        densities = sorted({check_density(d) for d in np.atleast_1d(densities).tolist()})
        if not densities:
            raise ValueError("densities must name at least one density")
        for name, v in (("batch", batch), ("repeats", repeats)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        x = np.random.default_rng(seed).standard_normal((batch, *self.input_shape)).astype(self.dtype)
        before, prof = self.density, {}
        for d in densities:
            self.set_density(d)
            times = self._times(x, repeats)
            if self._compiled is not None and self._compiled.paths == "auto":
                # The whole model on BLAS too: if that is faster at this density and batch (the
                # per-layer calibration can be wrong on a busy machine), serve it that way.
                # Compared by the fastest call: other processes only ever add time, and a 90th
                # percentile (or even a median) of a few calls on a busy machine is mostly them.
                plan, chosen, path = self._plan_now, self._plan_now[3], 1 if batch == 1 else 2
                generation = self._compiled.generation
                plan[3] = self._new_state(d, plan[1], force_dense=path, probe=True)
                dense = self._times(x, repeats)
                if min(dense) < min(times):
                    plan[3], times = self._new_state(d, plan[1], force_dense=path), dense
                else:              # the chosen state, unless the probe's matrix moved its offsets
                    plan[3] = chosen if self._compiled.generation == generation else None
            prof[d] = float(np.quantile(times, quantile))
        self.set_density(before)
        self.profile = {"batch": batch, "quantile": quantile, "seconds": prof}
        return prof

    def _times(self, x, repeats):
        return timed_calls(self.predict, x, repeats)

    def choose_density(self, budget_ms) -> float:
        """The densest profiled density whose latency fits ``budget_ms``; the sparsest one if
        none fits (the best the model can do). Needs ``latency_profile`` first."""
        if self.profile is None:
            raise ValueError("choose_density needs a latency profile: call latency_profile() first")
        prof = self.profile["seconds"]
        fits = [d for d, s in prof.items() if 1000 * s <= budget_ms]
        return max(fits) if fits else min(prof)

"""A stored model as one compiled program (``minidress.kernels.program``), and the choice, per
layer and density, between the row-sparse kernel and a dense BLAS product.

``CompiledNet(store)`` walks the network the store's metadata describes and emits its program:
the operation table, the layer table, and the flat parameter arrays, in which every sparsified
layer is held **transposed** (``vt, ct [kmax, rows]``, the batch-1 layout; the batched kernel
reads the same arrays). That is one extra copy of the sparse entries, built once at load and
counted by ``nbytes``; the store itself is not changed.

Why a dense path: above a crossover density a row-sparse product is slower than BLAS on a
dense matrix (a gather per weight against a register-blocked GEMV/GEMM). ``calibrate`` times,
per sparsified layer, the kernel at two prefix lengths and BLAS once, for one sample and for a
batch, and keeps the prefix length from which BLAS is faster (the kernel's time grows linearly
with ``k``; BLAS's does not depend on it). ``state(density, slot)`` then routes each layer to
the faster path; a layer routed to BLAS needs the masked dense matrix of that prefix, built the
first time and kept (``dense_bytes`` says how much that costs). Switching between densities
already used is then a lookup.
"""
from __future__ import annotations

import time

import numpy as np
from numba import config as numba_config

from ..kernels import program as prog
from ..kernels.serving import transpose_rowsparse
from ..masks import n_kept
from ..nn.layers import (AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d,
                         PreActBlock, ReLU, Sequential, fold_batchnorm)
from ..nn.models import build_model

PATHS = ("auto", "sparse", "dense")
# Without the JIT (NUMBA_DISABLE_JIT=1) nothing meaningful can be timed: "auto" then takes BLAS
# from a quarter of a row, about the crossover the kernel notes measured.
UNTIMED_CROSSOVER = 0.25
# The masked dense matrices of the BLAS path are kept for at most this many prefix lengths per
# product (one matrix each); past it they are all dropped and rebuilt on use. A budget
# controller profiles and then uses a few densities (a profile of n densities needs at most
# n + 1 per product), each then switched to by a lookup; one sweeping through hundreds of
# densities would otherwise hold a dense copy for each.
MAX_MASKED_COPIES = 16


class CompiledNet:
    """The program of one stored model.

    Attributes
    ----------
    products : list of dict, one per Linear/Conv2d in program order: ``name``, ``rows``,
        ``row_len``, ``positions`` (output positions per sample), ``sparse`` (the store's
        RowSparse, or None for a layer kept dense), ``input`` (its input shape ``(C, H, W)``)
    crossover : int64 [2, n_products], prefix length from which BLAS is used (row 0: one
        sample; row 1: a batch); ``row_len + 1`` = never
    """

    def __init__(self, store, paths="auto"):
        if paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}, got {paths!r}")
        self.store, self.paths, self.dtype = store, paths, np.dtype(store.dtype)
        widest = max([rs.row_len for rs in store.sparse.values()])
        self.index_dtype = np.uint16 if widest <= 1 << 16 else np.uint32
        self.products, self._code, self._layers = [], [], []
        self._params, self._index, self._qvalues, self._dense = [], [], [], []
        self._sizes = {"params": 0, "index": 0, "qvalues": 0, "dense": 0}
        shape = self._emit(build_model(store.meta["model"], dtype=store.dtype), "",
                           tuple(store.meta["model"]["input_shape"]))
        self.n_out = shape[0]
        self.code = np.array(self._code, np.int64).reshape(-1, 6)
        self.layers = np.array(self._layers, np.int64).reshape(-1, prog.L_NO_GATHER + 1)
        self.params = np.concatenate(self._params).astype(self.dtype)
        self.index = np.concatenate(self._index or [np.zeros(0, self.index_dtype)])
        self.qvalues = np.concatenate(self._qvalues or [np.zeros(0, np.int8)])
        self.dense = np.concatenate(self._dense or [np.zeros(0, self.dtype)])
        self._matrices = {}                    # (product, k) -> offset of its masked matrix
        self._kept_dense = (len(self._dense), self._sizes["dense"])    # the layers the store keeps dense
        self.generation = 0                    # + 1 each time the masked matrices are dropped
        self.crossover = np.array([[p["row_len"] + 1 for p in self.products]] * 2, np.int64)
        if paths == "dense":
            self.crossover[:] = 0
        elif paths == "auto" and numba_config.DISABLE_JIT:
            self.crossover[:] = [[int(UNTIMED_CROSSOVER * p["row_len"]) for p in self.products]] * 2

    # -- emitting the program --------------------------------------------------------------------
    def _append(self, kind, array):
        """Add ``array`` (flattened) to the ``params``, ``index`` or ``dense`` buffer; its offset."""
        getattr(self, f"_{kind}").append(np.ravel(array))
        offset = self._sizes[kind]
        self._sizes[kind] += np.size(array)
        return offset

    def _op(self, opcode, *operands):
        self._code.extend([opcode, *operands, *[0] * (5 - len(operands))])

    def _fold(self, relu=False, norm=None):
        """Put a ReLU, or a batch norm ``norm = (scale offset, shift offset, C)``, into the
        epilogue of the operation just emitted if it is a product whose epilogue can still take it
        (a batch norm only before a ReLU); returns whether it did (``program`` module docstring)."""
        op = self._code[-6:]
        if not op or op[0] != prog.OP_PRODUCT or op[5] or (norm is not None and op[4]):
            return False
        if norm is not None:
            op[2:5] = norm
        else:
            op[5] = 1
        self._code[-6:] = op
        return True

    def _emit(self, layer, name, shape):
        """Emit the operations of ``layer`` (named ``name``) for input ``shape (C, H, W)``;
        returns its output shape."""
        c, h, w = shape
        if isinstance(layer, Sequential):
            for n, child in layer.children():
                shape = self._emit(child, f"{name}{n}.", shape)
            return shape
        if isinstance(layer, (Linear, Conv2d)):
            return self._emit_product(layer, name.rstrip("."), shape)
        if isinstance(layer, BatchNorm):
            arrays = [self.store.dense[f"{name}{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
            folded = [fold_batchnorm(*arrays, layer.eps, slot) for slot in range(len(self.store.levels))]
            norm = (self._append("params", [f[0] for f in folded]), self._append("params", [f[1] for f in folded]), c)
            if not self._fold(norm=norm):
                self._op(prog.OP_BATCHNORM, *norm)
            return shape
        if isinstance(layer, PreActBlock):
            return self._emit_preact(layer, name, shape)
        if isinstance(layer, ReLU):
            if not self._fold(relu=True):
                self._op(prog.OP_RELU)
            return shape
        if isinstance(layer, (MaxPool2d, AvgPool2d)):
            self._op(prog.OP_POOL, layer.k, layer.stride, int(isinstance(layer, AvgPool2d)))
            return c, (h - layer.k) // layer.stride + 1, (w - layer.k) // layer.stride + 1
        if isinstance(layer, GlobalAvgPool):
            self._op(prog.OP_GLOBAL_AVG)
            return c, 1, 1
        if isinstance(layer, Flatten):
            self._op(prog.OP_FLATTEN)
            return c * h * w, 1, 1
        raise ValueError(f"DeployedModel cannot run a {type(layer).__name__} layer")

    def _emit_preact(self, block, name, shape):
        """``out = conv2(relu(bn2(conv1(a)))) + (proj(a) or x)`` with ``a = relu(bn1(x))``."""
        self._op(prog.OP_SAVE, 0)                                       # x
        a = self._emit(block.relu1, name, self._emit(block.bn1, f"{name}bn1.", shape))
        self._op(prog.OP_SAVE, 1)                                       # a
        out = shape
        for part in ("conv1", "bn2", "relu2", "conv2"):
            out = self._emit(getattr(block, part), f"{name}{part}.", out if part != "conv1" else a)
        if block.proj is None:
            self._op(prog.OP_ADD, 0)
            return out
        self._op(prog.OP_SAVE, 2)                                       # the residual branch
        self._op(prog.OP_LOAD, 1)
        self._emit(block.proj, f"{name}proj.", a)
        self._op(prog.OP_ADD, 2)
        return out

    def _emit_product(self, layer, name, shape):
        conv = isinstance(layer, Conv2d)
        kh, stride, pad = (layer.kernel_size, layer.stride, layer.padding) if conv else (1, 1, 0)
        rows = layer.out_channels if conv else layer.out_features
        ho = (shape[1] + 2 * pad - kh) // stride + 1
        wo = (shape[2] + 2 * pad - kh) // stride + 1
        rs = self.store.sparse.get(name)
        entry = {"name": name, "rows": rows, "row_len": shape[0] * kh * kh, "positions": ho * wo,
                 "sparse": rs, "input": shape, "dense": -1}
        vt_off = ct_off = kmax = scale_off = -1
        bits = getattr(rs, "bits", 0)         # a quantized layer (minidress.deploy.quantized)
        if bits:
            vt_off, scale_off = self._append("qvalues", rs.qt), self._append("params", rs.scale)
            ct_off, kmax = self._append("index", rs.cols.T.astype(self.index_dtype)), rs.kmax
        elif rs is not None:
            vt, ct = transpose_rowsparse(rs.values, rs.cols, self.index_dtype)
            vt_off, ct_off, kmax = self._append("params", vt), self._append("index", ct), vt.shape[0]
        else:                          # a layer the store keeps dense runs on BLAS at every density
            entry["dense"] = self._append("dense", self.store.dense[f"{name}.weight"])
        bias = self.store.dense.get(f"{name}.bias")
        bias_off = -1 if bias is None else self._append("params", bias)
        self._layers.extend([rows, entry["row_len"], kh, kh, stride, pad, vt_off, ct_off, kmax, bias_off,
                             bits, scale_off, 0])         # L_NO_GATHER: gathers until calibrated
        self._op(prog.OP_PRODUCT, len(self.products))
        self.products.append(entry)
        return rows, ho, wo

    # -- running -----------------------------------------------------------------------------------
    def predict(self, state, x):
        """Logits ``[N, n_out]`` of the batch-major input ``x [N, C, H, W]`` (``program.predict``)."""
        return prog.predict(self.code, self.layers, self.params, self.index, self.qvalues, self.dense, state, x)

    def run(self, state, x, shape):
        """Logits (flat, feature-major ``[n_out, N]``) of the flat input ``x`` of ``shape``, and
        their shape ``(n_out, N, 1, 1)`` (``program.run_quantized``)."""
        return prog.run_quantized(self.code, self.layers, self.params, self.index, self.qvalues, self.dense, state, x, shape)

    def state(self, density, slot, force_dense=0, probe=False):
        """The ``state`` table (``program`` module docstring) of ``density``: prefix lengths, the
        path of every layer for one sample and for a batch, and the batch-norm slot.
        ``force_dense``: 1 (one sample) or 2 (a batch) puts every layer of that path on BLAS.
        ``probe``: for timing BLAS only, use each layer's matrix of all its stored entries
        (built once, and the one the densest level uses) instead of building this density's:
        the same cost, wrong logits, no matrix per density probed."""
        st = np.zeros((4, len(self.products)), np.int64)
        st[3, 0] = slot
        held = np.bincount([i for i, _ in self._matrices], minlength=len(self.products))
        if held.max(initial=0) >= MAX_MASKED_COPIES:   # this state may add one more per product
            self._drop_matrices()              # before any offset of this state is taken
        for i, p in enumerate(self.products):
            if p["sparse"] is None:
                st[:3, i] = p["row_len"], p["dense"], p["dense"]
                continue
            k = st[0, i] = n_kept(density, p["row_len"])
            for path in (1, 2):
                dense = path == force_dense or k >= self.crossover[path - 1, i]
                st[path, i] = self._matrix(i, p["sparse"].values.shape[1] if probe else k) if dense else -1
        return st

    def _drop_matrices(self):
        """Forget every masked matrix (they are rebuilt when used again), so that a controller
        visiting ever new densities does not grow the memory without bound. Offsets taken
        before are invalid afterwards: ``generation`` tells the caller."""
        n, size = self._kept_dense
        del self._dense[n:]
        self._sizes["dense"], self._matrices = size, {}
        self.dense = np.concatenate(self._dense or [np.zeros(0, self.dtype)])
        self.generation += 1

    def _matrix(self, i, k):
        """Offset in ``dense`` of product ``i``'s masked dense matrix at prefix ``k``, built once."""
        if (i, k) not in self._matrices:
            rs = self.products[i]["sparse"]
            self._matrices[i, k] = self._sizes["dense"]
            self._append("dense", rs.dense(k))
            self.dense = np.concatenate([self.dense, self._dense[-1]])
        return self._matrices[i, k]

    def nbytes(self) -> dict:
        """Bytes this program holds besides the store: ``transposed`` (the batch-1 layout of
        the sparse entries, biases and folded batch norms), ``dense`` (layers kept dense and the
        masked matrices built for the BLAS path)."""
        return {"transposed": int(self.params.nbytes + self.index.nbytes + self.qvalues.nbytes),
                "dense": int(self.dense.nbytes)}

    # -- choosing the faster path -----------------------------------------------------------------
    def calibrate(self, batch=32, seconds=0.001, rounds=7):
        """Measure, per sparsified layer, which one-sample loop is faster, ``matvec_t`` (vector
        gathers) or ``matvec_t_no_gather`` (the same numbers; stored in ``layers[:, L_NO_GATHER]``),
        and with ``paths="auto"`` the prefix length from which BLAS beats the kernel, for one
        sample and for ``batch`` samples (stored in ``crossover``). Returns the timings ``{layer
        name: {"gathers": (t_matvec_t, t_no_gather), path: (t_kernel(k1), t_kernel(k2), t_blas,
        k1, k2)}}`` (no path entries unless ``paths="auto"``; "gathers", the sums of the times
        at ``k1`` and ``k2``, only for the layers whose one sample runs a matrix-vector
        product: not for a conv with more than one output position)."""
        report = {}
        for i, p in enumerate(self.products):
            rs = p["sparse"]
            if rs is None:
                continue
            kmax = rs.values.shape[1]
            k1, k2 = max(1, kmax // 10), kmax
            code = np.array([[prog.OP_PRODUCT, i, 0, 0, 0, 0]], np.int64)
            # BLAS's matrix of this layer, only where BLAS is timed
            dense = np.concatenate([self.dense, rs.dense().ravel()]) if self.paths == "auto" else self.dense
            report[p["name"]] = {}
            for path, n in ((0, 1), (1, batch)):
                x = np.ones(n * int(np.prod(p["input"])), self.dtype)
                shape = (p["input"][0], n, p["input"][1], p["input"][2])

                def timed(k, dense_off, layers=self.layers):
                    st = np.zeros((4, len(self.products)), np.int64)
                    st[0, i], st[1:3, i] = k, dense_off
                    return lambda: prog.run_quantized(code, layers, self.params, self.index, self.qvalues, dense, st, x, shape)
                # one sample of a Linear (or of a conv with one output position) runs one of two
                # loops (program: _matvec, or the quantized pair)
                if path == 0 and p["positions"] == 1:
                    no_gather = self.layers.copy()
                    no_gather[i, prog.L_NO_GATHER] = 1
                    # at both prefix lengths: the sparse levels, where the kernel runs most, and
                    # the longest (their ratio can differ)
                    t = _interleaved([timed(k, -1, tab) for k in (k1, k2) for tab in (self.layers, no_gather)],
                                     seconds, rounds)
                    self.layers[i, prog.L_NO_GATHER] = int(t[1] + t[3] < t[0] + t[2])
                    report[p["name"]]["gathers"] = (t[0] + t[2], t[1] + t[3])
                if self.paths != "auto":
                    continue
                t = _interleaved([timed(k1, -1), timed(k2, -1), timed(k2, len(self.dense))], seconds, rounds)
                slope = (t[1] - t[0]) / max(1, k2 - k1)
                # first k at which the kernel's time (t0 + slope * (k - k1)) reaches BLAS's
                cross = k1 + (t[2] - t[0]) / slope if slope > 0 else kmax + 1
                self.crossover[path, i] = int(np.clip(np.ceil(cross), 0, p["row_len"] + 1))
                report[p["name"]][("one", "batch")[path]] = (*t, k1, k2)
        return report


def _interleaved(fns, seconds, rounds):
    """Seconds per call of each function: the fastest of ``rounds`` interleaved rounds of
    ``seconds`` each. The fastest, not the median: other processes only ever add time, and what
    is compared here is the two paths' own speed."""
    for fn in fns:
        fn()                                            # compile, warm the caches
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < seconds:    # at least one call, even if
                fn()                                                # the clock already passed
                n += 1
            ts.append((time.perf_counter() - t0) / n)
    return [min(ts) for ts in times]

"""A whole network as one compiled call: a small interpreter over a flat list of operations.

``minidress.deploy.compiled`` translates a model into a *program*: integer tables saying which
operation runs next and where its parameters are, and a few flat arrays holding every parameter.
``run_quantized`` (``run`` without quantized layers) executes the program in one Numba-compiled
call, so a request costs one Python call (about half a microsecond) instead of one per layer
(tens of microseconds); ``predict`` wraps it with the conversions of a batch-major request in
and out, compiled too. One interpreter, compiled once and cached on disk, serves every model;
code generation would compile a new function for every model structure. The product and its
epilogue are inlined into it (``inline="always"``): a call between compiled functions costs
tens of nanoseconds, about what the smallest layer's work does.

Arrays
------
code : int64 [n_ops, 6]
    One operation per row: ``code[i, 0]`` is the opcode (``OP_*`` below), the rest its operands.
layers : int64 [n_products, 13]
    One Linear or Conv2d per row (``L_*`` columns): shape, kernel geometry, and the offsets of its
    transposed row-sparse arrays in ``params``/``index`` and of its bias in ``params``; for a
    quantized layer (``L_BITS`` 8 or 4, else 0) ``L_VT`` is the offset of its entries in
    ``qvalues`` and ``L_SCALE`` that of its per-row scales in ``params``. ``L_NO_GATHER`` 1 runs
    the layer's one-sample product as ``matvec_t_no_gather`` instead of ``matvec_t``
    (``qmatvec_t_no_gather`` for ``qmatvec_t``; the same numbers; whichever measured faster on
    this machine, ``CompiledNet.calibrate``).
params : float [P]
    The transposed values ``vt [kmax, rows]`` of every sparse layer, biases, batch-norm scales
    and shifts, one after the other.
index : unsigned int [Q]
    The transposed columns ``ct [kmax, rows]`` of every sparse layer.
qvalues : int8 [R]
    The transposed quantized entries of every quantized layer (``minidress.kernels.quantized``).
dense : float [D]
    Dense matrices ``[rows, row_len]``: the layers the store keeps dense, and any masked matrix
    the model chose to run through BLAS at some density (see ``state``).
state : int64 [4, n_products]
    What ``set_density`` switches, one column per product: row 0 the prefix length ``k``; row
    1 (one sample) and row 2 (a batch) the offset of the dense matrix to use in ``dense``, or -1
    for the row-sparse kernel; ``state[3, 0]`` the batch-norm slot.

A product's bias, and a batch norm and a ReLU that directly follow it, run in the product's
*epilogue*: one pass over its fresh output, in place, instead of a new array per operation. The
arithmetic is the same, in the same order (``((sum + bias) * scale + shift)``, then ``max(., 0)``).

Activations are feature-major, ``[C, N, H, W]`` (vectors ``[F, N, 1, 1]``), held as one flat
array and its shape. Every operation writes a new array, so nothing aliases (the kernels'
``noalias`` contract) and a saved activation (a residual branch) stays valid.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .blas import gemm
from .quantized import qmatmul, qmatvec_t, qmatvec_t_no_gather
from .serving import flatten, im2col, matmul_t, matvec_t, matvec_t_no_gather, pool2d, to_feature_major

# opcodes and their operands (code[i, 1:])
OP_PRODUCT = 0      # layer row; its epilogue: offsets of a batch norm's scale and shift, C (0 = none),
                    # 1 for a ReLU after it
OP_BATCHNORM = 1    # offset of scale [slots, C] in params, offset of shift, C
OP_RELU = 2
OP_POOL = 3         # k, stride, 1 for average (0 for max)
OP_GLOBAL_AVG = 4
OP_FLATTEN = 5
OP_SAVE = 6         # register
OP_LOAD = 7         # register
OP_ADD = 8          # register: current + saved
N_REGISTERS = 3

# columns of the layers table
L_ROWS, L_ROW_LEN, L_KH, L_KW, L_STRIDE, L_PAD, L_VT, L_CT, L_KMAX, L_BIAS, L_BITS, L_SCALE, L_NO_GATHER = range(13)


@njit(cache=True, inline='always')
def _product(layer, k, dense_off, params, index, qvalues, dense, h, shape, scale, shift, relu):
    """One Linear (``h [in, N]``) or Conv2d (``h [C, N, H, W]``), as its state says: the
    row-sparse kernel on the first ``k`` entries, or BLAS on a dense matrix, then its epilogue
    (``_epilogue``). Returns the new activation ``[rows, N, Ho, Wo]`` (flat) and its shape."""
    rows, row_len, kh, kw, stride, pad = layer[L_ROWS], layer[L_ROW_LEN], layer[L_KH], layer[L_KW], \
        layer[L_STRIDE], layer[L_PAD]
    c, n, hh, ww = shape
    pointwise = kh == 1 and kw == 1 and stride == 1 and pad == 0     # a Linear, or a 1x1 conv
    ho, wo = (hh, ww) if pointwise else ((hh + 2 * pad - kh) // stride + 1, (ww + 2 * pad - kw) // stride + 1)
    m = n * ho * wo
    bits = layer[L_BITS] if layer.shape[0] > L_BITS else 0     # 10 columns: no quantization
    kmax = layer[L_KMAX]
    if m == 1 and pointwise and dense_off < 0 and not bits:
        # one sample of a Linear, the real-time case, on the shortest way: its time is mostly
        # the kernel's, and each reshape or division skipped saves tens of nanoseconds. (Folding
        # this into the general path below, with the columns kept flat, measured 0.6 us slower
        # on the 784 MLP's 7.3 us request.)
        y = np.empty(rows, h.dtype)
        vt = params[layer[L_VT]:layer[L_VT] + kmax * rows].reshape(kmax, rows)
        ct = index[layer[L_CT]:layer[L_CT] + kmax * rows].reshape(kmax, rows)
        _matvec(layer, vt, ct, k, h, y)
        return _epilogue(layer, params, y, rows, 1, scale, shift, relu), (rows, n, ho, wo)
    if pointwise:
        cols = h.reshape(row_len, m)                  # no im2col
    else:
        cols = np.empty((row_len, m), h.dtype)
        im2col(h.reshape(c, n, hh, ww), kh, kw, stride, pad, cols)
    if dense_off >= 0:
        w = dense[dense_off:dense_off + rows * row_len].reshape(rows, row_len)
        # NumPy's BLAS for a batch (``blas.gemm``: faster than SciPy's on thin products here)
        y = np.dot(w, cols.reshape(row_len)) if m == 1 else gemm(w, cols).reshape(rows * m)
    else:
        y = np.empty(rows * m, h.dtype)
        ct = index[layer[L_CT]:layer[L_CT] + kmax * rows].reshape(kmax, rows)
        if bits:                                      # quantized entries, dequantized in the kernel
            nq = (kmax if bits == 8 else (kmax + 1) // 2) * rows
            qt = qvalues[layer[L_VT]:layer[L_VT] + nq].reshape(nq // rows, rows)
            qscale = params[layer[L_SCALE]:layer[L_SCALE] + rows]     # not the epilogue's scale
            if m == 1 and _no_gather(layer):
                qmatvec_t_no_gather(qt, ct, qscale, bits, k, cols.reshape(row_len), y)
            elif m == 1:
                qmatvec_t(qt, ct, qscale, bits, k, cols.reshape(row_len), y)
            else:
                qmatmul(qt, ct, qscale, bits, k, cols, y.reshape(rows, m))
        else:
            vt = params[layer[L_VT]:layer[L_VT] + kmax * rows].reshape(kmax, rows)
            if m == 1:                                # one sample: gathers across rows
                _matvec(layer, vt, ct, k, cols.reshape(row_len), y)
            else:                                     # a batch: SIMD over the batch
                matmul_t(vt, ct, k, cols, y.reshape(rows, m))
    return _epilogue(layer, params, y, rows, m, scale, shift, relu), (rows, n, ho, wo)


@njit(cache=True, inline='always')
def _matvec(layer, vt, ct, k, x, y):
    """A one-sample product by the batch-1 loop the layer measured faster (``L_NO_GATHER``)."""
    if _no_gather(layer):
        matvec_t_no_gather(vt, ct, k, x, y)
    else:
        matvec_t(vt, ct, k, x, y)


@njit(cache=True, inline='always')
def _no_gather(layer):
    """Whether the layer's one sample runs the loop without gathers (a table of fewer columns:
    no)."""
    return layer.shape[0] > L_NO_GATHER and layer[L_NO_GATHER] != 0


@njit(cache=True, inline='always')
def _epilogue(layer, params, y, rows, m, scale, shift, relu):
    """In place on ``y [rows, m]`` (flat): add the layer's bias, then ``* scale + shift`` per row
    (a batch norm, if ``scale`` is not empty), then ``max(., 0)`` (if ``relu``). Element by
    element: a row-slice ``+=`` costs an array each."""
    has_bias, has_norm = layer[L_BIAS] >= 0, scale.size > 0
    if not (has_bias or has_norm or relu):
        return y
    bias = params[max(layer[L_BIAS], 0):max(layer[L_BIAS], 0) + rows]
    zero = y.dtype.type(0)
    if m == 1:      # one sample: one loop over the rows (vectorized), not `rows` loops of length 1
        for r in range(rows):
            y[r] = _epilogue_value(y[r], bias[r] if has_bias else zero, scale[r] if has_norm else zero,
                                   shift[r] if has_norm else zero, has_bias, has_norm, relu, zero)
        return y
    y2 = y.reshape(rows, m)
    for r in range(rows):
        b_r, s_r, t_r = bias[r] if has_bias else zero, scale[r] if has_norm else zero, shift[r] if has_norm else zero
        for b in range(m):
            y2[r, b] = _epilogue_value(y2[r, b], b_r, s_r, t_r, has_bias, has_norm, relu, zero)
    return y


@njit(cache=True, inline='always')
def _epilogue_value(v, bias, scale, shift, has_bias, has_norm, relu, zero):
    """One output through ``_epilogue``'s steps, in their order (scalars only: arrays passed to
    an inlined function still cost a reference count each, per element)."""
    if has_bias:
        v = v + bias
    if has_norm:
        v = v * scale + shift
    if relu and v < zero:       # np.maximum(v, 0) of NaN is NaN: so is this
        v = zero
    return v


@njit(cache=True)
def run(code, layers, params, index, dense, state, x, shape):
    """``run_quantized`` of a program without quantized layers (its ``layers`` table may have the
    first 10 columns only)."""
    return run_quantized(code, layers, params, index, np.zeros(0, np.int8), dense, state, x, shape)


@njit(cache=True)
def predict(code, layers, params, index, qvalues, dense, state, x):
    """Logits ``[N, n_out]`` (C-contiguous) of the batch-major input ``x [N, C, H, W]`` (any
    strides): ``run_quantized`` with the conversions in and out compiled too, as a real-time
    request is served (a reshape or a transpose costs more in Python than the smallest layer)."""
    n, c, hh, ww = x.shape
    # one sample, or one channel: batch-major memory is already feature-major
    shape = (c if n == 1 or c == 1 else -c, n, hh, ww)
    out, out_shape = run_quantized(code, layers, params, index, qvalues, dense, state,
                                   np.ascontiguousarray(x).reshape(x.size), shape)
    n_out = out_shape[0]
    if n == 1:
        return out.reshape(1, n_out)
    logits, out2 = np.empty((n, n_out), out.dtype), out.reshape(n_out, n)
    for b in range(n):
        for i in range(n_out):
            logits[b, i] = out2[i, b]
    return logits


@njit(cache=True)
def run_quantized(code, layers, params, index, qvalues, dense, state, x, shape):
    """Run the program on ``x`` (flat, feature-major, of ``shape = (C, N, H, W)``; with
    ``C < 0``, ``x`` is batch-major ``[N, |C|, H, W]`` and is turned feature-major first).
    Returns the output (flat) and its shape ``(C, N, H, W)``."""
    h = x
    if shape[0] < 0:
        shape = (-shape[0], shape[1], shape[2], shape[3])
        h = np.empty(x.size, x.dtype)
        to_feature_major(x.reshape(shape[1], shape[0], shape[2], shape[3]), h.reshape(shape))
    path = 1 if shape[1] == 1 else 2          # state row of the one-sample or the batch path
    # the registers, as variables: a list of arrays would cost a quarter of a microsecond per call
    r0 = r1 = r2 = h
    r0_shape = r1_shape = r2_shape = shape
    slot = state[3, 0]
    for i in range(code.shape[0]):
        op, a, b, c = code[i, 0], code[i, 1], code[i, 2], code[i, 3]
        if op == OP_PRODUCT:       # a batch norm in the epilogue: code[i, 2:4] as OP_BATCHNORM's a, b
            d, e = code[i, 4], code[i, 5]
            h, shape = _product(layers[a], state[0, a], state[path, a], params, index, qvalues, dense, h, shape,
                                params[b + slot * d:b + (slot + 1) * d], params[c + slot * d:c + (slot + 1) * d], e == 1)
        elif op == OP_BATCHNORM:
            scale, shift = params[a + slot * c:a + (slot + 1) * c], params[b + slot * c:b + (slot + 1) * c]
            h2 = h.reshape(c, h.size // c)
            out = np.empty_like(h2)
            for ch in range(c):
                for p in range(h2.shape[1]):
                    out[ch, p] = h2[ch, p] * scale[ch] + shift[ch]
            h = out.reshape(h.size)
        elif op == OP_RELU:
            h = np.maximum(h, h.dtype.type(0))
        elif op == OP_POOL:
            ho, wo = (shape[2] - a) // b + 1, (shape[3] - a) // b + 1
            out = np.empty((shape[0], shape[1], ho, wo), h.dtype)
            pool2d(h.reshape(shape), a, b, c == 1, out)
            h, shape = out.reshape(out.size), (shape[0], shape[1], ho, wo)
        elif op == OP_GLOBAL_AVG:
            sums = h.reshape(shape[0] * shape[1], shape[2] * shape[3]).sum(axis=1)
            h = sums / h.dtype.type(shape[2] * shape[3])            # keeps float32 float32
            shape = (shape[0], shape[1], 1, 1)
        elif op == OP_FLATTEN:
            if shape[1] > 1 and shape[2] * shape[3] > 1:     # else the memory order is the same
                out = np.empty((shape[0] * shape[2] * shape[3], shape[1]), h.dtype)
                flatten(h.reshape(shape), out)
                h = out.reshape(out.size)
            shape = (shape[0] * shape[2] * shape[3], shape[1], 1, 1)
        elif op == OP_SAVE:
            if a == 0:
                r0, r0_shape = h, shape
            elif a == 1:
                r1, r1_shape = h, shape
            else:
                r2, r2_shape = h, shape
        elif op == OP_LOAD:
            h, shape = (r0, r0_shape) if a == 0 else (r1, r1_shape) if a == 1 else (r2, r2_shape)
        elif op == OP_ADD:
            h = h + (r0 if a == 0 else r1 if a == 1 else r2)
    return h, shape

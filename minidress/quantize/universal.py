"""Universal DNN compression: randomized (dithered) lattice quantization, fine-tuning, then a
universal lossless coder over the quantized indices.

Source: Y. Choi, M. El-Khamy, J. Lee, "Universal Deep Neural Network Compression", IEEE Journal
of Selected Topics in Signal Processing, 2020. We know the published description; no code was
copied.

The method, as we apply it to the nested store (every level stays a prefix of every row):

* **Dithered lattice quantization.** Per sparsified layer a step ``delta`` and a dither
  ``u [rows, row_len] ~ U[-delta/2, delta/2)`` drawn from the seed (``dither``). An entry
  ``w`` becomes the index ``i = rint((w + u) / delta)`` and is served as
  ``w_hat = i * delta - u``: the error ``w_hat - w`` is uniform and independent of ``w``
  (the paper's point: the quantizer is universal, good for any weight distribution). The
  dither is shared through the seed, so only the indices are stored. Our lattice is the
  scalar one (``delta * Z``, one dimension): the paper also uses vector lattices.
* **Fine-tuning** of the quantized network: the DRESS levels trained on ``w_hat`` with the
  straight-through estimator (``dithered_quantizer`` for ``minidress.quantize.qat.finetune``).
* **Universal lossless coding** of the indices (and of the columns, Lehmer-coded and
  bit-packed as in the quantized store, ``minidress.kernels.quantized.lehmer_encode``): the paper
  uses universal source codes (Lempel-Ziv-Welch, gzip, bzip2). We measure the standard
  library's ``lzma``, ``bz2`` and ``zlib`` on every stream and keep the smallest (``encode``
  reports all three in ``sizes``). Measured with ``benchmarks/compress_store.py`` (delta =
  std / 4, seed 0): on the digits CNN store bz2 34.5 kB, lzma 34.9 kB, zlib 35.4 kB (lzma won
  on the tutorial's shorter run); on the all-sparse MNIST MLP bz2 386 kB, lzma 389 kB, zlib
  401 kB: within 4% of each other, as all three mostly entropy-code the skewed index
  distribution (the indices have little long-range structure for lzma's matches to find), so
  we keep whichever is smallest rather than fix one.

Our choices: ``delta = step_fraction * std`` of the layer's stored entries, fixed before
fine-tuning and stored; indices in rank order, as int8 when they fit (else int16); the dense
layers, biases and batch norms are left as they are (float). The functions read a store's
``sparse`` layers (anything with ``shape``, ``values [rows, kmax]``, ``cols [rows, kmax]``) and
return arrays, so that this training package does not import the deployment package.
"""
from __future__ import annotations

import bz2
import lzma
import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..kernels.quantized import lehmer_decode, lehmer_encode, lehmer_widths, pack_codes, unpack_codes

CODERS = {"lzma": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
          "bz2": lambda b: bz2.compress(b, 9), "zlib": lambda b: zlib.compress(b, 9)}
DECODERS = {"lzma": lzma.decompress, "bz2": bz2.decompress, "zlib": zlib.decompress}



def dither(shape, delta, seed, layer):
    """The dither ``u [rows, row_len] ~ U[-delta/2, delta/2)`` of sparsified layer number
    ``layer`` (its position in the store), drawn from ``default_rng([seed, layer])``: the same
    numbers on every machine for the same arguments (float64, then cast by the caller)."""
    rows, row_len = shape[0], int(np.prod(shape[1:]))
    return (np.random.default_rng([seed, layer]).random((rows, row_len)) - 0.5) * delta


def layer_steps(sparse, step_fraction):
    """``{layer: delta}``: ``step_fraction`` times the std of the layer's stored entries."""
    if not step_fraction > 0:
        raise ValueError(f"step_fraction must be > 0, got {step_fraction!r}")
    return {n: float(step_fraction * np.std(rs.values)) or 1.0 for n, rs in sparse.items()}


def dithered_quantizer(dress, steps, seed):
    """``quantizer(name, weight) -> (w_hat, inside)`` for ``minidress.quantize.qat.finetune``:
    ``w_hat = rint((w + u) / delta) * delta - u`` on the whole weight (the dither of entry
    ``(r, c)`` is ``u[r, c]``, as ``encode`` uses it); no clipping, so the STE is the identity."""
    names = list(dress.layers)

    def quantizer(name, weight):
        # In float64, as ``quantize_entries`` and ``decode``: the same grid point for every entry.
        u = dither(weight.shape, steps[name], seed, names.index(name)).reshape(weight.shape)
        w_hat = np.rint((weight.astype(np.float64) + u) / steps[name]) * steps[name] - u
        return w_hat.astype(weight.dtype), np.ones(weight.shape, bool)
    return quantizer


@dataclass
class UniversalCode:
    """A coded nested store's sparsified layers.

    Attributes
    ----------
    seed : int, the dither's seed;  steps : dict layer -> delta
    coder : name in ``CODERS``;  streams : dict layer -> (indices bytes, columns bytes), coded
    layout : dict layer -> (shape, kmax, index dtype name)
    sizes : dict coder -> total coded bytes with that coder (what ``encode`` measured)
    """
    seed: int
    steps: dict
    coder: str
    streams: dict
    layout: dict
    sizes: dict

    def nbytes(self) -> int:
        """Coded bytes of the indices and columns (the steps and layout are a few numbers)."""
        return sum(len(a) + len(b) for a, b in self.streams.values())


def quantize_entries(sparse, steps, seed):
    """``{layer: indices int64 [rows, kmax]}``: ``rint((w + u[r, cols]) / delta)`` per stored entry."""
    out = {}
    for i, (name, rs) in enumerate(sparse.items()):
        u = np.take_along_axis(dither(rs.shape, steps[name], seed, i), rs.cols.astype(np.intp), axis=1)
        out[name] = np.rint((rs.values.astype(np.float64) + u) / steps[name]).astype(np.int64)
    return out


def encode(sparse, steps, seed, coder=None) -> UniversalCode:
    """Dithered-quantize and code every sparsified layer of ``sparse`` (a store's ``sparse``);
    ``coder``: a name in ``CODERS``, or None for the smallest of them on these streams."""
    raw, layout = {}, {}
    for name, idx in quantize_entries(sparse, steps, seed).items():
        rs = sparse[name]
        dtype = np.int8 if np.abs(idx).max(initial=0) < 128 else np.int16
        widths = lehmer_widths(math.prod(rs.shape[1:]), rs.cols.shape[1])     # as the quantized store
        raw[name] = (idx.astype(dtype).tobytes(), pack_codes(lehmer_encode(rs.cols), widths).tobytes())
        layout[name] = (tuple(rs.shape), rs.cols.shape[1], np.dtype(dtype).name)
    coded = {c: {n: (fn(a), fn(b)) for n, (a, b) in raw.items()} for c, fn in CODERS.items()}
    sizes = {c: sum(len(a) + len(b) for a, b in s.values()) for c, s in coded.items()}
    if coder is not None and coder not in CODERS:
        raise ValueError(f"coder must be one of {sorted(CODERS)} or None, got {coder!r}")
    coder = min(sizes, key=sizes.get) if coder is None else coder
    return UniversalCode(seed, dict(steps), coder, coded[coder], layout, sizes)


def decode(code: UniversalCode, dtype=np.float32) -> dict:
    """``{layer: (values [rows, kmax] of dtype, cols [rows, kmax] int64)}``, ``values`` the
    served ``w_hat = i * delta - u``: bit for bit the same for the same code (and seed)."""
    out = {}
    for i, (name, (shape, kmax, idx_dtype)) in enumerate(code.layout.items()):
        a, b = code.streams[name]
        rows, row_len = shape[0], math.prod(shape[1:])
        idx = np.frombuffer(DECODERS[code.coder](a), idx_dtype).reshape(rows, kmax).astype(np.float64)
        packed = np.frombuffer(DECODERS[code.coder](b), np.uint8)
        cols = lehmer_decode(unpack_codes(packed, lehmer_widths(row_len, kmax), rows), row_len)
        u = np.take_along_axis(dither(shape, code.steps[name], code.seed, i), cols, axis=1)
        out[name] = ((idx * code.steps[name] - u).astype(dtype), cols)
    return out

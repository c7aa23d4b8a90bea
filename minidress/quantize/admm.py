"""ADMM quantization on DRESS's row-balanced sparsity sets.

Source: A. Ren, T. Zhang, S. Ye, J. Li, W. Xu, X. Qian, X. Lin, Y. Wang, "ADMM-NN: An
Algorithm-Hardware Co-Design Framework of DNNs Using ADMM", ASPLOS 2019 (joint pruning and
quantization by ADMM). We know the published description; no code was copied.

The loop is ``minidress.pruning.admm.ADMMPruner``'s (W-step: SGD on the loss plus
``rho/2 ||W - Z + U||^2``; Z-step: a projection; U-step: ``U += W - Z``), with the Z-step's
projection onto the intersection of two sets: DRESS's row-balanced sparsity set (every row keeps
``n_kept(d, row_len)`` entries) and the quantized store's grid (per row ``scale * {-qmax .. qmax}``,
``scale`` = the kept entries' max-abs / qmax, ``minidress.kernels.quantized``). Projecting
first onto the support, then rounding onto the grid of that support, is our choice: the exact
Euclidean projection onto the intersection would search the scale too (ADMM-NN fixes the
levels per layer; we fix them per row by the max-abs rule, so the result is what a
``QuantizedStore`` holds without further rounding).

Our choices besides ``ADMMPruner``'s: the hard projection at ``admm_steps`` prunes as ADMM
pruning does; masked retraining then runs in float, and ``finish`` puts the kept weights on the
grid for good (so a short retraining phase, or none, is advised: the retrained weights are
rounded once more at the end). ``constraint_gap`` measures how far W is from the set.
"""
from __future__ import annotations

import numpy as np

from ..kernels.quantized import quantize_rows, row_scales
from ..pruning.admm import ADMMPruner
from ..pruning.common import project


def project_on_grid(weight, density, bits):
    """``weight [rows, ...]`` projected onto the row-balanced set at ``density`` (largest ``|w|``
    per row), then its kept entries rounded onto the row's grid; zeros stay zero."""
    z = project(weight, density, "row").reshape(len(weight), -1)
    scale = row_scales(z, bits)
    return (quantize_rows(z, scale, bits).astype(weight.dtype) * scale[:, None]).reshape(weight.shape)


class ADMMQuantizer(ADMMPruner):
    """ADMM pruning and quantization of ``model`` to ``density`` and ``bits`` (8 or 4); the
    parameters are ``ADMMPruner``'s (``projection`` is always ``"row"``)."""

    kind = "admm_quantize"

    def __init__(self, model, density, admm_steps, bits=8, **options):
        row_scales(np.zeros((1, 1)), bits)              # refuses a bit width other than 8 or 4
        self.bits = bits
        super().__init__(model, density, admm_steps, projection="row", **options)
        for layer in self.layers.values():
            w = layer.params["weight"]
            layer.buffers["admm_z"][...] = project_on_grid(w, self.density_target, bits)

    def options(self) -> dict:
        return {**super().options(), "bits": self.bits}

    def update_z_u(self):
        """``Z = proj_{S and grid}(W + U)``, then ``U += W - Z``."""
        for layer in self.layers.values():
            w, z, u = layer.params["weight"], layer.buffers["admm_z"], layer.buffers["admm_u"]
            z[...] = project_on_grid(w + u, self.density_target, self.bits)
            u += w - z

    def finish(self):
        """The hard projection (if still due), then the kept weights rounded onto the grid."""
        super().finish()
        for layer in self.layers.values():
            w = layer.params["weight"]
            w[...] = project_on_grid(w * layer.mask, self.density_target, self.bits)
        return self

"""Interop: a DRESS sub-network (or a dense model) in PyTorch and ONNX, and PyTorch weights back.

* ``to_torch(net, density)``: an equivalent ``torch.nn.Module`` in eval mode, with the same
  parameter names as the minidress model (``"0.weight"``, ``"2.conv1.weight"``, ...). Each
  sparsified layer is pruned the way ``torch.nn.utils.prune`` prunes (``weight_orig`` parameter,
  ``weight_mask`` buffer, ``weight = weight_orig * weight_mask`` before every forward), so its
  ``state_dict()`` is the one ``prune`` writes; batch norms hold the statistics and affine pair
  of the slot that ``Dress.use(density)`` selects (the nearest trained level,
  ``minidress.masks.nearest_level``; recalibrated statistics if any).
* ``torch_module(spec, ...)``: the same module built from a model spec alone, ready to
  ``load_state_dict`` a state dict written by ``to_torch(...).state_dict()``.
* ``load_torch_state_dict(model, state_dict)``: the reverse, into a minidress model.
* ``export_onnx(net, path, input_shape, density)``: the sub-network as an ONNX graph.

ONNX has no row-sparse weight: the file stores every masked weight densely (zeros included) and
runs dense products. It is a portability format, the same numbers on any ONNX runtime, not the
fast path; that is ``minidress.deploy``'s nested store and row-sparse kernels.

torch and onnx are optional (``pip install "minidress[onnx]"``) and imported only inside the
functions that need them.
"""
from __future__ import annotations

import functools

import numpy as np

from ..checkpoint import load_checkpoint
from ..dress import Dress, DressOptions, build_dress
from ..nn.layers import (AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Layer, Linear,
                         MaxPool2d, PreActBlock, ReLU, Sequential, eval_mode, in_slot)
from ..nn.models import build_model

ONNX_OPSET = 17


def at_density(net, density=None) -> Layer:
    """The minidress model computing ``net``'s sub-network at ``density``.

    ``net`` is a ``Dress`` (``density`` required; ``net.use(density)`` is called, so the DRESS
    model is left at that density) or a plain model (``density`` must be None).
    """
    if isinstance(net, Dress):
        if density is None:
            raise ValueError(f"density is required for a DRESS model (trained levels {list(net.levels)})")
        return net.use(density).model
    if density is not None:
        raise ValueError(f"density must be None for a dense model (it has no levels), got {density!r}")
    return net


def load_network(checkpoint):
    """``(net, spec)`` from a checkpoint: a ``Dress`` for a DRESS run's checkpoint (it holds
    ``dress_step``), else the plain model; ``spec`` is its model spec (``build_model``)."""
    meta = load_checkpoint(checkpoint)
    spec, state = meta["model"], meta["model_state"]
    dtype = next(v.dtype for v in state.values() if v.dtype.kind == "f")
    if "dress_step" in state:
        net = build_dress(spec, DressOptions.from_config(meta["config"]), dtype)
        net.load_state(state)
        return net, spec
    net = build_model(spec, dtype=dtype)
    net.load_state(state)
    return net, spec


def _bn_arrays(bn: BatchNorm) -> dict:
    """The eval-mode arrays of ``bn``'s current slot: ``weight, bias, running_mean, running_var``
    (``[F]`` each; recalibrated statistics replace the running ones when set)."""
    mean, var = bn.stats_override or (in_slot(bn.buffers["running_mean"], bn.slot),
                                      in_slot(bn.buffers["running_var"], bn.slot))
    return {"weight": in_slot(bn.params["weight"], bn.slot), "bias": in_slot(bn.params["bias"], bn.slot),
            "running_mean": mean, "running_var": var}


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------

@functools.cache
def _torch_blocks():
    """The torch modules minidress needs that torch lacks (made once, on first use)."""
    import torch  # optional dependency: only the PyTorch export needs it

    class PreActBlockTorch(torch.nn.Module):
        """``minidress.nn.layers.PreActBlock``: ``relu(bn1(x))`` -> conv1 -> bn2 -> relu ->
        conv2, plus ``x`` or ``proj(relu(bn1(x)))``."""

        def __init__(self, parts: dict):
            super().__init__()
            for name, module in parts.items():
                setattr(self, name, module)

        def forward(self, x):
            a = self.relu1(self.bn1(x))
            out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
            return out + (self.proj(a) if hasattr(self, "proj") else x)

    return PreActBlockTorch


def _mirror(layer, spatial=True):
    """``(torch module, spatial after it)`` with ``layer``'s structure and parameter names, no
    weights copied. ``spatial``: whether the activation entering ``layer`` is ``[N, C, H, W]``
    (a batch norm on it is ``BatchNorm2d``; on ``[N, F]`` it is ``BatchNorm1d``)."""
    import torch  # optional dependency: only the PyTorch export needs it
    nn = torch.nn
    if isinstance(layer, Sequential):
        children = []
        for _, child in layer.children():
            module, spatial = _mirror(child, spatial)
            children.append(module)
        return nn.Sequential(*children), spatial
    if isinstance(layer, PreActBlock):
        return _torch_blocks()({n: _mirror(c)[0] for n, c in layer.children()}), True
    if isinstance(layer, Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params), False
    if isinstance(layer, Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, bias="bias" in layer.params), True
    if isinstance(layer, BatchNorm):
        kind = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return kind(layer.num_features, eps=layer.eps, momentum=layer.momentum), spatial
    simple = {ReLU: (nn.ReLU, spatial), Flatten: (nn.Flatten, False),
              GlobalAvgPool: (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), False),
              MaxPool2d: (lambda: nn.MaxPool2d(layer.k, layer.stride), True),
              AvgPool2d: (lambda: nn.AvgPool2d(layer.k, layer.stride), True)}
    if type(layer) not in simple:
        raise ValueError(f"layer must be one of minidress.nn.layers' layers, got {layer!r}")
    make, spatial_after = simple[type(layer)]
    return make(), spatial_after


def _torch_dtype(dtype):
    import torch  # optional dependency: only the PyTorch export needs it
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def _dtype_of(model) -> np.dtype:
    return next(iter(model.parameters().values())).dtype


def to_torch(net, density=None, prune=True):
    """An equivalent ``torch.nn.Module`` (eval mode, the model's dtype) of ``net`` at ``density``.

    Parameters
    ----------
    net : Dress (``density`` required) or a minidress model (``density`` None)
    density : float in (0, 1], the sub-network to export
    prune : bool
        True: every masked layer is pruned with ``torch.nn.utils.prune.custom_from_mask``
        (``weight_orig`` and ``weight_mask`` in the state dict). False: plain modules holding
        ``weight * mask`` (what ONNX or TorchScript users may prefer).

    Returns
    -------
    torch.nn.Module whose eval-mode output matches minidress's eval-mode forward (in float64 to
    1e-10 in ``tests/test_export.py``).
    """
    import torch  # optional dependency: only the PyTorch export needs it
    from torch.nn.utils import prune as torch_prune  # same reason
    model = at_density(net, density)
    module = _mirror(model)[0].to(_torch_dtype(_dtype_of(model)))
    targets = dict(module.named_modules())
    with torch.no_grad():
        for prefix, layer in model.named_layers():
            target = targets[prefix.rstrip(".")]
            arrays = _bn_arrays(layer) if isinstance(layer, BatchNorm) else layer.params
            for name, value in arrays.items():
                getattr(target, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
            mask = getattr(layer, "mask", None)
            if mask is not None and prune:
                torch_prune.custom_from_mask(target, "weight", torch.from_numpy(mask != 0))
            elif mask is not None:
                target.weight.mul_(torch.from_numpy(mask))
    return module.eval()


def torch_module(spec, dtype=np.float32, state_dict=None):
    """A torch module built from a model ``spec`` (``build_model``), in eval mode; with
    ``state_dict`` (e.g. ``torch.load`` of ``minidress export --torch``), every layer whose
    ``weight_orig`` it holds is pruned first (``prune.identity``) and the state dict is loaded."""
    from torch.nn.utils import prune as torch_prune  # optional dependency: only this export needs it
    module = to_torch(build_model(spec, dtype=dtype))
    if state_dict is not None:
        for name, sub in module.named_modules():
            if f"{name}.weight_orig" in state_dict:
                torch_prune.identity(sub, "weight")
        module.load_state_dict(state_dict)
    return module


def load_torch_state_dict(model, state_dict, slot=None) -> Layer:
    """Copy a torch ``state_dict`` (names as ``to_torch`` writes them) into a minidress model.

    A pruned layer (``weight_orig`` and ``weight_mask``) gets ``weight = weight_orig`` and
    ``mask = weight_mask``, so its forward is ``weight * mask`` as in torch. A batch norm with
    per-level slots is written at row ``slot`` (required then). ``num_batches_tracked`` is
    ignored. Names, shapes and dtypes must match; the model is modified in place and returned.
    """
    given = {k: v.detach().cpu().numpy() for k, v in state_dict.items()
             if not k.endswith("num_batches_tracked")}
    used = set()
    for prefix, layer in model.named_layers():
        pruned = f"{prefix}weight_orig" in given
        stats = {k: v for k, v in layer.buffers.items() if k.startswith("running_")}   # not ranks
        for name, arr in {**layer.params, **stats}.items():
            key = prefix + ("weight_orig" if pruned and name == "weight" else name)
            if isinstance(layer, BatchNorm) and arr.ndim == 2:
                arr = _slot_row(arr, slot, prefix + name)
            value = given.get(key)
            if value is None or value.shape != arr.shape or value.dtype != arr.dtype:
                got = "missing" if value is None else f"{value.dtype} of shape {value.shape}"
                raise ValueError(f"state_dict[{key!r}] must be {arr.dtype} of shape {arr.shape}, got {got}")
            arr[...] = value
            used.add(key)
        if pruned:
            layer.mask = given[f"{prefix}weight_mask"].astype(layer.params["weight"].dtype)
            used.add(f"{prefix}weight_mask")
    unexpected = sorted(set(given) - used)
    if unexpected:
        raise ValueError(f"state_dict has entries the model does not: {unexpected}")
    return model


def _slot_row(arr, slot, name):
    if slot is None or not 0 <= slot < len(arr):
        raise ValueError(f"slot must be an integer in [0, {len(arr)}) for {name} (a batch norm with "
                         f"{len(arr)} slots), got {slot!r}")
    return arr[slot]


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------

class _OnnxGraph:
    """Nodes and initializers of an ONNX graph, written layer by layer from a minidress model."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.initializers = onnx, [], []

    def const(self, name, array):
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def add(self, layer, prefix, x) -> str:
        """Append ``layer`` (named ``prefix``) applied to the tensor ``x``; return its output."""
        p, at = prefix, prefix.rstrip(".") or "model"
        if isinstance(layer, Sequential):
            for name, child in layer.children():
                x = self.add(child, f"{prefix}{name}.", x)
            return x
        if isinstance(layer, PreActBlock):
            a = out = self.add(layer.relu1, p + "relu1.", self.add(layer.bn1, p + "bn1.", x))
            for name in ("conv1", "bn2", "relu2", "conv2"):
                out = self.add(getattr(layer, name), f"{p}{name}.", out)
            shortcut = self.add(layer.proj, p + "proj.", a) if layer.proj else x
            return self.node("Add", [out, shortcut], f"{at}.add")
        if isinstance(layer, (Linear, Conv2d)):
            w = layer.params["weight"] if layer.mask is None else layer.params["weight"] * layer.mask
            inputs = [x, self.const(p + "weight", w)]
            inputs += [self.const(p + "bias", layer.params["bias"])] if "bias" in layer.params else []
            if isinstance(layer, Linear):
                return self.node("Gemm", inputs, at, transB=1)
            k, s, pad = layer.kernel_size, layer.stride, layer.padding
            return self.node("Conv", inputs, at, kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)
        if isinstance(layer, BatchNorm):
            arrays = _bn_arrays(layer)
            inputs = [x] + [self.const(p + n, arrays[n]) for n in ("weight", "bias", "running_mean", "running_var")]
            return self.node("BatchNormalization", inputs, at, epsilon=layer.eps)
        if isinstance(layer, (MaxPool2d, AvgPool2d)):
            op = "MaxPool" if isinstance(layer, MaxPool2d) else "AveragePool"
            return self.node(op, [x], at, kernel_shape=[layer.k] * 2, strides=[layer.stride] * 2)
        if isinstance(layer, GlobalAvgPool):
            return self.node("Flatten", [self.node("GlobalAveragePool", [x], at + ".pool")], at, axis=1)
        if isinstance(layer, ReLU):
            return self.node("Relu", [x], at)
        if isinstance(layer, Flatten):                 # C-order over (C, H, W), as minidress
            return self.node("Flatten", [x], at, axis=1)
        raise ValueError(f"layer must be one of minidress.nn.layers' layers, got {layer!r}")


def export_onnx(net, path, input_shape, density=None):
    """Write ``net``'s sub-network at ``density`` (eval mode) as an ONNX model.

    Parameters
    ----------
    net : Dress (``density`` required) or a minidress model
    path : where to write the ``.onnx`` file
    input_shape : (C, H, W) or (F,): one sample's shape; the batch axis is dynamic (``N``)

    The graph reads ``x`` ``[N, *input_shape]`` and writes ``logits``, in the model's dtype.
    Masked weights are stored densely (see the module's docstring). Returns the path.
    """
    import onnx  # optional dependency: only the ONNX export needs it
    import onnx.numpy_helper  # same reason: from_array
    model = at_density(net, density)
    elem = onnx.helper.np_dtype_to_tensor_dtype(_dtype_of(model))
    graph = _OnnxGraph(onnx)
    out = graph.add(model, "", "x")
    graph.nodes.append(onnx.helper.make_node("Identity", [out], ["logits"], name="logits"))
    inputs = [onnx.helper.make_tensor_value_info("x", elem, ["N", *input_shape])]
    with eval_mode(model):                 # also checks that input_shape fits the model
        n_out = model.forward(np.zeros((1, *input_shape), _dtype_of(model))).shape[1]
    outputs = [onnx.helper.make_tensor_value_info("logits", elem, ["N", n_out])]
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(graph.nodes, "minidress", inputs, outputs, graph.initializers),
        opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)], producer_name="minidress")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path

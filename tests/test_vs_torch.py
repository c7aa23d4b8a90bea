"""Forward pass and every gradient against PyTorch in float64 (max abs diff < 1e-10)."""
import numpy as np
import pytest

from helpers import assert_close
from minidress.nn.layers import (AvgPool2d, BatchNorm, Conv2d, GlobalAvgPool, Linear, MaxPool2d,
                              PreActBlock, ReLU, Sequential)
from minidress.nn.losses import softmax_cross_entropy
from minidress.nn.models import lenet5, mlp, preact_resnet

try:
    import torch
except ImportError:         # every test here is then skipped and counted at the end (conftest.py)
    torch = None
nn = getattr(torch, "nn", None)
F = getattr(nn, "functional", None)
_Module = nn.Module if nn is not None else object      # the classes below must still be defined
pytestmark = pytest.mark.torch
ATOL = 1e-10


def t(a, grad=True):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def compare(ours, ref_fn, x, rng, named_ref_params):
    """Run ``ours`` and the torch function ``ref_fn(x_t)`` on the same input, backprop the
    same random cotangent, and compare output, input gradient and every parameter gradient.

    ``named_ref_params`` maps our parameter names to the torch tensors that play their role.
    """
    out = ours.forward(x)
    r = rng.standard_normal(out.shape)
    dx = ours.backward(r)
    xt = t(x)
    ref = ref_fn(xt)
    ref.backward(torch.tensor(r))
    assert_close(out, ref, "output", ATOL)
    assert_close(dx, xt.grad, "grad x", ATOL)
    grads = ours.gradients()
    assert set(grads) == set(named_ref_params)
    for name, p in named_ref_params.items():
        assert_close(grads[name], p.grad, f"grad {name}", ATOL)


def test_linear(rng):
    lin = Linear(5, 3, rng, np.float64)
    lin.params["bias"] = rng.standard_normal(3)
    w, b = t(lin.params["weight"]), t(lin.params["bias"])
    compare(lin, lambda x: F.linear(x, w, b), rng.standard_normal((4, 5)), rng, {"weight": w, "bias": b})


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 0), (5, 2, 2), (1, 1, 0), (2, 3, 1)])
def test_conv2d(rng, k, s, p):
    conv = Conv2d(3, 4, k, s, p, rng, np.float64)
    conv.params["bias"] = rng.standard_normal(4)
    w, b = t(conv.params["weight"]), t(conv.params["bias"])
    compare(conv, lambda x: F.conv2d(x, w, b, s, p), rng.standard_normal((2, 3, 7, 6)), rng,
            {"weight": w, "bias": b})


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 1)])
def test_pools(rng, k, s):
    x = rng.standard_normal((2, 3, 7, 7))
    compare(MaxPool2d(k, s), lambda x: F.max_pool2d(x, k, s), x, rng, {})
    compare(AvgPool2d(k, s), lambda x: F.avg_pool2d(x, k, s), x, rng, {})
    compare(GlobalAvgPool(), lambda x: x.mean(dim=(2, 3)), x, rng, {})
    compare(ReLU(), F.relu, x, rng, {})


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 5)])
def test_batchnorm_train_and_eval(rng, shape):
    ours = BatchNorm(4, dtype=np.float64)
    ref = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(4).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(rng.standard_normal(4)))
        ref.bias.copy_(torch.tensor(rng.standard_normal(4)))
    ours.params["weight"][:] = ref.weight.detach().numpy()
    ours.params["bias"][:] = ref.bias.detach().numpy()
    named = {"weight": ref.weight, "bias": ref.bias}
    for step in range(3):  # several steps so the running statistics accumulate
        ref.zero_grad()
        compare(ours, ref, rng.standard_normal(shape) * 3 + 1, rng, named)
    assert_close(ours.buffers["running_mean"], ref.running_mean, "running_mean", ATOL)
    assert_close(ours.buffers["running_var"], ref.running_var, "running_var", ATOL)
    ours.eval(), ref.eval(), ref.zero_grad()
    compare(ours, ref, rng.standard_normal(shape), rng, named)


def test_softmax_cross_entropy(rng):
    logits = rng.standard_normal((8, 5)) * 4
    y = rng.integers(0, 5, 8)
    loss, d = softmax_cross_entropy(logits, y)
    lt = t(logits)
    ref = F.cross_entropy(lt, torch.tensor(y))
    ref.backward()
    assert_close(np.array(loss), ref, "loss", ATOL)
    assert_close(d, lt.grad, "dlogits", ATOL)


def to_torch(model):
    """A torch copy of a minidress ``Sequential`` (same weights), and a map from our parameter
    names to the torch parameters."""
    named = {}

    def convert(layer, prefix):
        if isinstance(layer, Linear):
            m = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)
        elif isinstance(layer, Conv2d):
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, bias="bias" in layer.params)
        elif isinstance(layer, BatchNorm):
            m = _BN(layer.num_features)
        elif isinstance(layer, ReLU):
            return nn.ReLU()
        elif isinstance(layer, MaxPool2d):
            return nn.MaxPool2d(layer.k, layer.stride)
        elif isinstance(layer, GlobalAvgPool):
            return _Lambda(lambda x: x.mean(dim=(2, 3)))
        elif isinstance(layer, Sequential):
            return nn.Sequential(*[convert(c, f"{prefix}{i}.") for i, c in layer.children()])
        elif isinstance(layer, PreActBlock):
            return _PreAct({n: convert(c, f"{prefix}{n}.") for n, c in layer.children()})
        else:  # Flatten
            return nn.Flatten()
        m = m.double()
        for k, v in layer.params.items():
            getattr(m, k).data = torch.tensor(v)
            named[prefix + k] = getattr(m, k)
        return m

    return convert(model, ""), named


class _Lambda(_Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class _BN(_Module):
    """Batch norm over dim 1 for 2-D and 4-D input, like ours."""
    def __init__(self, n):
        super().__init__()
        self.bn = nn.BatchNorm2d(n)
        self.weight, self.bias = self.bn.weight, self.bn.bias

    def forward(self, x):
        return self.bn(x[:, :, None, None])[:, :, 0, 0] if x.dim() == 2 else self.bn(x)


class _PreAct(_Module):
    def __init__(self, parts):
        super().__init__()
        self.p = nn.ModuleDict(parts)

    def forward(self, x):
        p = self.p
        a = p["relu1"](p["bn1"](x))
        out = p["conv2"](p["relu2"](p["bn2"](p["conv1"](a))))
        return out + (p["proj"](a) if "proj" in p else x)


@pytest.mark.parametrize("build,shape", [
    (lambda: mlp([64, 32, 16, 10], dtype=np.float64, batchnorm=True), (8, 1, 8, 8)),
    (lambda: lenet5((1, 28, 28), dtype=np.float64), (4, 1, 28, 28)),
    (lambda: lenet5((1, 8, 8), dtype=np.float64), (4, 1, 8, 8)),
    (lambda: preact_resnet((1, 28, 28), dtype=np.float64), (3, 1, 28, 28)),
    (lambda: preact_resnet((3, 32, 32), dtype=np.float64), (2, 3, 32, 32)),
])
def test_whole_models(rng, build, shape):
    ours = build()
    ref, named = to_torch(ours)
    compare(ours, ref, rng.standard_normal(shape), rng, named)

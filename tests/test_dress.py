"""DRESS: the joint weighted step against central differences and PyTorch, nesting, options.

The step tests here pin ``sample_prob=0`` (the levels only); the fine-grained options, with the
same checks, are in ``test_dress_fine.py``."""

import numpy as np
import pytest

from helpers import assert_close
from minidress.data import make_spirals
from minidress.dress import (Dress, DressOptions, cubic_density, recalibrate_batchnorm, resolve_lambdas,
                             sparsifiable_layers)
from minidress.nn.gradcheck import numerical_gradient, relative_error
from minidress.nn.layers import BatchNorm
from minidress.nn.losses import softmax_cross_entropy
from minidress.nn.models import mlp, small_cnn
from minidress.nn.optim import SGD
from minidress.nn.train import dense_step, fit

F64 = np.float64


def tiny_mlp(seed=0, batchnorm=True):
    return mlp([6, 8, 7, 5, 3], seed=seed, dtype=F64, batchnorm=batchnorm)


def weighted_loss(dress, x, y):
    """sum_k lambda_k * loss_k, computed level by level with the forward pass only."""
    total = 0.0
    for k, (d, lam) in enumerate(zip(dress.level_densities(), dress.lambdas)):
        dress.use(d, level=k)
        total += lam * softmax_cross_entropy(dress.model.forward(x), y)[0]
    return total


@pytest.mark.parametrize("norm", ["per_level", "per_level_stats", "shared"])
@pytest.mark.parametrize("lambdas", ["uniform", "inverse_density", [0.5, 2.0, 1.0]])
def test_joint_step_gradient_is_the_weighted_loss_gradient(rng, norm, lambdas):
    model = tiny_mlp()
    dress = Dress(model, levels=(1.0, 0.5, 0.2), lambdas=lambdas, norm=norm, sample_prob=0.0)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    loss, _, grads = dress.joint_step(model, x, y)
    assert loss == pytest.approx(weighted_loss(dress, x, y), rel=1e-12)
    for name, p in model.parameters().items():
        num = numerical_gradient(lambda: weighted_loss(dress, x, y), p)
        assert relative_error(grads[name], num) < 1e-7, name


def test_joint_step_on_a_cnn_matches_central_differences(rng):
    model = small_cnn((1, 6, 6), 3, widths=(2, 3, 4), dtype=F64)
    dress = Dress(model, levels=(1.0, 0.4), dense_first_last=False, sample_prob=0.0)
    x, y = rng.standard_normal((4, 1, 6, 6)), rng.integers(0, 3, 4)
    _, _, grads = dress.joint_step(model, x, y)
    for name in ["0.weight", "3.weight", "1.weight", "12.weight"]:
        p = model.parameters()[name]
        assert relative_error(grads[name], numerical_gradient(lambda: weighted_loss(dress, x, y), p)) < 1e-7


def test_each_level_trains_only_the_weights_it_keeps(rng):
    model = tiny_mlp()
    dress = Dress(model, levels=(0.5, 0.25), lambdas=[1.0, 0.0])
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    _, _, grads = dress.joint_step(model, x, y)
    for name, layer in dress.layers.items():
        dress.use(0.5)
        kept = layer.mask.astype(bool)
        assert np.all(grads[f"{name}.weight"][~kept] == 0)
        assert np.any(grads[f"{name}.weight"][kept] != 0)
    # per-level batch norm: level 1 had lambda 0, so its affine row got no gradient
    bn = dress.batchnorms[0]
    assert np.all(grads["2.weight"][1] == 0) and np.any(grads["2.weight"][0] != 0)
    assert isinstance(bn, BatchNorm) and bn.n_slots == 2 and bn.params["weight"].shape == (2, 8)


def test_joint_step_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    model = tiny_mlp(batchnorm=False)
    dress = Dress(model, levels=(1.0, 0.5, 0.25), lambdas="density", sample_prob=0.0)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    masks = {}
    for d in dress.levels:
        dress.use(d)
        masks[d] = {n: torch.tensor(l.mask) for n, l in dress.layers.items()}
    params = {n: torch.tensor(p, requires_grad=True) for n, p in model.parameters().items()}
    loss, _, grads = dress.joint_step(model, x, y)
    total = 0
    for d, lam in zip(dress.levels, dress.lambdas):
        h = torch.tensor(x)
        for i in (1, 3, 5, 7):
            w = params[f"{i}.weight"] * masks[d][str(i)] if str(i) in masks[d] else params[f"{i}.weight"]
            h = torch.nn.functional.linear(h, w, params[f"{i}.bias"])
            h = torch.relu(h) if i < 7 else h
        total = total + lam * torch.nn.functional.cross_entropy(h, torch.tensor(y))
    total.backward()
    assert_close(np.array(loss), total, "weighted loss", 1e-10)
    for n, p in params.items():
        assert_close(grads[n], p.grad, f"grad {n}", 1e-10)


def test_single_dense_level_is_plain_training(rng):
    a, b = tiny_mlp(seed=3, batchnorm=False), tiny_mlp(seed=3, batchnorm=False)
    dress = Dress(b, levels=(1.0,))
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    la, _, ga = dense_step(a, x, y)
    lb, _, gb = dress.joint_step(b, x, y)
    assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in ga)


def test_levels_are_nested_and_any_density_works(rng):
    model = small_cnn(seed=1)
    dress = Dress(model)
    assert list(dress.layers) == ["3", "7"]           # first conv and classifier stay dense
    prev = None
    for d in sorted([0.05, 0.1, 0.17, 0.25, 0.5, 0.8, 1.0]):
        dress.use(d)
        m = {n: l.mask.astype(bool) for n, l in dress.layers.items()}
        if prev:
            assert all(np.all(prev[n] <= m[n]) for n in m)
        for n, layer in dress.layers.items():
            rows = m[n].reshape(m[n].shape[0], -1)
            assert np.all(rows.sum(axis=1) == rows.sum(axis=1)[0])  # balanced rows
        prev = m
    assert all(l.mask.all() for l in dress.layers.values())


def test_weights_are_never_edited_by_masks(rng):
    model = tiny_mlp()
    before = {k: v.copy() for k, v in model.parameters().items()}
    dress = Dress(model, levels=(1.0, 0.1))
    dress.use(0.1)
    model.forward(rng.standard_normal((4, 6)))
    for name in ["1", "4", "7", "10"]:   # every Linear, sparsified or not
        assert np.array_equal(before[f"{name}.weight"], model.parameters()[f"{name}.weight"])


def test_kernels_train_the_same_network(rng):
    """kernel_max_density=1: every level's sparsified Linear layers run on their kept weights
    through the row-sparse kernels; the joint step must give the same losses and gradients."""
    x, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    results = []
    for kmd in (0.0, 1.0):
        dress = Dress(tiny_mlp(), levels=(1.0, 0.5, 0.2), kernel_max_density=kmd, dense_first_last=False)
        loss, _, grads = dress.joint_step(dress.model, x, y)
        results.append((loss, dress.last_losses.copy(), grads))
        assert all((layer.kept is not None) == (kmd > 0) for layer in dress.layers.values())
    (l0, ls0, g0), (l1, ls1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-12) and np.allclose(ls0, ls1, rtol=1e-12, atol=0)
    for name in g0:
        assert_close(g1[name], g0[name], name, atol=1e-12, label="dense masked")
    with pytest.raises(ValueError, match="kernel_max_density must be in"):
        Dress(tiny_mlp(), kernel_max_density=1.5)


def test_lambdas_and_ramp():
    assert np.allclose(resolve_lambdas("uniform", (1, 0.5)), [1, 1])          # mean 1: sum_k loss_k
    assert np.allclose(resolve_lambdas("density", (1, 0.5, 0.5)), [1.5, 0.75, 0.75])
    assert np.allclose(resolve_lambdas("inverse_density", (1, 0.5)), [2 / 3, 4 / 3])
    assert np.allclose(resolve_lambdas("sqrt_inverse_density", (1, 0.25)), [2 / 3, 4 / 3])
    assert np.allclose(resolve_lambdas([2, 1], (1, 0.5)), [2, 1])
    with pytest.raises(ValueError, match="lambdas must be 2 finite"):
        resolve_lambdas([1, -1], (1, 0.5))
    with pytest.raises(ValueError, match="lambdas must be one of"):
        resolve_lambdas("equal", (1, 0.5))
    # The densest level's weight: 1 by default (a single network's), the scheme's on request,
    # whichever position it holds; a list stays as given.
    sqrt = resolve_lambdas("sqrt_inverse_density", (0.25, 1.0, 0.5))
    assert np.array_equal(DressOptions(levels=(0.25, 1.0, 0.5)).lambda_weights(), [sqrt[0], 1.0, sqrt[2]])
    assert np.array_equal(DressOptions(levels=(0.25, 1.0, 0.5), densest_weight="scheme").lambda_weights(), sqrt)
    assert np.array_equal(DressOptions(levels=(1.0, 0.5), lambdas="density", densest_weight=2).lambda_weights(),
                          [2.0, resolve_lambdas("density", (1.0, 0.5))[1]])
    assert np.array_equal(DressOptions(levels=(1.0, 0.5), lambdas=(3, 1)).lambda_weights(), [3, 1])
    assert np.allclose(Dress(tiny_mlp(), levels=(1.0, 0.5)).lambdas, [1.0, np.sqrt(2) / ((1 + np.sqrt(2)) / 2)])
    assert cubic_density(0.1, 0, 100) == 1.0
    assert cubic_density(0.1, 100, 100) == pytest.approx(0.1)
    assert cubic_density(0.1, 50, 100) == pytest.approx(0.1 + 0.9 / 8)


def test_option_errors():
    with pytest.raises(ValueError, match="levels must be in"):
        Dress(tiny_mlp(), levels=(1.0, 0.0))
    with pytest.raises(ValueError, match="distinct"):
        Dress(tiny_mlp(), levels=(0.5, 0.5))
    with pytest.raises(ValueError, match="norm must be one of"):
        Dress(tiny_mlp(), norm="batch")
    with pytest.raises(ValueError, match="no layer to sparsify"):
        sparsifiable_layers(mlp([4, 3, 2]))


def test_resample_every_reranks_and_ramp_moves_densities(rng):
    x, y = make_spirals(120, seed=0)
    model = mlp([2, 16, 16, 3], seed=0)
    dress = Dress(model, levels=(1.0, 0.25), resample_every=3, ramp="cubic", ramp_steps=8)
    ranks0 = dress.layers["3"].buffers["ranks"].copy()
    fit(model, SGD(lr=0.5), x, y, epochs=1, batch_size=20, step=dress.joint_step, quiet=True)
    assert int(model.buffers["dress_step"]) == 6
    assert not np.array_equal(ranks0, dress.layers["3"].buffers["ranks"])
    assert dress.level_densities(4)[1] == pytest.approx(cubic_density(0.25, 4, 8))


def test_dress_training_resumes_bit_identically(tmp_path):
    x, y = make_spirals(200, seed=1)

    def run(epochs, **kw):
        model = mlp([2, 16, 16, 16, 3], seed=0, batchnorm=True)
        dress = Dress(model, levels=(1.0, 0.5, 0.25), resample_every=4)
        fit(model, SGD(lr=0.1, momentum=0.9), x, y, epochs=epochs, batch_size=32, seed=0,
            step=dress.joint_step, quiet=True, **kw)
        return model

    full = run(3)
    ckpt = tmp_path / "d.npz"
    run(2, checkpoint_path=ckpt)   # the same run, stopped after epoch 2 (a constant lr: same schedule)
    resumed = run(3, resume=ckpt)
    assert all(np.array_equal(v, resumed.state()[k]) for k, v in full.state().items())


def test_recalibration_uses_the_sub_network_and_leaves_buffers_alone(rng):
    model = small_cnn(seed=0)
    dress = Dress(model)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    before = {k: v.copy() for k, v in model.state().items()}
    recalibrate_batchnorm(dress, x, 0.3, n_batches=4, batch_size=64, seed=0)
    assert all(np.array_equal(before[k], v) for k, v in model.state().items())
    bn = dress.batchnorms[1]
    # with all 64 samples in every batch, the average of 4 identical batch means is that mean
    model.train()
    h = x
    for layer in model.layers[:4]:
        h = layer.forward(h)
    assert_close(bn.stats_override[0], h.mean(axis=(0, 2, 3)), "recalibrated mean", 1e-5, "direct")
    dress.use(0.3)
    assert bn.stats_override is None

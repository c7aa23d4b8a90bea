"""Every backward pass against central differences in float64 (relative error < 1e-7),
and the im2col convolution against its naive loop version."""
import numpy as np
import pytest

from minidress.nn.gradcheck import check_layer, numerical_gradient, relative_error
from minidress.nn.layers import (AvgPool2d, BatchNorm, Conv2d, Flatten, GlobalAvgPool, Linear, in_slot,
                              MaxPool2d, PreActBlock, ReLU, Sequential, conv2d_forward,
                              conv2d_forward_naive)
from minidress.nn.losses import softmax_cross_entropy
from minidress.nn.models import lenet5, mlp, preact_resnet

TOL = 1e-7
F64 = np.float64


def assert_gradients_ok(layer, x):
    errors = check_layer(layer, x)
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("n,fin,fout", [(1, 1, 1), (3, 5, 4), (7, 2, 9)])
def test_linear_gradients(rng, n, fin, fout):
    assert_gradients_ok(Linear(fin, fout, rng, F64), rng.standard_normal((n, fin)))


def test_linear_masked_gradients(rng):
    layer = Linear(6, 4, rng, F64)
    layer.mask = (rng.random((4, 6)) < 0.5).astype(F64)
    x = rng.standard_normal((3, 6))
    assert_gradients_ok(layer, x)
    layer.forward(x)
    layer.backward(np.ones((3, 4)))
    assert np.all(layer.grads["weight"][layer.mask == 0] == 0)


@pytest.mark.parametrize("n,fin,fout,k", [(3, 6, 4, 3), (1, 9, 2, 1), (10, 5, 7, 5)])
def test_linear_through_the_rowsparse_kernels(rng, n, fin, fout, k):
    """``kept`` (row-sparse kernels on the kept weights) against central differences, and against
    the dense product with the equivalent mask."""
    layer = Linear(fin, fout, rng, F64)
    layer.params["bias"] = rng.standard_normal(fout)
    kept = np.stack([rng.permutation(fin)[:k] for _ in range(fout)]).astype(np.uint8)
    mask = np.zeros((fout, fin))
    np.put_along_axis(mask, kept.astype(int), 1.0, axis=1)
    x, dout = rng.standard_normal((n, fin)), rng.standard_normal((n, fout))
    layer.kept = kept
    assert_gradients_ok(layer, x)
    sparse = layer.forward(x), layer.backward(dout), dict(layer.grads)
    layer.kept, layer.mask = None, mask
    dense = layer.forward(x), layer.backward(dout), dict(layer.grads)
    for a, b in zip(sparse[:2], dense[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(sparse[2][name], dense[2][name], rtol=1e-12, atol=1e-12)
    assert np.all(sparse[2]["weight"][mask == 0] == 0)


# (N, C_in, H, W, C_out, k, stride, padding): odd sizes, stride > 1 leaving a remainder,
# padding larger than needed, 1x1 kernels, kernel as large as the padded input.
CONV_CASES = [
    (2, 3, 5, 5, 4, 3, 1, 1),
    (1, 2, 7, 6, 3, 3, 2, 0),
    (2, 1, 6, 6, 2, 3, 2, 1),
    (1, 2, 4, 5, 3, 1, 1, 0),
    (1, 2, 5, 5, 2, 1, 2, 0),
    (2, 2, 3, 3, 2, 5, 1, 1),
    (1, 1, 4, 4, 2, 2, 3, 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gradients(rng, case):
    n, c, h, w, co, k, s, p = case
    layer = Conv2d(c, co, k, s, p, rng, F64)
    layer.params["bias"] = rng.standard_normal(co)
    assert_gradients_ok(layer, rng.standard_normal((n, c, h, w)))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_im2col_matches_naive(rng, case, dtype):
    n, c, h, w, co, k, s, p = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((co, c, k, k)).astype(dtype)
    b = rng.standard_normal(co).astype(dtype)
    fast, _ = conv2d_forward(x, wt, b, s, p)
    naive = conv2d_forward_naive(x, wt, b, s, p)
    assert fast.dtype == dtype
    np.testing.assert_allclose(fast, naive, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_conv_masked_gradients(rng):
    layer = Conv2d(2, 3, 3, 1, 1, rng, F64)
    layer.mask = (rng.random(layer.params["weight"].shape) < 0.4).astype(F64)
    assert_gradients_ok(layer, rng.standard_normal((2, 2, 4, 4)))


@pytest.mark.parametrize("shape,k,s", [((2, 3, 4, 4), 2, 2), ((1, 2, 5, 7), 3, 2), ((2, 1, 5, 5), 2, 1)])
def test_pool_gradients(rng, shape, k, s):
    # Distinct values keep the max-pool's choice away from ties under the +-h perturbation.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(F64) / 10
    assert_gradients_ok(MaxPool2d(k, s), x)
    assert_gradients_ok(AvgPool2d(k, s), rng.standard_normal(shape))


def test_relu_flatten_global_pool_gradients(rng):
    x = rng.standard_normal((3, 2, 3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # away from the kink
    assert_gradients_ok(ReLU(), x)
    assert_gradients_ok(Flatten(), x)
    assert_gradients_ok(GlobalAvgPool(), x)


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 3, 3), (2, 3, 1, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(rng, shape, training):
    bn = BatchNorm(shape[1], dtype=F64)
    bn.params["weight"] = rng.standard_normal(shape[1])
    bn.params["bias"] = rng.standard_normal(shape[1])
    bn.buffers["running_mean"] = rng.standard_normal(shape[1])
    bn.buffers["running_var"] = rng.random(shape[1]) + 0.5
    bn.train(training)
    assert_gradients_ok(bn, rng.standard_normal(shape) * 2 + 1)


@pytest.mark.parametrize("cin,cout,stride", [(2, 2, 1), (2, 3, 2), (2, 3, 1)])
def test_preact_block_gradients(rng, cin, cout, stride):
    assert_gradients_ok(PreActBlock(cin, cout, stride, rng, F64), rng.standard_normal((2, cin, 5, 5)))


def test_sequential_gradients(rng):
    # No conv bias: the batch norm after it cancels a bias exactly (its gradient is 0).
    net = Sequential(Conv2d(1, 2, 3, 1, 1, rng, F64, bias=False), BatchNorm(2, dtype=F64), ReLU(), MaxPool2d(2),
                     Flatten(), Linear(8, 3, rng, F64))
    assert_gradients_ok(net, rng.standard_normal((3, 1, 4, 4)))


def test_softmax_cross_entropy_gradient(rng):
    logits = rng.standard_normal((6, 5)) * 3
    y = rng.integers(0, 5, 6)
    _, d = softmax_cross_entropy(logits, y)
    num = numerical_gradient(lambda: softmax_cross_entropy(logits, y)[0], logits)
    assert relative_error(d, num) < TOL


def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]])
    loss, d = softmax_cross_entropy(logits, np.array([0, 1]))
    assert np.isfinite(loss) and loss == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isfinite(d))
    loss, _ = softmax_cross_entropy(np.array([[0.0, 1000.0]]), np.array([0]))
    assert loss == pytest.approx(1000.0)


@pytest.mark.parametrize("build,shape", [
    (lambda: mlp([16, 7, 5, 3], dtype=F64, batchnorm=True), (4, 1, 4, 4)),
    (lambda: lenet5((1, 8, 8), 3, dtype=F64, widths=(2, 3, 4, 4)), (2, 1, 8, 8)),
])
def test_whole_model_gradients(build, shape):
    rng = np.random.default_rng(7)
    assert_gradients_ok(build(), rng.standard_normal(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_follows_parameters(dtype):
    rng = np.random.default_rng(0)
    for net, shape in [(mlp([64, 10, 3], dtype=dtype, batchnorm=True), (4, 1, 8, 8)),
                       (preact_resnet((1, 28, 28), dtype=dtype), (2, 1, 28, 28))]:
        x = rng.standard_normal(shape).astype(dtype)
        out = net(x)
        assert out.dtype == dtype
        assert net.backward(np.ones_like(out)).dtype == dtype
        assert all(g.dtype == dtype for g in net.gradients().values())


def test_input_errors_name_what_was_expected():
    lin = Linear(4, 2)
    with pytest.raises(ValueError, match=r"x.shape\[1\] == 4"):
        lin(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="float32"):
        lin(np.zeros((3, 4), np.float64))
    with pytest.raises(ValueError, match="4-D"):
        Conv2d(1, 2, 3)(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        Conv2d(1, 2, 5)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="more than one value"):
        BatchNorm(3)(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_state_round_trip_and_mismatch(rng):
    a, b = mlp([8, 4, 2], seed=1, batchnorm=True), mlp([8, 4, 2], seed=2, batchnorm=True)
    a.train()(rng.standard_normal((5, 8)).astype(np.float32))  # move running statistics
    b.load_state(a.state())
    for k, v in a.state().items():
        assert np.array_equal(v, b.state()[k])
    with pytest.raises(ValueError, match="missing"):
        b.load_state({})


def test_same_seed_same_weights():
    s1, s2 = preact_resnet(seed=3).state(), preact_resnet(seed=3).state()
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert not np.array_equal(s1["0.weight"], preact_resnet(seed=4).state()["0.weight"])


# ---------------------------------------------------------------------------------------------
# One BatchNorm class with slots
# ---------------------------------------------------------------------------------------------

def test_batchnorm_slots_start_equal_and_train_only_the_slot_in_use():
    bn = BatchNorm(3, dtype=np.float64)
    bn.params["weight"][...] = [1.0, 2.0, 3.0]
    bn.set_slots(2, per_slot_stats=True, per_slot_affine=False)
    assert bn.params["weight"].shape == (1, 3) and bn.buffers["running_mean"].shape == (2, 3)
    assert np.array_equal(bn.params["weight"][0], [1.0, 2.0, 3.0])
    x = np.random.default_rng(0).standard_normal((4, 3))
    bn.slot = 1
    bn.forward(x)
    bn.backward(np.ones_like(x))
    assert np.all(bn.buffers["running_mean"][0] == 0) and np.any(bn.buffers["running_mean"][1] != 0)
    assert bn.grads["weight"].shape == (1, 3)                     # a shared pair: its only row
    bn.set_slots(2, per_slot_stats=True, per_slot_affine=False)  # the same layout again: no-op
    with pytest.raises(ValueError, match="already has slots"):
        bn.set_slots(3)
    bn.slot = 2
    with pytest.raises(ValueError, match=r"slot must be in \[0, 2\), got 2"):
        bn.forward(x)


def test_in_slot_is_the_one_slot_rule():
    per_slot, shared, plain = np.arange(6).reshape(3, 2), np.arange(2)[None], np.arange(2)
    assert in_slot(per_slot, 2).tolist() == [4, 5]
    assert in_slot(shared, 2).tolist() == [0, 1] and in_slot(plain, 2).tolist() == [0, 1]


def test_a_one_slot_peer_checkpoint_names_its_conversion():
    model = Sequential(Linear(3, 2, dtype=np.float64), BatchNorm(2, dtype=np.float64))
    state = {k: (v[None] if k.startswith("1.") else v) for k, v in model.state().items()}
    with pytest.raises(ValueError, match=r"state\['1.weight'\] has shape \(1, 2\).*\[0\]"):
        model.load_state(state)


@pytest.mark.parametrize("build, shape", [(lambda dt: mlp([12, 7, 5], seed=1, dtype=dt), (3, 12)),
                                          (lambda dt: lenet5((1, 12, 12), dtype=dt), (2, 1, 12, 12)),
                                          (lambda dt: preact_resnet((1, 8, 8), widths=(4, 4, 8), dtype=dt),
                                           (2, 1, 8, 8))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_backward_skips_only_the_input_gradient(rng, build, shape, dtype):
    # What training calls (input_grad=False): every parameter's gradient bit for bit as with the
    # input's gradient, None returned, and the first layer asked for no input gradient.
    x, dout = rng.standard_normal(shape).astype(dtype), None
    grads = []
    for input_grad in (True, False):
        model = build(dtype)
        out = model.forward(x)
        dout = rng.standard_normal(out.shape).astype(dtype) if dout is None else dout
        first = next(layer for layer in model.layers if layer.parameters())
        calls, backward = [], first.backward
        first.backward = lambda d, **kw: calls.append(kw) or backward(d, **kw)
        dx = model.backward(dout, input_grad=input_grad)
        assert (dx is None) == (not input_grad) and calls == ([{}] if input_grad else [{"input_grad": False}])
        grads.append(model.gradients())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert np.array_equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("dtype, direct", [(np.float32, False), (np.float32, True), (np.float64, None)])
def test_conv_backward_without_input_gradient(rng, dtype, direct):
    from minidress.kernels import conv_train
    from minidress.nn.layers import conv2d_backward, conv2d_forward_reference
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(dtype), np.zeros(4, dtype)
    if direct is None:
        out, cache = conv2d_forward_reference(x, w, b, 2, 1)
    else:
        out, cache = conv_train.conv2d_forward(x, w, b, 2, 1, direct=direct)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = conv2d_backward(dout, cache)
    none, dw2, db2 = conv2d_backward(dout, cache, input_grad=False)
    assert none is None and dx.shape == x.shape
    assert np.array_equal(dw, dw2) and np.array_equal(db, db2)

"""Training for compression: the straight-through estimator (gradient-checked: the identity inside
the clip range), the QAT step (the joint step's gradients at the quantized weights), universal
compression reproducible bit for bit from its seed, and the device-memory count by hand."""
import copy

import numpy as np
import pytest

from minidress.deploy.memory import device_memory
from minidress.deploy.quantized import QuantizedStore
from minidress.deploy.store import Store
from minidress.kernels.quantized import quantize_rows
from minidress.nn.gradcheck import numerical_gradient, relative_error
from minidress.quantize import qat, universal
from test_store import make_dress


def test_ste_backward_is_the_gradient_of_the_clip_without_rounding(rng):
    """Where a backward exists: ``w -> sum(g * s * clip(w / s, -qmax, qmax))`` (the quantizer
    with its rounding removed) has gradient ``g`` inside the range and 0 outside: the STE's."""
    scale = np.array([0.1, 0.02, 0.5])
    w = rng.standard_normal((3, 6)) * 1.5
    w[np.abs(np.abs(w) - 7 * scale[:, None]) < 1e-3] += 0.01          # keep h away from the edge
    g = rng.standard_normal(w.shape)

    def loss():
        return float(np.sum(g * scale[:, None] * np.clip(w / scale[:, None], -7, 7)))
    _, inside = qat.fake_quantize(w, scale, 4)
    assert inside.any() and not inside.all()
    assert relative_error(numerical_gradient(loss, w), qat.ste_backward(g, inside)) < 1e-8
    assert np.array_equal(qat.ste_backward(g, inside)[inside], g[inside])


def test_fake_quantize_is_the_stores_grid(rng):
    w = rng.standard_normal((4, 9)).astype(np.float32)
    scale = np.abs(w).max(axis=1) / 127
    wq, inside = qat.fake_quantize(w, scale, 8)
    assert inside.all() and np.array_equal(wq, quantize_rows(w, scale, 8) * scale[:, None])


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_step_is_the_joint_step_at_the_quantized_weights(rng, bits):
    dress, _ = make_dress("cnn", dtype=np.float64)
    twin = copy.deepcopy(dress)
    xb, yb = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 10, 5)
    before = {n: l.params["weight"].copy() for n, l in dress.layers.items()}
    quantizer = qat.grid_quantizer(dress, bits)
    loss, _, grads = qat.qat_step(dress, quantizer)(dress.model, xb, yb)
    inside = {}
    for name, layer in twin.layers.items():
        layer.params["weight"][...], inside[name] = quantizer(name, layer.params["weight"])
    want_loss, _, want = twin.joint_step(twin.model, xb, yb)
    assert loss == want_loss
    for name, g in want.items():
        layer = name.rsplit(".", 1)[0]
        expect = qat.ste_backward(g, inside[layer]) if layer in dress.layers and name.endswith("weight") else g
        assert np.array_equal(grads[name], expect), name
    for n, l in dress.layers.items():       # the float weights are what the optimizer sees
        assert np.array_equal(l.params["weight"], before[n])


def test_qat_scales_are_the_quantized_stores(rng):
    dress, meta = make_dress(dtype=np.float32)
    qs = QuantizedStore.from_store(Store.from_dress(dress, "rank", meta), 4)
    quantizer = qat.grid_quantizer(dress, 4)
    for name, layer in dress.layers.items():
        wq, _ = quantizer(name, layer.params["weight"])
        rs = qs.sparse[name]
        got = np.take_along_axis(wq.reshape(len(wq), -1), rs.cols.astype(int), axis=1)
        assert np.array_equal(got, rs.values), name


def test_universal_code_is_reproducible_bit_for_bit_from_its_seed():
    dress, meta = make_dress(dtype=np.float32)
    sparse = Store.from_dress(dress, "rank", meta).sparse
    steps = universal.layer_steps(sparse, 0.25)
    one, two = universal.encode(sparse, steps, seed=7), universal.encode(sparse, steps, seed=7)
    assert one.streams == two.streams and one.coder == min(one.sizes, key=one.sizes.get)
    a, b = universal.decode(one), universal.decode(two)
    quantizer = universal.dithered_quantizer(dress, steps, seed=7)
    for name, rs in sparse.items():
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], rs.cols)
        # the error is at most half a step, and it is what fine-tuning trained on
        assert np.abs(a[name][0] - rs.values).max() <= steps[name] / 2 * (1 + 1e-5)
        w_hat, _ = quantizer(name, dress.layers[name].params["weight"])
        assert np.array_equal(np.take_along_axis(w_hat.reshape(len(w_hat), -1), rs.cols.astype(int), axis=1),
                              a[name][0])
    other = universal.decode(universal.encode(sparse, steps, seed=8))
    assert not np.array_equal(other[name][0], a[name][0])
    for coder in universal.CODERS:
        code = universal.encode(sparse, steps, seed=7, coder=coder)
        assert np.array_equal(universal.decode(code)[name][0], a[name][0])
    with pytest.raises(ValueError, match="coder must be one of"):
        universal.encode(sparse, steps, 7, coder="gzip")


def test_device_memory_by_hand_and_sparsity_does_not_shrink_activations():
    dress, meta = make_dress("mlp", dtype=np.float32)         # 64 -> 24 -> 16 -> 10
    store = Store.from_dress(dress, "rank", meta)
    mem = device_memory(store, batches=(1, 4))
    # batch 1: the input (kept by the registers) + the second product's input and output, 64 + 24
    # + 16 (batch norm and ReLU run in place, in the products' epilogue); batch 4: the input, its
    # flattened copy and the first product's output
    assert mem[1.0]["activations"] == {1: 4 * (64 + 24 + 16), 4: 4 * 4 * (64 + 64 + 24)}
    assert mem[1.0]["scratch"][1] == 0
    assert all(m["activations"] == mem[1.0]["activations"] for m in mem.values())
    assert mem[0.1]["macs"] < mem[1.0]["macs"] and mem[0.1]["params_level"] < mem[1.0]["params_level"]
    assert mem[1.0]["params_store"] == store.nbytes()
    with pytest.raises(ValueError, match="batches must be positive"):
        device_memory(store, batches=(0,))


@pytest.mark.parametrize("bits", [8, 4])
def test_admm_quantization_ends_row_balanced_and_on_the_grid(rng, bits):
    from minidress.quantize.admm import ADMMQuantizer, project_on_grid
    from test_pruning import tiny_batch, tiny_mlp, train
    quantizer = ADMMQuantizer(tiny_mlp(), 0.5, admm_steps=12, bits=bits, update_every=3)
    layer = quantizer.layers["3"]
    w, u = layer.params["weight"].copy(), layer.buffers["admm_u"].copy()
    quantizer.update_z_u()                                          # the Z-step's definition
    assert np.array_equal(layer.buffers["admm_z"], project_on_grid(w + u, 0.5, bits))
    x, y = tiny_batch(rng, 40)
    train(quantizer, x, y, epochs=4)
    quantizer.finish()
    assert quantizer.row_balanced() and quantizer.options()["bits"] == bits
    for layer in quantizer.layers.values():
        wk = layer.params["weight"].reshape(len(layer.params["weight"]), -1)
        assert np.array_equal(wk, project_on_grid(wk, 0.5, bits))     # a fixed point: on the grid
    with pytest.raises(ValueError, match="bits must be one of"):
        ADMMQuantizer(tiny_mlp(), 0.5, admm_steps=1, bits=2)

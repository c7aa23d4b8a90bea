"""Interop (minidress/app/export.py): a DRESS sub-network as a torch module and a
torch.nn.utils.prune state dict, torch weights back into minidress, and ONNX, each against
minidress's own eval-mode forward."""
from dataclasses import asdict

import numpy as np
import pytest

from minidress.app.cli import main
from minidress.app.export import (at_density, export_onnx, load_network, load_torch_state_dict,
                                  to_torch, torch_module)
from minidress.checkpoint import save_checkpoint
from minidress.dress import Dress, DressOptions
from minidress.masks import nearest_level
from minidress.nn.layers import eval_mode
from minidress.nn.models import build_model

F64_TOL = 1e-10       # float64: torch and minidress differ only in the order of additions
# ONNX Runtime float32 against minidress float32, relative to the largest logit: measured up to
# 5.0e-7 (2.6e-6 on logits up to 5.3; other kernels, other orders of additions): a factor of 20.
ONNX_F32_RTOL = 1e-5
LEVELS = (1.0, 0.5, 0.25)
SPECS = {
    "mlp": {"name": "mlp", "input_shape": [1, 8, 8], "n_classes": 10, "hidden": [32, 16]},
    "cnn": {"name": "cnn", "input_shape": [1, 8, 8], "n_classes": 10},
    "lenet5": {"name": "lenet5", "input_shape": [1, 8, 8], "n_classes": 10},
    "resnet": {"name": "resnet", "input_shape": [1, 8, 8], "n_classes": 10},
}


def dress_for(arch, dtype=np.float64, seed=0, **options):
    """A DRESS model with weights and per-level batch-norm slots that all differ."""
    rng = np.random.default_rng(seed)
    dress = Dress(build_model(SPECS[arch], dtype=dtype, rng=rng), levels=LEVELS, **options)
    for bn in dress.batchnorms:
        shape = bn.params["weight"].shape
        bn.params["weight"][...] = 1 + 0.2 * rng.standard_normal(shape)
        bn.params["bias"][...] = 0.2 * rng.standard_normal(shape)
        bn.buffers["running_mean"][...] = 0.3 * rng.standard_normal(shape)
        bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, shape)
    return dress


def batch(dtype=np.float64, n=4):
    return np.random.default_rng(7).standard_normal((n, 1, 8, 8)).astype(dtype)


def ours(net, x, density=None):
    model = at_density(net, density)
    with eval_mode(model):
        return model.forward(x)


def max_diff(a, b):
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    return float(np.max(np.abs(a - b)))


@pytest.mark.torch
@pytest.mark.parametrize("arch", sorted(SPECS))
@pytest.mark.parametrize("density", [0.5, 0.3, 0.1])      # a level, between levels, below them
def test_torch_module_matches_minidress_in_float64(arch, density):
    torch = pytest.importorskip("torch")
    dress, x = dress_for(arch), batch()
    module = to_torch(dress, density)
    expected = ours(dress, x, density)
    assert max_diff(expected, module(torch.from_numpy(x))) <= F64_TOL
    plain = to_torch(dress, density, prune=False)                 # weight * mask baked in
    assert max_diff(expected, plain(torch.from_numpy(x))) <= F64_TOL
    assert not any(k.endswith("weight_orig") for k in plain.state_dict())
    # The state dict is the one torch.nn.utils.prune writes, with minidress's masks.
    state = module.state_dict()
    for name, layer in dress.layers.items():
        assert f"{name}.weight" not in state
        np.testing.assert_array_equal(state[f"{name}.weight_mask"].numpy(), layer.mask)
        np.testing.assert_array_equal(state[f"{name}.weight_orig"].numpy(), layer.params["weight"])
    slot = nearest_level(LEVELS, density)
    for bn in dress.batchnorms:
        name = next(n.rstrip(".") for n, m in dress.model.named_layers() if m is bn)
        np.testing.assert_array_equal(state[f"{name}.running_var"].numpy(), bn.buffers["running_var"][slot])


@pytest.mark.torch
@pytest.mark.parametrize("arch", sorted(SPECS))
def test_a_state_dict_round_trips_through_torch_and_back(arch):
    """Export, rebuild the module from the spec alone, load the state dict there and back into
    a fresh minidress model: every forward agrees."""
    torch = pytest.importorskip("torch")
    dress, x = dress_for(arch), batch()
    state = to_torch(dress, 0.3).state_dict()
    rebuilt = torch_module(SPECS[arch], np.float64, state_dict=state)
    assert torch.nn.utils.prune.is_pruned(rebuilt)
    expected = ours(dress, x, 0.3)
    assert max_diff(expected, rebuilt(torch.from_numpy(x))) <= F64_TOL
    fresh = load_torch_state_dict(build_model(SPECS[arch], dtype=np.float64, seed=99), state)
    assert max_diff(expected, ours(fresh, x)) <= F64_TOL


@pytest.mark.torch
def test_weights_trained_in_torch_load_into_minidress():
    """A torch module with torch's own initialisation (and made-up statistics), unpruned and
    pruned, into a minidress model; batch norms with slots take it at one slot."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune
    module = torch_module(SPECS["cnn"], np.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_uniform_(m.weight)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
    prune.l1_unstructured(module[3], "weight", amount=0.6)
    x = batch()
    expected = module(torch.from_numpy(x))
    model = load_torch_state_dict(build_model(SPECS["cnn"], dtype=np.float64), module.state_dict())
    assert max_diff(ours(model, x), expected) <= F64_TOL
    dress = dress_for("cnn")
    before = dress.model.state()["1.running_var"].copy()
    load_torch_state_dict(dress.model, module.state_dict(), slot=2)
    after = dress.model.state()["1.running_var"]
    np.testing.assert_array_equal(after[2], module[1].running_var.numpy())
    np.testing.assert_array_equal(after[:2], before[:2])                   # the other slots untouched
    with pytest.raises(ValueError, match=r"slot must be an integer in \[0, 3\) for 1.weight"):
        load_torch_state_dict(dress.model, module.state_dict())


@pytest.mark.torch
def test_state_dict_mismatches_are_one_line_errors():
    pytest.importorskip("torch")
    model = build_model(SPECS["mlp"], dtype=np.float64)
    state = to_torch(model).state_dict()
    with pytest.raises(ValueError, match=r"^state_dict\['1.weight'\] must be float64 of shape \(32, 64\), got missing$"):
        load_torch_state_dict(model, {k: v for k, v in state.items() if k != "1.weight"})
    with pytest.raises(ValueError, match=r"entries the model does not: \['extra'\]"):
        load_torch_state_dict(model, {**state, "extra": state["1.weight"]})
    with pytest.raises(ValueError, match="got float32 of shape"):
        load_torch_state_dict(model, {k: v.float() for k, v in state.items()})


def test_density_is_required_for_dress_and_refused_for_dense():
    with pytest.raises(ValueError, match=r"density is required for a DRESS model \(trained levels \[1.0, 0.5, 0.25\]\)"):
        at_density(dress_for("mlp"))
    with pytest.raises(ValueError, match="density must be None for a dense model"):
        at_density(build_model(SPECS["mlp"]), 0.5)


@pytest.mark.onnx
@pytest.mark.parametrize("arch", sorted(SPECS))
def test_onnx_matches_minidress_in_float32(arch, tmp_path):
    """ONNX Runtime's CPU kernels are float32 for Conv (no float64), so the check is float32."""
    ort = pytest.importorskip("onnxruntime")
    dress, x = dress_for(arch, np.float32), batch(np.float32, n=3)
    path = export_onnx(dress, tmp_path / "m.onnx", SPECS[arch]["input_shape"], 0.3)
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    expected = ours(dress, x, 0.3)
    assert got.dtype == np.float32 and max_diff(expected, got) <= ONNX_F32_RTOL * np.abs(expected).max()


@pytest.mark.onnx
def test_onnx_mlp_in_float64(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dress, x = dress_for("mlp", dense_first_last=False), batch()
    path = export_onnx(dress, tmp_path / "m.onnx", [1, 8, 8], 0.25)
    assert max_diff(ours(dress, x, 0.25), ort.InferenceSession(str(path)).run(None, {"x": x})[0]) <= F64_TOL


@pytest.mark.onnx
@pytest.mark.torch
def test_cli_export_of_a_dress_checkpoint(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    dress = dress_for("cnn", np.float32)
    ckpt = save_checkpoint(tmp_path / "checkpoint.npz", dress.model,
                           meta={"model": SPECS["cnn"], "config": asdict(DressOptions(levels=LEVELS))})
    onnx_path, pt_path = tmp_path / "m.onnx", tmp_path / "m.pt"
    assert main(["export", str(ckpt), "--density", "0.3", "--onnx", str(onnx_path), "--torch", str(pt_path)]) == 0
    assert "masked weights stored densely" in capsys.readouterr().out
    net, spec = load_network(ckpt)
    x = batch(np.float32)
    expected = ours(net, x, 0.3)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
    assert max_diff(expected, got) <= ONNX_F32_RTOL * np.abs(expected).max()
    module = torch_module(spec, np.float32, state_dict=torch.load(pt_path))
    assert max_diff(expected, module(torch.from_numpy(x))) <= ONNX_F32_RTOL * np.abs(expected).max()
    assert main(["export", str(ckpt), "--onnx", str(onnx_path)]) == 2
    assert "density is required for a DRESS model" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--density", "0.3"]) == 2
    assert "at least one of --onnx FILE or --torch FILE" in capsys.readouterr().err

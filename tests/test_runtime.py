"""The deployed model: the same logits as the training-time model at every density, switching
without copies, MACs, and the latency-driven choice of density."""
import numpy as np
import pytest
from test_store import make_dress

from minidress.nn.metrics import macs
from minidress.deploy.runtime import DeployedModel
from minidress.deploy.store import Store
from minidress.nn.train import predict_logits

CASES = [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("lenet5", (1, 28, 28)), ("resnet", (1, 12, 12))]


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deployed_logits_match_the_dress_model_at_any_density(name, shape, dtype):
    dress, meta = make_dress(name, shape, dtype)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta))
    x = np.random.default_rng(2).standard_normal((6, *shape)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for d in (1.0, 0.5, 0.25, 0.1, 0.33, 0.04):
        dress.use(d)
        ref = predict_logits(dress.model, x)
        deployed.set_density(d)
        for batch in (x, x[:1]):              # batch 1 takes the gather kernel
            out = deployed.predict(batch)
            assert out.dtype == dtype and out.shape == (len(batch), 10)
            diff = np.abs(out - ref[:len(batch)]).max()
            assert diff <= tol * max(1.0, np.abs(ref).max()), f"{name} d={d}: ours vs Dress, max abs diff {diff:.3e}"
        assert deployed.macs() == macs(dress.model, shape)


@pytest.mark.parametrize("backend", ["dense", "csr"])
def test_rebuilding_backends_compute_the_same_network(backend):
    dress, meta = make_dress("cnn", (1, 8, 8), np.float64)
    store = Store.from_dress(dress, "rank", meta)
    ours, other = DeployedModel.from_store(store), DeployedModel.from_store(store, backend)
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8))
    for d in (1.0, 0.25, 0.13):
        np.testing.assert_allclose(other.set_density(d).predict(x), ours.set_density(d).predict(x),
                                   rtol=1e-12, atol=1e-12)
        assert other.macs() == ours.macs()
    assert other.weight_bytes() > store.nbytes() == ours.weight_bytes()
    with pytest.raises(ValueError, match="backend must be one of"):
        DeployedModel.from_store(store, "gpu")


def test_switching_copies_nothing_and_changes_only_prefix_lengths():
    dress, meta = make_dress("mlp", (1, 8, 8), np.float32)
    store = Store.from_dress(dress, "rank", meta)
    deployed = DeployedModel.from_store(store)
    sparse = [p for p in deployed._products if p.sparse is not None]
    assert sparse and all(p.sparse is store.sparse[n] for p, n in zip(sparse, store.sparse))
    before = {k: v.copy() for k, v in store.arrays().items()}
    ks = []
    for d in (1.0, 0.1, 0.5, 0.07):
        deployed.set_density(d)
        ks.append([p.k for p in sparse])
    assert ks[1] == [max(1, int(0.1 * 24 + 0.5))] and ks[3] == [2]
    assert all(np.array_equal(before[k], v) for k, v in store.arrays().items())
    assert deployed.weight_bytes() == store.nbytes()


def test_level_major_store_serves_only_its_levels():
    dress, meta = make_dress("cnn", (1, 8, 8), np.float64)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "level_major", meta))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8))
    for d in dress.levels:
        dress.use(d)
        np.testing.assert_allclose(deployed.set_density(d).predict(x), predict_logits(dress.model, x), atol=1e-12)
    with pytest.raises(ValueError, match="exact only at its levels"):
        deployed.set_density(0.3)


def test_bad_input_and_densities_are_rejected():
    dress, meta = make_dress("mlp", (1, 8, 8), np.float32)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta))
    for bad in (0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="density must be in"):
            deployed.set_density(bad)
    with pytest.raises(ValueError, match=r"shape \[N, 1, 8, 8\]"):
        deployed.predict(np.zeros((2, 64), np.float32))
    with pytest.raises(TypeError, match="float64"):
        deployed.predict(np.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="latency_profile"):
        deployed.choose_density(1.0)


def test_choose_density_takes_the_densest_that_fits():
    dress, meta = make_dress("mlp", (1, 8, 8), np.float32)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta))
    prof = deployed.latency_profile([1.0, 0.5, 0.1], batch=4, repeats=3)
    assert sorted(prof) == [0.1, 0.5, 1.0] and all(s > 0 for s in prof.values())
    assert deployed.density == 1.0                              # restored
    deployed.profile["seconds"] = {1.0: 3e-3, 0.5: 2e-3, 0.1: 1e-3}    # a known profile
    assert deployed.choose_density(5) == 1.0
    assert deployed.choose_density(2.5) == 0.5
    assert deployed.choose_density(1.0) == 0.1
    assert deployed.choose_density(0.1) == 0.1                  # nothing fits: the sparsest

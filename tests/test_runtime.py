"""The deployed model: the same logits as the training-time model at every density and on every
path (row-sparse kernels, BLAS, the faster of the two), switching without copies, MACs, the
densities a store can serve, and the latency-driven choice of density."""
import numpy as np
import pytest
from numba import config as numba_config
from test_store import make_dress

from minidress.kernels import program as prog
from minidress.nn.metrics import macs
from minidress.deploy.runtime import DeployedModel
from minidress.deploy.store import Store
from minidress.nn.train import predict_logits

CASES = [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("lenet5", (1, 28, 28)), ("resnet", (1, 12, 12))]
# Without the JIT every kernel runs as Python loops: fewer densities keep the suite quick.
DENSITIES = (1.0, 0.33, 0.04) if numba_config.DISABLE_JIT else (1.0, 0.33, 0.5, 0.25, 0.1, 0.04)


@pytest.mark.parametrize("name,shape", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deployed_logits_match_the_dress_model_at_any_density(name, shape, dtype):
    dress, meta = make_dress(name, shape, dtype)
    store = Store.from_dress(dress, "rank", meta)
    models = [DeployedModel.from_store(store, paths=p) for p in ("sparse", "auto", "dense")]
    x = np.random.default_rng(2).standard_normal((6, *shape)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for d in DENSITIES:
        dress.use(d)
        ref = predict_logits(dress.model, x)
        for deployed in models if d in DENSITIES[:2] else models[:1]:      # BLAS: the same everywhere
            deployed.set_density(d)
            for batch in (x, x[:1]):              # batch 1 takes the one-sample path
                out = deployed.predict(batch)
                assert out.dtype == dtype and out.shape == (len(batch), 10)
                diff = np.abs(out - ref[:len(batch)]).max()
                assert diff <= tol * max(1.0, np.abs(ref).max()), \
                    f"{name} d={d} paths={deployed._compiled.paths}: ours vs Dress, max abs diff {diff:.3e}"
            assert deployed.macs() == macs(dress.model, shape)


def test_feature_major_input_gives_the_same_logits():
    for name, shape in (("mlp", (1, 8, 8)), ("cnn", (2, 8, 8))):
        dress, meta = make_dress(name, shape, np.float64)
        deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta)).set_density(0.3)
        x = np.random.default_rng(4).standard_normal((5, *shape))
        ref = deployed.predict(x)
        xt = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
        assert np.array_equal(deployed.predict(xt, feature_major=True), ref)
        if name == "mlp":                         # a model that flattens first also takes [C*H*W, N]
            assert np.array_equal(deployed.predict(x.reshape(5, -1).T, feature_major=True), ref)
        with pytest.raises(ValueError, match="feature-major x must have shape"):
            deployed.predict(x, feature_major=True)


def test_any_memory_layout_of_the_input_gives_the_same_logits():
    """``predict``'s compiled entry takes any strides (it copies what is not C-contiguous): a
    strided, Fortran-ordered or read-only input, one sample or a batch, and a batch cut by
    ``batch_size`` give bit for bit the logits of C-contiguous copies of the same requests. (Not
    across batch sizes: the layers a store keeps dense run on BLAS, whose order of additions
    depends on the number of columns.)"""
    dress, meta = make_dress("cnn", (2, 8, 8), np.float64)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta), paths="sparse").set_density(0.3)
    strided = np.random.default_rng(5).standard_normal((10, 2, 8, 8))[::2]     # not C-contiguous
    ref, ref1 = (deployed.predict(np.ascontiguousarray(x)) for x in (strided, strided[1:2]))
    readonly = strided.copy()
    readonly.setflags(write=False)
    for x in (strided, np.asfortranarray(strided), readonly):
        assert np.array_equal(deployed.predict(x), ref)
        assert np.array_equal(deployed.predict(x[1:2]), ref1)
    halves = [deployed.predict(np.ascontiguousarray(strided[i:i + 2])) for i in range(0, 5, 2)]
    assert np.array_equal(deployed.predict(strided, batch_size=2), np.concatenate(halves))


def test_a_store_without_level_1_refuses_denser_densities():
    """A model trained without level 1.0 stores n_kept(0.5) entries per row: a longer prefix
    does not exist. (Before the fix the compiled kernels read past the arrays, exit 139.)"""
    dress, meta = make_dress("mlp", (1, 8, 8), np.float64, levels=[0.5, 0.25])
    store = Store.from_dress(dress, "rank", meta)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8))
    for backend in ("rowsparse", "dense", "csr"):
        deployed = DeployedModel.from_store(store, backend)
        assert deployed.density == 0.5
        for d in (1.0, 0.51):
            with pytest.raises(ValueError, match=f"density {d} is above the densest stored level 0.5"):
                deployed.set_density(d)
        assert deployed.density == 0.5                # unchanged by the refusal
        dress.use(0.5)
        np.testing.assert_allclose(deployed.predict(x), predict_logits(dress.model, x), atol=1e-12)


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
    for m in (ours, other):
        mem = m.memory_bytes()
        assert mem["store"] == store.nbytes() and mem["serving"] > 0
        assert mem["total"] == mem["store"] + mem["serving"] == m.weight_bytes()
    with pytest.raises(ValueError, match="backend must be one of"):
        DeployedModel.from_store(store, "gpu")


def test_switching_copies_nothing_and_changes_only_prefix_lengths():
    dress, meta = make_dress("mlp", (1, 8, 8), np.float32)
    store = Store.from_dress(dress, "rank", meta)
    deployed = DeployedModel.from_store(store, paths="sparse")
    net = deployed._compiled
    x = np.zeros((1, 1, 8, 8), np.float32)
    for d in (1.0, 0.1, 0.5, 0.07):               # first use: each density's plan is worked out
        deployed.set_density(d).predict(x)
    arrays = {k: getattr(net, k) for k in ("code", "layers", "params", "index", "dense")}
    before = {k: v.copy() for k, v in arrays.items()}
    ks = []
    for d in (1.0, 0.1, 0.5, 0.07):
        deployed.set_density(d)
        ks.append(list(deployed._plan_now[2]))
    assert ks[1] == [max(1, int(0.1 * 24 + 0.5))] and ks[3] == [2]
    assert all(getattr(net, k) is v and np.array_equal(before[k], v) for k, v in arrays.items())
    mem = deployed.memory_bytes()
    # the transposed copy holds the sparse entries once more (columns as uint16, here from uint8)
    rs = next(iter(store.sparse.values()))
    assert mem["parts"]["transposed"] >= rs.values.nbytes + 2 * rs.cols.size


def test_dense_path_is_chosen_per_layer_and_density():
    dress, meta = make_dress("mlp", (1, 8, 8), np.float64, dense_first_last=False)
    store = Store.from_dress(dress, "rank", meta)
    deployed = DeployedModel.from_store(store)
    deployed._calibrated = True                     # a known crossover instead of a measurement
    net = deployed._compiled
    net.crossover[:] = [[p["row_len"] // 2 for p in net.products], [p["row_len"] + 1 for p in net.products]]
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8))
    for d, one_sample_dense in ((0.25, False), (0.75, True)):
        deployed.set_density(d)
        ref = DeployedModel.from_store(store, paths="sparse").set_density(d).predict(x)
        np.testing.assert_allclose(deployed.predict(x), ref, atol=1e-12)
        deployed.predict(x[:1])
        state = deployed._plan_now[3]
        assert np.all((state[1] >= 0) == one_sample_dense) and np.all(state[2] < 0)
    assert deployed.memory_bytes()["parts"]["dense"] == sum(p["rows"] * p["row_len"] * 8 for p in net.products)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_either_one_sample_loop_gives_the_same_logits_and_calibration_picks_one(dtype):
    """``matvec_t`` (vector gathers) and ``matvec_t_no_gather`` compute the same sums in the same
    order: one sample's logits are equal bit for bit whichever a layer runs, and the
    row-sparse kernels' (``paths="sparse"``) still calibrate which one to run, per layer."""
    dress, meta = make_dress("mlp", (1, 8, 8), dtype, dense_first_last=False)
    store = Store.from_dress(dress, "rank", meta)
    deployed = DeployedModel.from_store(store, paths="sparse")
    report = deployed.calibrate()
    layers = deployed._compiled.layers
    chosen = layers[:, prog.L_NO_GATHER].copy()
    assert set(chosen.tolist()) <= {0, 1}
    if not numba_config.DISABLE_JIT:
        assert report and all(len(r["gathers"]) == 2 and min(r["gathers"]) > 0 for r in report.values())
        index = {p["name"]: i for i, p in enumerate(deployed._compiled.products)}
        assert all(bool(chosen[index[name]]) == (r["gathers"][1] < r["gathers"][0]) for name, r in report.items())
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(dtype)
    for d in (1.0, 0.33, 0.04):
        deployed.set_density(d)
        outs = []
        for loop in (0, 1):
            layers[:, prog.L_NO_GATHER] = loop
            outs.append(deployed.predict(x))
        assert np.array_equal(outs[0], outs[1]), f"d={d}: the two one-sample loops differ"
    layers[:, prog.L_NO_GATHER] = chosen


@pytest.mark.skipif(numba_config.DISABLE_JIT, reason="nothing is timed without the JIT")
def test_only_layers_whose_one_sample_is_a_matrix_vector_product_time_the_two_loops():
    """A conv with more than one output position runs the batched loop even for one sample:
    timing "the two loops" there would time one loop twice and choose by noise."""
    dress, meta = make_dress("cnn", (1, 8, 8), np.float32, dense_first_last=False)
    deployed = DeployedModel.from_store(Store.from_dress(dress, "rank", meta), paths="sparse")
    report = deployed.calibrate()
    for p in deployed._compiled.products:
        assert ("gathers" in report.get(p["name"], {})) == (p["sparse"] is not None and p["positions"] == 1), p["name"]


def test_masked_matrices_are_bounded_and_rebuilt_after_being_dropped():
    """A controller sweeping through ever new densities on the BLAS path keeps at most
    MAX_MASKED_COPIES densities' worth of masked matrices, and a density whose matrices were
    dropped still gives its own logits (bit for bit those of a fresh model)."""
    from minidress.deploy.compiled import MAX_MASKED_COPIES
    dress, meta = make_dress("mlp", (1, 8, 8), np.float64, dense_first_last=False)
    store = Store.from_dress(dress, "rank", meta)
    deployed = DeployedModel.from_store(store, paths="dense")
    net = deployed._compiled
    one_copy = sum(p["rows"] * p["row_len"] * 8 for p in net.products)
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8))
    first = deployed.set_density(0.3).predict(x)
    densities = np.linspace(0.05, 1.0, 4 * MAX_MASKED_COPIES)
    for d in densities:
        deployed.set_density(float(d)).predict(x)
        assert deployed.memory_bytes()["parts"]["dense"] <= MAX_MASKED_COPIES * one_copy
    assert net.generation >= 3
    assert np.array_equal(deployed.set_density(0.3).predict(x), first)
    for d in densities[::7]:
        fresh = DeployedModel.from_store(store, paths="dense").set_density(float(d)).predict(x)
        assert np.array_equal(deployed.set_density(float(d)).predict(x), fresh)
    # a latency profile over more densities than that: its probes drop matrices that states
    # chosen before point into; every density must still serve its own logits afterwards
    auto = DeployedModel.from_store(store)
    auto._calibrated = True
    auto._compiled.crossover[:] = 0                    # every layer on BLAS, as on a fast BLAS
    auto.latency_profile(densities, batch=3, repeats=1)
    for d in densities[::5]:
        fresh = DeployedModel.from_store(store, paths="dense").set_density(float(d)).predict(x)
        assert np.array_equal(auto.set_density(float(d)).predict(x), fresh)


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
    for kwargs, msg in (({"repeats": 0}, "repeats must be a positive integer"),
                        ({"batch": 0}, "batch must be a positive integer"),
                        ({"densities": []}, "at least one density"),
                        ({"quantile": 0}, "quantile must be in")):
        with pytest.raises(ValueError, match=msg):
            deployed.latency_profile(**{"densities": [0.5], **kwargs})


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


def test_calibration_timer_calls_each_path_at_least_once():
    """The crossover calibration's timer divides by its call count: a round whose budget has
    already passed at the first check (a 0 s budget here; a preempted process in CI) must still
    time one call, not divide by zero."""
    from minidress.deploy.compiled import _interleaved
    calls = []
    times = _interleaved([lambda: calls.append(0), lambda: calls.append(1)], seconds=0.0, rounds=3)
    assert calls.count(0) == 4 and calls.count(1) == 4          # one warm-up, then one per round
    assert all(np.isfinite(t) and t > 0 for t in times)

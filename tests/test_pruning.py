"""The pruning families beside DRESS: each projection or prox is the one its paper defines,
the hand-written gradients agree with central differences in float64 (and PyTorch), short runs
lower the loss, and every family saves, loads and resumes bit for bit."""
import itertools

import numpy as np
import pytest

from helpers import assert_close
from minidress.data import load_digits, standardize
from minidress.masks import n_kept
from minidress.nn.gradcheck import numerical_gradient, relative_error
from minidress.nn.losses import softmax_cross_entropy
from minidress.nn.models import mlp, small_cnn
from minidress.nn.optim import SGD
from minidress.nn.train import evaluate, fit
from minidress.pruning import (ADMMPruner, CompressionAware, LearnedThresholds, LotteryTicket,
                               class_report, class_weighted_cross_entropy, factorized_model,
                               important_class_weights, nuclear_norm, penalised_step, project,
                               projection_mask, pruning_function_backward, pruning_function_forward,
                               rank_for_density, stored_bytes, svt, truncate)

F64 = np.float64


@pytest.fixture(scope="module")
def digits():
    ds = load_digits(seed=0)
    (x_train, x_test), _ = standardize(ds.x_train, ds.x_test)
    return x_train, ds.y_train, x_test, ds.y_test


def digits_mlp(seed=0):
    return mlp([64, 32, 24, 10], seed=seed, batchnorm=True)


def tiny_mlp(seed=0):
    """A float64 MLP for gradient checks (biases off zero, so no ReLU sits on its kink)."""
    model = mlp([6, 8, 7, 5, 3], seed=seed, dtype=F64)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.parameters().items():
        if name.endswith("bias"):
            p[...] = rng.uniform(0.1, 0.5, p.shape) * rng.choice([-1, 1], p.shape)
    return model


def tiny_batch(rng, n=10):
    return rng.standard_normal((n, 6)), rng.integers(0, 3, n)


def train(pruner, x, y, epochs=3, lr=0.05, **kw):
    return fit(pruner.model, SGD(lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4), x, y,
               epochs=epochs, batch_size=64, step=pruner.step, quiet=True, **kw)


def check_step_gradient(pruner, loss_of, xb, yb, tol=1e-6):
    """The step's gradients equal central differences of ``loss_of()`` for every parameter."""
    _, _, grads = pruner.step(pruner.model, xb, yb)
    grads = {k: v.copy() for k, v in grads.items()}
    for name, p in pruner.model.parameters().items():
        err = relative_error(grads[name], numerical_gradient(loss_of, p))
        assert err < tol, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Projections onto the sparsity sets
# ---------------------------------------------------------------------------------------------

def brute_force_projection(w, allowed_supports):
    """The support (of the allowed ones) nearest to ``w`` in Frobenius norm, by enumeration."""
    best = min(allowed_supports, key=lambda s: float(np.sum((w - w * s) ** 2)))
    return w * best


def test_row_projection_is_the_nearest_row_balanced_matrix(rng):
    w = rng.standard_normal((2, 5))
    k = n_kept(0.4, 5)
    rows = [np.isin(np.arange(5), c) for c in itertools.combinations(range(5), k)]
    supports = [np.stack([a, b]) for a in rows for b in rows]
    assert np.array_equal(project(w, 0.4, "row"), brute_force_projection(w, supports))
    mask = projection_mask(rng.standard_normal((7, 3, 3, 3)), 0.1, "row")
    assert np.all(mask.reshape(7, -1).sum(axis=1) == n_kept(0.1, 27))


def test_layer_projection_is_the_nearest_matrix_with_k_entries(rng):
    w = rng.standard_normal((2, 4))
    k = n_kept(0.375, 8)
    supports = [np.isin(np.arange(8), c).reshape(2, 4) for c in itertools.combinations(range(8), k)]
    assert np.array_equal(project(w, 0.375, "layer"), brute_force_projection(w, supports))
    with pytest.raises(ValueError, match="projection must be one of"):
        project(w, 0.5, "global")


def test_stored_bytes_follow_the_store_conventions():
    model = mlp([6, 8, 7, 5, 3], seed=0)
    pruner = ADMMPruner(model, 0.5, admm_steps=0)
    pruner.hard_prune()
    layers = pruner.layers            # "3": 8 -> 7 and "5": 7 -> 5, float32, uint8 column indices
    others = sum(p.nbytes for n, p in model.parameters().items() if n not in ("3.weight", "5.weight"))
    kept = {n: n_kept(0.5, l.params["weight"].shape[1]) * l.params["weight"].shape[0] for n, l in layers.items()}
    assert stored_bytes(model, layers, "rows") == others + sum(5 * v for v in kept.values())
    assert stored_bytes(model, layers, "csr") == others + sum(8 * v for v in kept.values()) + (8 + 6) * 4
    assert stored_bytes(model, layers, "dense") == sum(p.nbytes for p in model.parameters().values())
    assert pruner.row_balanced() and pruner.stored_bytes() == stored_bytes(model, layers, "rows")


# ---------------------------------------------------------------------------------------------
# ADMM
# ---------------------------------------------------------------------------------------------

def test_admm_updates_are_the_definitions(rng):
    pruner = ADMMPruner(tiny_mlp(), 0.5, admm_steps=10, projection="row")
    layer = pruner.layers["3"]
    assert np.array_equal(layer.buffers["admm_z"], project(layer.params["weight"], 0.5, "row"))
    assert not layer.buffers["admm_u"].any()
    layer.buffers["admm_u"][...] = rng.standard_normal(layer.params["weight"].shape) * 0.1
    w, u_old = layer.params["weight"].copy(), layer.buffers["admm_u"].copy()
    pruner.update_z_u()
    assert np.array_equal(layer.buffers["admm_z"], project(w + u_old, 0.5, "row"))
    assert np.allclose(layer.buffers["admm_u"], u_old + w - layer.buffers["admm_z"])
    assert [pruner.rho(t) for t in (0, 19, 20, 40)] == [0.01, 0.01, 0.015, 0.0225]


def test_admm_step_gradient_is_loss_plus_augmented_lagrangian(rng):
    pruner = ADMMPruner(tiny_mlp(), 0.5, admm_steps=10, rho0=0.7)
    for layer in pruner.layers.values():
        layer.buffers["admm_u"][...] = rng.standard_normal(layer.buffers["admm_u"].shape) * 0.2
    xb, yb = tiny_batch(rng)

    def objective():
        return softmax_cross_entropy(pruner.model.forward(xb), yb)[0] + pruner.penalty(0.7)[0]
    check_step_gradient(pruner, objective, xb, yb)


def test_admm_approaches_the_set_then_prunes_row_balanced(digits):
    x, y = digits[0][:512], digits[1][:512]
    pruner = ADMMPruner(digits_mlp(), 0.25, admm_steps=40, rho0=0.5, growth=1.5, update_every=8)
    gap0 = pruner.constraint_gap()["4"]
    train(pruner, x, y, epochs=5)                     # 8 steps an epoch: 40 ADMM steps
    assert pruner.constraint_gap()["4"] < 0.5 * gap0
    history = train(pruner, x, y, epochs=7)           # hard projection, masked retraining
    pruner.finish()
    mask = pruner.layers["4"].mask
    assert np.all(mask.sum(axis=1) == n_kept(0.25, 32)) and pruner.row_balanced()
    assert history[-1]["train_loss"] < history[0]["train_loss"] + 0.05
    layerwise = ADMMPruner(digits_mlp(), 0.25, admm_steps=0, projection="layer")
    layerwise.finish()
    assert layerwise.layers["4"].mask.sum() == n_kept(0.25, 32 * 24)


# ---------------------------------------------------------------------------------------------
# Lottery tickets with rewinding; class-dependent loss
# ---------------------------------------------------------------------------------------------

def test_class_weighted_cross_entropy_gradient_and_unit_weights(rng):
    logits, y = rng.standard_normal((9, 4)), rng.integers(0, 4, 9)
    w = np.array([1.0, 3.0, 0.5, 2.0])
    _, d = class_weighted_cross_entropy(logits, y, w)
    num = numerical_gradient(lambda: class_weighted_cross_entropy(logits, y, w)[0], logits)
    assert relative_error(d, num) < 1e-8
    plain, unit = softmax_cross_entropy(logits, y), class_weighted_cross_entropy(logits, y, np.ones(4))
    assert np.isclose(plain[0], unit[0]) and np.allclose(plain[1], unit[1])
    with pytest.raises(ValueError, match="class_weights must be 4 positive numbers"):
        class_weighted_cross_entropy(logits, y, np.ones(3))
    with pytest.raises(ValueError, match=r"important must list class indices in \[0, 4\)"):
        important_class_weights(4, (7,), 2.0)


def test_class_weighted_cross_entropy_matches_torch(rng):
    torch = pytest.importorskip("torch")
    logits, y = rng.standard_normal((9, 4)), rng.integers(0, 4, 9)
    w = np.array([1.0, 3.0, 0.5, 2.0])
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(y), weight=torch.tensor(w))
    ref.backward()
    loss, d = class_weighted_cross_entropy(logits, y, w)
    assert abs(loss - ref.item()) < 1e-12
    assert_close(d, t.grad, "dlogits", 1e-12)


def test_class_report_counts_recall_and_false_negatives():
    r = class_report(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 4)
    assert np.allclose(r["recall"][:3], [0.5, 0.5, 1.0]) and np.isnan(r["recall"][3])
    assert r["false_negatives"].tolist() == [1, 1, 0, 0] and r["support"].tolist() == [2, 2, 2, 0]


def test_lottery_prunes_survivors_and_rewinds_them(rng):
    pruner = LotteryTicket(tiny_mlp(), 0.25, rounds=2, round_steps=3, rewind_step=1)
    layer = pruner.layers["3"]
    xb, yb = tiny_batch(rng)
    opt = SGD(lr=0.1)
    kept, early = [], None
    for t in range(9):
        _, _, grads = pruner.step(pruner.model, xb, yb)
        if t == 1:
            early = layer.buffers["rewind_weight"].copy()
        if t in (3, 6):           # just pruned and rewound, before this step's update
            m = layer.mask.copy()
            kept.append(m)
            assert np.array_equal(layer.params["weight"], early)
            assert np.all(m.sum(axis=1) == n_kept(pruner.density_after(len(kept)), 8))
        opt.step(pruner.model.parameters(), grads)
    assert np.all(kept[1] <= kept[0])                 # each pruning removes survivors only
    assert np.isclose(pruner.density_after(2), 0.25) and np.isclose(pruner.density_after(1), 0.5)
    schedule = pruner.segment_schedule(lambda s: 10 - s)
    assert [schedule(t) for t in (0, 2, 3, 7, 9, 10)] == [10, 8, 10, 9, 7, 6]   # 3 segments of 3, then on


def test_lottery_class_dependent_loss_is_the_weighted_one(rng):
    pruner = LotteryTicket(tiny_mlp(), 0.5, rounds=1, round_steps=5, important=(1,),
                           class_weight=3.0, n_classes=3)
    xb, yb = tiny_batch(rng)

    def objective():
        return class_weighted_cross_entropy(pruner.model.forward(xb), yb, [1.0, 3.0, 1.0])[0]
    check_step_gradient(pruner, objective, xb, yb)


# ---------------------------------------------------------------------------------------------
# Compression-aware training: the nuclear-norm prox, truncation, factorisation
# ---------------------------------------------------------------------------------------------

def prox_objective(x, w, lam):
    return 0.5 * np.sum((x - w) ** 2) + lam * nuclear_norm(x)


def test_svt_is_the_minimiser_of_the_proximal_objective(rng):
    w, lam = rng.standard_normal((5, 7)), 0.8
    x, s = svt(w, lam)
    # Another computation: the nuclear norm's variational form ||X||_* = min_{X = AB}
    # (||A||^2 + ||B||^2) / 2, minimised by plain gradient descent over the factors.
    a, b = rng.standard_normal((5, 5)) * 0.1, rng.standard_normal((5, 7)) * 0.1
    for _ in range(20000):
        r = a @ b - w
        a, b = a - 0.02 * (r @ b.T + lam * a), b - 0.02 * (a.T @ r + lam * b)
    assert np.allclose(a @ b, x, atol=1e-6)
    assert np.allclose(np.linalg.svd(x, compute_uv=False), s, atol=1e-12)
    best = prox_objective(x, w, lam)
    for _ in range(200):                                # no nearby point does better
        assert prox_objective(x + 1e-3 * rng.standard_normal(x.shape), w, lam) >= best - 1e-12
    # Optimality: W - X = lam * (P Q^T + G) on the kept singular directions.
    p, sv, qt = np.linalg.svd(w, full_matrices=False)
    keep = sv > lam
    assert np.allclose(((w - x) @ qt[keep].T), lam * p[:, keep], atol=1e-10)


def test_truncation_is_the_best_rank_r_approximation(rng):
    w = rng.standard_normal((6, 9))
    x, u, v = truncate(w, 2)
    sv = np.linalg.svd(w, compute_uv=False)
    assert np.allclose(u @ v, x) and u.shape == (6, 2) and v.shape == (2, 9)
    assert np.isclose(np.linalg.norm(w - x), np.sqrt(np.sum(sv[2:] ** 2)))
    for _ in range(50):
        other = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 9))
        assert np.linalg.norm(w - other) >= np.linalg.norm(w - x)
    assert rank_for_density((32, 32, 3, 3), 0.1) == 2 and rank_for_density((4, 4), 1.0) == 2  # 2 * 8 = 16


def test_factorized_network_computes_the_truncated_one(rng):
    model = small_cnn(dtype=F64)
    pruner = CompressionAware(model, 0.25, tau=0.0, prox_steps=0, lr=0.1, total_steps=1)
    pruner.finish()                                   # truncation to the ranks
    thin = pruner.factorized()
    x = rng.standard_normal((3, 1, 8, 8))
    model.eval()
    thin.eval()
    assert np.allclose(thin.forward(x), model.forward(x), atol=1e-10)
    n_thin = sum(p.size for p in thin.parameters().values())
    assert n_thin == pruner.factor_parameters() < sum(p.size for p in model.parameters().values())
    with pytest.raises(ValueError, match="not top-level layers"):
        factorized_model(model, {"3.1": 2})


def test_compression_aware_step_applies_the_prox_of_the_previous_update(rng):
    pruner = CompressionAware(tiny_mlp(), 0.5, tau=2.0, prox_steps=5, lr=0.1, total_steps=10,
                              schedule="constant")
    xb, yb = tiny_batch(rng)
    opt = SGD(lr=0.1)
    _, _, grads = pruner.step(pruner.model, xb, yb)
    opt.step(pruner.model.parameters(), grads)
    before = pruner.singular_values()["3"]
    pruner.step(pruner.model, xb, yb)               # first the prox of step 0 (threshold 0.2)
    assert np.allclose(pruner.singular_values()["3"], np.maximum(before - 0.2, 0), atol=1e-10)
    ranked = CompressionAware(tiny_mlp(), 0.5, 0.0, 0, 0.1, 10, row_density=0.5)
    ranked.step(ranked.model, xb, yb)                 # the row mask at prox_steps = 0
    assert all(np.all(m.sum(axis=1) == n_kept(0.5, m.shape[1])) for m in ranked.masks().values())
    with pytest.raises(ValueError, match="schedule must be one of"):
        CompressionAware(tiny_mlp(), 0.5, 1.0, 1, 0.1, 10, schedule="linear")


def test_nuclear_norm_regulariser_concentrates_the_spectrum_in_a_short_run(digits):
    x, y = digits[0][:512], digits[1][:512]
    spectra = []
    for tau in (0.0, 3.0):
        pruner = CompressionAware(digits_mlp(), 0.25, tau=tau, prox_steps=24, lr=0.05, total_steps=24)
        history = train(pruner, x, y, epochs=3)
        pruner.finish()                               # the last prox (no truncation: all prox)
        assert history[-1]["train_loss"] < history[0]["train_loss"]
        spectra.append(np.linalg.svd(pruner.layers["4"].params["weight"].astype(F64), compute_uv=False))
    top = [s[:6].sum() / s.sum() for s in spectra]    # rank_for_density((24, 32), 0.25) == 3
    assert spectra[1].sum() < 0.5 * spectra[0].sum() and top[1] > top[0]


# ---------------------------------------------------------------------------------------------
# Learned differentiable thresholds
# ---------------------------------------------------------------------------------------------

def test_pruning_function_shape_and_gradients(rng):
    w, t, a = rng.standard_normal(40) * 0.5, 0.3, 12.0
    sharp = pruning_function_forward(w, t, 60.0)[0]
    assert np.all(np.abs(sharp[np.abs(w) < 0.2]) < 1e-3)     # ~0 well inside the threshold
    assert np.allclose(sharp[np.abs(w) > 0.4], w[np.abs(w) > 0.4], atol=1e-2)
    assert np.array_equal(pruning_function_forward(w, 0.0, a)[0], w)
    out, cache = pruning_function_forward(w, t, a)
    r = rng.standard_normal(40)
    dw, dt = pruning_function_backward(r, cache)
    assert relative_error(dw, numerical_gradient(lambda: np.sum(pruning_function_forward(w, t, a)[0] * r), w)) < 1e-8
    tt = np.array(t)
    num_t = numerical_gradient(lambda: np.sum(pruning_function_forward(w, float(tt), a)[0] * r), tt)
    assert abs(dt - float(num_t)) < 1e-7 * max(1.0, abs(dt))


def test_pruning_function_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    w, t, a = rng.standard_normal((5, 6)) * 0.5, 0.25, 15.0
    r = rng.standard_normal((5, 6))
    tw, tt = torch.tensor(w, requires_grad=True), torch.tensor(t, dtype=torch.float64, requires_grad=True)
    sig, relu = torch.sigmoid, torch.relu
    ref = relu(tw - tt) + tt * sig(a * (tw - tt)) - relu(-tw - tt) - tt * sig(a * (-tw - tt))
    (ref * torch.tensor(r)).sum().backward()
    out, cache = pruning_function_forward(w, t, a)
    dw, dt = pruning_function_backward(r, cache)
    assert_close(out, ref, "f(w; t)", 1e-12)
    assert_close(dw, tw.grad, "df/dw", 1e-12)
    assert abs(dt - tt.grad.item()) < 1e-12


def test_learned_threshold_step_gradient_reaches_weights_and_thresholds(rng):
    pruner = LearnedThresholds(tiny_mlp(), lam=0.3, learn_steps=10, sharpness=8.0, theta0=0.4)
    xb, yb = tiny_batch(rng)

    def objective():
        return pruner.smooth_step(pruner.model, xb, yb, softmax_cross_entropy)[0]
    check_step_gradient(pruner, objective, xb, yb)
    assert set(pruner.model.parameters()) >= {"3.threshold", "5.threshold"}


def test_learned_thresholds_rise_and_the_density_is_learned(digits):
    x, y = digits[0][:512], digits[1][:512]
    densities = []
    for lam in (0.05, 1.0):
        pruner = LearnedThresholds(digits_mlp(), lam=lam, learn_steps=24)
        train(pruner, x, y, epochs=3)                 # 24 learning steps
        pruner.finish()                               # the mask of the learned thresholds
        t = pruner.thresholds()["4"]
        mask, w = pruner.layers["4"].mask, pruner.layers["4"].params["weight"]
        assert t > 0 and np.array_equal(mask != 0, np.abs(w) > t)
        densities.append(pruner.density())
    assert densities[1] < densities[0] < 1.0


# ---------------------------------------------------------------------------------------------
# Every family: a short run lowers the loss; save, load, resume bit for bit
# ---------------------------------------------------------------------------------------------

BUILDERS = {
    "admm-row": lambda: ADMMPruner(digits_mlp(), 0.25, admm_steps=9, rho0=1.0, update_every=4),
    "admm-layer": lambda: ADMMPruner(digits_mlp(), 0.25, admm_steps=9, projection="layer", rho0=1.0,
                                        update_every=4),
    "lottery": lambda: LotteryTicket(digits_mlp(), 0.25, rounds=2, round_steps=4, rewind_step=1,
                                     important=(3, 8), class_weight=2.0),
    "low-rank": lambda: CompressionAware(digits_mlp(), 0.25, tau=1.0, prox_steps=9, lr=0.05, total_steps=12),
    "low-rank+rows": lambda: CompressionAware(digits_mlp(), 0.25, tau=1.0, prox_steps=9, lr=0.05,
                                              total_steps=12, row_density=0.25),
    "thresholds": lambda: LearnedThresholds(digits_mlp(), lam=0.5, learn_steps=10),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_resume_is_bit_identical_and_files_round_trip(digits, tmp_path, name):
    x, y = digits[0][:256], digits[1][:256]                 # 4 steps an epoch, 12 in all
    whole = BUILDERS[name]()
    history = train(whole, x, y, epochs=3)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    part = BUILDERS[name]()
    train(part, x, y, epochs=2, checkpoint_path=tmp_path / "ck.npz")
    resumed = BUILDERS[name]()
    train(resumed, x, y, epochs=3, resume=tmp_path / "ck.npz")
    assert resumed.steps_done == whole.steps_done == 12
    for key, v in whole.model.state().items():
        assert np.array_equal(v, resumed.model.state()[key]), key
    whole.finish().save(tmp_path / "final.npz")
    again = BUILDERS[name]()
    again.load(tmp_path / "final.npz")
    assert again.steps_done == 12 and np.array_equal(again.density(), whole.density())
    assert evaluate(again.model, x, y) == evaluate(whole.model, x, y)


def test_load_refuses_another_family_or_other_options(tmp_path):
    ADMMPruner(digits_mlp(), 0.25, admm_steps=3).save(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="holds a 'admm' pruner, not a 'lottery'"):
        LotteryTicket(digits_mlp(), 0.25, 1, 4).load(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="density: file 0.25, here 0.5"):
        ADMMPruner(digits_mlp(), 0.5, admm_steps=3).load(tmp_path / "a.npz")


@pytest.mark.parametrize("build, message", [
    (lambda: ADMMPruner(digits_mlp(), 0.0, 1), r"density must be in \(0, 1\]"),
    (lambda: ADMMPruner(digits_mlp(), 0.5, 1, rho0=-1), "rho0 must be > 0, got -1"),
    (lambda: ADMMPruner(digits_mlp(), 0.5, -2), "admm_steps must be an integer >= 0, got -2"),
    (lambda: LotteryTicket(digits_mlp(), 0.5, 1, 4, rewind_step=4), "rewind_step must be below round_steps = 4"),
    (lambda: LotteryTicket(digits_mlp(), 0.5, 0, 4), "rounds must be an integer >= 1, got 0"),
    (lambda: LotteryTicket(digits_mlp(), 0.5, 1, 4, granularity="col"), "granularity must be one of"),
    (lambda: CompressionAware(digits_mlp(), 0.5, -1.0, 1, 0.1, 4), "tau must be >= 0, got -1.0"),
    (lambda: LearnedThresholds(digits_mlp(), lam=0.1, learn_steps=3, sharpness=0), "sharpness must be > 0, got 0"),
])
def test_bad_options_raise_one_line_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_penalised_step_without_penalty_is_the_dense_step(rng):
    from minidress.nn.train import dense_step
    a, b = tiny_mlp(), tiny_mlp()
    xb, yb = tiny_batch(rng)
    la, ca, ga = penalised_step(a, xb, yb)
    lb, cb, gb = dense_step(b, xb, yb)
    assert (la, ca) == (lb, cb) and all(np.array_equal(ga[k], gb[k]) for k in gb)


def test_benchmark_families_sparsify_every_layer_when_asked():
    """``compare_single_density.py --setting mlp`` relies on ``make_family(dense_first_last=
    False)`` reaching every Linear, the classifier included, for every family."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compare_single_density as bench
    from minidress.app.experiment import RunConfig
    linears = [n.rstrip(".") for n, m in mlp([6, 8, 7, 3]).named_layers() if type(m).__name__ == "Linear"]
    for dense_first_last, expected in ((False, set(linears)), (True, set(linears[1:-1]))):
        for name in bench.METHODS:
            pruner, _ = bench.make_family(name, mlp([6, 8, 7, 3]), 0.5, 30, 5, RunConfig(), (1,),
                                          dense_first_last)
            assert set(pruner.layers) == expected, (name, dense_first_last)
    assert bench.SETTINGS["mlp"]["dense_first_last"] is False

"""Tests for minidress.nn.optim: torch parity (float64), checkpoints, dtypes, errors, schedules."""
import math

import numpy as np
import pytest

from minidress.nn.optim import (SGD, Adam, constant, cosine, linear_warmup, make_schedule,
                             step_decay)

SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "1.weight": (2, 4, 3, 3)}


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def make_grads(n_steps, dtype=np.float64, seed=1, skip=()):
    """A fixed sequence of gradient dicts; ``(step, name)`` pairs in ``skip`` get None."""
    rng = np.random.default_rng(seed)
    seq = []
    for i in range(n_steps):
        g = {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
        for step, name in skip:
            if step == i:
                g[name] = None
        seq.append(g)
    return seq


def run(opt, params, grad_seq, lrs=None):
    for i, grads in enumerate(grad_seq):
        if lrs is not None:
            opt.lr = lrs[i]
        opt.step(params, grads)
    return params


def run_torch(make_opt, params, grad_seq, lrs=None):
    """The same run with a torch optimizer, on float64 copies; returns numpy arrays by name."""
    torch = pytest.importorskip("torch")
    tparams = {n: torch.tensor(p, dtype=torch.float64) for n, p in params.items()}
    opt = make_opt(list(tparams.values()))
    for i, grads in enumerate(grad_seq):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        for name, t in tparams.items():
            g = grads.get(name)
            t.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
    return {n: t.detach().numpy() for n, t in tparams.items()}


def assert_close_to_torch(ours, theirs, tol=1e-12):
    diff = max(float(np.max(np.abs(ours[n] - theirs[n]))) for n in ours)
    assert diff < tol, f"ours vs torch, max abs diff {diff:.3e} (tol {tol:.0e})"


# ---------------------------------------------------------------------------------------------
# Parity with torch.optim in float64
# ---------------------------------------------------------------------------------------------

SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=5e-2),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "all": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4),
    "momentum_wd_damp": dict(lr=0.05, momentum=0.5, weight_decay=1e-2, dampening=0.5),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_torch(case):
    torch = pytest.importorskip("torch")
    kw = SGD_CASES[case]
    grads = make_grads(20)
    ours = run(SGD(**kw), make_params(), grads)
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, foreach=False, **kw), make_params(), grads)
    assert_close_to_torch(ours, theirs)


ADAM_CASES = {
    "default": (dict(lr=1e-2), {}),
    "betas_eps": (dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6), {}),
    "l2": (dict(lr=1e-2, weight_decay=1e-1), {}),
    "adamw": (dict(lr=1e-2, weight_decay=1e-1, decoupled=True), {}),
}


@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_torch(case):
    torch = pytest.importorskip("torch")
    kw, _ = ADAM_CASES[case]
    kw = dict(kw)
    decoupled = kw.pop("decoupled", False)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    grads = make_grads(20)
    ours = run(Adam(decoupled=decoupled, **kw), make_params(), grads)
    theirs = run_torch(lambda ps: cls(ps, foreach=False, **kw), make_params(), grads)
    assert_close_to_torch(ours, theirs)


SKIP_CASES = {
    "sgd": (lambda: SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
            lambda torch, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2, foreach=False)),
    "adam": (lambda: Adam(lr=1e-2, weight_decay=1e-2),
             lambda torch, ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, foreach=False)),
}


@pytest.mark.parametrize("case", SKIP_CASES)
def test_skipped_grads_and_changing_lr_match_torch(case):
    """None gradients skip the parameter (Adam's per-parameter step does not advance) and an
    lr set between steps (as a schedule does) is used at once."""
    torch = pytest.importorskip("torch")
    ours_opt, torch_opt = SKIP_CASES[case]
    skip = [(0, "0.bias"), (3, "0.bias"), (4, "1.weight"), (7, "0.weight")]
    grads = make_grads(20, skip=skip)
    lrs = [cosine(0.1, 20)(t) for t in range(20)]
    ours = run(ours_opt(), make_params(), grads, lrs)
    theirs = run_torch(lambda ps: torch_opt(torch, ps), make_params(), grads, lrs)
    assert_close_to_torch(ours, theirs)


def test_missing_grad_key_skips_parameter():
    params = make_params()
    before = params["0.bias"].copy()
    grads = make_grads(1)[0]
    del grads["0.bias"]
    Adam().step(params, grads)
    assert np.array_equal(params["0.bias"], before)


# ---------------------------------------------------------------------------------------------
# In place, dtype, checkpoints
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda: SGD(lr=0.1),
    "sgd_nesterov_wd": lambda: SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd_damp": lambda: SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "adam_l2": lambda: Adam(lr=1e-2, weight_decay=1e-2),
    "adamw": lambda: Adam(lr=1e-2, weight_decay=1e-2, decoupled=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("grad_dtype", [np.float32, np.float64])
def test_float32_in_place(name, grad_dtype):
    params = make_params(np.float32)
    arrays = dict(params)
    views = {n: p.reshape(-1) for n, p in params.items()}   # a view sees in-place updates only
    before = {n: p.copy() for n, p in params.items()}
    opt = OPTIMIZERS[name]()
    run(opt, params, make_grads(3, grad_dtype))
    for n, p in params.items():
        assert p is arrays[n]
        assert p.dtype == np.float32
        assert np.array_equal(views[n], p.reshape(-1))
        assert not np.array_equal(p, before[n])
    for st in opt.state.values():
        for v in st.values():
            assert not isinstance(v, np.ndarray) or v.dtype == np.float32


def test_grads_are_not_modified():
    params, grads = make_params(), make_grads(3)
    copies = [{n: g.copy() for n, g in gs.items()} for gs in grads]
    for make in OPTIMIZERS.values():
        run(make(), params, grads)
    for gs, cs in zip(grads, copies):
        for n in gs:
            assert np.array_equal(gs[n], cs[n])


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_is_bit_exact(name, dtype, tmp_path):
    grads = make_grads(10, dtype, skip=[(2, "0.bias"), (7, "1.weight")])
    make = OPTIMIZERS[name]
    lrs = [0.1 * 0.9 ** i for i in range(10)]   # lr changes too, as under a schedule

    straight = run(make(), make_params(dtype), grads, lrs)

    params, opt = make_params(dtype), make()
    run(opt, params, grads[:5], lrs[:5])
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    np.savez(tmp_path / "params.npz", **params)
    del opt, params

    with np.load(tmp_path / "params.npz") as f:
        params = {n: f[n] for n in f.files}
    opt = make()
    with np.load(tmp_path / "opt.npz") as f:
        opt.load_state_dict(f)
    assert opt.step_count == 5
    run(opt, params, grads[5:], lrs[5:])

    for n in straight:
        assert params[n].dtype == dtype
        assert np.array_equal(params[n], straight[n]), n


def test_state_dict_layout_and_restore():
    opt = SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt.step(make_params(), make_grads(1)[0])
    opt.lr = 0.05
    sd = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert {"optimizer", "step", "lr", "momentum", "nesterov", "weight_decay",
            "dampening"} <= set(sd)
    assert {f"momentum_buffer/{n}" for n in SHAPES} <= set(sd)
    assert sd["lr"].ndim == 0 and sd["step"] == 1

    # The snapshot is a copy: further steps do not change it.
    snapshot = sd["momentum_buffer/0.weight"].copy()
    opt.step(make_params(), make_grads(1)[0])
    assert np.array_equal(sd["momentum_buffer/0.weight"], snapshot)

    # Hyper-parameters come back from the state, whatever the new optimizer was built with.
    other = SGD(lr=1.0)
    other.load_state_dict(sd)
    assert other.hyperparams() == dict(lr=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=5e-4, dampening=0.0)
    assert type(other.lr) is float and type(other.nesterov) is bool

    adam = Adam(betas=(0.8, 0.99))
    adam.step(make_params(), make_grads(1)[0])
    sd = adam.state_dict()
    assert {"beta1", "beta2", "eps", "decoupled", "step/0.weight", "exp_avg/0.weight",
            "exp_avg_sq/0.weight"} <= set(sd)
    fresh = Adam()
    fresh.load_state_dict(sd)
    assert fresh.betas == (0.8, 0.99) and fresh.state["0.weight"]["step"] == 1


def test_load_state_dict_errors():
    sd = SGD(lr=0.1).state_dict()
    with pytest.raises(ValueError, match="'SGD'.*Adam"):
        Adam().load_state_dict(sd)
    with pytest.raises(ValueError, match="missing.*lr"):
        SGD(lr=0.1).load_state_dict({k: v for k, v in sd.items() if k != "lr"})
    with pytest.raises(ValueError, match="unexpected key 'exp_avg/w'"):
        SGD(lr=0.1).load_state_dict({**sd, "exp_avg/w": np.zeros(3)})
    with pytest.raises(ValueError, match="momentum"):
        SGD(lr=0.1).load_state_dict({**sd, "momentum": np.array(-1.0)})


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: SGD(lr=-1), r"lr must be >= 0, got -1"),
    (lambda: SGD(lr=float("nan")), r"lr must be >= 0, got nan"),
    (lambda: SGD(lr="fast"), r"lr must be a number >= 0, got 'fast'"),
    (lambda: SGD(lr=0.1, momentum=-0.1), r"momentum must be in \[0, 1\), got -0.1"),
    (lambda: SGD(lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (lambda: SGD(lr=0.1, weight_decay=-1e-4), r"weight_decay must be >= 0"),
    (lambda: SGD(lr=0.1, dampening=2), r"dampening must be in \[0, 1\]"),
    (lambda: SGD(lr=0.1, nesterov=True), r"nesterov=True needs momentum > 0"),
    (lambda: SGD(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), r"dampening == 0"),
    (lambda: Adam(lr=-1e-3), r"lr must be >= 0, got -0.001"),
    (lambda: Adam(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (lambda: Adam(betas=(0.9, -0.5)), r"betas\[1\] must be in \[0, 1\), got -0.5"),
    (lambda: Adam(betas=0.9), r"betas must be a pair"),
    (lambda: Adam(eps=-1), r"eps must be >= 0"),
])
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_lr_attribute_is_checked():
    opt = SGD(lr=0.1)
    opt.lr = np.float64(0.0)           # a schedule may end at 0 and return NumPy scalars
    assert opt.lr == 0.0 and type(opt.lr) is float
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        opt.lr = -1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("make", [lambda: SGD(lr=0.1, momentum=0.9), lambda: Adam()],
                         ids=["sgd", "adam"])
def test_nonfinite_grad_names_parameter_and_changes_nothing(bad, make):
    params = make_params()
    before = {n: p.copy() for n, p in params.items()}
    grads = make_grads(1)[0]
    grads["1.weight"][0, 1, 2, 0] = bad
    opt = make()
    with pytest.raises(FloatingPointError, match=r"'1\.weight'"):
        opt.step(params, grads)
    for n in params:   # checked before any update, so nothing moved
        assert np.array_equal(params[n], before[n])
    assert opt.state == {} and opt.step_count == 0


def test_huge_finite_grads_are_not_mistaken_for_inf():
    # The float32 sum overflows to inf although every entry is finite.
    params = {"w": np.zeros(10, np.float32)}
    SGD(lr=1e-40).step(params, {"w": np.full(10, 3e38, np.float32)})
    assert np.isfinite(params["w"]).all()


def test_shape_mismatch_names_parameter_and_shapes():
    params = make_params()
    grads = make_grads(1)[0]
    grads["0.weight"] = grads["0.weight"].T
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(3, 4\).*\(4, 3\)"):
        SGD(lr=0.1).step(params, grads)


def test_grad_without_parameter_and_non_float_parameter():
    with pytest.raises(ValueError, match="not in params.*'typo'"):
        SGD(lr=0.1).step({"w": np.zeros(2)}, {"w": np.zeros(2), "typo": np.zeros(2)})
    with pytest.raises(ValueError, match=r"params\['w'\] must be a floating-point"):
        SGD(lr=0.1).step({"w": np.zeros(2, int)}, {"w": np.zeros(2)})


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def torch_lrs(make_sched, n, lr=0.1):
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_sched(torch, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def assert_schedule_close(ours, theirs, tol=1e-12):
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    assert diff < tol, f"ours vs torch, max abs diff {diff:.3e}"


@pytest.mark.parametrize("step_size, gamma", [(3, 0.1), (7, 0.5), (1, 0.9)])
def test_step_decay_matches_torch(step_size, gamma):
    sched = step_decay(0.1, step_size, gamma)
    theirs = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma), 30)
    assert_schedule_close([sched(t) for t in range(30)], theirs)


@pytest.mark.parametrize("total, min_lr", [(10, 0.0), (37, 1e-3)])
def test_cosine_matches_torch(total, min_lr):
    sched = cosine(0.1, total, min_lr)
    theirs = torch_lrs(lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=total, eta_min=min_lr), total + 1)
    assert_schedule_close([sched(t) for t in range(total + 1)], theirs)
    assert sched(total) == min_lr and sched(total + 5) == min_lr


def test_constant():
    sched = constant(0.3)
    assert [sched(t) for t in (0, 1, 1000)] == [0.3, 0.3, 0.3]


def test_linear_warmup_then_cosine():
    lr, total, warmup = 0.1, 20, 5
    sched = linear_warmup(cosine(lr, total - warmup), warmup)
    assert sched(0) == 0.0
    for t in range(warmup + 1):                         # straight line from 0 to lr
        assert math.isclose(sched(t), lr * t / warmup, rel_tol=1e-15)
    assert sched(warmup) == lr                          # cosine starts at the warm-up's end
    values = [sched(t) for t in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert sched(total) == 0.0

    assert make_schedule("cosine", lr, total, warmup=warmup)(7) == sched(7)


def test_linear_warmup_start_factor_and_no_shift():
    base = step_decay(1.0, 4, 0.5)
    sched = linear_warmup(base, 4, start_factor=0.2, shift=False)
    assert math.isclose(sched(0), 0.2)
    assert math.isclose(sched(2), 0.6)
    assert [sched(t) for t in range(4, 12)] == [base(t) for t in range(4, 12)]
    shifted = linear_warmup(base, 4, start_factor=0.2)
    assert [shifted(t) for t in range(4, 12)] == [base(t) for t in range(8)]
    assert linear_warmup(base, 0) is base


def test_warmup_cosine_matches_torch_sequential():
    lr, total, warmup = 0.1, 30, 6
    ours = make_schedule("cosine", lr, total, warmup=warmup, start_factor=0.1)

    def make(torch, o):
        s = torch.optim.lr_scheduler
        return s.SequentialLR(o, [s.LinearLR(o, start_factor=0.1, total_iters=warmup),
                                  s.CosineAnnealingLR(o, T_max=total - warmup)],
                              milestones=[warmup])
    theirs = torch_lrs(make, total + 1, lr)
    assert_schedule_close([ours(t) for t in range(total + 1)], theirs)


def test_make_schedule():
    assert make_schedule("constant", 0.1, 10)(9) == 0.1
    assert make_schedule(" Step ", 0.1, 10, step_size=3, gamma=0.5)(7) == 0.1 * 0.25
    assert make_schedule("cosine", 0.1, 10, min_lr=0.01)(10) == 0.01
    with pytest.raises(ValueError, match="unknown schedule 'linear'.*constant, step, cosine"):
        make_schedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="needs step_size"):
        make_schedule("step", 0.1, 10)
    with pytest.raises(ValueError, match=r"unexpected options \['gamma'\]"):
        make_schedule("cosine", 0.1, 10, gamma=0.1)
    with pytest.raises(ValueError, match=r"warmup must be in \[0, total=10\), got 10"):
        make_schedule("cosine", 0.1, 10, warmup=10)
    with pytest.raises(ValueError, match="total must be > 0, got 0"):
        make_schedule("cosine", 0.1, 0)


@pytest.mark.parametrize("make, match", [
    (lambda: step_decay(0.1, 0), "step_size must be > 0, got 0"),
    (lambda: step_decay(0.1, 3, gamma=-1), "gamma must be > 0"),
    (lambda: cosine(-0.1, 10), "lr must be >= 0"),
    (lambda: cosine(0.1, 10, min_lr=0.2), r"min_lr must be in \[0, lr=0.1\]"),
    (lambda: linear_warmup(constant(0.1), -1), "warmup must be >= 0"),
    (lambda: linear_warmup(constant(0.1), 3, start_factor=2), "start_factor must be in"),
    (lambda: cosine(0.1, 10)(-1), "t must be >= 0, got -1"),
])
def test_schedule_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()

"""DRESS's fine-grained options: sampled densities, in-place distillation, re-ranking schedules,
which layers stay dense. Every change to the backward pass is checked against central
differences in float64 and against PyTorch."""

from dataclasses import asdict

import numpy as np
import pytest

from helpers import assert_close
from minidress.baselines.alternating import Alternating
from minidress.baselines.slimmable import soft_cross_entropy_forward
from minidress.data import make_spirals
from minidress.dress import Dress, DressOptions, sparsifiable_layers, strata
from minidress.masks import nearest_level
from minidress.nn.gradcheck import numerical_gradient, relative_error
from minidress.nn.losses import log_softmax, softmax_cross_entropy
from minidress.nn.models import mlp, small_cnn
from minidress.nn.optim import SGD
from minidress.nn.train import fit

F64 = np.float64


def tiny_mlp(seed=0, batchnorm=True):
    return mlp([6, 8, 7, 5, 3], seed=seed, dtype=F64, batchnorm=batchnorm)


def planned_loss(dress, plan, x, y, teacher=None):
    """sum_k lambda_k * loss_k over the passes of ``plan`` (forward only), each level in its own
    slot (a drawn density in that of its nearest level); with ``teacher``, every level but the
    densest against those soft targets."""
    total = 0.0
    for k, ((d, drawn), lam) in enumerate(zip(plan, dress.lambdas)):
        dress.use(d, level=nearest_level(dress.levels, d) if drawn else k)
        logits = dress.model.forward(x)
        if teacher is None or k == dress.densest:
            total += lam * softmax_cross_entropy(logits, y)[0]
        else:
            total += lam * soft_cross_entropy_forward(logits, teacher)[0]
    return total


def densest_softmax(dress, x):
    dress.use(dress.levels[dress.densest], level=dress.densest)
    return np.exp(log_softmax(dress.model.forward(x)))


@pytest.mark.parametrize("levels", [(1.0, 0.5, 0.2), (0.5, 1.0, 0.2)])
@pytest.mark.parametrize("sample_prob, rule", [(0.0, "nearest"), (0.99, "nearest"), (0.99, "below")])
def test_distilled_and_sampled_step_matches_central_differences(rng, levels, sample_prob, rule):
    """The teacher (the densest level's softmax on the batch) is a constant of the step: the
    gradient is that of the loss with the teacher held fixed. Drawn densities in the plan, each
    in its nearest level's batch-norm slot (with ``strata="below"``, often not its pass's)."""
    model = tiny_mlp()
    dress = Dress(model, levels=levels, lambdas=[0.5, 2.0, 1.0], distill="densest",
                  sample_prob=sample_prob, d_min=0.05, strata=rule)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    teacher = densest_softmax(dress, x)
    plan = dress.pass_plan(0)
    assert sum(drawn for _, drawn in plan) == (2 if sample_prob else 0)
    loss, _, grads = dress.joint_step(model, x, y)
    assert dress.last_plan == plan
    assert loss == pytest.approx(planned_loss(dress, plan, x, y, teacher), rel=1e-12)
    for name, p in model.parameters().items():
        num = numerical_gradient(lambda: planned_loss(dress, plan, x, y, teacher), p)
        assert relative_error(grads[name], num) < 1e-7, name


def test_distillation_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    model = tiny_mlp(batchnorm=False)
    dress = Dress(model, levels=(0.5, 1.0, 0.25), lambdas=[2.0, 0.5, 1.0], distill="densest",
                  sample_prob=0.0)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    masks = {}
    for d in dress.levels:
        dress.use(d)
        masks[d] = {n: torch.tensor(l.mask) for n, l in dress.layers.items()}
    params = {n: torch.tensor(p, requires_grad=True) for n, p in model.parameters().items()}
    loss, _, grads = dress.joint_step(model, x, y)

    def logits(d):
        h = torch.tensor(x)
        for i in (1, 3, 5, 7):
            w = params[f"{i}.weight"] * masks[d][str(i)] if str(i) in masks[d] else params[f"{i}.weight"]
            h = torch.nn.functional.linear(h, w, params[f"{i}.bias"])
            h = torch.relu(h) if i < 7 else h
        return h

    dense = logits(1.0)
    teacher = torch.softmax(dense, dim=1).detach()
    total = 0.5 * torch.nn.functional.cross_entropy(dense, torch.tensor(y))
    for d, lam in ((0.5, 2.0), (0.25, 1.0)):
        total = total - lam * (teacher * torch.log_softmax(logits(d), dim=1)).sum(dim=1).mean()
    total.backward()
    assert_close(np.array(loss), total, "distilled loss", 1e-10)
    for n, p in params.items():
        assert_close(grads[n], p.grad, f"grad {n}", 1e-10)


def test_pass_plan_draws_within_strata_reproducibly():
    levels = (1.0, 0.5, 0.25, 0.1)
    assert strata(levels, 0.025) == [(0.75, 1.0), (0.375, 0.75), (0.175, 0.375), (0.025, 0.175)]
    assert strata((0.1, 1.0), 0.05) == [(0.05, 0.55), (0.55, 1.0)]
    dress = Dress(small_cnn(seed=0), sample_prob=0.5, sample_seed=3)
    plans = [dress.pass_plan(t) for t in range(400)]
    assert plans[7] == dress.pass_plan(7)                                  # a function of the step
    assert plans[7] != Dress(small_cnn(seed=0), sample_prob=0.5, sample_seed=4).pass_plan(7)
    drawn = np.array([[dr for _, dr in plan] for plan in plans])
    assert not drawn[:, 0].any()                           # the densest level is always trained
    assert 0.4 < drawn[:, 1:].mean() < 0.6
    for plan in plans:
        for (d, dr), level, (lo, hi) in zip(plan, levels, dress.strata):
            assert (lo <= d < hi) if dr else d == level
    assert Dress(small_cnn(seed=0), sample_prob=0.0).pass_plan(5) == [(d, False) for d in levels]


def test_strata_below_and_the_slot_a_drawn_density_trains():
    """``strata="below"``: each level draws from itself down to the next sparser level. A drawn
    density trains (and is deployed with) its nearest level's batch-norm slot; under the default
    ``nearest`` strata that is always the pass's own level, as before the option existed."""
    levels = (1.0, 0.5, 0.25, 0.1)
    assert strata(levels, 0.025, "below") == [(0.5, 1.0), (0.25, 0.5), (0.1, 0.25), (0.025, 0.1)]
    assert strata((0.1, 1.0), 0.05, "below") == [(0.05, 0.1), (0.1, 1.0)]
    with pytest.raises(ValueError, match="strata must be one of"):
        DressOptions(strata="above")
    for rule in ("nearest", "below"):
        dress = Dress(small_cnn(seed=0), sample_prob=0.5, strata=rule)
        other_slot = 0
        for t in range(300):
            for k, ((d, drawn), (lo, hi)) in enumerate(zip(dress.pass_plan(t), dress.strata)):
                assert (lo <= d < hi) if drawn else d == levels[k]
                dress.use_pass(k, d, drawn)
                slot = nearest_level(levels, d) if drawn else k
                assert all(bn.slot == slot for bn in dress.batchnorms)
                other_slot += slot != k
        assert (other_slot > 0) == (rule == "below")


def test_d_min_default_and_no_draws_while_a_ramp_runs():
    dress = Dress(tiny_mlp(), levels=(1.0, 0.2), sample_prob=0.99, ramp="cubic", ramp_steps=10)
    assert dress.strata[1] == (0.05, 0.2)               # d_min 0: a quarter of 0.2; strata "below"
    assert all(not drawn for t in range(10) for _, drawn in dress.pass_plan(t))
    assert dress.pass_plan(10)[1][1]


def test_drawn_densities_leave_running_statistics_alone(rng):
    model = tiny_mlp()
    dress = Dress(model, levels=(1.0, 0.5, 0.2), sample_prob=0.99, d_min=0.05)
    assert [drawn for _, drawn in dress.pass_plan(0)] == [False, True, True]
    before = {k: v.copy() for k, v in model.state().items() if "running" in k}
    dress.joint_step(model, rng.standard_normal((9, 6)), rng.integers(0, 3, 9))
    for name, value in before.items():
        now = model.state()[name]
        assert np.array_equal(now[1:], value[1:]), name          # slots of the drawn levels
        assert not np.array_equal(now[0], value[0]), name        # the densest level's slot
    assert all(bn.momentum == 0.1 for bn in dress.batchnorms)


def test_sampling_and_distillation_resume_bit_identically(tmp_path):
    x, y = make_spirals(200, seed=1)
    options = DressOptions(levels=(1.0, 0.5, 0.25), sample_prob=0.5, distill="densest",
                           resample_every=2, resample_until=14)

    def run(epochs, **kw):
        model = mlp([2, 16, 16, 16, 3], seed=0, batchnorm=True)
        dress = Dress(model, options)
        fit(model, SGD(lr=0.1, momentum=0.9), x, y, epochs=epochs, batch_size=32, seed=0,
            step=dress.joint_step, quiet=True, **kw)
        return model

    full = run(3)
    ckpt = tmp_path / "d.npz"
    run(2, checkpoint_path=ckpt)
    resumed = run(3, resume=ckpt)
    assert all(np.array_equal(v, resumed.state()[k]) for k, v in full.state().items())


def test_resample_until_stops_reranking():
    dress = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=10, resample_until=35)
    assert [t for t in range(80) if dress.rerank_due(t)] == [10, 20, 30]
    dress = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=10, resample_until=0)
    assert [t for t in range(45) if dress.rerank_due(t)] == [10, 20, 30, 40]


def test_fractional_resample_until_scales_with_the_run():
    """A fraction in (0, 1) stops re-ranking at that fraction of run_steps (nearest step), so the
    same option re-ranks through half of a short run and half of a long one."""
    due = lambda dress, n: [t for t in range(n) if dress.rerank_due(t)]
    short = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=10, resample_until=0.5, run_steps=80)
    assert short.rerank_stop() == 40 and due(short, 80) == [10, 20, 30]
    long = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=10, resample_until=0.5, run_steps=400)
    assert long.rerank_stop() == 200 and due(long, 400) == list(range(10, 200, 10))
    odd = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=1, resample_until=0.25, run_steps=10)
    assert odd.rerank_stop() == 3 and due(odd, 10) == [1, 2]             # 2.5 -> step 3
    # An unknown run length (run_steps 0, a Dress built by hand) stops nothing.
    unknown = Dress(tiny_mlp(), levels=(1.0, 0.5), resample_every=10, resample_until=0.5)
    assert unknown.rerank_stop() is None and due(unknown, 45) == [10, 20, 30, 40]
    # The default re-ranks all run long; a fraction set on the run's config scales with it: the
    # first half of digits' 220 steps is exactly the 110 measured before fractions existed.
    assert DressOptions().resample_until == 0
    from minidress.app.experiment import RunConfig
    assert Dress(tiny_mlp(), RunConfig().dress_for(22)).rerank_stop() is None
    options = RunConfig(dress=DressOptions(resample_until=0.5)).dress_for(22)
    assert options.run_steps == 220 and Dress(tiny_mlp(), options).rerank_stop() == 110
    assert RunConfig(epochs=3).dress_for(938).run_steps == 2814


def test_alternating_stops_reranking_at_the_same_joint_step():
    """Alternating's run_steps counts its own steps (K per DRESS step): the fraction is of its
    run too, so it re-ranks before the same passes as DRESS does."""
    x, y = np.random.default_rng(0).standard_normal((9, 6)), np.arange(9) % 3
    options = DressOptions(levels=(1.0, 0.5), resample_every=2, resample_until=0.5)
    dress = Dress(tiny_mlp(), options, run_steps=20)
    peer = Alternating(tiny_mlp(), options, run_steps=40)
    calls, ranked = [], []
    peer.dress.rank = lambda: calls.append(1)
    for t in range(40):
        before = len(calls)
        peer.step(peer.model, x, y)
        ranked += [t] * (len(calls) - before)
    assert [t // 2 for t in ranked] == [t for t in range(20) if dress.rerank_due(t)] == [2, 4, 6, 8]
    assert all(t % 2 == 0 for t in ranked)          # before the densest level's pass


def test_alternating_trains_dress_pass_plan(rng):
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 3, 9)
    peer = Alternating(tiny_mlp(), levels=(1.0, 0.5, 0.2), sample_prob=0.99, d_min=0.05)
    for t in range(6):
        peer.step(peer.model, x, y)
        assert peer.dress.density == peer.dress.pass_plan(t // 3)[t % 3][0]


def test_dense_layers_small_sparsifies_a_wide_first_layer():
    wide = mlp([30, 8, 7, 3])
    assert list(sparsifiable_layers(wide)) == ["3"]                             # first_last
    assert list(sparsifiable_layers(wide, dense_layers="small")) == ["1", "3"]  # rows of 30 > 27
    assert list(sparsifiable_layers(wide, False, "small")) == ["1", "3", "5"]   # --sparsify-all
    cnn = small_cnn(seed=0)                            # a 3x3 conv on one channel: rows of 9
    assert list(Dress(cnn).layers) == list(Dress(small_cnn(seed=0), dense_layers="first_last").layers)
    assert DressOptions().dense_layers == "small"      # the default: an MLP's first layer is sparse
    assert list(Dress(mlp([30, 8, 7, 3])).layers) == ["1", "3"]


def test_old_configs_load_and_new_options_are_checked():
    """A config written before the fine-grained options existed loads as the run behaved then."""
    old = {"levels": [1.0, 0.5], "lambdas": "uniform", "resample_every": 0, "ramp": "none",
           "ramp_steps": 0, "norm": "per_level", "dense_first_last": True, "epochs": 3}
    assert DressOptions.from_config(old) == DressOptions(levels=(1.0, 0.5), resample_every=0,
                                                         resample_until=0, sample_prob=0.0,
                                                         dense_layers="first_last", lambdas="uniform",
                                                         strata="nearest", densest_weight="scheme")
    assert DressOptions.from_config(asdict(DressOptions())) == DressOptions()
    # A run that recorded resample_until=110 (steps, before fractions existed) keeps it.
    assert DressOptions.from_config({**old, "resample_until": 110}).resample_until == 110
    assert type(DressOptions(resample_until=110.0).resample_until) is int
    for change, message in [({"sample_prob": 1.0}, r"sample_prob must be in \[0, 1\)"),
                            ({"d_min": 0.2}, r"d_min must be in \[0, 0.1\]"),
                            ({"distill": "teacher"}, "distill must be one of"),
                            ({"dense_layers": "big"}, "dense_layers must be one of"),
                            ({"resample_until": -1}, "resample_until must be 0, a fraction"),
                            ({"resample_until": 1.5}, "resample_until must be 0, a fraction"),
                            ({"run_steps": -1}, "run_steps must be >= 0"),
                            ({"dense_first_last": "False"}, "dense_first_last must be True or False"),
                            ({"densest_weight": -1}, "densest_weight must be a number >= 0 or 'scheme'"),
                            ({"densest_weight": "heavy"}, "densest_weight must be a number >= 0"),
                            ({"densest_weight": float("inf")}, "densest_weight must be a number >= 0"),
                            ({"densest_weight": True}, "densest_weight must be a number >= 0"),
                            ({"levels": (1.0,), "densest_weight": 0}, "loss weights must not all be 0")]:
        with pytest.raises(ValueError, match=message):
            DressOptions(**change)


def test_new_options_are_flags_of_minidress_train():
    from minidress.app.cli import build_parser, dress_options
    args = build_parser().parse_args(["train", "--sample-prob", "0.5", "--d-min", "0.05",
                                      "--sample-seed", "2", "--distill", "densest",
                                      "--resample-until", "100", "--dense-layers", "small"])
    assert dress_options(args) == DressOptions(sample_prob=0.5, d_min=0.05, sample_seed=2,
                                               distill="densest", resample_until=100,
                                               dense_layers="small")
    assert isinstance(dress_options(args).resample_until, int)
    args = build_parser().parse_args(["train", "--resample-until", "0.25"])
    assert dress_options(args).resample_until == 0.25
    for text, value in (("scheme", "scheme"), ("2", 2.0), ("0.5", 0.5)):
        args = build_parser().parse_args(["train", "--densest-weight", text])
        assert dress_options(args).densest_weight == value


def test_compare_anytime_reads_options_as_their_flags_do():
    """benchmarks/compare_anytime.py --dress-options: "dense_first_last=False" must sparsify the
    first and last layers (it once became the true string "False"), and resample_until reads a
    fraction or a step."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_anytime.py"
    spec = importlib.util.spec_from_file_location("compare_anytime_under_test", path)
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(path.parent))            # its "from common import ..."
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    changes = module.dress_changes("dense_first_last=False,resample_until=110,sample_prob=0.25")
    assert changes == {"dense_first_last": False, "resample_until": 110, "sample_prob": 0.25}
    assert module.dress_changes("resample_until=0.25") == {"resample_until": 0.25}
    # a list value keeps its commas: only ",name=" starts the next option
    assert module.dress_changes("lambdas=0.5,0.75,1,1.75,levels=1,0.5,0.2,0.05,sample_prob=0") == \
        {"lambdas": (0.5, 0.75, 1.0, 1.75), "levels": (1.0, 0.5, 0.2, 0.05), "sample_prob": 0.0}
    assert list(Dress(mlp([30, 8, 7, 3]), **changes).layers) == ["1", "3", "5"]
    with pytest.raises(ValueError, match="dense_first_last must be true or false"):
        module.dress_changes("dense_first_last=no")

"""The main job end to end on a tiny budget: DRESS, baselines, table, plot, checkpoint, eval."""
import json

import numpy as np
import pytest

from minidress.app.cli import main
from minidress.app.experiment import RunConfig, load_data, run_experiment, subset_indices
from minidress.app.report import format_table


@pytest.fixture(scope="module")
def run():
    cfg = RunConfig(model="mlp", hidden=(32, 16), pretrain_epochs=2, epochs=1, grid=(0.1, 0.3, 1.0),
                    recalibrate_batches=2, quiet=True)
    return run_experiment(cfg)


@pytest.fixture(scope="module")
def result(run):
    return run.metrics


def test_every_level_has_dress_and_baselines(result):
    assert [lv["density"] for lv in result["levels"]] == [1.0, 0.5, 0.25, 0.1]
    for lv in result["levels"]:
        for key in ("dress_acc", "single_acc", "one_shot_acc"):
            assert 0.0 <= lv[key] <= 1.0
    macs = [lv["macs"] for lv in result["levels"]]
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0]
    assert result["passes"]["dress"] == 4 * result["passes"]["single_each"]
    b = result["bytes"]
    assert b["dense"] < b["nested"] < b["separate"] < b["separate_csr"]
    memory = result["memory"]
    assert set(memory) == {"1.0", "0.5", "0.25", "0.1"}
    assert memory["0.1"]["params_level"] < memory["1.0"]["params_level"]
    assert memory["0.1"]["activations"] == memory["1.0"]["activations"]     # sparsity keeps activations
    assert "| 0.25 |" in format_table(result)


def test_pretrained_is_the_common_start(run):
    """``pretrained`` is the dense network every method starts from: DRESS's weights moved away
    from it, its test accuracy is the reported dense one."""
    from minidress.nn.train import evaluate
    ds, _, x_test = load_data(RunConfig(seed=run.metrics["config"]["seed"]))
    assert evaluate(run.pretrained, x_test, ds.y_test)[1] == run.metrics["dense_acc"]
    trained = run.dress.model.parameters()
    assert any(not np.array_equal(v, trained[k]) for k, v in run.pretrained.parameters().items())


def test_subsets_are_fixed_and_validated():
    full_ds, full_x, _ = load_data(RunConfig(seed=3))
    ds, x_train, x_test = load_data(RunConfig(seed=3, train_subset=100, test_subset=50))
    idx = subset_indices(len(full_x), 100, "train_subset")
    assert x_train.shape[0] == 100 and x_test.shape[0] == 50 and len(ds.y_test) == 50
    assert np.array_equal(x_train, full_x[idx]) and np.array_equal(ds.y_train, full_ds.y_train[idx])
    assert np.array_equal(idx, subset_indices(len(full_x), 100, "train_subset"))
    with pytest.raises(ValueError, match="test_subset must be None .* or an integer >= 1, got 0"):
        RunConfig(test_subset=0)
    with pytest.raises(ValueError, match=r"train_subset must be an integer in \[1, 1347\], got 2000"):
        load_data(RunConfig(train_subset=2000))


def test_same_seed_same_numbers():
    cfg = RunConfig(model="mlp", hidden=(16, 16), pretrain_epochs=1, epochs=1, grid=(0.5,),
                    baselines=False, recalibrate_batches=1, quiet=True)
    a, b = run_experiment(cfg), run_experiment(cfg)
    assert a.metrics["levels"] == b.metrics["levels"] and a.metrics["curve"] == b.metrics["curve"]
    for k, v in a.dress.model.state().items():
        assert np.array_equal(v, b.dress.model.state()[k])


def test_cli_train_dress_then_eval_any_density(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--hidden", "32,16", "--pretrain-epochs", "1",
                 "--epochs", "1", "--levels", "1,0.3", "--lambdas", "inverse_density",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 0.3 |" in printed and "one nested copy" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["lambdas"] == "inverse_density"
    assert (out / "accuracy_vs_density.png").stat().st_size > 0
    dress_acc = {lv["density"]: lv["dress_acc"] for lv in metrics["levels"]}
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    printed = capsys.readouterr().out
    assert f"at density 0.3 {dress_acc[0.3]:.4f}" in printed
    assert main(["eval", str(out / "checkpoint.npz"), "--density", "0.17", "--recalibrate"]) == 0
    assert "at density 0.17" in capsys.readouterr().out
    assert main(["inspect", str(out / "store.npz")]) == 0
    printed = capsys.readouterr().out
    assert f"| this store: one nested copy | {metrics['bytes']['nested']:,} | 1.00x |" in printed
    assert "levels [1.0, 0.3]" in printed
    assert "bytes at rest (this file's arrays)" in printed and "in memory to serve it" in printed


@pytest.mark.parametrize("argv,message", [
    (["--levels", "1,0"], "levels must be in (0, 1]"),
    (["--levels", "1,x"], "--levels must be comma-separated"),
    (["--lambdas", "1,2,3"], "lambdas must be 4 finite"),
])
def test_cli_rejects_bad_dress_options(tmp_path, capsys, argv, message):
    assert main(["train", "--quiet", "--pretrain-epochs", "0", "--epochs", "0", "--out",
                 str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_every_dress_option_is_a_flag_of_minidress_train(capsys):
    """The flags are generated from DressOptions: one per field (ramp_steps comes from
    --ramp-epochs, run_steps from --epochs), each with the field's default."""
    from dataclasses import fields

    from minidress.app.cli import build_parser
    from minidress.dress import DressOptions
    args = build_parser().parse_args(["train"])
    for f in fields(DressOptions):
        if f.name not in ("ramp_steps", "run_steps"):
            assert hasattr(args, f.name), f.name
    from minidress.app.cli import dress_options
    assert dress_options(args) == DressOptions()
    assert dress_options(build_parser().parse_args(["train", "--sparsify-all", "--norm", "shared",
                                                    "--levels", "1,0.3"])) == \
        DressOptions(levels=(1.0, 0.3), norm="shared", dense_first_last=False)


def test_plot_title_names_the_layers_that_stay_dense():
    from minidress.app.report import sparsified_layers_note
    assert sparsified_layers_note({"config": {"dense_first_last": False}}) == "every Linear/Conv2d layer sparse"
    old_run = {"config": {"dense_first_last": True}}                  # before dense_layers existed
    assert sparsified_layers_note(old_run) == "first layer and classifier dense, the others sparse"
    small = {"config": {"dense_first_last": True, "dense_layers": "small"}}
    assert sparsified_layers_note(small).startswith("classifier (and a first layer of short rows) dense")

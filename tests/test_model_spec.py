"""A model spec read from a file is data: ``build_model`` refuses one with wrong types or sizes
(one line naming the field) before it allocates anything, and ``minidress eval`` says so
without a traceback."""
import pytest

from minidress.app.cli import main
from minidress.checkpoint import save_checkpoint
from minidress.nn.models import MAX_WEIGHTS, build_model, check_spec

MLP = {"name": "mlp", "input_shape": [1, 8, 8], "n_classes": 10, "hidden": [16]}


@pytest.mark.parametrize("change, field", [
    ({"hidden": [10 ** 9]}, "hidden[0]"),
    ({"hidden": [60000, 60000]}, "weights"),
    ({"hidden": "300"}, "'hidden'"),
    ({"input_shape": [1, -8, 8]}, "input_shape[1]"),
    ({"input_shape": [1, 8]}, "'input_shape'"),
    ({"n_classes": 2.5}, "'n_classes'"),
    ({"n_classes": True}, "'n_classes'"),
    ({"name": "os.system"}, "'name'"),
])
def test_hostile_named_specs_are_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build_model({**MLP, **change})


@pytest.mark.parametrize("layers, field", [
    ([{"type": "exec"}], r"layers\[0\]"),
    ([{"type": "linear", "in": 4, "out": 0}], r"layers\[0\]\.out"),
    ([{"type": "conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3, "stride": 1,
       "padding": -1}], r"layers\[0\]\.padding"),
    ([{"type": "conv2d", "in_channels": 4096, "out_channels": 4096, "kernel_size": 64, "stride": 1,
       "padding": 0}], "weights"),
    ([], "'layers'"),
    ("linear", "'layers'"),
])
def test_hostile_layer_specs_are_refused_naming_the_field(layers, field):
    with pytest.raises(ValueError, match=field):
        check_spec({"layers": layers})


def test_the_bound_lies_above_every_model_minidress_trains():
    for spec in (MLP, {"name": "mlp", "input_shape": [1, 28, 28], "n_classes": 10, "hidden": [300, 100]},
                 {"name": "lenet5", "input_shape": [1, 28, 28], "n_classes": 10},
                 {"name": "resnet", "input_shape": [3, 32, 32], "n_classes": 10},
                 {"layers": [{"type": "conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3,
                              "stride": 1, "padding": 0}, {"type": "flatten"}]}):
        check_spec(spec)
    assert MAX_WEIGHTS >= 10 * 784 * 300


def test_eval_of_a_checkpoint_with_a_hostile_spec_prints_one_line(tmp_path, capsys):
    model = build_model(MLP)
    path = save_checkpoint(tmp_path / "checkpoint.npz", model,
                           meta={"model": {**MLP, "hidden": [10 ** 9]}, "dataset": "digits"})
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden[0] must be an integer" in err and "Traceback" not in err and len(err.splitlines()) == 1

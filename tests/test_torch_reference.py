"""examples/torch_reference.py, the independent PyTorch implementation of the golden file, passes
on a fresh file and FAILS, printing the first mismatches, for each planted mistake; the file it
writes passes ``minidress golden --check``."""
import importlib.util
from pathlib import Path

import pytest

from minidress.app.cli import main as minidress
from minidress.app.golden import write_golden

pytestmark = pytest.mark.torch
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "torch_reference.py"


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("torch_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return str(write_golden(tmp_path_factory.mktemp("g") / "golden.npz"))


def not_ok(out) -> set:
    """Names of the tensors the reference printed as NOT OK."""
    return {line.split()[0] for line in out.splitlines() if line.endswith("NOT OK") or " NOT OK:" in line}


def test_reference_reproduces_every_tensor_of_a_fresh_file(reference, golden, capsys):
    assert reference.main([golden]) == 0
    out = capsys.readouterr().out
    assert "NOT OK" not in out and out.count(" OK") > 600
    assert out.rstrip().endswith("all OK")


# Each planted mistake, and tensors that must then fail (a subset of what does).
PLANTED = {
    "tie_high": {"ties/step/0/ranks/0", "ties/step/0/mask/1/0", "ties/step/0/mask/2/2", "ties/step/0/logits/1"},
    "half_even": {"mlp/step/0/mask/2/2", "counts/step/0/mask/1/2", "counts/step/0/mask/3/0"},
    "nhwc": {"cnn/step/0/logits/0", "batchnorm/step/0/logits/0", "conv_pool/step/0/grad/0.weight"},
    "relu_grad_at_zero": {"relu_zero/step/0/grad/0.bias", "relu_zero/step/0/grad/2.weight"},
    "biased_running_var": {"batchnorm/step/0/buffer_after/1.running_var", "trajectory/step/9/buffer_after/1.running_var"},
    "grad_1e-9": {"batchnorm/step/0/grad/0.weight"},       # the first case in the file (sorted names)
    "last_max": {"conv_pool/step/0/grad/0.weight"},
}


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_each_planted_mistake_is_caught_with_its_first_mismatches(reference, golden, capsys, plant):
    assert reference.main([golden, "--plant", plant]) == 1
    out = capsys.readouterr().out
    failing = not_ok(out)
    assert PLANTED[plant] <= failing, sorted(failing)[:10]
    assert "   [" in out and "] torch " in out and " file " in out     # first mismatching entries
    if plant in ("relu_grad_at_zero", "last_max", "grad_1e-9"):
        # Rules only one case exercises: every other case still passes.
        assert {name.split("/")[0] for name in failing} == {next(iter(PLANTED[plant])).split("/")[0]}


def test_a_1e9_gradient_error_fails_the_gradient_only(reference, golden, capsys):
    reference.main([golden, "--plant", "grad_1e-9"])
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("batchnorm/step/0/grad/0.weight"))
    assert "max diff 1.000e-09" in line and line.endswith("NOT OK")


def test_minidress_checks_the_file_the_reference_writes(reference, golden, tmp_path, capsys):
    """The round trip of the issue: another implementation writes the documented names,
    ``minidress golden --check`` compares; a wrong implementation's file fails there too."""
    theirs, wrong = str(tmp_path / "theirs.npz"), str(tmp_path / "wrong.npz")
    assert reference.main([golden, "--write", theirs]) == 0
    assert reference.main([golden, "--case", "relu_zero", "--plant", "relu_grad_at_zero", "--write", wrong]) == 1
    capsys.readouterr()
    assert minidress(["golden", "--check", theirs]) == 0
    out = capsys.readouterr().out
    assert "has no __sha256__" in out and out.rstrip().endswith(": OK")
    assert minidress(["golden", "--check", wrong]) == 1
    out = capsys.readouterr().out
    assert "relu_zero/step/0/grad/0.bias" in out and "NOT OK" in out and "[" in out

"""Runs that are never lost, mixed or mistaken: run folders, resuming DRESS, interrupts, and bad
command-line values refused early in one line."""
import json
import os
import signal
import stat

import numpy as np
import pytest

from minidress.app.cli import build_parser, main
from minidress.app.experiment import RunConfig
from minidress.app.report import curve_ylim
from minidress.app.runfolder import LOCK_FILE, RunFolder, RunFolderError, read_status
from minidress.dress import Dress
from minidress.fileio import atomic_write_bytes
from minidress.masks import check_density
from minidress.nn.models import mlp
from minidress.nn.optim import SGD
from minidress.nn.train import fit

TINY = ["train", "--model", "mlp", "--hidden", "16,16", "--pretrain-epochs", "2", "--epochs", "2",
        "--levels", "1,0.3", "--quiet"]
STEPS_PER_EPOCH = 22                       # digits: 1347 training examples, batch 64


def numbers(metrics):
    """metrics.json without its wall-clock times."""
    if isinstance(metrics, dict):
        return {k: numbers(v) for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [numbers(v) for v in metrics]
    return metrics


def interrupt_after(monkeypatch, target, attr, n_calls):
    """Make ``target.attr`` raise KeyboardInterrupt on its ``n_calls``-th call, as Ctrl-C would."""
    original, calls = getattr(target, attr), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(target, attr, wrapped)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("phase,calls", [("DRESS", STEPS_PER_EPOCH + 7), ("pre-training", 30)])
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, capsys, monkeypatch, uninterrupted,
                                                        phase, calls):
    out = tmp_path / "run"
    if phase == "DRESS":
        interrupt_after(monkeypatch, Dress, "joint_step", calls)
    else:
        import minidress.nn.train as train
        interrupt_after(monkeypatch, train, "dense_step", calls)
        monkeypatch.setattr(train.fit, "__kwdefaults__", {**train.fit.__kwdefaults__, "step": train.dense_step})
    assert main([*TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "--resume" in err[0]
    assert read_status(out)["status"] == "incomplete" and not (out / "metrics.json").exists()
    assert not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    assert main([*TINY, "--out", str(out)]) == 2                  # not silently restarted
    assert "--resume" in capsys.readouterr().err
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    assert read_status(out)["status"] == "complete"
    assert numbers(json.loads((out / "metrics.json").read_text())) == numbers(uninterrupted)


def test_resume_refuses_another_runs_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--epochs", "0", "--pretrain-epochs", "0", "--no-baselines"]) == 0
    capsys.readouterr()
    assert main([*TINY, "--out", str(out), "--seed", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "seed is 0 there, 1 here" in err


def test_a_complete_run_is_replaced_only_with_force(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--epochs", "0", "--pretrain-epochs", "0", "--no-baselines"]
    assert main(args) == 0
    before = (out / "metrics.json").read_bytes()
    assert main([*args, "--seed", "2"]) == 2
    assert "holds a complete run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert main([*args, "--seed", "2", "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 2
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 2


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(str(os.getppid()))          # a live process holds it
    with pytest.raises(RunFolderError, match=f"in use by process {os.getppid()}"):
        RunFolder(folder, {"a": 1}).__enter__()
    dead = 2 ** 22 + 12345                                       # above pid_max: never alive
    (folder / LOCK_FILE).write_text(str(dead))
    (folder / ".metrics.json.abc.tmp").write_text("half")       # a killed run's leftovers
    with RunFolder(folder, {"a": 1}) as run:
        assert (folder / LOCK_FILE).read_text() == str(os.getpid())
        run.complete()
    assert not (folder / LOCK_FILE).exists() and not list(folder.glob(".*.tmp"))
    assert read_status(folder) == {"status": "complete", "config": {"a": 1}}


def test_sigterm_unwinds_like_ctrl_c(tmp_path, capsys, monkeypatch):
    original = Dress.joint_step

    def step(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)
    monkeypatch.setattr(Dress, "joint_step", step)
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "-1"], "expected an integer >= 0, got '-1'"),
    (["--dense", "--epochs", "-1"], "expected an integer >= 0, got '-1'"),
    (["--hidden", "abc"], "expected comma-separated positive integers, got 'abc'"),
    (["--batch-size", "0"], "expected an integer >= 1, got '0'"),
])
def test_bad_values_are_refused_before_any_training(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["train", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kw,message", [
    ({"epochs": -1}, "epochs must be an integer >= 0, got -1"),
    ({"lr": 0}, "lr must be > 0, got 0"),
    ({"model": "vgg"}, "model must be one of"),
    ({"grid": (0.5, 2.0)}, r"grid must be in \(0, 1\]"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
])
def test_run_config_checks_everything_when_made(kw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kw)


def test_lambdas_error_prints_plain_numbers(capsys):
    assert main([*TINY, "--lambdas", "1,2,3"]) == 2
    assert "got [1.0, 2.0, 3.0]" in capsys.readouterr().err


def test_help_shows_the_defaults_and_the_real_out_folder(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs/dress-<dataset>-<model>-seed<seed>" in text
    assert "(default: 1.0,0.5,0.25,0.1)" in text and "(default: per_level)" in text


@pytest.mark.parametrize("bad", [True, "0.5", b"1"])
def test_booleans_and_strings_are_not_densities(bad):
    with pytest.raises(TypeError, match="must be a number in"):
        check_density(bad)


def test_fit_refuses_empty_data():
    with pytest.raises(ValueError, match=r"same number \(>= 1\) of examples, got 0 and 0"):
        fit(mlp([2, 3]), SGD(lr=0.1), np.zeros((0, 2), np.float32), np.zeros(0, int), epochs=1)


def test_divergence_stops_training_early():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 2)).astype(np.float32), rng.integers(0, 3, 64)
    with pytest.raises(FloatingPointError, match="training diverged"):
        fit(mlp([2, 16, 3]), SGD(lr=1e6), x, y, epochs=5, batch_size=16, quiet=True)


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 2)).astype(np.float32), rng.integers(0, 3, 32)
    fit(mlp([2, 3]), SGD(lr=0.1), x, y, epochs=1, batch_size=8, label="warm-up")
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "it/s" not in captured.err
    assert "warm-up, epoch 1/1: loss" in captured.out


def test_eval_says_when_a_run_is_incomplete_and_reads_its_data_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, Dress, "joint_step", STEPS_PER_EPOCH + 3)
    assert main([*TINY, "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    printed = capsys.readouterr().out
    assert "incomplete run (1 of 2 epochs" in printed and "--resume" in printed


def test_the_plot_shows_the_range_that_matters():
    result = {"config": {"levels": [1.0, 0.1]},
              "curve": [{"density": 0.05, "recalibrated_acc": 0.2, "nearest_norm_acc": 0.2},
                        {"density": 0.1, "recalibrated_acc": 0.97, "nearest_norm_acc": 0.96},
                        {"density": 1.0, "recalibrated_acc": 0.99, "nearest_norm_acc": 0.99}],
              "levels": [{"dress_acc": 0.99, "single_acc": 0.98}, {"dress_acc": 0.97}]}
    assert curve_ylim(result) == pytest.approx((94.0, 100.0))


def test_a_process_forked_after_a_parallel_kernel_survives(tmp_path):
    """GNU OpenMP, Numba's default layer here, kills a child forked after a parallel kernel ran;
    minidress selects the fork-safe layer (unless the user chose one)."""
    import subprocess
    import sys
    script = tmp_path / "fork.py"
    script.write_text(
        "import os, numpy as np\n"
        "from minidress.kernels import rowsparse_matmul\n"
        "import numba\n"
        "v = np.ones((300, 784), np.float32); c = np.tile(np.arange(784, dtype=np.uint16), (300, 1))\n"
        "x = np.ones((784, 256), np.float32)\n"
        "rowsparse_matmul(v, c, 200, x)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    rowsparse_matmul(v, c, 200, x); os._exit(0)\n"
        "print(numba.threading_layer(), os.waitpid(pid, 0)[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    layer, status = out.stdout.split()
    assert status == "0" and layer != "omp"

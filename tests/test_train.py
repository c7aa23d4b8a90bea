"""The training loop, checkpoints and the command line."""
import json

import numpy as np
import pytest

from minidress.checkpoint import (ArchiveError, load_checkpoint, read_archive, save_checkpoint,
                                  write_archive)
from minidress.app.cli import main
from minidress.data import make_spirals
from minidress.nn.models import mlp, small_cnn
from minidress.nn.optim import SGD, Adam, make_schedule
from minidress.nn.train import dense_step, evaluate, fit


@pytest.fixture(scope="module")
def spirals():
    x, y = make_spirals(300, seed=0)
    return x, y


def run(x, y, epochs, seed=0, **kw):
    model = mlp([2, 32, 32, 3], seed=seed, batchnorm=True)
    opt = SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = make_schedule("cosine", 0.1, epochs * 10, warmup=5)
    hist = fit(model, opt, x, y, x, y, epochs=epochs, batch_size=32, schedule=sched, seed=seed,
               quiet=True, **kw)
    return model, opt, hist


def test_fit_learns_spirals(spirals):
    x, y = spirals
    model, _, hist = run(x, y, epochs=30)
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert evaluate(model, x, y)[1] > 0.9
    assert [h["epoch"] for h in hist] == list(range(1, 31))


def test_same_seed_same_result_bit_for_bit(spirals):
    a, _, ha = run(*spirals, epochs=3, seed=5)
    b, _, hb = run(*spirals, epochs=3, seed=5)
    c, _, _ = run(*spirals, epochs=3, seed=6)
    for k, v in a.state().items():
        assert np.array_equal(v, b.state()[k]), k
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    assert not np.array_equal(a.state()["1.weight"], c.state()["1.weight"])


def test_resume_is_bit_identical(spirals, tmp_path):
    x, y = spirals
    full, full_opt, full_hist = run(x, y, epochs=4, seed=2)
    ckpt = tmp_path / "ckpt.npz"
    steps = []

    def interrupted_step(model, xb, yb):  # the machine dies in the middle of epoch 3
        steps.append(1)
        if len(steps) == 25:
            raise KeyboardInterrupt
        return dense_step(model, xb, yb)

    with pytest.raises(KeyboardInterrupt):
        run(x, y, epochs=4, seed=2, checkpoint_path=ckpt, step=interrupted_step)
    assert len(load_checkpoint(ckpt)["history"]) == 2
    # A fresh process would rebuild the model and optimizer from scratch, then resume.
    resumed, opt, hist = run(x, y, epochs=4, seed=2, resume=ckpt, checkpoint_path=ckpt)
    for k, v in full.state().items():
        assert np.array_equal(v, resumed.state()[k]), k
    for k, v in full_opt.state_dict().items():
        assert np.array_equal(v, opt.state_dict()[k]), k
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in full_hist]


def test_nan_loss_names_the_step(spirals):
    x, y = spirals
    calls = []

    def step(model, xb, yb):
        calls.append(1)
        loss, correct, grads = dense_step(model, xb, yb)
        return (float("nan") if len(calls) == 13 else loss), correct, grads

    with pytest.raises(FloatingPointError, match=r"epoch 2, step 3 \(global step 12\)"):
        fit(mlp([2, 8, 3]), SGD(lr=0.1), x, y, epochs=3, batch_size=30, step=step, quiet=True)


# Diverging on purpose overflows, and NumPy warns of it before the loss check stops the run.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_divergence_is_reported(spirals):
    x, y = spirals
    with pytest.raises(FloatingPointError):
        fit(mlp([2, 64, 3]), SGD(lr=1e30), x * 1e10, y, epochs=3, batch_size=30, quiet=True)


def test_checkpoint_round_trip_and_metadata(tmp_path):
    model, opt = small_cnn(seed=1), Adam(lr=1e-3)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    _, _, grads = dense_step(model, x, np.arange(4))
    opt.step(model.parameters(), grads)
    path = save_checkpoint(tmp_path / "c.npz", model, opt, {"note": "hello", "levels": [1.0, 0.5]})
    other, other_opt = small_cnn(seed=2), Adam(lr=1e-3)
    meta = load_checkpoint(path, other, other_opt)
    assert meta["note"] == "hello" and meta["format_version"] == 1
    for k, v in model.state().items():
        assert np.array_equal(v, other.state()[k])
    assert other_opt.state_dict()["step"] == opt.state_dict()["step"]


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 3] ^= 0xFF
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "empty"])
def test_corrupt_checkpoint_is_rejected(tmp_path, how):
    path = save_checkpoint(tmp_path / "c.npz", mlp([4, 3, 2], seed=0))
    corrupt(path, how)
    with pytest.raises(ArchiveError, match="c.npz"):
        load_checkpoint(path)


def test_tampered_array_fails_the_checksum(tmp_path):
    path = write_archive(tmp_path / "a.npz", {"w": np.arange(5.0)}, {}, "test.kind", 1)
    with np.load(path) as z:
        entries = dict(z)
    entries["w"] = entries["w"] + 1e-12
    np.savez(path, **entries)
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        read_archive(path, "test.kind", {1})


def test_wrong_kind_or_version_is_rejected(tmp_path):
    path = write_archive(tmp_path / "a.npz", {"w": np.zeros(2)}, {}, "test.kind", 3)
    with pytest.raises(ArchiveError, match="format_version 3"):
        read_archive(path, "test.kind", {1, 2})
    with pytest.raises(ArchiveError, match="expected a 'other.kind' file"):
        read_archive(path, "other.kind", {3})
    with pytest.raises(FileNotFoundError):
        read_archive(tmp_path / "missing.npz", "test.kind", {3})


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.npz", mlp([4, 3, 2], seed=0))
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, mlp([4, 3, 2], seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def test_cli_train_dense_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dense", "--epochs", "2", "--quiet", "--out", str(out),
                 "--model", "mlp", "--hidden", "32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and 0 <= metrics["test_acc"] <= 1
    assert (out / "curves.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    assert f"{metrics['test_acc']:.4f}" in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.npz")]) == 2
    assert "no such archive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "0"])

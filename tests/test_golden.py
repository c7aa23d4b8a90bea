"""Golden vectors: written, re-checked, and recomputed independently with PyTorch autograd."""
import json

import numpy as np
import pytest

from helpers import assert_close
from minidress.checkpoint import read_archive, write_archive
from minidress.app.cli import main
from minidress.app.golden import GOLDEN_KIND, GOLDEN_VERSION, check_golden, write_golden


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("g") / "golden.npz")


def test_check_recomputes_every_tensor_exactly(golden):
    diffs = {name: r["max_diff"] for name, r in check_golden(golden).items()}
    assert len(diffs) > 50 and max(diffs.values()) <= 1e-12
    assert any(k.startswith("cnn/mask/2/") for k in diffs)


def test_check_reports_a_wrong_tensor(golden, tmp_path):
    arrays, meta = read_archive(golden, GOLDEN_KIND, {GOLDEN_VERSION})
    arrays["mlp/grad/2.weight"] = arrays["mlp/grad/2.weight"] + 1e-6
    bad = write_archive(tmp_path / "bad.npz", arrays, meta, GOLDEN_KIND, GOLDEN_VERSION)
    report = check_golden(bad)
    assert report["mlp/grad/2.weight"]["max_diff"] == pytest.approx(1e-6)
    assert main(["golden", "--check", str(bad)]) == 1
    assert main(["golden", "--check", str(golden)]) == 0


def test_golden_file_in_pytorch(golden):
    """Load the file as an outside implementation would (np.load + JSON), rebuild each network
    in torch from the metadata, derive masks from the ranks, and recompute the step."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    with np.load(golden) as z:
        a = {k: z[k] for k in z.files}
    meta = json.loads(a["__meta__"].tobytes())
    assert meta["format_version"] == 1 and meta["kind"] == "minidress.golden"
    for net, info in meta["networks"].items():
        g = {k[len(net) + 1:]: v for k, v in a.items() if k.startswith(net + "/")}
        params = {k[6:]: torch.tensor(v, requires_grad=True) for k, v in g.items() if k.startswith("param/")}
        x, y = torch.tensor(g["x"]), torch.tensor(g["y"])
        total = 0
        for k, (d, lam) in enumerate(zip(g["levels"], g["lambdas"])):
            h = x
            for layer in info["layers"]:
                name, kind = layer["name"], layer["type"]
                if kind in ("linear", "conv2d"):
                    ranks = torch.tensor(g[f"ranks/{name}"])
                    # The documented rule: keep max(1, floor(d*row_len + 0.5)) entries per row.
                    n = max(1, int(np.floor(d * ranks.shape[1] + 0.5)))
                    w = params[f"{name}.weight"]
                    mask = (ranks < n).reshape(w.shape).double()
                    assert_close(g[f"mask/{k}/{name}"], mask.to(torch.uint8), f"{net} mask {k}/{name}", 0)
                    if kind == "linear":
                        h = F.linear(h, w * mask, params[f"{name}.bias"])
                    else:
                        h = F.conv2d(h, w * mask, params[f"{name}.bias"], layer["stride"], layer["padding"])
                elif kind == "relu":
                    h = torch.relu(h)
                else:
                    h = h.flatten(1)
            loss = F.cross_entropy(h, y)
            assert_close(g[f"logits/{k}"], h, f"{net} logits {k}", 1e-10)
            assert_close(g["loss"][k], loss, f"{net} loss {k}", 1e-10)
            total = total + float(lam) * loss
        total.backward()
        assert_close(g["total_loss"], total, f"{net} total loss", 1e-10)
        for name, p in params.items():
            assert_close(g[f"grad/{name}"], p.grad, f"{net} grad {name}", 1e-10)
            assert_close(g[f"param_after/{name}"], p.detach() - meta["lr"] * p.grad, f"{net} after {name}", 1e-10)
        # The ranks follow the documented rule: stable sort of -|w|, ties to the lower column.
        for layer in info["layers"]:
            if layer["type"] in ("linear", "conv2d"):
                w = params[f"{layer['name']}.weight"].detach().reshape(len(g[f"ranks/{layer['name']}"]), -1)
                order = torch.argsort(-w.abs(), dim=1, stable=True)
                ranks = torch.empty_like(order).scatter_(1, order, torch.arange(w.shape[1]).expand_as(order))
                assert_close(g[f"ranks/{layer['name']}"], ranks, f"{net} ranks", 0)


def test_cli_golden_needs_one_action(capsys):
    assert main(["golden"]) == 2
    assert "exactly one of --out" in capsys.readouterr().err


def test_check_prints_the_first_entries_of_a_failing_tensor_and_never_passes_nan(golden, tmp_path, capsys):
    arrays, meta = read_archive(golden, GOLDEN_KIND, {GOLDEN_VERSION})
    bad = dict(arrays)
    bad["cnn/logits/1"] = bad["cnn/logits/1"].copy()
    bad["cnn/logits/1"].flat[1] = np.nan                    # not the first entry: max() would skip it
    path = write_archive(tmp_path / "nan.npz", bad, meta, GOLDEN_KIND, GOLDEN_VERSION)
    assert main(["golden", "--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "cnn/logits/1" in out and "above tolerance" in out and "MISMATCH" in out
    assert "[1] ours" in out and "file nan" in out and "NOT OK" in out


def test_file_kinds_are_the_documented_ones():
    """The kinds are part of the file formats (docs/golden-format.md, the README): moving a module
    must never change them."""
    from minidress.checkpoint import CHECKPOINT_KIND
    from minidress.deploy.store import STORE_KIND
    assert (CHECKPOINT_KIND, STORE_KIND, GOLDEN_KIND) == ("minidress.checkpoint", "minidress.store", "minidress.golden")

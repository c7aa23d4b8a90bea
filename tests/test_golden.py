"""Golden vectors (docs/golden-format.md): written, re-checked, each case exercising what it
claims, files of other implementations checked, edited files caught, format 1 still read.
The PyTorch reimplementation runs in tests/test_torch_reference.py."""
import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from minidress.app.cli import main
from minidress.app.golden import (CASE_NAMES, GOLDEN_KIND, GOLDEN_VERSION, V1_CASES, case_inputs,
                                  check_golden, get_case, run_case, write_golden)
from minidress.checkpoint import read_archive, write_archive
from minidress.dress import Dress
from minidress.masks import check_density, n_kept
from minidress.nn.models import build_model

ROOT = Path(__file__).resolve().parents[1]
V1_FILE = Path(__file__).parent / "data" / "golden_v1.npz"   # written by minidress before format 2
# minidress recomputing its own file: the same code, but BLAS's order of additions depends on the
# CPU (OpenBLAS picks its kernels per processor), so the products' outputs recomputed on another
# machine may differ in the last bits: at most 4.4e-16 on an AMD EPYC against the format-1 file,
# which was written on an Intel Xeon. Inputs, masks and ranks never depend on BLAS: bit for bit.
SELF_TOL = 1e-12


def _assert_rewritten_the_same(new, old, name):
    """``new`` equals ``old``: bit for bit for the inputs and every non-float tensor, within
    ``SELF_TOL`` of the largest magnitude for the float outputs of the arithmetic."""
    assert new.dtype == old.dtype and new.shape == old.shape, name
    is_input = name.split("/")[1] in ("x", "y", "param", "buffer")
    if is_input or not np.issubdtype(old.dtype, np.floating):
        np.testing.assert_array_equal(new, old, err_msg=name)
    else:
        scale = max(1.0, float(np.max(np.abs(old), initial=0.0)))
        assert float(np.max(np.abs(new - old), initial=0.0)) <= SELF_TOL * scale, name


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return write_golden(tmp_path_factory.mktemp("g") / "golden.npz")


@pytest.fixture(scope="module")
def contents(golden):
    return read_archive(golden, GOLDEN_KIND, {GOLDEN_VERSION})


@pytest.fixture(scope="module")
def tensors(contents):
    return contents[0]


@pytest.fixture
def rewrite(contents):
    """``rewrite(path, arrays)``: a re-signed golden file, whose checksum is valid whatever was
    edited in it (anyone can re-sign a file)."""
    return lambda path, arrays: write_archive(path, arrays, contents[1], GOLDEN_KIND, GOLDEN_VERSION)


def test_check_recomputes_every_tensor_of_every_case(golden):
    report = check_golden(golden)
    assert report.ok and not report.notes
    assert {name.split("/")[0] for name in report.tensors} == set(CASE_NAMES)
    assert len(report.tensors) > 600
    assert max(r["max_diff"] for r in report.tensors.values()) <= SELF_TOL


def test_one_case_is_written_and_checked_alone(tmp_path, capsys):
    path = tmp_path / "ties.npz"
    assert main(["golden", "--out", str(path), "--case", "ties"]) == 0
    with np.load(path) as z:
        assert {k.split("/")[0] for k in z.files if "/" in k} == {"ties"}
    assert main(["golden", "--check", str(path), "--case", "ties"]) == 0
    assert "0 NOT OK, 0 missing, 0 unexpected: OK" in capsys.readouterr().out


def test_check_reports_a_wrong_tensor_with_its_first_mismatches(rewrite, tensors, tmp_path, capsys):
    bad = dict(tensors)
    bad["mlp/step/0/grad/2.weight"] = bad["mlp/step/0/grad/2.weight"].copy()
    bad["mlp/step/0/grad/2.weight"].flat[3] += 1e-9          # ten times the tolerance
    path = rewrite(tmp_path / "bad.npz", bad)
    report = check_golden(path)
    assert report.failing == ["mlp/step/0/grad/2.weight"]
    assert report.tensors["mlp/step/0/grad/2.weight"]["first"][0][0] == 3
    assert main(["golden", "--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"mlp/step/0/grad/2.weight +max abs diff 1.0\d\de-09  tol 1e-10  NOT OK", out)
    assert "[3] ours" in out and "MISMATCH" in out


def test_nan_never_passes(rewrite, tensors, tmp_path, capsys):
    bad = dict(tensors)
    bad["cnn/step/0/logits/1"] = bad["cnn/step/0/logits/1"].copy()
    bad["cnn/step/0/logits/1"].flat[1] = np.nan              # not the first entry: max() would skip it
    assert main(["golden", "--check", str(rewrite(tmp_path / "nan.npz", bad))]) == 1
    out = capsys.readouterr().out
    assert "[1] ours" in out and "file nan" in out and "NOT OK" in out


def test_edited_weights_fail_even_with_every_output_recomputed(rewrite, tensors, tmp_path, capsys):
    """The issue's point: recomputing from edited inputs passes trivially. The check regenerates
    the inputs from the seed, so the edit is caught and named."""
    case = get_case("mlp")
    inputs = case_inputs(case)
    inputs["param/2.weight"] = inputs["param/2.weight"] * (1 + 1e-12)     # a loader's rounding
    edited = dict(tensors)
    edited.update({f"mlp/{k}": v for k, v in run_case(case, inputs).items()})   # consistent outputs
    path = rewrite(tmp_path / "edited.npz", edited)
    report = check_golden(path)
    assert report.failing == ["mlp/param/2.weight"]
    assert report.tensors["mlp/param/2.weight"]["role"] == "input"
    assert main(["golden", "--check", str(path)]) == 1
    assert "(input: must equal the seed's)" in capsys.readouterr().out


def test_a_file_written_by_another_implementation(tensors, tmp_path):
    """Plain np.savez with the documented names: no checksum, and no metadata (format 2, seed 0)."""
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, **tensors)
    report = check_golden(theirs)
    assert report.ok and report.version == 2 and report.seed == 0
    assert any("no __sha256__" in n for n in report.notes)
    # A missing tensor and a misspelt one are failures, never silently skipped.
    partial = {k: v for k, v in tensors.items() if k != "ties/step/0/logits/2"}
    partial["ties/step/0/logit/2"] = tensors["ties/step/0/logits/2"]
    np.savez(theirs, **partial)
    report = check_golden(theirs)
    assert not report.ok
    assert report.missing == ["ties/step/0/logits/2"] and report.unexpected == ["ties/step/0/logit/2"]


def test_a_wrong_input_dtype_is_one_line_naming_the_tensor(tensors, tmp_path, capsys):
    theirs = dict(tensors)
    theirs["cnn/x"] = theirs["cnn/x"].astype(np.float32)
    np.savez(tmp_path / "f32.npz", **theirs)
    assert main(["golden", "--check", str(tmp_path / "f32.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cnn/x must be float64 of shape (5, 2, 6, 6), got float32" in err


def test_format_1_files_still_check_and_are_still_written_the_same(tmp_path):
    report = check_golden(V1_FILE)
    assert report.ok and report.version == 1 and len(report.tensors) == 78
    assert max(r["max_diff"] for r in report.tensors.values()) <= SELF_TOL
    fresh = write_golden(tmp_path / "v1.npz", cases=V1_CASES, version=1)
    with np.load(V1_FILE) as old, np.load(fresh) as new:
        assert sorted(old.files) == sorted(new.files)
        for name in old.files:
            if name not in ("__meta__", "__sha256__"):
                _assert_rewritten_the_same(new[name], old[name], name)
        old_meta, new_meta = (json.loads(z["__meta__"].tobytes()) for z in (old, new))
    old_meta.pop("minidress_version"), new_meta.pop("minidress_version")   # the one field that may move
    assert old_meta == new_meta


def test_format_2_mlp_and_cnn_are_format_1_with_step_0(tensors):
    with np.load(V1_FILE) as old:
        for name in old.files:
            if not name.startswith("__"):
                net, rest = name.split("/", 1)
                new = tensors.get(f"{net}/{rest}", tensors.get(f"{net}/step/0/{rest}"))
                _assert_rewritten_the_same(new, old[name], name)


# ---------------------------------------------------------------------------------------------
# Each case exercises what docs/golden-format.md says it does
# ---------------------------------------------------------------------------------------------

def test_ties_straddle_every_cut_of_every_row(tensors):
    for layer in ("0", "2"):
        w = np.abs(tensors[f"ties/param/{layer}.weight"])
        ranks = tensors[f"ties/step/0/ranks/{layer}"]
        for d in get_case("ties").levels[1:]:
            n = n_kept(d, w.shape[1])
            at = [np.flatnonzero(ranks[r] == n - 1)[0] for r in range(len(w))]
            after = [np.flatnonzero(ranks[r] == n)[0] for r in range(len(w))]
            assert all(w[r, a] == w[r, b] and a < b for r, (a, b) in enumerate(zip(at, after)))


def test_counts_keep_the_documented_numbers(tensors):
    kept = [(tensors[f"counts/step/0/mask/{k}/0"].sum(1)[0], tensors[f"counts/step/0/mask/{k}/2"].sum(1)[0])
            for k in range(4)]
    assert kept == [(50, 5), (25, 3), (14, 1), (3, 1)]     # levels 1, 0.5, 0.29, 0.05; rows 50 and 5


def _preactivations(case_name, tensors, level):
    """Each layer's output in ``level``'s sub-network, from the file's inputs."""
    case = get_case(case_name)
    model = build_model({"layers": list(case.layers)}, dtype=np.float64)
    dress = Dress(model, levels=case.levels, dense_first_last=False)
    for name, p in model.parameters().items():
        p[...] = tensors[f"{case_name}/param/{name}"]
    dress.rank()
    dress.use(case.levels[level], level=level)
    h, outs = tensors[f"{case_name}/x"], []
    for layer in model.layers:
        h = layer.forward(h)
        outs.append(h)
    return outs


def test_relu_zero_has_exact_zeros_entering_both_relus_in_every_level(tensors):
    for level in range(2):
        outs = _preactivations("relu_zero", tensors, level)
        assert all(np.count_nonzero(outs[i] == 0) >= 2 for i in (0, 2))


def test_conv_pool_has_tied_maxima_in_live_windows(tensors):
    conv_out = _preactivations("conv_pool", tensors, 0)[0]            # [4, 3, 5, 4]
    windows = np.lib.stride_tricks.sliding_window_view(conv_out, (2, 2), axis=(2, 3))
    flat = windows.reshape(*windows.shape[:4], 4)
    top = flat.max(-1)
    tied = (np.count_nonzero(flat == top[..., None], axis=-1) >= 2) & (top > 0)
    assert tied.sum() >= 4 and tied.any(axis=(1, 2, 3)).all()        # at least one per sample


def test_resample_changes_the_masks_at_step_2_only(tensors):
    names = [k for k in tensors if k.startswith("resample/step/") and "/ranks/" in k]
    assert sorted({k.split("/")[2] for k in names}) == ["0", "2"]
    changed = sum(np.count_nonzero(tensors[f"resample/step/0/mask/{k}/0"] != tensors[f"resample/step/2/mask/{k}/0"])
                  for k in range(3))
    assert changed > 0


def test_trajectories_learn_and_batch_norm_statistics_move(tensors):
    for case in ("trajectory", "trajectory_f32"):
        assert tensors[f"{case}/step/9/total_loss"] < tensors[f"{case}/step/0/total_loss"]
        before, after = tensors[f"{case}/buffer/1.running_var"], tensors[f"{case}/step/9/buffer_after/1.running_var"]
        assert after.shape == (3, 10) and not np.allclose(before, after)
    assert tensors["trajectory_f32/param_after/0.weight"].dtype == np.float32


def test_the_document_lists_every_case_and_tolerance():
    doc = (ROOT / "docs" / "golden-format.md").read_text()
    table = re.findall(r"^\| `(\w+)` \|", doc.split("## The cases")[1], re.M)
    assert table == list(CASE_NAMES)
    assert f"tolerance `{get_case('trajectory_f32').tolerance:.0e}`".replace("e-05", "e-5") in doc


# ---------------------------------------------------------------------------------------------
# The density rule in floating point (docs/golden-format.md, "The row count in floating point")
# ---------------------------------------------------------------------------------------------

def test_float32_densities_are_refused_with_one_line():
    for bad in (np.float32(0.29), np.float16(0.5), np.array(0.5, np.float32)):
        with pytest.raises(TypeError, match=r"^density must be a Python float or float64, got .* of dtype float(32|16)$"):
            check_density(bad)
    with pytest.raises(TypeError, match="levels must be a Python float or float64"):
        check_density(np.float32(0.5), "levels")
    assert check_density(np.float64(0.29)) == 0.29 and check_density(0.29) == 0.29 and check_density(1) == 1.0
    with pytest.raises(TypeError, match="must be a number in"):          # bool and str, as before
        check_density(True)


def test_the_documented_disagreement_counts():
    """Densities 0.01..1.00, row lengths 1..1000: float32 densities change 749 counts, exact
    decimal arithmetic 49 (double, the rule, is what n_kept computes)."""
    i, row_len = np.meshgrid(np.arange(1, 101), np.arange(1, 1001), indexing="ij")
    rule = np.array([[n_kept(d / 100, n) for n in range(1, 1001)] for d in range(1, 101)])
    f32 = np.maximum(1, np.floor((i / 100).astype(np.float32).astype(np.float64) * row_len + 0.5))
    decimal = np.maximum(1, (2 * i * row_len + 100) // 200)     # floor(i/100 * L + 1/2), in integers
    assert (np.count_nonzero(f32 != rule), np.count_nonzero(decimal != rule)) == (749, 49)
    assert n_kept(0.29, 50) == 14 and Fraction(29, 100) * 50 + Fraction(1, 2) == 15


# ---------------------------------------------------------------------------------------------
# Command line and file kinds
# ---------------------------------------------------------------------------------------------

def test_cli_golden_needs_one_action(capsys):
    assert main(["golden"]) == 2
    assert "exactly one of --out" in capsys.readouterr().err


def test_cli_refuses_a_case_format_1_lacks(tmp_path, capsys):
    assert main(["golden", "--out", str(tmp_path / "g.npz"), "--case", "ties", "--format-version", "1"]) == 2
    assert "format 1 holds only the cases" in capsys.readouterr().err


def test_meta_documents_each_case(golden):
    with np.load(golden) as z:
        meta = json.loads(z["__meta__"].tobytes())
    assert list(meta["cases"]) == sorted(CASE_NAMES)             # JSON written with sorted keys
    assert meta["cases"]["trajectory_f32"]["tolerance"] == get_case("trajectory_f32").tolerance
    assert meta["cases"]["resample"]["resample_every"] == 2


def test_file_kinds_are_the_documented_ones():
    """The kinds are part of the file formats (docs/golden-format.md, the README): moving a module
    must never change them."""
    from minidress.checkpoint import CHECKPOINT_KIND
    from minidress.deploy.store import STORE_KIND
    assert (CHECKPOINT_KIND, STORE_KIND, GOLDEN_KIND) == ("minidress.checkpoint", "minidress.store", "minidress.golden")

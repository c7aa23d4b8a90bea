"""Every tutorial notebook has a MyST markdown pair (Jupytext) holding the same cells.

The .md file is the reviewable text of a notebook; the .ipynb is what a code host renders and what
Jupyter opens. Both are committed and must hold the same markdown and code cells (outputs and
metadata are ignored). A notebook without a pair fails here: pair it with

    jupytext --set-formats ipynb,md:myst tutorials/NAME.ipynb

and after editing either file, bring the other one up to date with

    jupytext --sync tutorials/NAME.ipynb
"""
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext", reason='pip install ".[dev]" brings jupytext')

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9]*.ipynb"))
PAIRS = sorted(TUTORIALS.glob("[0-9]*.md"))


def cells(notebook):
    """(type, source) of every markdown and code cell, trailing blank lines dropped."""
    return [(c.cell_type, c.source.rstrip()) for c in notebook.cells
            if c.cell_type in ("markdown", "code")]


def test_the_tutorials_are_found():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_a_myst_pair_with_the_same_cells(ipynb):
    md = ipynb.with_suffix(".md")
    fix = f"jupytext --set-formats ipynb,md:myst tutorials/{ipynb.name}"
    assert md.exists(), f"{ipynb.name} has no MyST pair {md.name}: run `{fix}`"
    nb = jupytext.read(ipynb)
    formats = nb.metadata.get("jupytext", {}).get("formats", "")
    assert "md:myst" in formats, (
        f"{ipynb.name} is not paired (its jupytext.formats metadata is {formats!r}): run `{fix}`")
    text = jupytext.read(md)
    ours, theirs = cells(nb), cells(text)
    sync = f"jupytext --sync tutorials/{ipynb.name}"
    assert len(ours) == len(theirs), (
        f"{ipynb.name} has {len(ours)} cells, {md.name} {len(theirs)}: run `{sync}` "
        "(it keeps the newer file's cells)")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, (f"cell {i} differs between {ipynb.name} and {md.name} "
                        f"({a[0]}: {a[1][:60]!r} vs {b[0]}: {b[1][:60]!r}): run `{sync}`")


@pytest.mark.parametrize("md", PAIRS, ids=lambda p: p.name)
def test_every_myst_pair_has_its_notebook(md):
    assert md.with_suffix(".ipynb").exists(), (
        f"{md.name} pairs a notebook that does not exist: run "
        f"`jupytext --to ipynb tutorials/{md.name}` or remove {md.name}")

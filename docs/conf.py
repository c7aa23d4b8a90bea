"""Sphinx configuration of the minidress documentation site.

Build it from the repository root (``pip install ".[docs]"`` first)::

    python -m sphinx -W --keep-going -c docs -b html . build/docs/html

Every tutorial is executed during the build with ``MINIDRESS_FAST=1`` and one BLAS/OpenMP
thread; a cell that raises fails the build. Nothing is fetched from the network: the theme bundles its assets, MathJax is copied
from the ``django-static-mathjax`` wheel, and intersphinx is not used.
"""
import importlib
import importlib.util
import json
import logging
import os
import pkgutil
import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The tutorials train for a few epochs only: the kernels inherit this variable.
os.environ["MINIDRESS_FAST"] = "1"
# One thread per pool in the kernels, as minidress trains (kernels.conv_train.TRAINING_THREADS):
# on the shared 2-core build machine a second BLAS thread made steps and dense products 3-40x
# slower (benchmarks/README.md, thread policy). The kernels read these when NumPy loads.
for _pool in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_pool, "1")
# The notebooks run in kernels of their own: they too import this checkout's minidress (as
# autodoc does), not whatever copy is installed, which CI reinstalls while the site builds.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

project = "minidress"
author = "the minidress authors"
copyright = "the minidress authors"
import minidress  # noqa: E402

release = version = minidress.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# The source folder is the repository root (``-c docs .``), so that the README, the tutorials and
# the benchmark notes keep their own relative links; only these files are pages.
root_doc = "README"
include_patterns = ["README.md", "docs/**", "tutorials/README.md", "tutorials/*.ipynb",
                    "benchmarks/README.md"]
exclude_patterns = [
    "build", "docs/_extra", ".git", ".venv*", "runs", "**/.ipynb_checkpoints",
    # The MyST pairs hold the same cells as the notebooks: the site renders the .ipynb, so that
    # a tutorial page's "download" gives the notebook.
    "tutorials/[0-9]*.md",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
html_extra_path = ["_extra"]       # index.html: a redirect to the landing page README.html

# --- MyST and notebook execution -----------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("MINIDRESS_DOCS_EXECUTE", "cache")
nb_execution_cache_path = str(ROOT / "build" / "docs" / ".jupyter_cache")
# Local use only, never in CI: MINIDRESS_DOCS_NO_EXECUTE="*03_*,*06_*" builds those notebooks' pages
# without running them (say, while someone is in the middle of editing one).
nb_execution_excludepatterns = [p for p in os.environ.get("MINIDRESS_DOCS_NO_EXECUTE", "").split(",")
                                if p]
nb_execution_timeout = 1200
nb_execution_raise_on_error = True       # a failing cell fails the build (CI relies on it)
nb_execution_show_tb = True
nb_kernel_rgx_aliases = {".*": "python3"}
nb_merge_streams = True

# --- API reference ---------------------------------------------------------------------------
# ignore-module-all: a package's __all__ re-exports its modules' names; document each name once,
# in the module that defines it.
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["torch", "onnx", "onnxruntime"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_param = False      # types as text: "shape" in "array, shape (N,)" is no cross-reference
napoleon_use_rtype = False

# --- HTML: everything served from the build folder ---------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "minidress"
html_static_path = []
html_theme_options = {
    "repository_url": "",
    "use_download_button": True,      # per page: the source (.ipynb for a tutorial) and print
    "use_fullscreen_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
# The light/dark switch needs a default, else the theme logs "invalid theme mode" on a fresh visit.
html_context = {"default_mode": "auto"}
html_last_updated_fmt = None
html_copy_source = True
html_show_sourcelink = True

# MathJax 3 from a local copy (the django-static-mathjax wheel holds MathJax 3.2.2); SVG output
# needs no font files, so this one file renders all the math offline.
_mj = importlib.util.find_spec("mathjax")
_mj_file = (Path(_mj.origin).parent / "static" / "mathjax" / "es5" / "tex-svg-full.js"
            if _mj and _mj.origin else None)
if _mj_file is None or not _mj_file.is_file():
    raise RuntimeError("MathJax not found: pip install '.[docs]' (it brings django-static-mathjax)")
html_static_path.append(str(_mj_file))
mathjax_path = "tex-svg-full.js"
mathjax3_config = {"options": {"enableMenu": False}}

# docs/results.md (not ours to edit) has H2 -> H4 steps; they render fine.
# ref.python: an attribute's type in a docstring ("array, shape (N,)") is looked up as a Python
# name, and "shape" is an attribute of two classes: the ambiguity, not a broken link.
suppress_warnings = ["myst.header", "ref.python"]


# --- navigation: the README is the landing page and stays free of Sphinx markup -----------------
NAVIGATION = """

```{toctree}
:hidden:
:caption: Tutorials

tutorials/README
docs/teaching
```

```{toctree}
:hidden:
:glob:
:caption: Notebooks (run with MINIDRESS_FAST=1)

tutorials/0*
```

```{toctree}
:hidden:
:caption: Reference

docs/results
docs/golden-format
benchmarks/README
docs/api/index
```
"""


FAST_NOTE = ("```{note}\nThis page was executed while the site was built, with "
             "`MINIDRESS_FAST=1` set: every training runs for a few epochs only, so plots and "
             "numbers are rougher than in a full run, and every library ran one thread. Use the download button at the top of the "
             "page to get the notebook and run it yourself (with or without `MINIDRESS_FAST=1`)."
             "\n```")


def _add_navigation(app, docname, source):
    if docname == root_doc:
        source[0] += NAVIGATION
    elif docname.startswith("tutorials/") and docname != "tutorials/README":
        # say on every tutorial page how it was run (in the build only; the notebook is unchanged)
        nb = json.loads(source[0])
        nb["cells"].insert(1, {"cell_type": "markdown", "id": "minidress-fast-note", "metadata": {},
                               "source": FAST_NOTE})
        source[0] = json.dumps(nb)


# --- docstrings: their reST problems are listed apart (the modules belong to their authors) ----
class _DocstringProblems(logging.Filter):
    """Keeps docutils messages raised inside docstrings out of the build's warnings.

    They are written to ``docstring-problems.txt`` in the output folder instead, and counted at
    the end of the build; every other warning (pages, notebooks, cross-references) stays one.
    """

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        location = str(getattr(record, "location", "") or "")
        if record.levelno >= logging.WARNING and "docstring of " in location \
                and getattr(record, "type", None) == "docutils":
            self.records.append(f"{location}: {record.getMessage()}")
            return False
        return True


_problems = _DocstringProblems()


def _report_execution(app, exception):
    """Print how long each tutorial ran in this build (or that it came from the cache)."""
    if exception is not None:
        return
    from myst_nb.sphinx_ import NbMetadataCollector

    for docname in sorted(app.env.found_docs):
        if not docname.startswith("tutorials/0"):
            continue
        data = NbMetadataCollector.get_exec_data(app.env, docname) or {}
        runtime = data.get("runtime")
        if not data:
            print(f"notebook {docname}: not executed (MINIDRESS_DOCS_NO_EXECUTE)")
            continue
        took = f"{runtime:.1f} s" if isinstance(runtime, (int, float)) else "-"
        print(f"notebook {docname}: {data.get('method')}, {took}, "
              f"{'ok' if data.get('succeeded', False) else 'FAILED'}")


def _write_problems(app, exception):
    out = Path(app.outdir) / "docstring-problems.txt"
    problems = sorted(set(_problems.records))
    out.write_text("".join(line + "\n" for line in problems))
    if problems:
        print(f"{len(problems)} reST problems in docstrings (not warnings of this "
              f"build), listed in {out}")


# --- API pages: every module of a package, found at build time ---------------------------------
def public_modules(package, recursive=True):
    """The public modules of ``package`` (the package itself first), as dotted names."""
    pkg = importlib.import_module(package)
    names = [package]
    walker = pkgutil.walk_packages if recursive else pkgutil.iter_modules
    for info in walker(pkg.__path__, package + "."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("_") or (not recursive and info.ispkg):
            continue
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        names.append(info.name)
    return names


class MinidressModules(SphinxDirective):
    """``.. minidress-modules:: minidress.nn`` documents that package and all its modules.

    ``:flat:`` documents only the package and its direct non-package modules.
    """

    required_arguments = 1
    option_spec = {"flat": lambda arg: True}

    def run(self):
        names = public_modules(self.arguments[0], recursive="flat" not in self.options)
        lines = []
        for name in names:
            lines += [f"``{name}``", "-" * (len(name) + 4), "",
                      f".. automodule:: {name}", ""]
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=f"<{self.arguments[0]}>"),
                                 node)
        return node.children


def setup(app):
    app.connect("source-read", _add_navigation)
    app.connect("build-finished", _write_problems)
    app.connect("build-finished", _report_execution)
    for handler in logging.getLogger("sphinx").handlers:
        handler.filters.insert(0, _problems)   # before the filter that counts warnings
    app.add_directive("minidress-modules", MinidressModules)
    return {"parallel_read_safe": True}


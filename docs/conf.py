"""Sphinx configuration of the stsr documentation.

Build (from the repository root; no network needed)::

    sphinx-build -W -b html docs docs/_build/html

The tutorials are MyST markdown notebooks kept in ``tutorials/`` (``docs/tutorials`` is a symlink to it) and are
executed during the build by myst-nb. ``STSR_DOCS_EXECUTE`` chooses how: ``cache`` (default: re-run only changed
notebooks, cache in ``docs/_build/.jupyter_cache``), ``force`` (always), ``off`` (do not run; the pages then show
code only). Real data are read from ``$STSR_DATA_DIR`` (default ``<repo>/../shared/data`` when it exists).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # the checkout's stsr, also when it is not installed editable

import stsr  # noqa: E402

_data = ROOT.parent / "shared" / "data"
if "STSR_DATA_DIR" not in os.environ and _data.is_dir():
    os.environ["STSR_DATA_DIR"] = str(_data)  # inherited by the notebook kernels
# the kernels import the same stsr as autodoc
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])

# -- project -------------------------------------------------------------------------------------------------------
project = "stsr"
author = "the stsr authors"
copyright = f"{date.today().year}, {author}"  # noqa: A001
version = release = stsr.__version__

# -- general -------------------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinx_design",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    # docs/benchmarks/ is written by the benchmark scripts; the pages in the toctree of benchmarks.md are kept
    *(
        str(p.relative_to(HERE))
        for p in (HERE / "benchmarks").glob("**/*")
        if p.suffix in (".md", ".rst", ".ipynb")
        and p.name
        not in (
            "accuracy.md",
            "accuracy_fast.md",
            "scaling.md",
            "feature_cache.md",
            "default_call.md",
            "image_features.md",
            "repeat_call.md",
            "visium_geometry.md",
        )
    ),
    "tutorials/README.md",
    "_autosummary.rst",
    "**.ipynb_checkpoints",
]
# No intersphinx: the build must work without network. Cross-references to numpy, anndata, spatialdata, ... stay
# plain text; nitpicky stays off so that they are not warnings.
nitpicky = False
default_role = "literal"
pygments_style = "default"

# -- autodoc / autosummary / napoleon ------------------------------------------------------------------------------
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# stsr's "Returns" sections are free text (not numpy "name : type" entries): render them as written, under a
# "Returns" rubric, instead of letting napoleon split the first line into a name and a type.
napoleon_custom_sections = ["Returns"]

# -- MyST / myst-nb ------------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("STSR_DOCS_EXECUTE", "cache")
nb_execution_timeout = int(os.environ.get("STSR_DOCS_CELL_TIMEOUT", "600"))  # seconds per cell
nb_execution_raise_on_error = True  # a failing tutorial fails the build
nb_execution_show_tb = True
nb_output_stderr = "remove"  # progress bars and library warnings are not part of the tutorials
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "python3"}

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"stsr {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
    "use_fullscreen_button": False,
}
html_show_sourcelink = False


# -- generated parts of pages -------------------------------------------------------------------------------------
# Pages hold HTML-comment markers that are filled when the page is read, so that they follow the code:
#   <!-- accuracy-table -->                        a toctree entry of docs/benchmarks/accuracy.md, or a note on how
#                                                  to generate it
#   <!-- autosummary MODULE [-NAME ...] -->        an autosummary table of MODULE.__all__ (minus the -NAMEs)
#   <!-- cli-help [SUBCOMMAND] -->                 the ``stsr [SUBCOMMAND] --help`` text
_ACCURACY = HERE / "benchmarks" / "accuracy.md"
_MARKER = re.compile(r"<!--\s*(accuracy-table|autosummary|cli-help)\b([^>]*?)\s*-->")


def _accuracy_block() -> str:
    if _ACCURACY.is_file():
        return (
            "The accuracy table is generated by `python benchmarks/accuracy.py` (it writes "
            "`docs/benchmarks/accuracy.md`):\n\n```{toctree}\n:maxdepth: 1\n\nbenchmarks/accuracy\n```\n"
        )
    return (
        "```{note}\nThe accuracy table is not part of this build. It is generated by "
        "`python benchmarks/accuracy.py`, which writes `docs/benchmarks/accuracy.md`; rebuild the docs "
        "afterwards to show it here.\n```\n"
    )


def _autosummary_block(args: list[str]) -> str:
    module, skip = args[0], {a[1:] for a in args[1:] if a.startswith("-")}
    names = [n for n in importlib.import_module(module).__all__ if n not in skip and not n.startswith("__")]
    body = "\n".join(f"   {n}" for n in names)
    return f"```{{eval-rst}}\n.. currentmodule:: {module}\n\n.. autosummary::\n   :toctree: generated\n\n{body}\n```\n"


def _cli_block(args: list[str]) -> str:
    from stsr.cli import _parser

    parser = _parser()
    if args:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[args[0]]
    os.environ["COLUMNS"] = "100"
    return "```text\n" + parser.format_help().rstrip() + "\n```\n"


def _write_autosummary_index() -> str:
    """Write every autosummary table of the pages to ``_autosummary.rst`` (not a page) for stub generation.

    Autosummary reads the page files themselves (not the ``source-read`` output) to decide which stubs to write,
    so the tables that the markers produce are also written, with full names, to this file.
    """
    lines = []
    for page in sorted(HERE.rglob("*.md")):
        if "_build" in page.parts or page.is_symlink() or "tutorials" in page.parts:
            continue
        for m in _MARKER.finditer(page.read_text(encoding="utf-8")):
            if m.group(1) != "autosummary":
                continue
            args = m.group(2).split()
            module, skip = args[0], {a[1:] for a in args[1:] if a.startswith("-")}
            for n in importlib.import_module(module).__all__:
                if n not in skip and not n.startswith("__"):
                    lines.append(f"   {module}.{n}")
    out = HERE / "_autosummary.rst"
    text = ":orphan:\n\n.. autosummary::\n   :toctree: api/generated\n\n" + "\n".join(lines) + "\n"
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return out.name


autosummary_generate = [_write_autosummary_index()]


def _fill_markers(app, docname: str, source: list[str]) -> None:
    def repl(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split()
        if kind == "accuracy-table":
            return _accuracy_block()
        if kind == "autosummary":
            return _autosummary_block(args)
        return _cli_block(args)

    source[0] = _MARKER.sub(repl, source[0])


def _drop_builtin_docstrings(app, what, name, obj, options, lines: list[str]) -> None:
    """Module constants (``REGISTRY``, ``HER2ST_SECTIONS``, ...) would show the docstring of ``dict``/``tuple``/``str``."""
    builtin = type(obj).__doc__ if type(obj).__module__ == "builtins" else None
    if what in ("data", "attribute") and builtin:
        if [ln.strip() for ln in lines if ln.strip()] == [
            ln.strip() for ln in builtin.splitlines() if ln.strip()
        ]:
            lines[:] = []


def setup(app) -> None:  # noqa: D103
    app.connect("source-read", _fill_markers)
    app.connect("autodoc-process-docstring", _drop_builtin_docstrings)

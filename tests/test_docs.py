"""The documentation builds warning-free (``sphinx-build -W``) with every tutorial executed on real data.

The full build executes the three tutorials in ``tutorials/`` (HER2ST, Vizgen, synthetic) and takes several
minutes on two CPU cores, so it is marked slow. It needs the ``docs`` extra (``pip install -e ".[docs]"``) and the
real data in ``$STSR_DATA_DIR``; it fails (does not skip) when either is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ("spot_slide", "train_with_truth", "scaling")


def test_tutorials_are_myst_notebooks_in_the_toctree():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert (DOCS / "tutorials").resolve() == (ROOT / "tutorials").resolve(), (
        "docs/tutorials must link to tutorials/"
    )
    for name in TUTORIALS:
        text = (ROOT / "tutorials" / f"{name}.md").read_text(encoding="utf-8")
        assert text.startswith("---\njupytext:") and "format_name: myst" in text, name
        assert "name: python3" in text, f"{name}: missing kernelspec"
        assert text.count("```{code-cell} ipython3") >= 5, name
        assert f"tutorials/{name}\n" in index, f"{name} is not in the toctree of docs/index.md"


@pytest.mark.slow
def test_docs_build_warning_free(tmp_path):
    for module in ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_design", "sphinx_copybutton"):
        try:
            __import__(module)
        except ImportError:
            pytest.fail(f"{module} is missing: the docs need the docs extra, pip install -e '.[docs]'.")
    out = tmp_path / "html"
    env = {**os.environ, "STSR_DOCS_EXECUTE": "force"}
    env.pop("MPLBACKEND", None)  # the notebooks draw inline
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-20000:]}"

    # every page and every public function has a page
    for page in ("index", "installation", "concepts", "benchmarks", "changelog", "api/index"):
        assert (out / f"{page}.html").is_file(), page
    import stsr

    for module in ("pp", "tl", "pl", "datasets", "models"):
        for name in getattr(stsr, module).__all__:
            documented_in = (
                "observation" if (module, name) in (("pp", "Grid"), ("pp", "ObservationModel")) else module
            )
            page = out / "api" / "generated" / f"stsr.{documented_in}.{name}.html"
            assert page.is_file(), f"stsr.{module}.{name} has no API page"

    # the tutorials ran: figures are embedded and the computed values are right
    pages = {name: (out / "tutorials" / f"{name}.html").read_text(encoding="utf-8") for name in TUTORIALS}
    for name, html in pages.items():
        assert html.count("<img") >= 1, f"{name}: no figure was rendered"
        assert "Traceback" not in html, name
    m = re.search(
        r"over (\d+) spots and (\d+) genes: r\(pooled, measured\) = ([0-9.]+); largest difference ([0-9.]+)",
        pages["spot_slide"],
    )
    assert m, "spot_slide: consistency check output missing"
    # pooling the HR map gives each spot's expected count: close to the measured, within two Poisson SDs
    assert int(m.group(1)) > 20 and float(m.group(3)) > 0.99 and float(m.group(4)) <= 2.01
    assert (
        "resuming, 12 of 25 tiles already finished" in pages["scaling"]
    )  # 3 batches of 4 before the failure
    executed = out.parent / "jupyter_execute" / "tutorials" / "train_with_truth.ipynb"
    nb = json.loads(executed.read_text(encoding="utf-8"))
    assert sum(c["cell_type"] == "code" for c in nb["cells"]) >= 8

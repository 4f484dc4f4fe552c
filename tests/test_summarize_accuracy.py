"""``benchmarks/summarize_accuracy.py``: the README's means, read off a report's tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_accuracy.py"

REPORT = """# report

## Summary

| method | HER2ST A1 (x2) | HER2ST B4 (x2) | DBiT-seq (x2) |
|---|---|---|---|
| *noise ceiling* | 0.900 / 0.800 | 0.950 / 0.900 | 0.800 / 0.600 |
| bicubic + mass | 0.600 / 0.100 | 0.800 / 0.300 | 0.700 / 0.100 |
| TESLA | n/a | n/a | n/a |
| stsr.tl.prior_map (defaults) | 0.700 / 0.200 | 0.700 / 0.500 | 0.600 / 0.200 |

## 4. Against an independent half of the counts

| method | DBiT-seq (x2), split |
|---|---|
| *noise ceiling* | 0.800 / 0.600 |
| bicubic + mass | 0.500 / 0.080 |
| stsr.tl.prior_map (defaults) | 0.550 / 0.150 |
"""


def run(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=True, capture_output=True, text=True
    ).stdout


def test_means_of_the_summary_and_of_another_section(tmp_path):
    path = tmp_path / "report.md"
    path.write_text(REPORT)
    rows = {line.split(" | ")[0].strip("| "): line for line in run(str(path)).splitlines()}
    # HER2ST mean of the two sections, DBiT as it is, and the sections beating bicubic + mass on both
    assert rows["stsr.tl.prior_map (defaults)"].startswith(
        "| stsr.tl.prior_map (defaults) | 0.700 / 0.350 | 0.600 / 0.200 | 1 |"
    )
    assert "TESLA" not in rows  # not run: left out
    split = run("--section", "## 4.", str(path))
    assert (
        "| stsr.tl.prior_map (defaults) | 0.550 / 0.150 |" in split and "HER2ST" not in split.splitlines()[2]
    )

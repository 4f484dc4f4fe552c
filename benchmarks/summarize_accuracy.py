"""Condense the accuracy report (``docs/benchmarks/accuracy.md``, or ``docs/benchmarks/default_call.md``) into the
README's summary table.

Run::

    python benchmarks/summarize_accuracy.py [docs/benchmarks/accuracy.md [docs/benchmarks/accuracy_fast.md:fast ...]]
    python benchmarks/summarize_accuracy.py docs/benchmarks/default_call.md   # README's "Accuracy" numbers
    python benchmarks/summarize_accuracy.py --section "## 4." docs/benchmarks/default_call.md   # count splitting

Reads the report's summary table (``r / within-block r`` per method and case), averages the HER2ST sections, and
prints a markdown table with the HER2ST mean, DBiT-seq, Vizgen and synthetic columns, plus the number of HER2ST
sections on which each method beats bicubic + mass on both r and within-block r. Further reports (``PATH:LABEL``,
run with other weights, e.g. ``accuracy.py --model fast``) add their stsr rows, named ``stsr LABEL, ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = (
    "*noise ceiling*",
    "bicubic + mass",
    "TESLA",
    "regression net (same backbone)",
    "stsr, 1 sample",
    "stsr, mean of 4",
    "stsr + adaptation",
    "bicubic + mass × semantic prior",
    "stsr, mean of 4 × semantic prior",
    "stsr prior map (stsr.tl.prior_map)",
)


def read_summary(
    path: Path, section: str = "## Summary"
) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """Case names and, per method, ``(r, within-block r)`` per case from the first table after the heading that
    starts with ``section`` (the report's summary table by default)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(section)), None)
    if start is None:
        raise SystemExit(f"{path} has no heading starting with {section!r}.")
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append(line)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows: dict[str, list[tuple[float, float]]] = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if any(c == "n/a" for c in cells[1:]):  # a method that did not run (e.g. TESLA not installed)
            continue
        rows[cells[0]] = [tuple(float(v) for v in c.split(" / ")) for c in cells[1:]]  # type: ignore[misc]
    return header[1:], rows


def main() -> None:  # noqa: D103
    argv = sys.argv[1:]
    section = "## Summary"
    if argv[:1] == ["--section"]:
        if len(argv) < 2:
            raise SystemExit('--section needs the start of a heading, e.g. --section "## 4."')
        section, argv = argv[1], argv[2:]
    path = Path(argv[0]) if argv else HERE.parent / "docs" / "benchmarks" / "accuracy.md"
    cases, rows = read_summary(path, section)
    keep = list(KEEP) + [name for name in rows if name not in KEEP]  # e.g. default_call.md's public calls
    for extra in argv[1:]:
        other, _, label = extra.rpartition(":")
        other_cases, other_rows = read_summary(Path(other))
        if other_cases != cases:
            raise SystemExit(f"{other} scores other cases than {path}; rerun it with the same cases.")
        for name in ("stsr, 1 sample", "stsr, mean of 4", "stsr, mean of 4 × semantic prior"):
            if name in other_rows:
                renamed = name.replace("stsr", f"stsr {label}", 1)
                rows[renamed] = other_rows[name]
                keep.append(renamed)
    her2st = [i for i, c in enumerate(cases) if c.startswith("HER2ST")]
    others = [i for i, c in enumerate(cases) if not c.startswith("HER2ST")]
    ref = rows["bicubic + mass"]
    head = ([f"HER2ST, mean of {len(her2st)} sections (x2)"] if her2st else []) + [cases[i] for i in others]
    print(
        "| method | "
        + " | ".join(head)
        + " | HER2ST sections beating bicubic + mass (r and within-block r) |"
    )
    print("|---" * (len(head) + 2) + "|")
    for name in keep:
        if name not in rows:
            continue
        vals = rows[name]
        cells = [f"{vals[i][0]:.3f} / {vals[i][1]:.3f}" for i in others]
        if her2st:
            r = sum(vals[i][0] for i in her2st) / len(her2st)
            w = sum(vals[i][1] for i in her2st) / len(her2st)
            cells.insert(0, f"{r:.3f} / {w:.3f}")
        wins = (
            ""
            if name.startswith("*")
            else str(sum(vals[i][0] > ref[i][0] and vals[i][1] > ref[i][1] for i in her2st))
        )
        print(f"| {name} | " + " | ".join(cells) + f" | {wins} |")


if __name__ == "__main__":
    main()

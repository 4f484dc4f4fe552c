"""The prior's strength checked on groups of spots against the strength that is best on the map's pixels.

The self-check of ``super_resolve`` hides a slide's spots behind groups of them and scores each prior strength by
how well the map made from the groups predicts the spots (level 1). The run, though, maps pixels from the spots: one
scale finer. For every real case (the public-path cases of ``benchmarks/accuracy.py``) this script fits the slide's
prior once (``stsr.tl._semantic_prior.slide_prior``, as ``super_resolve`` does) and prints, for every strength of a
fine grid, the level-1 score (r across spots / r within groups) and the prior map's score against the truth
(r / within-block r); then, per rule that turns the checked optimum into the strength used, the strength and its
truth next to the prior map's (``stsr.tl.prior_map`` at its default strength, 0.25).

Split: the rule's ratio was read off HER2ST C2-C6 (one patient; C2 the validation section); A1, A2 (patient A),
B4 (patient B) and Vizgen are the test cases; DBiT-seq is data the shipped weights saw.

``--native`` scores the HER2ST sections at native geometry instead (``benchmarks/native_resolution.py``: the 2 x 2
blocks of spots as square bins, the map on a 10 µm grid, pooled over each measured spot's disk and scored against
the spots), the geometry a user's slide has.

    python benchmarks/self_check_strength.py [--cases her2st dbit vizgen] [--sections ...] [--genes 20]
    python benchmarks/self_check_strength.py --native [--sections ...] [--out benchmarks/results/self_check_strength_native.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402
import native_resolution as N  # noqa: E402
import self_check_scale as S  # noqa: E402

from stsr.models import ModelConfig  # noqa: E402
from stsr.tl._self_check import STRENGTHS, CoarseSlide, spot_scores, used_strength  # noqa: E402
from stsr.tl._semantic_prior import PRIOR_WINDOW  # noqa: E402
from stsr.tl._super_resolve import _prior_map_array, _raster  # noqa: E402

#: The strengths scored (the self-check's own candidates are :data:`STRENGTHS`).
GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0, 1.25, 1.5)
#: The strengths scored at native geometry.
NATIVE_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
#: ``stsr.tl.prior_map``'s default strength.
PRIOR_MAP_STRENGTH = 0.25
RULES = {
    "checked optimum (the rule before)": lambda p: p,
    "the prior map's 0.25": lambda p: PRIOR_MAP_STRENGTH,
    "a quarter of the checked optimum (used_strength, shipped)": lambda p: used_strength(p, STRENGTHS),
}


def case_record(case, native=None) -> dict:
    """Level-1 and truth scores per strength of one case; ``native`` (a ``native_resolution.Section``) scores the
    map on its fine grid pooled over the measured spots instead of on the lattice."""
    user = A.case_sdata(case) if native is None else native.user
    inputs, prior = S.slide_inputs_and_prior(user, user.pixel_size if native is None else native.pixel_size)
    op, lr, mask = inputs.observation, np.asarray(inputs.lr), inputs.mask
    coarse = CoarseSlide(op, lr, mask, prior, PRIOR_WINDOW)
    rec = {"level1": {}, "truth": {}}
    for s in GRID:
        rec["level1"][s] = spot_scores(coarse.predicted_spots(coarse.prior_map(s)), coarse.lr, coarse.groups)
        user.sdata.images["probe"] = _raster(_prior_map_array(inputs, prior, s), inputs)
        if native is None:
            pred = A.read_map(user.sdata, "probe", user.grid)
        else:
            grid = N.element_grid(user.sdata, "probe", A.SLIDE_BINS)
            pred = native.on_lattice(np.asarray(A._level0(user.sdata["probe"]).data, np.float64), grid)
        del user.sdata.images["probe"]
        t = A.score(case, pred)
        rec["truth"][s] = (t["pearson"][0], t["within_block"][0])
    return rec


def report(records: dict[str, dict]) -> str:
    lines = ["| case | " + " | ".join(f"{s:g}" for s in GRID) + " |", "|---|" + "---|" * len(GRID)]
    for name, rec in records.items():
        best = max(GRID, key=lambda s: sum(rec["truth"][s]))
        checked = max(STRENGTHS, key=lambda s: sum(rec["level1"][s]))
        cells = []
        for s in GRID:
            (r1, w1), (rt, wt) = rec["level1"][s], rec["truth"][s]
            mark = ("**" if s == best else "") + ("†" if s == checked else "")
            cells.append(f"{mark}{rt:.3f} / {wt:.3f}{'**' if s == best else ''}<br>({r1:.3f} / {w1:.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = [
        "Per strength: the prior map's r / within-block r against the truth, in brackets the self-check's level-1 "
        "score (r across spots / r within groups). Bold: best against the truth (r + within-block r); †: the "
        "self-check's optimum over its candidates " + ", ".join(f"{s:g}" for s in STRENGTHS) + ".",
        "",
        *lines,
        "",
        "| rule | strength used per case | cases at least the prior map on both r and within-block r "
        "| mean gain over the prior map (r / within-block r) | worst (r / within-block r) |",
        "|---|---|---|---|---|",
    ]
    for rule_name, rule in RULES.items():
        used, ok, dr, dw = [], 0, [], []
        for rec in records.values():
            checked = max(STRENGTHS, key=lambda s: sum(rec["level1"][s]))
            u = min(GRID, key=lambda s: abs(s - rule(checked)))
            (rt, wt), (rp, wp) = rec["truth"][u], rec["truth"][PRIOR_MAP_STRENGTH]
            ok += rt >= rp - 1e-9 and wt >= wp - 1e-9
            dr.append(rt - rp)
            dw.append(wt - wp)
            used.append(f"{u:g}")
        out.append(
            f"| {rule_name} | {', '.join(used)} | {ok} of {len(records)} | {np.mean(dr):+.4f} / {np.mean(dw):+.4f} "
            f"| {min(dr):+.3f} / {min(dw):+.3f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen"])
    p.add_argument("--sections", nargs="+", default=list(A.HER2ST_SECTIONS))
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--native", action="store_true", help="HER2ST at native geometry (10 µm grid, spots as disks)"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or HERE / "results" / (
        "self_check_strength_native.md" if args.native else "self_check_strength.md"
    )
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    A.quiet_pixel_warning()
    t0 = time.time()
    records = {}
    if args.native:
        global GRID
        GRID = NATIVE_GRID  # a 10 µm map per strength costs more: fewer strengths
        for section in args.sections:
            sec = N.Section(section, args.genes, ModelConfig().image_scale, 10.0)
            records[f"HER2ST {section} (native, 10 µm)"] = case_record(sec.case, native=sec)
            print(f"[{time.time() - t0:5.0f} s] {section}", file=sys.stderr, flush=True)
    else:
        cases = A.build_cases(
            set(args.cases), args.sections, args.genes, ModelConfig().image_scale, public=True
        )
        for case in cases:
            records[case.name] = case_record(case)
            print(f"[{time.time() - t0:5.0f} s] {case.name}", file=sys.stderr, flush=True)
    cmd = "python benchmarks/self_check_strength.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"# The self-check's strength against the truth's\n\nGenerated {_dt.datetime.now():%Y-%m-%d %H:%M} by "
        f"`{cmd.strip()}` ({time.time() - t0:.0f} s; {args.genes} genes per case).\n\n"
        + report(records)
        + "\n"
    )
    out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""How the self-check's estimate transfers across scales: groups -> spots against spots -> pixels (the truth).

For each real case (the public-path cases of ``benchmarks/accuracy.py``), the slide's prior is fitted once
(``stsr.tl._semantic_prior.slide_prior``, as ``super_resolve`` does) and, for every prior strength of the self-check:

- level 1: the self-check's score (spot groups predicting the spots: r across spots, r within groups);
- level 2: the same one level up (groups of groups predicting the groups);
- truth: the prior map from the spots, scored against the truth (r, within-block r).

A linear extrapolation across levels, ``2 x level 1 - level 2``, is printed next to level 1 as an estimate of the
truth's score; the table says which estimate tracks the truth and which strength each picks.

    python benchmarks/self_check_scale.py [--cases her2st dbit vizgen] [--sections ...] [--genes 20]
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

from stsr.models import ModelConfig  # noqa: E402
from stsr.tl._image_tiles import ImageSource  # noqa: E402
from stsr.tl._inputs import expected_inputs, prepare_inputs, teacher_image_scale  # noqa: E402
from stsr.tl._self_check import STRENGTHS, CoarseSlide, spot_scores  # noqa: E402
from stsr.tl._semantic_prior import PRIOR_WINDOW, slide_prior  # noqa: E402
from stsr.tl._super_resolve import _prior_map_array, _raster  # noqa: E402


def level_scores(op, lr, mask, prior) -> dict[float, tuple[float, float]]:
    slide = CoarseSlide(op, lr, mask, prior, PRIOR_WINDOW)
    return {
        s: spot_scores(slide.predicted_spots(slide.prior_map(s)), slide.lr, slide.groups) for s in STRENGTHS
    }


def slide_inputs_and_prior(user, pixel_size: float):
    """The inputs ``super_resolve`` prepares from a user's slide (expected counts) and the slide's semantic prior,
    fitted once as ``super_resolve`` fits it."""
    inputs = expected_inputs(
        prepare_inputs(
            user.sdata,
            user.image_key,
            user.genes,
            table_key=None,
            pixel_size=pixel_size,
            coordinate_system=None,
            image_channels=3,
        )
    )
    source = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs))
    return inputs, slide_prior(inputs, source)


def case_rows(case) -> list[tuple]:
    user = A.case_sdata(case)
    inputs, prior = slide_inputs_and_prior(user, user.pixel_size)
    op, lr, mask = inputs.observation, np.asarray(inputs.lr), inputs.mask
    one = level_scores(op, lr, mask, prior)
    coarse = CoarseSlide(op, lr, mask, prior, PRIOR_WINDOW)
    two = level_scores(coarse.op, coarse.group_lr, mask, prior)
    rows = []
    for s in STRENGTHS:
        user.sdata.images["probe"] = _raster(_prior_map_array(inputs, prior, s), inputs)
        pred = A.read_map(user.sdata, "probe", user.grid)
        del user.sdata.images["probe"]
        truth = A.score(case, pred)
        rows.append((s, one[s], two[s], (truth["pearson"][0], truth["within_block"][0])))
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen"])
    p.add_argument("--sections", nargs="+", default=list(A.HER2ST_SECTIONS))
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "self_check_scale.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    A.quiet_pixel_warning()
    t0 = time.time()
    cases = A.build_cases(set(args.cases), args.sections, args.genes, ModelConfig().image_scale, public=True)
    lines = [
        "| case | strength | level 1 r / within | level 2 r / within | 2 x L1 - L2 r / within | truth r / within |",
        "|---|---|---|---|---|---|",
    ]
    picks = []
    for case in cases:
        try:
            rows = case_rows(case)
        except Exception as err:  # noqa: BLE001
            lines.append(f"| {case.name} | failed: {type(err).__name__}: {err} | | | | |")
            continue
        for s, l1, l2, t in rows:
            ex = (2 * l1[0] - l2[0], 2 * l1[1] - l2[1])
            lines.append(
                f"| {case.name} | {s:g} | {l1[0]:.3f} / {l1[1]:.3f} | {l2[0]:.3f} / {l2[1]:.3f} | "
                f"{ex[0]:.3f} / {ex[1]:.3f} | {t[0]:.3f} / {t[1]:.3f} |"
            )
        best = max(rows, key=lambda x: x[3][0] + x[3][1])
        by_l1 = max(rows, key=lambda x: x[1][0] + x[1][1])
        by_ex = max(rows, key=lambda x: 2 * (x[1][0] + x[1][1]) - (x[2][0] + x[2][1]))
        picks.append((case.name, best, by_l1, by_ex))
        print(lines[-1], flush=True)
    summary = ["", "| case | best strength (truth) | picked by level 1 (truth there) | picked by 2 L1 - L2 (truth there) |",
               "|---|---|---|---|"]  # fmt: skip
    err_l1, err_ex = [], []
    for name, best, l1, ex in picks:
        summary.append(
            f"| {name} | {best[0]:g} ({best[3][0]:.3f} / {best[3][1]:.3f}) | {l1[0]:g} ({l1[3][0]:.3f} / "
            f"{l1[3][1]:.3f}) | {ex[0]:g} ({ex[3][0]:.3f} / {ex[3][1]:.3f}) |"
        )
        err_l1.append(abs(l1[1][0] - l1[3][0]))
        err_ex.append(abs(2 * ex[1][0] - ex[2][0] - ex[3][0]))
    summary.append(
        f"\nMean |estimate - true r| at the picked strength: level 1 {np.mean(err_l1):.3f}, "
        f"extrapolated {np.mean(err_ex):.3f} ({len(picks)} cases)."
    )
    cmd = "python benchmarks/self_check_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"# Self-check across scales\n\nGenerated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` "
        f"({time.time() - t0:.0f} s).\n\n" + "\n".join(lines) + "\n" + "\n".join(summary) + "\n"
    )
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

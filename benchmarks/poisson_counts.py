"""Spot counts as Poisson draws: the rate error of the map with and without ``poisson=True``.

Synthetic slides (``stsr.datasets.synthetic``, known expected counts per HR pixel ``hr_truth``) at several depths:
``stsr.tl.prior_map(sdata, "he", genes, poisson=...)`` with the measured counts (``poisson=False``) and with each
spot's expected count (``poisson=True``, the default, :meth:`stsr.observation.ObservationModel.expected_counts`).
Scores over the tissue pixels (where the known expected counts are not zero), mean over genes and seeds: the relative root-mean-square error of the map against the
expected counts (lower is better) and Pearson r; and, per spot, the error of the counts the map pools to against the
spots' expected counts (``table.layers["expected"]``). Then the picture of MUC1 (a low-count gene) on the whole
HER2ST C2 slide, before (measured counts) and after (expected counts): ``docs/_static/poisson_muc1.png``.

    python benchmarks/poisson_counts.py [--depths 0.01 0.05 0.5 5] [--seeds 0 1 2] [--out FILE]
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

import stsr
from stsr.pp._spots import spots_observation_model

HERE = Path(__file__).resolve().parent
GENES = [f"gene_{i:03d}" for i in range(8)]


def _scores(sdata, key: str) -> tuple[float, float]:
    pred = np.asarray(sdata[key]["scale0"]["image"].values, np.float64)
    truth = np.asarray(sdata["hr_truth"]["scale0"]["image"].values, np.float64)[: len(GENES)]
    m = truth.sum(0) > 0  # the tissue, the same pixels for every map
    rel = np.sqrt(((pred[:, m] - truth[:, m]) ** 2).mean(1)) / truth[:, m].mean(1)
    r = [np.corrcoef(pred[g, m], truth[g, m])[0, 1] for g in range(len(GENES))]
    return float(np.mean(rel)), float(np.nanmean(r))


def _spot_error(sdata, poisson: bool) -> float:
    table = sdata["table"]
    genes = list(table.var_names[: len(GENES)])
    grid = stsr.pp.hr_grid(sdata, "he", 5.5)
    op = spots_observation_model(sdata, "spots", grid, "he")
    y = np.asarray(table[:, genes].X.todense()).T.astype(float)
    rate = np.asarray(table[:, genes].layers["expected"]).T.astype(float)
    got = op.expected_counts(y) if poisson else y
    return float(np.mean(np.sqrt(((got - rate) ** 2).mean(1)) / rate.mean(1)))


def synthetic_table(depths: list[float], seeds: list[int]) -> str:
    lines = [
        "| depth (counts per HR px) | counts per spot (mean) | map rel. RMSE: measured | expected (poisson) | "
        "map r: measured | expected | spot rel. RMSE: measured | expected |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        rows = []
        for seed in seeds:
            sdata = stsr.datasets.synthetic(size_um=(1000, 1000), n_genes=len(GENES), depth=depth, seed=seed)
            per_spot = float(np.asarray(sdata["table"].X.sum(0)).mean() / sdata["table"].n_obs)
            out = [per_spot]
            for poisson in (False, True):
                key = f"map_{poisson}"
                stsr.tl.prior_map(sdata, "he", GENES, poisson=poisson, key_added=key, progress=False)
                out.append(_scores(sdata, key))
            rows.append([out[0], out[1][0], out[2][0], out[1][1], out[2][1], _spot_error(sdata, False),
                         _spot_error(sdata, True)])  # fmt: skip
        m = np.mean(rows, axis=0)
        lines.append(
            f"| {depth:g} | {m[0]:.1f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | {m[4]:.3f} | {m[5]:.3f} | {m[6]:.3f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def muc1_picture(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = stsr.datasets.her2st("C2")
    counts = np.asarray(sdata["table"][:, ["MUC1"]].X.todense()).ravel()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, poisson in zip(axes, (False, True)):
        key = "expected" if poisson else "measured"
        stsr.tl.prior_map(sdata, "he", ["MUC1"], poisson=poisson, key_added=key, progress=False)
        stsr.pl.overlay(
            sdata,
            key,
            "MUC1",
            ax=ax,
            title=f"MUC1, counts {'as Poisson draws (poisson=True)' if poisson else 'as measured (poisson=False)'}",
        )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return (
        f"MUC1 on HER2ST C2: {counts.mean():.1f} counts per spot on average, {np.mean(counts == 0):.0%} of the spots "
        f"at zero; `{out.relative_to(HERE.parent)}`."
    )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=float, nargs="+", default=[0.01, 0.05, 0.5, 5.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "poisson_counts.md")
    p.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "_static" / "poisson_muc1.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.time()
    table = synthetic_table(args.depths, args.seeds)
    picture = muc1_picture(args.figure)
    cmd = "python benchmarks/poisson_counts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "# Spot counts as Poisson draws\n\n"
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` ({time.time() - t0:.0f} s).\n\n"
        f"Synthetic slides of 1 x 1 mm (hexagonal 55 µm spots), {len(GENES)} genes, seeds {args.seeds}; "
        "`stsr.tl.prior_map` with the measured counts and with the expected counts. Relative RMSE = RMSE against "
        "the known expected counts / their mean, over the tissue pixels (map) or the spots (spot).\n\n"
        + table
        + "\n"
        + picture
        + "\n"
    )
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

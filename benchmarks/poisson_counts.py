"""Spot counts as Poisson draws: the rate error of the map with and without ``poisson=True``.

Synthetic slides (``stsr.datasets.synthetic``, known expected counts per HR pixel ``hr_truth``) at several depths:
``stsr.tl.prior_map(sdata, "he", genes, poisson=...)`` with the measured counts (``poisson=False``) and with each
spot's expected count (``poisson=True``, the default, :meth:`stsr.observation.ObservationModel.expected_counts`).
Scores over the tissue pixels (where the known expected counts are not zero), mean over genes and seeds: the relative root-mean-square error of the map against the
expected counts (lower is better) and Pearson r; and, per spot, the error of the counts the map pools to against the
spots' expected counts (``table.layers["expected"]``). Then the picture of MUC1 (a low-count gene) on the whole
HER2ST C2 slide, before (measured counts) and after (expected counts): ``docs/_static/poisson_muc1.png``. First, on
real slides (HER2ST, DBiT-seq), the expected counts against an independent half of each spot's counts (count
splitting), with and without each spot's total count as its size factor.

    python benchmarks/poisson_counts.py [--depths 0.01 0.05 0.5 5] [--seeds 0 1 2] [--slides A1 C2 ...] [--out FILE]
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
    totals = np.asarray(table.X.sum(1), np.float64).ravel()  # every gene's counts: the spots' size factors
    got = op.expected_counts(y, empty=totals <= 0, depth=totals) if poisson else y
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


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _deviance(mu: np.ndarray, y: np.ndarray) -> float:
    """Mean Poisson deviance of counts ``y`` under means ``mu`` (means floored at 0.01 counts)."""
    mu = np.clip(mu, 1e-2, None)
    term = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0) - (y - mu)
    return float(2.0 * term.mean())


def _halves(sdata, image_key: str, genes: list[str], seed: int):
    """The slide's spot counts split by binomial thinning (p = 1/2, every gene of the table) into two independent
    halves: ``(operator, half A (G, n), half A's totals of every gene (n,), half B (G, n))``, spots in the
    operator's order."""
    from scipy import sparse

    from stsr.tl._inputs import prepare_inputs, spot_totals

    table = sdata["table"]
    x = table.X.toarray() if sparse.issparse(table.X) else np.asarray(table.X)
    rng = np.random.default_rng(seed)
    first = rng.binomial(np.rint(x).astype(np.int64), 0.5)
    out = []
    for half in (first, np.rint(x).astype(np.int64) - first):
        part = table.copy()
        part.X = sparse.csr_matrix(half.astype(np.float32))
        sdata.tables["table"] = part
        inputs = prepare_inputs(
            sdata,
            image_key,
            genes,
            table_key="table",
            pixel_size=None,
            coordinate_system=None,
            image_channels=3,
        )
        out.append(
            (
                inputs.observation,
                np.asarray(inputs.lr, np.float64),
                spot_totals(sdata, "table", inputs.spots_key),
            )
        )
    sdata.tables["table"] = table
    (op, a, totals_a), (_, b, totals_b) = out
    return op, a, totals_a, b, totals_b


def count_split_table(slides: list[str], seed: int = 0) -> str:
    """Real spots against an independent half of their own counts: each spot's counts are split by binomial
    thinning into halves A and B; from half A, the measured counts, the expected counts from the neighbours'
    densities per pixel (``expected_counts(y)``) and with each spot's total count of every gene as its size factor
    (``expected_counts(y, depth=...)``, what ``super_resolve`` and ``prior_map`` use) are scored against half B."""
    lines = [
        "| slide | spots | genes | r across spots: measured | expected, per pixel | expected, size factors | "
        "r, genes under 5 counts per spot: measured | per pixel | size factors | Poisson deviance: measured | "
        "per pixel | size factors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in slides:
        if name == "DBiT-seq":
            sdata, image_key = stsr.datasets.dbit_mouse_embryo(), "brightfield"
        else:
            sdata, image_key = stsr.datasets.her2st(name), "he"
        genes = stsr.pp.select_genes(sdata["table"])  # the default call's 50 genes
        op, a, totals_a, b, totals_b = _halves(sdata, image_key, genes, seed)
        keep = (totals_a > 0) & (totals_b > 0)  # spots measured in both halves
        empty = totals_a <= 0
        maps = {
            "measured": a,
            "per pixel": op.expected_counts(a, empty=empty),
            "size factors": op.expected_counts(a, empty=empty, depth=totals_a),
        }
        low = a[:, keep].mean(1) < 5
        r = {k: _corr_rows(v[:, keep], b[:, keep]) for k, v in maps.items()}
        dev = {k: _deviance(v[:, keep], b[:, keep]) for k, v in maps.items()}
        cells = [f"{np.nanmean(x):.3f}" for x in r.values()]
        cells += [f"{np.nanmean(x[low]):.3f}" if low.any() else "-" for x in r.values()]
        cells += [f"{x:.3f}" for x in dev.values()]
        lines.append(
            f"| {name} | {int(keep.sum())} | {len(genes)} ({int(low.sum())} under 5) | "
            + " | ".join(cells)
            + " |"
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
    p.add_argument(
        "--slides",
        nargs="+",
        default=["A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6", "DBiT-seq"],
        help="real slides for the count-split section (HER2ST sections, DBiT-seq)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "poisson_counts.md")
    p.add_argument("--figure", type=Path, default=HERE.parent / "docs" / "_static" / "poisson_muc1.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t0 = time.time()
    split = count_split_table(args.slides)
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
        + "\n\n## Real spots against an independent half of their counts\n\n"
        "Each spot's counts (every gene of the table) are split by binomial thinning (p = 1/2, seed 0) into two "
        "independent halves; from half A, the measured counts, the expected counts from the neighbours' densities "
        "per pixel (`ObservationModel.expected_counts(y)`, the default before size factors) and with each spot's "
        "total count of every gene as its size factor (`expected_counts(y, depth=totals)`, what `super_resolve` "
        "and `prior_map` use) are scored against half B over the spots measured in both halves: Pearson r across "
        "spots per gene (mean over the default call's 50 genes, and over those under 5 counts per spot) and the "
        "mean Poisson deviance (lower is better). No parameter is fitted: the size factors were tried on C2 and "
        "DBiT-seq first, and every section is reported.\n\n" + split
    )
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""How far a read-out of the image teacher's features can go: the semantic prior's variants and its ceiling.

The semantic prior (:func:`stsr.models.semantic_prior`) reads expression out of pretrained histology features with a
ridge fitted on the LR data of the slide itself. This script scores, on the real cases of the accuracy benchmark
(same truth, genes and LR input), with the accuracy metrics:

- the read-out as shipped (5 principal components, strength 0.5) and variants: more components, another strength;
- **read-outs fitted on the truth** (the HR counts of the scored case itself): a ridge on the features, in sample; a
  ridge on the features and their 3 x 3 neighbourhood mean; gradient-boosted trees, cross-fitted over column bands
  of the slide. They are not methods (they see the truth) but bounds for every method that reads the image through
  these features: compared with the noise ceiling, they show how much of the headroom the features explain at all;
- bicubic + mass and the uniform split for reference.

Run::

    python benchmarks/prior_readout.py [--cases her2st dbit vizgen] [--genes 20]
        [--out benchmarks/results/prior_readout.md]

Features are computed once per case (about 30 s for a HER2ST section on 2 CPU cores). The noise ceiling and TESLA
of each case are in ``docs/benchmarks/accuracy.md``.
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
from scipy.ndimage import uniform_filter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr import metrics as M  # noqa: E402
from stsr.models._prior import RIDGE_ALPHAS, FeatureMoments, _ridge_gcv, pca_scores, readout  # noqa: E402

COMPONENTS = (5, 10, 20)
STRENGTHS = (0.5, 1.0)
ORACLE_COMPONENTS = 20


def truth_readout(feats: np.ndarray, truth: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The ridge read-out (``k`` components) fitted on the HR truth itself, per pixel, in sample: an upper bound."""
    d = feats.shape[0]
    moments = FeatureMoments(d)
    moments.add(feats.reshape(d, -1)[:, mask.ravel()])
    mean, scale, axes = moments.pca(k)
    scores = pca_scores(feats, mean, scale, axes)
    x = scores.reshape(scores.shape[0], -1)[:, mask.ravel()].T
    y = np.log1p(truth.reshape(truth.shape[0], -1)[:, mask.ravel()]).T
    coef, intercept, _ = _ridge_gcv(x, y, RIDGE_ALPHAS)
    return readout(scores, coef, intercept)


def neighbourhood_mean(feats: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Mean features of the tissue pixels in the ``size`` x ``size`` window around each pixel (tissue context)."""
    m = mask.astype(np.float64)
    num = uniform_filter(feats * m, size=(1, size, size), mode="constant")
    return num / np.maximum(uniform_filter(m, size=size, mode="constant"), 1e-9)


def boosted_readout(feats: np.ndarray, truth: np.ndarray, mask: np.ndarray, folds: int = 5) -> np.ndarray:
    """A nonlinear read-out fitted on the truth: gradient-boosted trees per gene on 40 principal components, each
    pixel predicted by the trees fitted on the other column bands of the slide (``folds`` bands, cross-fitted)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    d, (h, w) = feats.shape[0], mask.shape
    moments = FeatureMoments(d)
    moments.add(feats.reshape(d, -1)[:, mask.ravel()])
    scores = pca_scores(feats, *moments.pca(40)).reshape(-1, h * w).T
    y = np.log1p(truth.reshape(truth.shape[0], -1)).T
    band = (np.arange(h * w) % w) * folds // w
    tissue = mask.ravel()
    pred = np.zeros_like(y)
    for f in range(folds):
        train, test = tissue & (band != f), band == f
        for g in range(y.shape[1]):
            trees = HistGradientBoostingRegressor(max_iter=100, learning_rate=0.05, random_state=0)
            pred[test, g] = trees.fit(scores[train], y[train, g]).predict(scores[test])
    return np.expm1(np.clip(pred.T, 0.0, None)).reshape(truth.shape)


def case_rows(case: A.Case) -> tuple[dict[str, dict], dict, float]:
    """Method label -> summarized metrics; the noise ceiling; feature seconds."""
    lr, op, mask = case.lr, case.pair.observation, case.mask
    truth = case.pair.hr.double().numpy()
    t0 = time.time()
    feats = stsr.models.teacher_features(case.teacher_image, op.shape)
    seconds = time.time() - t0
    out: dict[str, dict] = {}

    def score(label: str, pred: np.ndarray) -> None:
        out[label] = M.summarize(M.gene_metrics(pred, truth, op, lr=lr, mask=mask))

    base = B.bicubic_mass(lr, op)
    score("bicubic + mass", base)
    score("uniform split", B.uniform_split(lr, op))
    for k in COMPONENTS:
        prior = stsr.models.semantic_prior(feats, lr, op, mask=mask, n_components=k)
        for s in STRENGTHS:
            tag = " (shipped)" if (k, s) == (5, 0.5) else ""
            score(
                f"prior, {k} components, strength {s:g}{tag}",
                stsr.models.apply_prior(base, prior, lr, op, strength=s),
            )
    fitted = {
        f"{ORACLE_COMPONENTS} comp.": truth_readout(feats, truth, mask, ORACLE_COMPONENTS),
        f"{ORACLE_COMPONENTS} comp. of the features and their 3 x 3 neighbourhood mean": truth_readout(
            np.concatenate([feats, neighbourhood_mean(feats, mask, 3)]), truth, mask, ORACLE_COMPONENTS
        ),
        "gradient boosting, cross-fitted": boosted_readout(feats, truth, mask),
    }
    for what, prior in fitted.items():
        for s in STRENGTHS + (2.0,):
            score(
                f"read-out fitted on the truth ({what}), strength {s:g}",
                stsr.models.apply_prior(base, prior, lr, op, strength=s),
            )
    ceiling = M.summarize(M.noise_ceiling(truth, op, mask))
    return out, ceiling, seconds


def headroom_summary(results: list[tuple[str, dict, dict, float]]) -> list[str]:
    """Markdown: per case, the share of the noise-ceiling gap (over bicubic + mass) that the read-out fitted on the
    truth closes at its best strength, and the share of that read-out's gain that the shipped prior takes."""
    shipped = next(label for label in results[0][1] if label.endswith("(shipped)"))
    fitted = [label for label in results[0][1] if label.startswith("read-out fitted on the truth")]
    lines = [
        "## How much of the headroom the features can explain",
        "",
        "Gap closed = (x - bicubic + mass) / (noise ceiling - bicubic + mass); *fitted* is the read-out fitted on the "
        "truth (any of the three, any strength) that scores best on that metric; *shipped / fitted* = (shipped - bicubic + mass) / (fitted - "
        "bicubic + mass), n/a where the fitted read-out does not beat bicubic + mass.",
        "",
        "| case | within-block r: ceiling / bicubic + mass / fitted / shipped | gap closed by fitted | shipped / "
        "fitted | r: gap closed by fitted |",
        "|---|---|---|---|---|",
    ]
    closed_w, closed_r, shares = [], [], []
    for name, rows, ceiling, _ in results:
        vals = {}
        for key in ("within_block", "pearson"):
            base = rows["bicubic + mass"][key][0]
            best = max(rows[label][key][0] for label in fitted)
            vals[key] = (ceiling[key][0], base, best, rows[shipped][key][0])
        c, b, f, s = vals["within_block"]
        cw = (f - b) / (c - b)
        share = (s - b) / (f - b) if f > b else float("nan")
        cr = (vals["pearson"][2] - vals["pearson"][1]) / (vals["pearson"][0] - vals["pearson"][1])
        closed_w.append(cw)
        closed_r.append(cr)
        shares.append(share)
        share_txt = "n/a" if np.isnan(share) else f"{share:.2f}"
        lines.append(
            f"| {name} | {c:.3f} / {b:.3f} / {f:.3f} / {s:.3f} | {cw:.2f} | {share_txt} | {cr:.2f} |"
        )
    lines += [
        f"| mean | | {np.mean(closed_w):.2f} | {np.nanmean(shares):.2f} | {np.mean(closed_r):.2f} |",
        "",
    ]
    return lines


def load_cases(which: list[str], n_genes: int) -> list[A.Case]:
    k = 8  # the model's image scale does not matter here: only the teacher image is used
    cases: list[A.Case] = []
    if "her2st" in which:
        cases += [A.her2st_case(s, n_genes, k) for s in A.HER2ST_SECTIONS]
    if "dbit" in which:
        cases += A.dbit_cases((2, 4), n_genes, k)
    if "vizgen" in which:
        cases += A.vizgen_cases(((10.0, 5), (5.0, 10)), n_genes, k)
    return cases


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen"])
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    results = []
    for case in load_cases(args.cases, args.genes):
        rows, ceiling, secs = case_rows(case)
        results.append((case.name, rows, ceiling, secs))
        print(f"[{time.time() - t_start:.0f} s] {case.name}", file=sys.stderr, flush=True)
    labels = list(results[0][1])
    names = [r[0] for r in results]

    def cell(v: dict, key: str) -> str:
        return f"{v[key][0]:.3f}"

    cmd = "python benchmarks/prior_readout.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Semantic prior: read-out variants and the read-out fitted on the truth",
        "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` (stsr {stsr.__version__}, "
        f"{platform.machine()}, total {time.time() - t_start:.0f} s). {args.genes} genes per case, the accuracy "
        "benchmark's truth and LR input; every prior row reweights bicubic + mass.",
        "",
    ]
    for key, title in (("pearson", "r"), ("within_block", "within-block r"), ("ssim", "SSIM")):
        lines += [f"## {title} (mean over genes)", ""]
        lines += ["| method | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
        if key != "ssim":
            vals = [c[key][0] for _, _, c, _ in results]
            lines.append(
                "| *noise ceiling* | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |"
            )
        for label in labels:
            vals = [rows[label][key][0] for _, rows, _, _ in results]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
        lines.append("")
    lines += headroom_summary(results)
    lines += [
        "Feature seconds per case: " + ", ".join(f"{n} {s:.0f} s" for n, _, _, s in results) + ".",
        "",
    ]
    report = "\n".join(lines)
    return B.publish(report, args.out)


if __name__ == "__main__":
    main()

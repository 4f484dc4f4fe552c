"""How far a read-out of the image teacher's features can go: the semantic prior's variants and its ceiling.

The semantic prior (:func:`stsr.models.semantic_prior`) reads expression out of pretrained histology features with a
ridge fitted on the LR data of the slide itself. This script scores, on the real cases of the accuracy benchmark
(same truth, genes and LR input), with the accuracy metrics:

- the read-out as shipped (5 principal components, strength 0.5) and variants: more components, another strength;
- **read-outs fitted on the truth** (the HR counts of the scored case itself), in sample: a ridge on 20 principal
  components of the features, and on those of the features with their 3 x 3 neighbourhood mean. They are not methods
  (they see the truth) but optimistic bounds for every method that reads the image through these features: compared
  with the noise ceiling, they show how much of the headroom the features explain at all;
- **read-outs trained on the rest of the slide's truth** (cross-fitted over column bands, so scored out of sample):
  gradient-boosted trees on 40 components; a ridge on 20 components; a ridge on 20 components and the LR input of
  every gene (its interpolation and the structure it puts inside the blocks). They show what supervised training on
  HR truth of the same tissue could give;
- the prior map of :func:`stsr.tl.prior_map` (the interpolation of counts per tissue pixel x the shipped read-out,
  on the tissue only) at several strengths: its default strength was chosen on HER2ST C2 from these rows;
- the shipped prior with the teacher's image never finer than the image itself: the teacher otherwise reads every
  case at about ``stsr.models.TEACHER_UM_PER_PX`` (1.5 µm per pixel when the committed results were made), which upsamples the H&E of HER2ST A1 and A2 (3.2 µm per pixel) and the DBiT-seq
  image (3.5 µm per pixel) about twofold (so does :func:`stsr.tl.prior_map` on coarse images);
- bicubic + mass, the same with the counts on the tissue pixels only, and the uniform split for reference.

Run::

    python benchmarks/prior_readout.py [--cases her2st dbit vizgen] [--genes 20] [--teacher-um 1.5]
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
from stsr.models.prior import RIDGE_ALPHAS, readout, ridge_gcv, tissue_components  # noqa: E402

COMPONENTS = (5, 10, 20)
STRENGTHS = (0.5, 1.0)
ORACLE_COMPONENTS = 20
NATIVE_LABEL = "prior as shipped, the teacher's image never finer than the image itself"
MAP_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
MAP_LABEL = "prior map (stsr.tl.prior_map: tissue-aware interpolation × prior)"


def truth_readout(feats: np.ndarray, truth: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The ridge read-out (``k`` components) fitted on the HR truth itself, per pixel, in sample: an upper bound."""
    scores = tissue_components(feats, mask, k)
    x = scores.reshape(scores.shape[0], -1)[:, mask.ravel()].T
    y = np.log1p(truth.reshape(truth.shape[0], -1)[:, mask.ravel()]).T
    coef, intercept, _ = ridge_gcv(x, y, RIDGE_ALPHAS)
    return readout(scores, coef, intercept)


def neighbourhood_mean(feats: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Mean features of the tissue pixels in the ``size`` x ``size`` window around each pixel (tissue context)."""
    m = mask.astype(np.float64)
    num = uniform_filter(feats * m, size=(1, size, size), mode="constant")
    return num / np.maximum(uniform_filter(m, size=size, mode="constant"), 1e-9)


def cross_fitted(
    regressors: np.ndarray, truth: np.ndarray, mask: np.ndarray, method: str, folds: int = 5
) -> np.ndarray:
    """A read-out trained on the truth of the rest of the slide: every pixel is predicted by a model fitted on the
    tissue pixels of the other column bands (``folds`` bands), so it is scored out of sample.

    ``regressors`` ``(p, h, w)``; ``method`` "ridge" (all genes, one penalty by GCV) or "boosting" (gradient-boosted
    trees per gene). Returns expected counts ``(G, h, w)``: ``expm1`` of the predicted ``log1p(truth)``.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    h, w = mask.shape
    x = regressors.reshape(regressors.shape[0], -1).T
    y = np.log1p(truth.reshape(truth.shape[0], -1)).T
    band = (np.arange(h * w) % w) * folds // w
    pred = np.zeros_like(y)
    for f in range(folds):
        train, test = mask.ravel() & (band != f), band == f
        if method == "ridge":
            coef, intercept, _ = ridge_gcv(x[train], y[train], RIDGE_ALPHAS)
            pred[test] = x[test] @ coef + intercept
            continue
        for g in range(y.shape[1]):
            trees = HistGradientBoostingRegressor(max_iter=100, learning_rate=0.05, random_state=0)
            pred[test, g] = trees.fit(x[train], y[train, g]).predict(x[test])
    return np.expm1(np.clip(pred.T, 0.0, None)).reshape(truth.shape)


def lr_regressors(interpolated: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Regressors from the LR input: ``log1p`` of its interpolation for every gene, and their deviation from the
    uniform split (the structure the interpolation puts inside each block)."""
    log_interp = np.log1p(np.clip(interpolated, 0.0, None))
    return np.concatenate([log_interp, log_interp - np.log1p(np.clip(uniform, 0.0, None))])


def case_rows(case: A.Case, native_teacher: np.ndarray | None = None) -> tuple[dict[str, dict], dict, float]:
    """Method label -> summarized metrics; the noise ceiling; feature seconds.

    ``native_teacher``: the case's image for the teacher at no finer than the image's own resolution, where that
    differs from ``case.teacher_image`` (which is upsampled to about ``TEACHER_UM_PER_PX``).
    """
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
    score("bicubic + mass on the tissue", B.bicubic_mass_on_tissue(lr, op, mask))
    for k in COMPONENTS:
        prior = stsr.models.semantic_prior(feats, lr, op, mask=mask, n_components=k)
        for s in STRENGTHS:
            tag = " (shipped)" if (k, s) == (5, 0.5) else ""
            score(
                f"prior, {k} components, strength {s:g}{tag}",
                stsr.models.apply_prior(base, prior, lr, op, strength=s),
            )
    shipped = stsr.models.semantic_prior(feats, lr, op, mask=mask)
    for s in MAP_STRENGTHS:  # the strength of stsr.tl.prior_map was chosen on C2 from these rows
        score(
            f"{MAP_LABEL}, strength {s:g}",
            stsr.models.prior_guide(shipped, lr, op, mask=mask, strength=s),
        )
    if native_teacher is not None and native_teacher.shape != case.teacher_image.shape:
        native = stsr.models.teacher_features(native_teacher, op.shape)
        prior = stsr.models.semantic_prior(native, lr, op, mask=mask)
    else:
        prior = stsr.models.semantic_prior(feats, lr, op, mask=mask)
    score(NATIVE_LABEL, stsr.models.apply_prior(base, prior, lr, op))
    pcs = tissue_components(feats, mask, ORACLE_COMPONENTS)
    fitted = {
        f"{ORACLE_COMPONENTS} comp.": truth_readout(feats, truth, mask, ORACLE_COMPONENTS),
        f"{ORACLE_COMPONENTS} comp. of the features and their 3 x 3 neighbourhood mean": truth_readout(
            np.concatenate([feats, neighbourhood_mean(feats, mask, 3)]), truth, mask, ORACLE_COMPONENTS
        ),
        "gradient boosting on 40 comp., cross-fitted": cross_fitted(
            tissue_components(feats, mask, 40), truth, mask, "boosting"
        ),
        f"{ORACLE_COMPONENTS} comp., cross-fitted": cross_fitted(pcs, truth, mask, "ridge"),
        f"{ORACLE_COMPONENTS} comp. and the LR input of every gene, cross-fitted": cross_fitted(
            np.concatenate([pcs, lr_regressors(base, B.uniform_split(lr, op))]), truth, mask, "ridge"
        ),
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
    """Markdown: per case, the share of the noise-ceiling gap (over bicubic + mass) that the read-outs fitted on the
    truth close (the best in sample, the best cross-fitted) and that the shipped prior closes."""
    labels = list(results[0][1])
    shipped = next(label for label in labels if label.endswith("(shipped)"))
    on_truth = [label for label in labels if label.startswith("read-out fitted on the truth")]
    groups = {
        "in sample": [label for label in on_truth if "cross-fitted" not in label],
        "cross-fitted": [label for label in on_truth if "cross-fitted" in label],
    }
    lines = [
        "## How much of the headroom the features can explain",
        "",
        "Gap closed = (x - bicubic + mass) / (noise ceiling - bicubic + mass), on within-block r unless marked r. "
        "*In sample*: the best read-out fitted on all of the truth (any strength); *cross-fitted*: the best read-out "
        "trained on the truth of the other column bands of the slide; *shipped*: the prior as shipped, fitted on the "
        "LR input alone; *shipped / in-sample gain* = (shipped - bicubic + mass) / (in sample - bicubic + mass), "
        "n/a where the in-sample bound gains less than 0.02 over bicubic + mass.",
        "",
        "| case | within-block r: ceiling / bicubic + mass | in sample | cross-fitted | shipped | gap closed: in "
        "sample / cross-fitted / shipped | r: gap closed in sample / cross-fitted / shipped | shipped / in-sample gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    closed: dict[str, list[float]] = {}

    def gap(key: str, rows: dict, ceiling: dict, value: float) -> float:
        base = rows["bicubic + mass"][key][0]
        return (value - base) / (ceiling[key][0] - base)

    for name, rows, ceiling, _ in results:
        best = {g: max(rows[label]["within_block"][0] for label in members) for g, members in groups.items()}
        w_ship = rows[shipped]["within_block"][0]
        r_best = {g: max(rows[label]["pearson"][0] for label in members) for g, members in groups.items()}
        shares = {
            "in sample": gap("within_block", rows, ceiling, best["in sample"]),
            "cross-fitted": gap("within_block", rows, ceiling, best["cross-fitted"]),
            "shipped": gap("within_block", rows, ceiling, w_ship),
            "r in sample": gap("pearson", rows, ceiling, r_best["in sample"]),
            "r cross-fitted": gap("pearson", rows, ceiling, r_best["cross-fitted"]),
            "r shipped": gap("pearson", rows, ceiling, rows[shipped]["pearson"][0]),
        }
        base = rows["bicubic + mass"]["within_block"][0]
        # the shipped prior's gain as a share of the in-sample bound's (where the bound gains at least 0.02)
        bound_gain = best["in sample"] - base
        shares["shipped of bound"] = (w_ship - base) / bound_gain if bound_gain >= 0.02 else float("nan")
        for k, v in shares.items():
            closed.setdefault(k, []).append(v)
        of_bound = shares["shipped of bound"]
        lines.append(
            f"| {name} | {ceiling['within_block'][0]:.3f} / {rows['bicubic + mass']['within_block'][0]:.3f} | "
            f"{best['in sample']:.3f} | {best['cross-fitted']:.3f} | {w_ship:.3f} | "
            f"{shares['in sample']:.2f} / {shares['cross-fitted']:.2f} / {shares['shipped']:.2f} | "
            f"{shares['r in sample']:.2f} / {shares['r cross-fitted']:.2f} / {shares['r shipped']:.2f} | "
            + ("n/a" if np.isnan(of_bound) else f"{of_bound:.2f}")
            + " |"
        )
    m = {k: np.nanmean(v) for k, v in closed.items()}
    lines += [
        f"| mean | | | | | {m['in sample']:.2f} / {m['cross-fitted']:.2f} / {m['shipped']:.2f} | "
        f"{m['r in sample']:.2f} / {m['r cross-fitted']:.2f} / {m['r shipped']:.2f} | "
        f"{m['shipped of bound']:.2f} |",
        "",
    ]
    return lines


def load_cases(which: list[str], n_genes: int) -> list[tuple[A.Case, np.ndarray | None]]:
    """The cases, each with its teacher image at no finer than the image's own resolution (None: the same)."""
    k = 8  # the model's image scale does not matter here: only the teacher image is used
    cases: list[tuple[A.Case, np.ndarray | None]] = []
    if "her2st" in which:
        for s in A.HER2ST_SECTIONS:
            native = A.her2st_case(s, n_genes, k, teacher_native=True).teacher_image
            cases.append((A.her2st_case(s, n_genes, k), native))
    if "dbit" in which:
        native = [c.teacher_image for c in A.dbit_cases((2, 4), n_genes, k, teacher_native=True)]
        cases += list(zip(A.dbit_cases((2, 4), n_genes, k), native))
    if "vizgen" in which:  # the morphology image is at 0.11 µm per pixel: never upsampled
        cases += [(c, None) for c in A.vizgen_cases(((10.0, 5), (5.0, 10)), n_genes, k)]
    return cases


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["her2st", "dbit", "vizgen"])
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    A.add_teacher_option(p)
    args = p.parse_args(argv)
    A.use_teacher_option(args)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    results = []
    for case, native_teacher in load_cases(args.cases, args.genes):
        rows, ceiling, secs = case_rows(case, native_teacher)
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
        f"{platform.machine()}, total {time.time() - t_start:.0f} s; image teacher at "
        f"{stsr.models.TEACHER_UM_PER_PX:g} µm per pixel). {args.genes} genes per case, the accuracy "
        "benchmark's truth and LR input; every prior row reweights bicubic + mass, except the prior map rows, "
        "which reweight the interpolation of counts per tissue pixel (as stsr.tl.prior_map does).",
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

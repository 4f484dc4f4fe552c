"""What a user gets from the default call: ``stsr.tl.super_resolve(sdata, image_key, genes)``, scored on every case.

Run::

    python benchmarks/default_call.py [--quick] [--no-split] [--out docs/benchmarks/default_call.md]

The default call runs the semantic prior and the self-check (``stsr.tl._self_check``): it hides the spots behind
groups of spots, predicts them back with candidate configurations (the prior's strength, the share of the diffusion
core's map), uses the best and records it in the element's provenance ``sdata.attrs["stsr"][key]``
(``prior_strength``, ``diffusion_residual``, ``self_check`` with the self-estimated r and within r, ``dispersion``:
one negative-binomial ``phi`` per gene). It writes the map (counts per HR pixel) and ``f"{key}_std"`` =
``sqrt(phi) x map``: the predictive of a pixel count of mean ``m`` is negative binomial with variance
``m + phi m^2``.

Cases: those of ``benchmarks/accuracy.py`` built for its public-function rows (:func:`accuracy.build_cases` with
``public=True``: HER2ST A1 A2 B4 C2-C6 at x2, DBiT-seq x2 and x4, Vizgen 10 µm and 5 µm, synthetic seed 42), each
as a user's SpatialData (:func:`accuracy.case_sdata`: the image, the LR blocks as square bins, a table of their
counts; nothing of the truth but its pooling). Rows per case:

- bicubic + mass (in memory) and TESLA (when installed), as ``accuracy.py`` runs them;
- ``stsr.tl.prior_map`` with its defaults;
- ``stsr.tl.super_resolve`` with its defaults (``model=None`` and the tiling and feature cache set by the device:
  ``stsr.tl._super_resolve.DEVICE_DEFAULTS``);

both public calls with ``pixel_size`` = the truth's pixel, so that the map read back from ``sdata[key]`` lies on
the truth's grid (:func:`accuracy.read_map`), and ``progress=False``. Per row: r, within-block r and SSIM
(:func:`accuracy.score`, mean over genes) and the wall time (the call and reading the map back). For the default
call also: its self-estimate (from the provenance) next to the true r and within r, the chosen prior strength and
diffusion residual, and the coverage of the truth counts over the case's scored pixels by the central negative-binomial
intervals of the map and the provenance's dispersion (nominal 0.5, 0.7, 0.8, 0.9, 0.95; all genes pooled, and the
mean over genes), drawn as a reliability figure.

Count splitting (section 4, unless ``--no-split``): the same three rows on each case with its truth counts split
into two independent binomial halves (:func:`count_split`), the input pooled from one and scored against the other,
so that no row is scored against the counting noise of its own input.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR's default)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr import metrics as M  # noqa: E402
from stsr.tl import _semantic_prior  # noqa: E402

#: Nominal levels of the central intervals whose coverage is measured (the reliability figure's x axis).
LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95)
#: The level the issue's target is stated at, and the target band of its coverage.
MAIN_LEVEL, TARGET_BAND = 0.9, (0.85, 0.95)
#: Target on the self-estimate: mean absolute difference to the true r over the real cases.
SELF_ESTIMATE_TARGET = 0.05
DEFAULT_LABEL = "stsr.tl.super_resolve (defaults)"
PRIOR_LABEL = "stsr.tl.prior_map (defaults)"
DEFAULT_OUT = HERE.parent / "docs" / "benchmarks" / "default_call.md"
DEFAULT_FIGURE = HERE.parent / "docs" / "_static" / "reliability.png"


# ---------------------------------------------------------------------------------------------------- coverage
def nb_cdfs(mean: np.ndarray, phi: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P(Y <= y)`` and ``P(Y <= y - 1)`` of a negative binomial of mean ``mean`` and variance ``m + phi m^2``.

    ``mean`` and ``counts`` are ``(G, ...)``, ``phi`` ``(G,)``; it is scipy's ``nbinom(n=1/phi, p=n/(n+m))``, and a
    mean of zero is the point mass at zero.
    """
    from scipy.stats import nbinom

    m = np.asarray(mean, np.float64)
    y = np.asarray(counts, np.float64)
    n = (1.0 / np.asarray(phi, np.float64)).reshape((-1,) + (1,) * (m.ndim - 1))
    pos = m > 0
    p = n / (n + np.where(pos, m, 1.0))
    at = np.where(pos, nbinom.cdf(y, n, p), (y >= 0).astype(np.float64))
    below = np.where(pos, nbinom.cdf(y - 1, n, p), (y >= 1).astype(np.float64))
    return at, below


def covered(at: np.ndarray, below: np.ndarray, level: float) -> np.ndarray:
    """Whether each count lies in the central ``level`` interval ``[ppf(a), ppf(1 - a)]``, ``a = (1 - level) / 2``,
    from its :func:`nb_cdfs`: ``y >= ppf(a)`` iff ``P(Y <= y) >= a``; ``y <= ppf(1 - a)`` iff
    ``P(Y <= y - 1) < 1 - a`` (``ppf(q)`` is the least ``k`` with ``P(Y <= k) >= q``)."""
    a = (1.0 - level) / 2.0
    return (at >= a) & (below < 1.0 - a)


def pit_covered(at: np.ndarray, below: np.ndarray, level: float) -> np.ndarray:
    """The probability that each count's *randomised* PIT, ``u = P(Y <= y - 1) + V P(Y = y)`` with ``V`` uniform,
    lies in the central ``[a, 1 - a]``, ``a = (1 - level) / 2`` (Czado, Gneiting & Held 2009).

    For a count drawn from the predictive distribution ``u`` is uniform, so the mean of this is ``level`` exactly;
    the plain interval of a discrete distribution holds at least ``level`` of its mass, far more where most counts
    are 0 or 1 (a mean of 0.1: ``[0, 1]``, 99.5 %). The expectation over ``V`` is taken in closed form: the share of
    ``[below, at]`` inside ``[a, 1 - a]``."""
    a = (1.0 - level) / 2.0
    width = at - below
    inside = np.clip(np.minimum(at, 1.0 - a) - np.maximum(below, a), 0.0, None)
    point = (below >= a) & (below <= 1.0 - a)  # a point mass (width 0): covered iff inside
    return np.where(width > 1e-15, inside / np.where(width > 1e-15, width, 1.0), point.astype(np.float64))


@dataclass
class Coverage:
    """Coverage of the truth counts by the central intervals, per nominal level: all genes pooled, the mean over
    genes, and each gene's; ``pit``: all genes pooled, by the randomised PIT (:func:`pit_covered`)."""

    levels: tuple[float, ...]
    pooled: dict[float, float]
    gene_mean: dict[float, float]
    per_gene: dict[float, np.ndarray]
    n_values: int
    pit: dict[float, float] = field(default_factory=dict)
    #: The factor on every gene's ``phi`` at which the randomised PIT coverage of :data:`MAIN_LEVEL` is nominal
    #: (:func:`pit_factor`): how far the calibrated spread is from the one these truths ask for.
    pit_factor: float = float("nan")


def coverage(
    mean: np.ndarray,
    phi: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    levels: tuple[float, ...] = LEVELS,
) -> Coverage:
    """Coverage of ``truth`` ``(G, H, W)`` (integer counts) by the central negative-binomial intervals of the map
    ``mean`` ``(G, H, W)`` and the per-gene dispersion ``phi`` ``(G,)``, over the pixels of ``mask`` ``(H, W)``."""
    y = np.asarray(truth, np.float64)[:, mask]
    counts = np.rint(y)
    if not np.allclose(counts, y, atol=1e-3):
        raise ValueError("coverage is of integer counts, and the truth holds non-integer values.")
    at, below = nb_cdfs(np.asarray(mean, np.float64)[:, mask], phi, counts)
    inside = {lv: covered(at, below, lv) for lv in levels}
    return Coverage(
        tuple(levels),
        {lv: float(c.mean()) for lv, c in inside.items()},
        {lv: float(c.mean(1).mean()) for lv, c in inside.items()},
        {lv: c.mean(1) for lv, c in inside.items()},
        int(counts.size),
        {lv: float(pit_covered(at, below, lv).mean()) for lv in levels},
        pit_factor(np.asarray(mean, np.float64)[:, mask], phi, counts),
    )


def pit_factor(mean: np.ndarray, phi: np.ndarray, counts: np.ndarray, level: float = MAIN_LEVEL) -> float:
    """The factor ``c`` for which the negative binomials of mean ``mean`` and dispersion ``c * phi`` give the
    counts a randomised PIT coverage (:func:`pit_covered`) of ``level`` (``mean`` and ``counts`` ``(G, ...)``,
    ``phi`` ``(G,)``). The coverage grows with ``c`` until the spread is so wide that its mass piles up at zero and
    in a far tail; the first ``c`` on the rising side is found: on powers of 2 from 1/256 to 256, then by bisection
    on ``log c`` between the last below ``level`` and the first at or above it (1/256 when the first already is,
    256 when none is). Where counts are mostly 0 or 1 the coverage hardly depends on ``phi`` and the factor can be
    large with a coverage near ``level`` already."""

    def cov(c: float) -> float:
        return float(pit_covered(*nb_cdfs(mean, c * np.asarray(phi, np.float64), counts), level).mean())

    grid = 2.0 ** np.arange(-8, 9)
    above = next((i for i, c in enumerate(grid) if cov(float(c)) >= level), None)
    if above is None:
        return float(grid[-1])
    if above == 0:
        return float(grid[0])
    lo, hi = float(grid[above - 1]), float(grid[above])
    for _ in range(16):
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if cov(mid) < level else (lo, mid)
    return float(np.sqrt(lo * hi))


# ---------------------------------------------------------------------------------------------------- one case
@dataclass
class PublicCall:
    """What a public ``stsr.tl`` call wrote on the case's slide, read back before its elements are removed."""

    map: np.ndarray  # (G, H, W) on the truth's grid
    std: np.ndarray | None  # f"{key}_std" on the truth's grid, when written
    provenance: dict[str, Any]
    seconds: float
    peak_mib: float


def public_call(user: A.UserSlide, fn: Callable[..., Any], key: str, **kwargs: Any) -> PublicCall:
    """``fn(sdata, image_key, genes, pixel_size=<truth's>, key_added=key, progress=False, **kwargs)`` on the case's
    slide (as :meth:`accuracy.UserSlide.run`), timed with reading the map back, as a first call on the slide (the
    image scores an earlier call kept are dropped first); the map, its ``_std`` layer and the provenance are kept,
    then the elements and their provenance are removed from the slide."""
    std_key = f"{key}_std"
    # every call is timed as a first call on its slide: without the image scores an earlier call kept
    _semantic_prior.clear_scores_cache()
    try:
        with B.Timer() as t:
            fn(
                user.sdata,
                user.image_key,
                user.genes,
                pixel_size=user.pixel_size,
                key_added=key,
                progress=False,
                **kwargs,
            )
            pred = A.read_map(user.sdata, key, user.grid)
        std = A.read_map(user.sdata, std_key, user.grid) if std_key in user.sdata else None
        record = dict((user.sdata.attrs.get("stsr") or {}).get(key) or {})
    finally:
        for k in (key, std_key):
            if k in user.sdata:
                del user.sdata[k]
        for k in (key, std_key):
            (user.sdata.attrs.get("stsr") or {}).pop(k, None)
    return PublicCall(pred, std, record, t.seconds, t.peak_mib)


@dataclass
class CaseResult:
    """The rows of one case and what the default call said about itself."""

    case: A.Case
    rows: list[A.Row]
    ceiling: dict[str, tuple[float, float, int]]
    default: PublicCall | None = None
    phi: np.ndarray | None = None  # the provenance's dispersion, in the order of the case's genes
    coverage: Coverage | None = None
    std_deviation: float = float("nan")  # max |std - sqrt(phi) map| / max(sqrt(phi) map)
    notes: list[str] = field(default_factory=list)
    split: A.Case | None = None  # the count-split case (input from one half of the counts, truth the other)
    split_rows: list[A.Row] = field(default_factory=list)
    split_ceiling: dict[str, tuple[float, float, int]] = field(default_factory=dict)

    def row(self, method: str) -> A.Row | None:
        return next((r for r in self.rows if r.method == method and r.values is not None), None)

    @property
    def check(self) -> dict[str, Any]:
        return (self.default.provenance.get("self_check") or {}) if self.default is not None else {}

    @property
    def self_estimate(self) -> tuple[float, float]:
        """``(r, within r)`` the default call estimated for itself (nan when it did not check)."""
        c = self.check
        return tuple(  # type: ignore[return-value]
            float("nan") if c.get(k) is None else float(c[k])
            for k in ("self_estimated_r", "self_estimated_within_r")
        )

    @property
    def truth_scores(self) -> tuple[float, float]:
        """``(r, within r)`` of the default call against the truth."""
        r = self.row(DEFAULT_LABEL)
        if r is None:
            return float("nan"), float("nan")
        return r.values["pearson"][0], r.values["within_block"][0]


def dispersion_of(record: dict[str, Any], genes: list[str]) -> np.ndarray:
    """The provenance's per-gene ``dispersion``, in the order of ``genes``."""
    if record.get("dispersion") is None:
        raise ValueError("the call's provenance holds no 'dispersion' (the self-check did not run).")
    phi = dict(zip(record["genes"], record["dispersion"], strict=True))
    return np.array([phi[g] for g in genes], np.float64)


def count_split(case: A.Case, seed: int = 0) -> A.Case:
    """The case split into two independent halves of its counts (binomial thinning with p = 1/2; Neufeld et al.
    2024, *Data thinning for convolution-closed distributions*): the input is the LR pooling of one half, the truth
    the other half. A Poisson count ``y`` of rate ``lambda`` thins into two independent Poisson counts of rate
    ``lambda / 2``, so the truth no longer shares the input's counting noise.

    Scored against the truth the input was pooled from, a map that keeps every block's measured count is favoured
    over one that estimates the rate (the truth's pixels of a block sum to that count, noise included): a map of
    expected counts (``poisson=True``) is scored against noise it is built to remove. Against the other half it is
    scored on the rate alone."""
    hr = case.pair.hr.double().numpy()
    if not np.allclose(hr, np.rint(hr)) or hr.min() < 0:
        raise ValueError(f"{case.name}: the truth is not counts; it cannot be split.")
    rng = np.random.default_rng(seed)
    half = rng.binomial(np.rint(hr).astype(np.int64), 0.5)
    other = np.rint(hr).astype(np.int64) - half
    op = case.pair.observation
    others = case.others
    if others is not None:  # the input's other genes come from the same half (their own thinning)
        others = (
            np.random.default_rng([seed, 1]).binomial(np.rint(others).astype(np.int64), 0.5).astype(float)
        )
    return replace(
        case,
        name=f"{case.name}, split",
        pair=A._with(case.pair, hr=torch.from_numpy(other.astype(np.float32))),
        lr=op.pool(half.astype(np.float64)),
        others=others,
    )


def scored_call(
    case: A.Case, label: str, call: Callable[[], PublicCall], note: str = ""
) -> tuple[A.Row, PublicCall | None]:
    """``call()`` (a :func:`public_call`) scored on ``case`` as the row ``label``; a failure is a row with its error
    as note and no call."""
    try:
        out = call()
    except Exception as err:  # noqa: BLE001
        return A.Row(label, None, note=f"failed: {type(err).__name__}: {err}"), None
    return A.Row(label, A.score(case, out.map), out.seconds, out.peak_mib, note), out


def evaluate_split(
    case: A.Case, *, model: Any = None, tesla: bool = True, log: Callable[[str], None] | None = None
) -> tuple[A.Case, list[A.Row], dict[str, tuple[float, float, int]]]:
    """Bicubic + mass, TESLA (when ``tesla`` and installed), ``prior_map`` and ``super_resolve`` with their defaults
    on the count-split case (:func:`count_split`): input from one half of the counts, scored against the other
    half."""
    split = count_split(case)
    lr, op = split.lr, split.pair.observation
    rows = [A.run(split, "bicubic + mass", lambda: B.bicubic_mass(lr, op))]
    if tesla and B.tesla_available():
        img = split.pair.image.numpy()
        rows.append(A.run(split, "TESLA", lambda: B.tesla(lr, op, img)))
    user = A.case_sdata(split)
    kw = {} if model is None else {"model": model}
    for label, fn, key, extra in (
        (PRIOR_LABEL, stsr.tl.prior_map, "stsr_prior", {}),
        (DEFAULT_LABEL, stsr.tl.super_resolve, "stsr", kw),
    ):
        row, out = scored_call(split, label, lambda f=fn, k=key, x=extra: public_call(user, f, k, **x))
        rec = {} if out is None else out.provenance
        if rec.get("self_check") is not None:
            row.note = (
                f"prior strength {rec['prior_strength']}, diffusion residual {rec['diffusion_residual']}"
            )
        rows.append(row)
        if log is not None:
            log(f"{split.name}: {label} ({row.seconds:.0f} s)")
    ceiling = M.summarize(M.noise_ceiling(split.pair.hr.double().numpy(), op, split.mask))
    return split, rows, ceiling


def evaluate_case(
    case: A.Case,
    *,
    model: Any = None,
    tesla: bool = True,
    levels: tuple[float, ...] = LEVELS,
    log: Callable[[str], None] | None = None,
    split: bool = False,
) -> CaseResult:
    """Run and score the rows of one case (the truth is used only for scoring): bicubic + mass, TESLA (when
    ``tesla`` and installed), ``prior_map`` and ``super_resolve`` with their defaults on the case's slide
    (``model`` is passed to ``super_resolve`` only when not None, for tests), and the default call's coverage.
    With ``split``, also the rows of :func:`evaluate_split` (input and truth from independent halves of the
    counts)."""

    def tell(method: str, row: A.Row) -> A.Row:
        if log is not None:
            log(f"{case.name}: {method} ({row.seconds:.0f} s{', failed' if row.values is None else ''})")
        return row

    lr, op = case.lr, case.pair.observation
    rows = [tell("bicubic + mass", A.run(case, "bicubic + mass", lambda: B.bicubic_mass(lr, op)))]
    if tesla and B.tesla_available():
        img = case.pair.image.numpy()
        rows.append(tell("TESLA", A.run(case, "TESLA", lambda: B.tesla(lr, op, img))))
    elif tesla:
        rows.append(A.Row("TESLA", None, note="skipped: not installed (see notes)"))
    user = A.case_sdata(case)
    ceiling = M.summarize(M.noise_ceiling(case.pair.hr.double().numpy(), op, case.mask))
    result = CaseResult(case, rows, ceiling)
    if split:
        result.split, result.split_rows, result.split_ceiling = evaluate_split(
            case, model=model, tesla=tesla, log=log
        )

    def scored(label: str, call: Callable[[], PublicCall], note: str) -> PublicCall | None:
        row, out = scored_call(case, label, call, note)
        rows.append(tell(label, row))
        return out

    scored(PRIOR_LABEL, lambda: public_call(user, stsr.tl.prior_map, "stsr_prior"), "prior_map()")
    kw = {} if model is None else {"model": model}
    default = scored(
        DEFAULT_LABEL,
        lambda: public_call(user, stsr.tl.super_resolve, "stsr", **kw),
        "super_resolve()" if model is None else "super_resolve(model=<given>)",
    )
    result.default = default
    if default is None:
        return result
    rec = default.provenance
    if rec.get("model") is not None:
        rows[-1].note += f"; weights {rec['model']!r}"
    if case.seen_by_default:
        rows[-1].note += "; seen in training (the default weights saw DBiT x2 pairs)"
    if rec.get("dispersion") is None:
        result.notes.append("the default call ran no self-check (no dispersion in its provenance)")
        return result
    phi = dispersion_of(rec, user.genes)
    result.phi = phi
    result.coverage = coverage(default.map, phi, case.pair.hr.double().numpy(), case.mask, levels)
    if default.std is not None:
        expected = np.sqrt(phi)[:, None, None] * default.map
        scale = max(float(np.abs(expected).max()), 1e-12)
        result.std_deviation = float(np.abs(default.std - expected).max() / scale)
    return result


# ---------------------------------------------------------------------------------------------------- report
def _f(x: float, digits: int = 3, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _pearson(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a_) & np.isfinite(b_)
    if ok.sum() < 3 or np.std(a_[ok]) == 0 or np.std(b_[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a_[ok], b_[ok])[0, 1])


def is_real(result: CaseResult) -> bool:
    return not result.case.name.startswith("synthetic")


def detail_table(results: list[CaseResult]) -> str:
    """Markdown: every row of every case, with r, within r, SSIM (mean ± sd over genes) and wall time."""
    lines = [
        "| case | method | r | within-block r | SSIM | wall s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res.rows:
            if r.values is None:
                lines.append(f"| {res.case.name} | {r.method} | n/a | n/a | n/a | | {r.note} |")
                continue
            v = r.values
            lines.append(
                f"| {res.case.name} | {r.method} | {A._fmt(v['pearson'])} | {A._fmt(v['within_block'])} | "
                f"{A._fmt(v['ssim'])} | {r.seconds:.1f} | {r.note} |"
            )
    return "\n".join(lines) + "\n"


def self_estimate_summary(results: list[CaseResult]) -> dict[str, float]:
    """Over the real cases with a self-estimate: mean absolute difference to the truth and Pearson correlation
    across cases, of r and of within r, and how many cases."""
    real = [r for r in results if is_real(r) and np.isfinite(r.self_estimate[0])]
    est_r = [r.self_estimate[0] for r in real]
    est_w = [r.self_estimate[1] for r in real]
    true_r = [r.truth_scores[0] for r in real]
    true_w = [r.truth_scores[1] for r in real]
    diff_r = np.abs(np.subtract(est_r, true_r)) if real else np.array([])
    diff_w = np.abs(np.subtract(est_w, true_w)) if real else np.array([])
    return {
        "n": len(real),
        "mad_r": float(np.nanmean(diff_r)) if len(diff_r) else float("nan"),
        "mad_within": float(np.nanmean(diff_w)) if len(diff_w) else float("nan"),
        "corr_r": _pearson(est_r, true_r),
        "corr_within": _pearson(est_w, true_w),
    }


def self_estimate_table(results: list[CaseResult]) -> str:
    lines = [
        "| case | true r | self-estimated r | difference | true within r | self-estimated within r | difference | "
        "prior strength | diffusion residual | spot groups | candidates (strength, residual: r / within r) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res.default is None:
            lines.append(f"| {res.case.name} | n/a | | | | | | | | | default call failed |")
            continue
        (er, ew), (tr, tw) = res.self_estimate, res.truth_scores
        rec, chk = res.default.provenance, res.check
        cands = "; ".join(
            f"{s:g}, {a:g}: {_f(r, 3)} / {_f(w if w is not None else float('nan'), 3)}"
            for s, a, r, w in chk.get("candidates", [])
        )
        lines.append(
            f"| {res.case.name} | {_f(tr)} | {_f(er)} | {_f(er - tr, signed=True)} | {_f(tw)} | {_f(ew)} | "
            f"{_f(ew - tw, signed=True)} | {rec.get('prior_strength', 'n/a')} | "
            f"{rec.get('diffusion_residual', 'n/a')} | {chk.get('spot_groups', 'n/a')} | {cands or '-'} |"
        )
    return "\n".join(lines) + "\n"


def coverage_table(results: list[CaseResult], levels: tuple[float, ...] = LEVELS) -> str:
    lo, hi = TARGET_BAND
    lines = [
        f"| case | {MAIN_LEVEL:.0%} interval: pooled | mean over genes (min - max) | in {lo:.0%}-{hi:.0%} | "
        f"{MAIN_LEVEL:.0%}, randomised PIT | in {lo:.0%}-{hi:.0%} | "
        + " | ".join(f"{lv:.0%}" for lv in levels)
        + f" | pixel values | phi: median (min - max) | phi x for a {MAIN_LEVEL:.0%} PIT | "
        "max rel. dev. of `_std` from sqrt(phi) map |",
        "|---|---|---|---|---|---|" + "---|" * len(levels) + "---|---|---|---|",
    ]
    for res in results:
        cov = res.coverage
        if cov is None:
            note = "; ".join(res.notes) or "default call failed"
            lines.append(f"| {res.case.name} | n/a | {note} |" + " |" * (len(levels) + 8))
            continue
        pooled = cov.pooled[MAIN_LEVEL]
        per = cov.per_gene[MAIN_LEVEL]
        ok = "yes" if lo <= pooled <= hi else "no"
        pit = cov.pit[MAIN_LEVEL]
        pit_ok = "yes" if lo <= pit <= hi else "no"
        lines.append(
            f"| {res.case.name} | {pooled:.3f} | {cov.gene_mean[MAIN_LEVEL]:.3f} ({per.min():.2f} - "
            f"{per.max():.2f}) | {ok} | {pit:.3f} | {pit_ok} | "
            + " | ".join(f"{cov.pooled[lv]:.3f}" for lv in levels)
            + f" | {cov.n_values} | {np.median(res.phi):.3g} ({res.phi.min():.3g} - {res.phi.max():.3g}) | "
            f"{cov.pit_factor:.2g} | {f'{res.std_deviation:.1e}' if np.isfinite(res.std_deviation) else 'n/a'} |"
        )
    return "\n".join(lines) + "\n"


def reliability_figure(results: list[CaseResult], path: Path, levels: tuple[float, ...] = LEVELS) -> None:
    """Nominal against empirical coverage (all genes pooled), one line per case, and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 5.4), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.3", ls="--", lw=1, label="calibrated")
    ax.axhspan(*TARGET_BAND, xmin=0, xmax=1, color="0.9", zorder=0)
    markers = "os^vD<>ph*"
    for i, res in enumerate(r for r in results if r.coverage is not None):
        ax.plot(
            levels,
            [res.coverage.pooled[lv] for lv in levels],
            marker=markers[i % len(markers)],
            lw=1.2,
            ms=4,
            ls=":" if not is_real(res) else "-",
            label=res.case.name,
        )
    ax.set_xlim(0.45, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("empirical coverage of the truth counts")
    ax.set_title("stsr.tl.super_resolve defaults: negative-binomial intervals", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(results: list[CaseResult], *, header: list[str], figure: Path | None, out: Path | None) -> str:
    s = self_estimate_summary(results)
    real_cov = [r for r in results if is_real(r) and r.coverage is not None]
    lo, hi = TARGET_BAND
    in_band = sum(lo <= r.coverage.pooled[MAIN_LEVEL] <= hi for r in real_cov)
    pit_in_band = sum(lo <= r.coverage.pit[MAIN_LEVEL] <= hi for r in real_cov)
    real = [r for r in results if is_real(r)]

    def ahead(method: str, split: bool = False) -> str:
        n, wins = 0, 0
        for r in real:
            rows = r.split_rows if split else r.rows
            a = next((x for x in rows if x.method == DEFAULT_LABEL and x.values is not None), None)
            b = next((x for x in rows if x.method == method and x.values is not None), None)
            if a is None or b is None:
                continue
            n += 1
            wins += all(a.values[k][0] >= b.values[k][0] for k in ("pearson", "within_block"))
        return f"{wins} of {n}"

    split_results = [r for r in results if r.split_rows]

    mean_gain = [
        r.row(DEFAULT_LABEL).values["within_block"][0] - r.row(PRIOR_LABEL).values["within_block"][0]
        for r in real
        if r.row(DEFAULT_LABEL) is not None and r.row(PRIOR_LABEL) is not None
    ]
    ran_tesla = any(x.method == "TESLA" and x.values is not None for r in real for x in r.rows)
    tesla_line = (
        [
            f"- Default call at least TESLA on both: {ahead('TESLA')} real cases"
            + (
                f"; against an independent half of the counts: {ahead('TESLA', split=True)}."
                if split_results
                else "."
            )
        ]
        if ran_tesla
        else []
    )
    out_lines = header + [
        "## Summary",
        "",
        f"- Default call at least the prior map on both r and within-block r: {ahead(PRIOR_LABEL)} real cases; "
        f"mean within-block r gain over the prior map {_f(np.mean(mean_gain) if mean_gain else np.nan, 3, True)} "
        "(target: ahead on every real case it did not train on, by ≥ 0.03 on average).",
        f"- Default call at least bicubic + mass on both: {ahead('bicubic + mass')} real cases"
        + (
            f"; against an independent half of the counts (section 4, the input from the other half): "
            f"{ahead('bicubic + mass', split=True)}, and at least the prior map there: "
            f"{ahead(PRIOR_LABEL, split=True)}."
            if split_results
            else "."
        ),
        *tesla_line,
        f"- Self-estimate over {s['n']} real cases: mean |self-estimated - true| r {_f(s['mad_r'])} (target "
        f"≤ {SELF_ESTIMATE_TARGET}), within r {_f(s['mad_within'])}; Pearson correlation across cases of "
        f"self-estimated and true r {_f(s['corr_r'])}, of within r {_f(s['corr_within'])}.",
        f"- Coverage of the central {MAIN_LEVEL:.0%} interval (all genes pooled) within {lo:.0%}-{hi:.0%}: "
        f"{in_band} of {len(real_cov)} real cases; by the randomised PIT (which a calibrated model meets at "
        f"{MAIN_LEVEL:.0%} exactly, where the plain interval of mostly 0-1 counts covers more): {pit_in_band} of "
        f"{len(real_cov)}.",
        "",
        "## 1. r / within-block r (mean over genes)",
        "",
        A.summary_table([(r.case, r.rows, r.ceiling) for r in results]),
        "All rows with SSIM and wall time (mean ± sd over genes):",
        "",
        detail_table(results),
        "## 2. Self-estimate against the truth",
        "",
        "The self-check scores spot counts predicted from groups of spots (r across spots; r within the groups: "
        "`spot_level_r` / `spot_level_within_r` in the provenance); the self-estimate carries those scores to the "
        "map's pixels, whose counts hold less signal against the same Poisson noise "
        "(`stsr.tl._self_check.pixel_factors`; `self_estimated_r` / `self_estimated_within_r`). The truth scores the "
        "HR pixels (r; r within the LR blocks). Real cases only in the summary line above; the synthetic case is "
        "listed for reference.",
        "",
        self_estimate_table(results),
        "## 3. Coverage of the truth counts",
        "",
        "Each truth count (HR pixel, gene) over the case's scored pixels against the negative binomial of mean = the "
        "map and dispersion phi = the provenance's `dispersion` of its gene (variance m + phi m²); a count is "
        "covered by the central interval of level l when it lies within [ppf((1-l)/2), ppf((1+l)/2)]. Columns "
        "per level: all genes pooled. The randomised PIT column scores the same intervals without the excess "
        "coverage of discrete counts: the share of each count's PIT range [P(Y < y), P(Y <= y)] inside "
        f"[{(1 - MAIN_LEVEL) / 2:.2f}, {(1 + MAIN_LEVEL) / 2:.2f}] (Czado, Gneiting & Held 2009), {MAIN_LEVEL:.0%} "
        "in expectation for a calibrated model. 'phi x' is the factor on every gene's phi that would make that "
        f"PIT coverage {MAIN_LEVEL:.0%} on this case (1: calibrated; above 1: the spread is too narrow; where "
        "most counts are 0 or 1 the coverage hardly moves with phi and the factor says little). The self-check "
        "calibrates phi on the spots predicted from groups of them and carries it unchanged one scale finer; "
        "variation of each finer unit beyond counting noise that averages out in the coarser ones (a nugget) is not "
        "seen there. "
        "The last column checks that the `_std` layer written is sqrt(phi) × map.",
        "",
        coverage_table(results),
    ]
    if figure is not None:
        rel = os.path.relpath(figure, out.parent if out is not None else Path.cwd())
        out_lines += [f"![Reliability: nominal against empirical coverage, one line per case]({rel})", ""]
    if split_results:
        out_lines += [
            "## 4. Against an independent half of the counts (count splitting)",
            "",
            "In sections 1-3 the truth is the counts the input was pooled from: a block's truth pixels sum to its "
            "input count, noise included, so a map that keeps each block's measured count (bicubic + mass, "
            "`poisson=False`) is scored against the same counting noise it copies, and the default call's map of "
            "expected counts (`poisson=True`: counts as Poisson draws of the rate) against noise it is built to "
            "remove. Here each case's truth counts are split by binomial thinning (p = 1/2, seed 0: "
            "`default_call.count_split`) into two independent Poisson halves of half the depth; the input is the "
            "LR pooling of one half and the truth is the other, so the rows are scored on the rate alone. The noise "
            "ceiling is computed from the half, as for any truth.",
            "",
            A.summary_table([(r.split, r.split_rows, r.split_ceiling) for r in split_results]),
            "What the default call's self-check chose on each split case: "
            + "; ".join(
                f"{r.split.name}: {row.note}"
                for r in split_results
                for row in r.split_rows
                if row.method == DEFAULT_LABEL and row.note
            )
            + ".",
            "",
        ]
    text = "\n".join(out_lines)
    return B.publish(text, out)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="HER2ST C2 only, 8 genes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="the reliability figure (PNG)")
    p.add_argument("--sections", nargs="+", default=None, help="HER2ST sections (default all; quick: C2)")
    p.add_argument("--cases", nargs="+", default=None, help="subset of: her2st dbit vizgen synthetic")
    p.add_argument("--genes", type=int, default=None, help="genes per case (default 20; quick 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--no-split",
        action="store_true",
        help="leave out section 4 (input and truth from independent halves of the counts)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="weights for super_resolve (a shipped name or a directory; default: model=None)",
    )
    args = p.parse_args(argv)
    q = args.quick
    sections = args.sections or (["C2"] if q else list(A.HER2ST_SECTIONS))
    kinds = set(args.cases or (["her2st"] if q else ["her2st", "dbit", "vizgen", "synthetic"]))
    n_genes = args.genes or (8 if q else 20)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    log = A.progress_log(t_start)
    A.quiet_pixel_warning()
    k = stsr.models.ModelConfig().image_scale
    cases = A.build_cases(kinds, sections, n_genes, k, synthetic_size=600.0, public=True)
    log(f"built {len(cases)} cases")
    results = []
    for case in cases:
        results.append(evaluate_case(case, model=args.model, log=log, split=not args.no_split))
        log(f"scored {case.name}")
    if args.figure is not None:
        reliability_figure(results, args.figure)

    first = next((r.default.provenance for r in results if r.default is not None), {})
    auto = first.get("device_defaults") or {}
    settings = ", ".join(f"{k}={v!r}" for k, v in auto.items()) or f"weights {first.get('model')!r}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python benchmarks/default_call.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [
        "# What the default call gives: `stsr.tl.super_resolve(sdata, image_key, genes)`",
        "",
        f"Generated {when} by `{cmd.strip()}` ({'quick' if q else 'full'} run; stsr {stsr.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}, {args.threads} thread(s), total {time.time() - t_start:.0f} s).",
        "",
        f"Settings: {n_genes} genes per case (most expressed). Every case is a user's SpatialData (the image cropped "
        "to the measured area, the LR blocks as square bins, a table of their raw counts; "
        "`benchmarks/accuracy.py` `case_sdata`), cropped to whole blocks. The public calls run with every argument "
        "at its default except `pixel_size` (the truth's pixel, so that the map read back lies on the truth's grid) "
        f"and `progress=False`: `super_resolve` with `model=None` and the settings the device sets (here: "
        f"{settings}), i.e. the semantic prior and the self-check on; `prior_map` with its default strength. Bicubic + mass and TESLA run "
        "in memory on the case's arrays. Wall time: the call and reading the map back.",
        "",
        "Splits: the shipped weights (both `default` and `fast`) saw synthetic seeds and DBiT-seq (x2 pairs); HER2ST, Vizgen and synthetic "
        "seed 42 are unseen, the DBiT rows measure fit. The self-check and `prior_map` use only the case's LR "
        "input.",
        "",
        "Notes:",
        "",
        f"- {B.TESLA_NOTE}"
        if not B.tesla_available()
        else "- TESLA (teslaforst) run as in `benchmarks/accuracy.py`.",
        "",
    ]
    return report(results, header=header, figure=args.figure, out=args.out)


if __name__ == "__main__":
    main()

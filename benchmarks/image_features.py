"""Image features of the semantic prior: the prior map's accuracy with ``"densenet121"``, ``"nuclei"`` and both, on
every real case of the accuracy benchmark, the prior read-out bound of each feature set, and what they cost.

Run::

    python benchmarks/image_features.py [--quick] [--cases her2st dbit vizgen] [--sections C2 C3] [--genes 20]
        [--threads 2] [--out docs/benchmarks/image_features.md]

For every real case of ``benchmarks/accuracy.py`` (``build_cases(..., public=True)``: HER2ST sections at factor 2,
DBiT-seq at factors 2 and 4, Vizgen binned at 10 and 5 µm; the same truth, genes and LR input), the case becomes a
user's SpatialData (``accuracy.case_sdata``: Vizgen's DAPI/polyT image as a virtual H&E) and the public call
``stsr.tl.prior_map(sdata, image, genes, pixel_size=<the truth's>, image_features=...)`` runs with each feature set;
the map read back on the truth's grid is scored with ``accuracy.score`` (Pearson r and within-block r, mean over
genes) and the whole call is timed.

The **prior read-out bound** is that of ``benchmarks/prior_readout.py`` ("in sample"): the best, over strengths 0.5,
1 and 2, of bicubic + mass reweighted by a ridge read-out fitted on the HR truth itself (20 principal components of
the features; and of the features with their 3 x 3 neighbourhood mean), scored on within-block r. It is not a method
(it sees the truth) but an optimistic bound for any read-out of those features. The features for the bound are
computed in memory on the case's teacher image (``Case.teacher_image``, read as the public functions read it): the
DenseNet by :func:`stsr.models.teacher_features`, the nuclei by :class:`stsr.models.prior.NucleiEncoder` at that
image's µm per pixel, both by concatenation.

The cost section times the built-in encoders on a 2048 x 2048 crop of HER2ST C2 at the teacher's resolution
(``stsr.models.TEACHER_UM_PER_PX``, 0.75 µm per pixel): seconds per megapixel for the DenseNet (``--threads``) and the
nuclei (1 and ``--threads`` threads), and the estimate per Visium capture area (6.5 x 6.5 mm at 0.75 µm per pixel,
about 75 MP).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)
import baselines as B  # noqa: E402
import prior_readout as PR  # noqa: E402

import stsr  # noqa: E402
from stsr import metrics as M  # noqa: E402
from stsr.models.prior import NucleiEncoder  # noqa: E402

#: The feature sets compared: label -> ``image_features=`` of the public call.
FEATURE_SETS: dict[str, Any] = {
    "densenet121": "densenet121",
    "nuclei": "nuclei",
    "densenet121 + nuclei": ["densenet121", "nuclei"],
}
BOUND_STRENGTHS = (0.5, 1.0, 2.0)
GROUPS = ("HER2ST", "DBiT", "Vizgen")
CROP = 2048  # px per side of the cost crop
CAPTURE_AREA_MM = 6.5  # Visium capture area side


def group_of(name: str) -> str:
    """The case group of a case name (HER2ST, DBiT, Vizgen)."""
    return next(g for g in GROUPS if name.startswith(g))


# ---------------------------------------------------------------------------------------------------- accuracy
def hr_um(case: A.Case) -> float:
    """µm per HR pixel of the case's truth."""
    slide = case.slide
    return float(slide.grid.pixel_size * A.image_um_per_px(slide.sdata, slide.image_key))


def case_features(case: A.Case) -> dict[str, np.ndarray]:
    """Features of each feature set on the case's HR grid, from its teacher image (for the read-out bound)."""
    op = case.pair.observation
    img = case.teacher_image
    um = hr_um(case) / (img.shape[-1] // op.shape[1])  # µm per pixel of the teacher image
    dense = stsr.models.teacher_features(img, op.shape)
    nuclei = NucleiEncoder(um).features(img, op.shape)
    return {"densenet121": dense, "nuclei": nuclei, "densenet121 + nuclei": np.concatenate([dense, nuclei])}


def readout_bound(case: A.Case, feats: np.ndarray) -> dict[str, tuple[float, float, int]]:
    """``prior_readout.py``'s in-sample bound: the metrics of the read-out fitted on the truth that reaches the
    highest within-block r (over the two in-sample read-outs and :data:`BOUND_STRENGTHS`)."""
    lr, op, mask = case.lr, case.pair.observation, case.mask
    truth = case.pair.hr.double().numpy()
    base = B.bicubic_mass(lr, op)
    best: dict[str, tuple[float, float, int]] | None = None
    for f in (feats, np.concatenate([feats, PR.neighbourhood_mean(feats, mask, 3)])):
        prior = PR.truth_readout(f, truth, mask, PR.ORACLE_COMPONENTS)
        for s in BOUND_STRENGTHS:
            v = A.score(case, stsr.models.apply_prior(base, prior, lr, op, strength=s))
            if best is None or v["within_block"][0] > best["within_block"][0]:
                best = v
    assert best is not None
    return best


def evaluate(case: A.Case, with_bound: bool, log: Any) -> dict[str, Any]:
    """Per feature set: the public prior map's metrics and seconds, and (``with_bound``) the read-out bound."""
    user = A.case_sdata(case)
    out: dict[str, Any] = {"maps": {}, "seconds": {}, "bound": {}, "errors": {}}
    for label, spec in FEATURE_SETS.items():
        t0 = time.time()
        try:
            pred = user.run(stsr.tl.prior_map, "stsr_prior", progress=False, image_features=spec)
        except Exception as err:  # noqa: BLE001  (reported in the table)
            out["errors"][label] = f"{type(err).__name__}: {err}"
            log(f"{case.name}: prior_map({label}) failed: {err}")
            continue
        out["seconds"][label] = time.time() - t0
        out["maps"][label] = A.score(case, pred)
        log(f"{case.name}: prior_map({label}) {out['seconds'][label]:.0f} s")
    out["reference"] = {
        "bicubic + mass": A.score(case, B.bicubic_mass(case.lr, case.pair.observation)),
    }
    out["ceiling"] = M.summarize(
        M.noise_ceiling(case.pair.hr.double().numpy(), case.pair.observation, case.mask)
    )
    if with_bound:
        t0 = time.time()
        for label, feats in case_features(case).items():
            out["bound"][label] = readout_bound(case, feats)
        log(f"{case.name}: read-out bounds {time.time() - t0:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------------- cost
def cost_crop() -> tuple[np.ndarray, float]:
    """A ``CROP`` x ``CROP`` RGB crop (uint8) of HER2ST C2 at ``TEACHER_UM_PER_PX``, centred on the spots; its µm/px."""
    sdata = stsr.datasets.her2st("C2")
    um_img = A.image_um_per_px(sdata, "he")
    target = stsr.models.TEACHER_UM_PER_PX
    level = A._level0(sdata["he"])
    # the spots' centre in the image's pixels
    centre_global = np.array(sdata["spots"].geometry.union_all().centroid.coords[0])[::-1]  # (y, x)
    m_spots = A._affine_yx(sdata["spots"])
    m_img = np.linalg.inv(A._affine_yx(level))
    cy, cx = (m_img @ m_spots @ np.r_[centre_global, 1.0])[:2]
    side = int(round(CROP * target / um_img))
    y0 = int(np.clip(cy - side / 2, 0, level.shape[1] - side))
    x0 = int(np.clip(cx - side / 2, 0, level.shape[2] - side))
    raw = torch.as_tensor(np.asarray(level.data[:, y0 : y0 + side, x0 : x0 + side])).float()
    img = F.interpolate(raw[None], size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)[0]
    return img.clamp(0, 255).round().to(torch.uint8).numpy(), float(target)


def time_encoder(fn: Any, threads: int, repeats: int = 1) -> float:
    """Seconds of ``fn()`` with ``threads`` torch threads (the best of ``repeats``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return float(best)
    finally:
        torch.set_num_threads(before)


def cost(threads: int) -> list[tuple[str, int, float]]:
    """``(encoder, threads, seconds per megapixel)`` on the crop of :func:`cost_crop`."""
    img, um = cost_crop()
    hr = (CROP // 8, CROP // 8)  # the default 8 image px per HR pixel
    mp = CROP * CROP / 1e6
    stsr.models.load_teacher()  # weights read once, before timing
    dense = stsr.models.prior.DenseNetEncoder()
    nuclei = NucleiEncoder(um)
    rows = [("densenet121", threads, time_encoder(lambda: dense.features(img, hr), threads) / mp)]
    for t in sorted({1, threads}):
        rows.append(("nuclei", t, time_encoder(lambda: nuclei.features(img, hr), t) / mp))
    return rows


# ---------------------------------------------------------------------------------------------------- report
def _cell(v: dict | None) -> str:
    return "n/a" if v is None else f"{v['pearson'][0]:.3f} / {v['within_block'][0]:.3f}"


def accuracy_tables(results: list[tuple[A.Case, dict]], with_bound: bool) -> list[str]:
    """Markdown: the prior map per case and feature set (r / within-block r), the group means, the bounds."""
    labels = list(FEATURE_SETS)
    lines = [
        "## Prior map: r / within-block r (mean over genes)",
        "",
        "`stsr.tl.prior_map(..., image_features=X)`; bicubic + mass and the noise ceiling for reference.",
        "",
        "| case | noise ceiling | bicubic + mass | " + " | ".join(f"`{x}`" for x in labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for case, res in results:
        cells = [_cell(res["maps"].get(label)) for label in labels]
        cells = [
            c if label not in res["errors"] else f"failed: {res['errors'][label][:80]}"
            for c, label in zip(cells, labels)
        ]
        lines.append(
            f"| {case.name} | {_cell(res['ceiling'])} | {_cell(res['reference']['bicubic + mass'])} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Mean per case group (r / within-block r):", ""]
    lines += [
        "| group | cases | bicubic + mass | " + " | ".join(f"`{x}`" for x in labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for g, members in group_means(results).items():
        lines.append(
            f"| {g} | {members['n']} | {members['bicubic + mass']} | "
            + " | ".join(members[label] for label in labels)
            + " |"
        )
    lines.append("")
    lines += [
        "Seconds per public call (whole `prior_map`, including reading the image and writing the map):",
        "",
    ]
    lines += ["| case | " + " | ".join(f"`{x}`" for x in labels) + " |", "|---|" + "---|" * len(labels)]
    for case, res in results:
        lines.append(
            f"| {case.name} | "
            + " | ".join(
                f"{res['seconds'][label]:.0f}" if label in res["seconds"] else "n/a" for label in labels
            )
            + " |"
        )
    lines.append("")
    if with_bound:
        lines += [
            "## Prior read-out bound: r / within-block r",
            "",
            "The read-out fitted on the truth itself (`benchmarks/prior_readout.py`, in sample: ridge on 20 "
            "principal components of the features, or of the features and their 3 x 3 neighbourhood mean; the "
            "best of strengths 0.5, 1, 2 on within-block r), reweighting bicubic + mass. Not a method: an "
            "optimistic bound for what a read-out of these features can reach. *Gap closed* = (within-block r of "
            "the bound - bicubic + mass) / (noise ceiling - bicubic + mass).",
            "",
            "| case | "
            + " | ".join(f"`{x}`" for x in labels)
            + " | gap closed: "
            + " / ".join(labels)
            + " |",
            "|---|" + "---|" * (len(labels) + 1),
        ]
        gaps: dict[str, list[float]] = {label: [] for label in labels}
        for case, res in results:
            base = res["reference"]["bicubic + mass"]["within_block"][0]
            ceil = res["ceiling"]["within_block"][0]
            row = []
            for label in labels:
                g = (res["bound"][label]["within_block"][0] - base) / (ceil - base)
                gaps[label].append(g)
                row.append(f"{g:.2f}")
            lines.append(
                f"| {case.name} | "
                + " | ".join(_cell(res["bound"].get(label)) for label in labels)
                + " | "
                + " / ".join(row)
                + " |"
            )
        lines.append(
            "| mean | "
            + " | ".join("" for _ in labels)
            + " | "
            + " / ".join(f"{np.mean(gaps[label]):.2f}" for label in labels)
            + " |"
        )
        lines.append("")
    return lines


def group_means(results: list[tuple[A.Case, dict]]) -> dict[str, dict[str, Any]]:
    """Per case group: the number of cases and the mean r / within-block r of each feature set (strings)."""
    out: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        members = [res for case, res in results if group_of(case.name) == g]
        if not members:
            continue
        row: dict[str, Any] = {"n": len(members)}
        for label in ["bicubic + mass", *FEATURE_SETS]:
            vals = [
                (res["reference"] | res["maps"]).get(label)
                for res in members
                if label in (res["reference"] | res["maps"])
            ]
            if len(vals) < len(members):
                row[label] = "n/a"
                continue
            row[label] = (
                f"{np.mean([v['pearson'][0] for v in vals]):.3f} / "
                f"{np.mean([v['within_block'][0] for v in vals]):.3f}"
            )
        out[g] = row
    return out


def verdict(results: list[tuple[A.Case, dict]]) -> str:
    """Whether adding the nuclei to the DenseNet helps on average without losing on any case group (issue 23's rule
    for making it a default), on within-block r and r."""
    both, dense = "densenet121 + nuclei", "densenet121"
    diffs: dict[str, dict[str, list[float]]] = {}
    for case, res in results:
        if both not in res["maps"] or dense not in res["maps"]:
            continue
        for key in ("pearson", "within_block"):
            d = res["maps"][both][key][0] - res["maps"][dense][key][0]
            diffs.setdefault(group_of(case.name), {}).setdefault(key, []).append(d)
    if not diffs:
        return "No case ran both feature sets."
    parts = []
    helps = True
    for g, d in diffs.items():
        mw, mr = np.mean(d["within_block"]), np.mean(d["pearson"])
        parts.append(f"{g} {mr:+.3f} / {mw:+.3f}")
        helps &= mw >= 0 and mr >= 0
    allw = np.mean([x for d in diffs.values() for x in d["within_block"]])
    allr = np.mean([x for d in diffs.values() for x in d["pearson"]])
    helps &= allw > 0 and allr > 0
    return (
        f"`densenet121 + nuclei` minus `densenet121`, r / within-block r, mean per group: {'; '.join(parts)}; "
        f"over all cases {allr:+.3f} / {allw:+.3f}. Issue 23's rule (helps on average without losing on any case "
        f"group): **{'met' if helps else 'not met'}**"
        + (f" on the groups run here ({', '.join(diffs)})" if len(diffs) < len(GROUPS) else "")
        + "."
    )


def cost_lines(rows: list[tuple[str, int, float]]) -> list[str]:
    """Markdown: seconds per megapixel and the estimate per Visium capture area."""
    um = stsr.models.TEACHER_UM_PER_PX
    area_mp = (CAPTURE_AREA_MM * 1000 / um) ** 2 / 1e6
    lines = [
        "## Cost of the built-in encoders (CPU)",
        "",
        f"A {CROP} x {CROP} crop of HER2ST C2 at {um:g} µm per pixel (the teacher's resolution), centred on the "
        f"spots; the encoder's `features` on the crop alone (no SpatialData, no read-out), one run. Per Visium "
        f"capture area: {CAPTURE_AREA_MM:g} x {CAPTURE_AREA_MM:g} mm at {um:g} µm per pixel = {area_mp:.0f} MP, "
        "all of it read (the prior reads only tissue windows, so a section covering part of the area costs less). "
        "The machine was shared with other jobs during the run, so these are upper bounds. GPU: not measured here.",
        "",
        "| encoder | torch threads | s per MP | min per capture area (CPU) |",
        "|---|---|---|---|",
    ]
    for name, threads, spm in rows:
        lines.append(f"| `{name}` | {threads} | {spm:.2f} | {spm * area_mp / 60:.1f} |")
    lines += [
        "",
        "`nuclei` is mostly scikit-image / scipy code, which torch's thread setting does not parallelise (only "
        "the final area average is torch); the difference between its two rows is largely the load of the shared "
        "machine.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="HER2ST C2 only")
    p.add_argument("--cases", nargs="+", default=None, help="subset of: her2st dbit vizgen (default all)")
    p.add_argument("--sections", nargs="+", default=None, help="HER2ST sections (default all)")
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bound", action="store_true", help="skip the prior read-out bound")
    p.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks" / "image_features.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    A.quiet_pixel_warning()
    t_start = time.time()
    log = A.progress_log(t_start)
    kinds = set(args.cases or (["her2st"] if args.quick else ["her2st", "dbit", "vizgen"]))
    sections = args.sections or (["C2"] if args.quick else list(A.HER2ST_SECTIONS))
    results = []
    # one case at a time: the cases of a dataset share its SpatialData, so they are built together
    for kind in ("her2st", "dbit", "vizgen"):
        if kind not in kinds:
            continue
        for sec in sections if kind == "her2st" else [None]:
            built = A.build_cases({kind}, [sec] if sec else [], args.genes, 8, public=True)
            for case in built:
                results.append((case, evaluate(case, not args.no_bound, log)))
                log(f"scored {case.name}")
    cost_rows = [] if args.no_cost else cost(args.threads)
    if cost_rows:
        log("timed the encoders")

    cmd = "python benchmarks/image_features.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Image features of the semantic prior: DenseNet121, nuclei, both",
        "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` ({'quick' if args.quick else 'full'} "
        f"run; stsr {stsr.__version__}, torch {torch.__version__}, {platform.machine()}, {args.threads} torch "
        f"thread(s), total {time.time() - t_start:.0f} s, on a machine shared with other jobs).",
        "",
        f"Cases: the real cases of `benchmarks/accuracy.py` (`build_cases(..., public=True)`), {args.genes} genes "
        "each (most expressed), the same truth and LR input. Each row is the public call `stsr.tl.prior_map(sdata, "
        "image, genes, pixel_size=<the truth's pixel>, image_features=X)` on the case's SpatialData "
        "(`accuracy.case_sdata`), every other argument at its default; Vizgen's DAPI/polyT image is given as a "
        "virtual H&E (DAPI as haematoxylin, polyT as eosin), so `nuclei` segments DAPI-derived 'haematoxylin'; "
        "DBiT-seq's bright-field image is greyscale (the same value in R, G and B), so colour deconvolution "
        "separates no stain there and `nuclei` reads darkness.",
        "",
        "Decision (issue 23): " + verdict(results),
        "",
    ]
    lines += accuracy_tables(results, not args.no_bound)
    if cost_rows:
        lines += cost_lines(cost_rows)
    return B.publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

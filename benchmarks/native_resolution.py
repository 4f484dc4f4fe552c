"""HER2ST at the model's native resolution: the public functions on a fine grid, pooled back to the spots.

The HER2ST cases of ``benchmarks/accuracy.py`` score every method on the spot lattice itself (one HR pixel per 200 µm
lattice position, the LR input pools 2 x 2 spots). There a 100 µm spot is a whole pixel, and the model reads the
H&E at 50 µm per image pixel. This script instead runs what a user runs on such a slide: the section as a SpatialData
whose LR observations are 400 µm square bins, each holding the counts of its 2 x 2 block of spots (the blocks of the
accuracy benchmark, :func:`accuracy.case_sdata`), and :func:`stsr.tl.prior_map` / :func:`stsr.tl.super_resolve` on
an HR grid of ``--pixel-size`` µm (default 10, a tenth of a spot's diameter: the README's quick start gives 10 µm
pixels on HER2ST). The map is read back from ``sdata[key_added]``, pooled over each measured spot's disk
(:func:`stsr.pp.spots_observation_model` on the map's grid) and scored against the measured spots with the metrics
of the accuracy benchmark. Methods:

- lattice baselines (as in ``accuracy.py``, in memory): bicubic + mass, TESLA (when installed) and bicubic + mass x
  semantic prior;
- fine interpolation (in memory): the bin densities interpolated onto the fine grid
  (``ObservationModel.interpolate`` of the bins' operator) and projected onto the bin sums;
- the prior map: ``stsr.tl.prior_map(sdata, image, genes, pixel_size=...)``, every other argument at its default;
- the default call (``--default-call``): ``stsr.tl.super_resolve(sdata, image, genes, pixel_size=...)``, every other
  argument at its default (the device's model and settings, the semantic prior and the self-check); the report adds
  what its self-check chose;
- stsr at native resolution (``--model``, a shipped name or a weights directory): ``stsr.tl.super_resolve(...,
  model=..., steps=..., cache_interval=...)`` (1 sample), alone and with ``semantic_prior=True`` (strength 0.5).
  ``super_resolve`` runs models that take the interpolated spots as LR input; a prior-guided model
  (``_guided.py``, an experiment without shipped weights) is refused, and its rows say so.

Each section is cropped to whole 2 x 2 blocks of its lattice (:func:`accuracy.whole_blocks`), so that every block is
one bin. Run::

    python benchmarks/native_resolution.py [--sections A1 C2] [--model fast] [--no-model] [--default-call]
        [--genes 20] [--pixel-size 10] [--out benchmarks/results/native_resolution.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402  (sets STSR_DATA_DIR like the accuracy benchmark)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.observation import Grid  # noqa: E402
from stsr.tl import _semantic_prior  # noqa: E402

PRIOR_STRENGTH = 0.5
MAP_KEY = "native_map"
DEFAULT_CALL_LABEL = "stsr.tl.super_resolve (defaults), pooled to spots"


def element_grid(sdata: Any, key: str, frame: str) -> Grid:
    """The pixels of raster ``sdata[key]`` as a :class:`Grid` in the intrinsic frame of element ``frame`` (an image,
    or shapes placed like one)."""
    level = A._level0(sdata[key])
    m = np.linalg.inv(A._affine_yx(sdata[frame])) @ A._affine_yx(level)
    if not (np.isclose(m[0, 0], m[1, 1], rtol=1e-6) and abs(m[0, 1]) + abs(m[1, 0]) < 1e-9 * abs(m[0, 0])):
        raise ValueError(f"{key!r} is not a grid of square, axis-aligned pixels over {frame!r}.")
    return Grid(tuple(level.shape[-2:]), float(m[0, 0]), (float(m[0, 2]), float(m[1, 2])))


class Section:
    """One HER2ST section: its lattice case, the user's slide (bins of 2 x 2 spots) and the measured spots."""

    def __init__(self, section: str, n_genes: int, k: int, pixel_size: float) -> None:
        self.case = A.her2st_case(section, n_genes, k, public=True)
        self.user = A.case_sdata(self.case)
        self.pixel_size = float(pixel_size)
        self.source = self.case.slide.sdata  # the dataset: its image "he", spots and table
        table = self.source["table"]
        li, lj = (table.obs[c].to_numpy().astype(int) for c in ("array_row", "array_col"))
        li, lj = li - li.min(), lj - lj.min()
        h, w = self.case.pair.shape
        self.inside = (li < h) & (lj < w)  # spots of the lattice kept by the crop to whole blocks
        self.li, self.lj = li[self.inside], lj[self.inside]
        ids = table.obs["instance_id"].to_numpy()[self.inside]
        self.spot_rows = self.source["spots"].index.get_indexer(ids)  # table row -> row of the spots element
        truth = self.case.pair.hr.double().numpy()
        genes = list(self.case.pair.genes)
        counts = table[:, genes].X[np.flatnonzero(self.inside)]
        counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
        if not np.allclose(truth[:, self.li, self.lj], counts.T):
            raise RuntimeError(f"{section}: the spots do not map onto the lattice truth")

    def on_lattice(self, fine: np.ndarray, grid: Grid) -> np.ndarray:
        """A map on ``grid`` (frame of the dataset's image) pooled over each measured spot's disk, on the lattice."""
        op = stsr.pp.spots_observation_model(self.source, "spots", grid, "he")
        pooled = op.pool(np.asarray(fine, np.float64))[:, self.spot_rows]
        out = np.zeros(self.case.pair.hr.shape)
        out[:, self.li, self.lj] = pooled
        return out

    def public(self, fn: Any, provenance: dict | None = None, **kwargs: Any) -> tuple[np.ndarray, Grid]:
        """``fn(sdata, image, genes, pixel_size=..., key_added=MAP_KEY, **kwargs)``: the map it wrote, read back from
        ``sdata[MAP_KEY]`` (removed afterwards), and its grid in the frame of the dataset's image; ``provenance``
        receives the call's provenance record."""
        u = self.user
        _semantic_prior.clear_scores_cache()  # timed as a first call on the slide (no image scores kept)
        try:
            fn(
                u.sdata,
                u.image_key,
                u.genes,
                pixel_size=self.pixel_size,
                key_added=MAP_KEY,
                progress=False,
                **kwargs,
            )
            grid = element_grid(u.sdata, MAP_KEY, A.SLIDE_BINS)  # the bins carry the dataset image's frame
            if provenance is not None:
                provenance.update(u.sdata.attrs.get("stsr", {}).get(MAP_KEY, {}))
            return np.asarray(A._level0(u.sdata[MAP_KEY]).data, np.float64), grid
        finally:
            for key in (MAP_KEY, f"{MAP_KEY}_std"):
                if key in u.sdata:
                    del u.sdata[key]

    def bins_operator(self, grid: Grid) -> Any:
        """The user's bins on ``grid`` (frame of the dataset's image), from :func:`stsr.pp.spots_observation_model`."""
        u = self.user
        image = A._level0(u.sdata[u.image_key])
        # the same pixels in the frame of the slide's (cropped) image
        m = np.linalg.inv(A._affine_yx(image)) @ A._affine_yx(u.sdata[A.SLIDE_BINS])
        local = Grid(grid.shape, grid.pixel_size, tuple(m[:2, :2] @ np.asarray(grid.origin) + m[:2, 2]))
        return stsr.pp.spots_observation_model(u.sdata, A.SLIDE_BINS, local, u.image_key)

    def bin_counts(self) -> np.ndarray:
        """``(genes, bins)`` the bins' counts of the scored genes, in the bins' order (the table also holds each
        bin's count of the other genes)."""
        u = self.user
        return np.asarray(u.sdata[A.SLIDE_TABLE][:, u.genes].X.toarray().T, np.float64)

    def fine_interpolation(self, grid: Grid) -> np.ndarray:
        """The bins' densities interpolated onto ``grid`` (frame of the dataset's image) and projected onto the bin
        sums (in memory; :meth:`bins_operator`)."""
        bins, lr = self.bins_operator(grid), self.bin_counts()
        return bins.project(bins.interpolate(lr), lr, mode="multiplicative")


def section_rows(
    section: str, args: argparse.Namespace, models: dict[str, Any], chosen: dict[str, dict] | None = None
) -> dict[str, tuple[dict, float]]:
    """Method -> (metrics, seconds) on one HER2ST section; ``chosen`` receives the default call's provenance per
    model row (the self-check's choice)."""
    chosen = {} if chosen is None else chosen
    k = stsr.models.ModelConfig().image_scale
    sec = Section(section, args.genes, k, args.pixel_size)
    case = sec.case
    lr, op = case.lr, case.pair.observation
    rows: dict[str, tuple[dict, float]] = {}

    def add(label: str, fn: Any) -> Any:
        t = time.time()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001
            print(f"# {section}: {label} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            rows[label] = (None, time.time() - t)
            return None
        pred = out if isinstance(out, np.ndarray) else sec.on_lattice(*out)
        rows[label] = (A.score(case, pred), time.time() - t)
        print(f"# {section}: {label} ({rows[label][1]:.0f} s)", file=sys.stderr, flush=True)
        return out

    bm = add("bicubic + mass (lattice)", lambda: B.bicubic_mass(lr, op))
    if B.tesla_available():
        img = case.pair.image.numpy()
        add("TESLA (lattice)", lambda: B.tesla(lr, op, img))

    def lattice_prior() -> np.ndarray:
        feats = stsr.models.teacher_features(case.teacher_image, op.shape)
        prior = stsr.models.semantic_prior(feats, lr, op, mask=case.mask)
        return stsr.models.apply_prior(bm, prior, lr, op, strength=PRIOR_STRENGTH)

    add("bicubic + mass × semantic prior (lattice)", lattice_prior)
    prior_map = add("prior map (stsr.tl.prior_map), pooled to spots", lambda: sec.public(stsr.tl.prior_map))
    if prior_map is not None:
        grid = prior_map[1]
        add("fine interpolation, pooled to spots", lambda: (sec.fine_interpolation(grid), grid))

    def public_call(provenance: dict | None = None, **kw: Any) -> Any:
        return lambda: sec.public(stsr.tl.super_resolve, provenance=provenance, **kw)

    if args.default_call:
        add(DEFAULT_CALL_LABEL, public_call(chosen.setdefault(DEFAULT_CALL_LABEL, {})))
    for name, net in models.items():
        kw = {"model": net, "steps": args.steps, "cache_interval": args.cache_interval}
        # the diffusion core by itself, and on the prior map, without the self-check that may leave it out
        add(f"stsr core ({name}), 1 sample", public_call(self_check=False, semantic_prior=False, **kw))
        on_prior = {"self_check": False, "semantic_prior": True, "prior_strength": PRIOR_STRENGTH}
        add(f"stsr core ({name}) × semantic prior", public_call(**on_prior, **kw))
        # the default call with these weights: the self-check chooses the prior's strength and the core's share
        label = f"super_resolve(model={name}) default call"
        add(label, public_call(chosen.setdefault(label, {}), model=net))
    h, w = case.pair.shape
    for label, rec in chosen.items():
        print(
            f"# {section}: {label}: prior_strength {rec.get('prior_strength')}, diffusion_residual "
            f"{rec.get('diffusion_residual')}",
            file=sys.stderr,
            flush=True,
        )
    h, w = case.pair.shape
    print(
        f"# {section}: lattice {h} x {w}, {sec.user.n_bins} bins, {int(sec.inside.sum())} spots scored",
        file=sys.stderr,
        flush=True,
    )
    return rows


def _cell(v: dict | None) -> str:
    if v is None:
        return "failed"
    return f"{v['pearson'][0]:.3f} / {v['within_block'][0]:.3f} / {v['ssim'][0]:.3f}"


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(A.HER2ST_SECTIONS))
    p.add_argument("--genes", type=int, default=20)
    p.add_argument("--pixel-size", type=float, default=10.0, help="HR pixel in µm (pixel_size= of the calls)")
    p.add_argument(
        "--model",
        nargs="+",
        default=["default"],
        help="stsr weights for the native-resolution rows (model=): shipped names or weights directories",
    )
    p.add_argument("--no-model", action="store_true", help="skip the stsr rows of --model")
    p.add_argument(
        "--default-call",
        action="store_true",
        help="add the default call's row (super_resolve, no argument set)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache-interval", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    A.add_teacher_option(p)
    args = p.parse_args(argv)
    A.use_teacher_option(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    A.quiet_pixel_warning()
    models = (
        {} if args.no_model else {m: stsr.models.load(m) for m in args.model}
    )  # shipped names or directories
    chosen: dict[str, dict[str, dict]] = {s: {} for s in args.sections}
    results = {s: section_rows(s, args, models, chosen[s]) for s in args.sections}
    methods = list(dict.fromkeys(m for rows in results.values() for m in rows))
    lines = [
        "# HER2ST at native resolution (public functions on a fine grid, pooled back to the spots)",
        "",
        f"Command: `python benchmarks/native_resolution.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Run {_dt.datetime.now():%Y-%m-%d %H:%M}, {args.threads} threads, stsr {stsr.__version__}; "
        f"{args.genes} genes per section, HR grid {args.pixel_size:g} µm, semantic prior strength "
        f"{PRIOR_STRENGTH}, image teacher at {stsr.models.TEACHER_UM_PER_PX:g} µm per pixel. The slide: the H&E, "
        "the 2 x 2 blocks of spots as 400 µm square bins and a table of their counts; the stsr rows are "
        "`stsr.tl.prior_map` / `stsr.tl.super_resolve` on it (`pixel_size` set, the rest at defaults; the rows of "
        "--model also set model, steps and cache_interval), read back from `sdata[key_added]`. Cells: r / within-block r / SSIM against the "
        "measured spots (2 x 2 blocks as in `benchmarks/accuracy.py`).",
        "",
        "| method | " + " | ".join(results) + " | mean |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for meth in methods:
        vals = [results[s].get(meth, (None, 0.0))[0] for s in results]
        ok = [v for v in vals if v is not None]
        mean = (
            " / ".join(
                f"{np.mean([v[key][0] for v in ok]):.3f}" for key in ("pearson", "within_block", "ssim")
            )
            if len(ok) == len(vals)
            else "n/a"
        )
        lines.append(f"| {meth} | " + " | ".join(_cell(v) for v in vals) + f" | {mean} |")
    lines += ["", "Seconds per section (the public rows: the whole call, image teacher included):", ""]
    lines += ["| method | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for meth in methods:
        secs = [results[s].get(meth, (None, float("nan")))[1] for s in results]
        lines.append(f"| {meth} | " + " | ".join(f"{x:.0f}" for x in secs) + " |")
    lines += choice_lines(chosen)
    report = "\n".join(lines) + "\n"
    return B.publish(report, args.out)


def choice_lines(chosen: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines: per section and default-call row, what its self-check chose and estimated (provenance)."""
    out = []
    for section, rows in chosen.items():
        for label, rec in rows.items():
            check = rec.get("self_check") or {}
            if not out:
                out = [
                    "",
                    "What the self-check of each default call chose (provenance): the prior's strength (the check's "
                    "optimum from groups of bins in brackets), the diffusion residual kept, and its self-estimate "
                    "for the map's pixels (r / within r; the table above scores spots, a coarser unit):",
                    "",
                    "| section | row | prior strength (checked) | diffusion residual | self-estimated r / within r |",
                    "|---|---|---|---|---|",
                ]
            out.append(
                f"| {section} | {label} | {rec.get('prior_strength')} ({check.get('checked_optimum')}) | "
                f"{rec.get('diffusion_residual')} | {check.get('self_estimated_r')} / "
                f"{check.get('self_estimated_within_r')} |"
            )
    return out


if __name__ == "__main__":
    main()

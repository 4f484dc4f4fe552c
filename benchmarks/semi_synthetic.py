"""Real H&E, known truth at every HR pixel: the public functions on semi-synthetic HER2ST slides.

Real spot data has no truth below the spots. :func:`stsr.datasets.semi_synthetic` keeps a section's real H&E and
spots and generates an expression field from its own nuclei and tissue classes, pooled over the real spots as
Poisson counts. Each section here becomes such a slide (``--seed``: never a seed the training recipe used, 0 by
default there), and what a user runs is scored at every 10 µm pixel of the tissue against the field (the expected
counts, no noise): r across the tissue and r within each spot's footprint (``stsr.metrics.within_block_pearson``
with the spots' operator: the structure below the spots that only the histology can give). Methods:

- fine interpolation of the spots (in memory): the spots' densities interpolated onto the grid and projected onto
  their counts (``ObservationModel.interpolate`` / ``project`` of :func:`stsr.pp.spots_observation_model`);
- ``stsr.tl.prior_map(sdata, "he", genes)`` and ``stsr.tl.super_resolve(sdata, "he", genes)``, every argument at
  its default (the map lies on the truth's grid: both use a tenth of the spot diameter);
- with ``--model NAME_OR_PATH`` (repeatable): the diffusion core with those weights by itself
  (``super_resolve(model=..., self_check=False, semantic_prior=False, steps=1, cache_interval=1)``: one denoising
  step from noise, the network's posterior-mean estimate) and the default call with them
  (``super_resolve(model=...)``).

Splits: training recipes that use semi-synthetic or weak pairs train on C3-C6 and validate on C2; A1, A2 and B4 are
test sections (other patients). Rows of sections a model trained on are marked. Run::

    python benchmarks/semi_synthetic.py [--sections C2 A1 A2 B4] [--genes 20] [--seed 1000] [--model runs/x/model]
        [--out benchmarks/results/semi_synthetic.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import accuracy as A  # noqa: E402,F401  (sets STSR_DATA_DIR like the other benchmarks)
import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr.tl import _semantic_prior  # noqa: E402

MAP_KEY = "semi_map"
TRAINED_ON = ("C3", "C4", "C5", "C6")


class Slide:
    """One semi-synthetic section: the SpatialData, its truth, tissue and the spots' operator on the truth's grid."""

    def __init__(self, section: str, sdata: Any) -> None:
        self.section = section
        self.sdata = sdata
        self.spots_key = sdata.attrs["stsr_semi_synthetic"]["spots_key"]
        self.genes = list(sdata["table"].var_names)
        self.truth = np.asarray(sdata["hr_truth"]["scale0"].image.values, np.float64)
        self.tissue = np.asarray(sdata["tissue_classes"]["scale0"].image.values) > 0
        self.grid = stsr.tl.raster_grid(sdata, "hr_truth", "he")
        self.op = stsr.pp.spots_observation_model(sdata, self.spots_key, self.grid, "he")
        self.lr = np.asarray(sdata["table"].X.toarray().T, np.float64)

    @classmethod
    def of_section(cls, section: str, n_genes: int, seed: int) -> Slide:
        """The semi-synthetic slide of a HER2ST section."""
        her2st = stsr.datasets.her2st(section)
        return cls(section, stsr.datasets.semi_synthetic(her2st, "he", n_genes=n_genes, seed=seed))

    def score(self, pred: np.ndarray) -> dict[str, float]:
        r = stsr.metrics.pearson(pred, self.truth, self.tissue)
        w = stsr.metrics.within_block_pearson(pred, self.truth, self.op, self.tissue)
        return {"r": float(np.nanmean(r)), "within": float(np.nanmean(w))}

    def public(self, fn: Any, provenance: dict | None = None, **kwargs: Any) -> np.ndarray:
        """``fn(sdata, "he", genes, key_added=MAP_KEY, **kwargs)``: the map it wrote, on the truth's grid."""
        _semantic_prior.clear_scores_cache()  # each call timed as a first call on the slide
        try:
            fn(self.sdata, "he", self.genes, key_added=MAP_KEY, progress=False, **kwargs)
            grid = stsr.tl.raster_grid(self.sdata, MAP_KEY, "he")
            if grid.shape != self.grid.shape or not np.allclose(
                grid.origin, self.grid.origin, atol=1e-6 * grid.pixel_size
            ):
                raise RuntimeError(f"{self.section}: the map's grid {grid} is not the truth's {self.grid}")
            if provenance is not None:
                provenance.update(self.sdata.attrs.get("stsr", {}).get(MAP_KEY, {}))
            return np.asarray(self.sdata[MAP_KEY]["scale0"].image.values, np.float64)
        finally:
            for key in (MAP_KEY, f"{MAP_KEY}_std"):
                if key in self.sdata:
                    del self.sdata[key]

    def interpolation(self) -> np.ndarray:
        return self.op.project(self.op.interpolate(self.lr), self.lr, mode="multiplicative")


def section_rows(slide: Slide, models: dict[str, Any]) -> tuple[dict[str, tuple[dict | None, float]], dict]:
    rows: dict[str, tuple[dict | None, float]] = {}
    chosen: dict[str, dict] = {}

    def add(label: str, fn: Any) -> None:
        t = time.time()
        try:
            pred = fn()
        except Exception as err:  # noqa: BLE001
            print(
                f"# {slide.section}: {label} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True
            )
            rows[label] = (None, time.time() - t)
            return
        rows[label] = (slide.score(pred), time.time() - t)
        print(f"# {slide.section}: {label}: {rows[label]}", file=sys.stderr, flush=True)

    add("fine interpolation of the spots", slide.interpolation)
    add("stsr.tl.prior_map (defaults)", lambda: slide.public(stsr.tl.prior_map))
    label = "stsr.tl.super_resolve (defaults)"
    add(label, lambda: slide.public(stsr.tl.super_resolve, chosen.setdefault(label, {})))
    for name, net in models.items():
        core = {"model": net, "self_check": False, "semantic_prior": False, "steps": 1, "cache_interval": 1}
        add(f"core ({name}), 1 step", lambda core=core: slide.public(stsr.tl.super_resolve, **core))
        label = f"super_resolve(model={name})"
        add(
            label,
            lambda label=label, net=net: slide.public(
                stsr.tl.super_resolve, chosen.setdefault(label, {}), model=net
            ),
        )
    return rows, chosen


def main(argv: list[str] | None = None) -> str:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["C2", "A1", "A2", "B4"])
    p.add_argument("--genes", type=int, default=20)
    p.add_argument(
        "--seed", type=int, default=1000, help="seed of the generated genes (not one training used)"
    )
    p.add_argument("--model", action="append", default=[], help="weights (shipped name or directory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {m: stsr.models.load(m) for m in args.model}
    t0 = time.time()
    results: dict[str, dict] = {}
    choices: dict[str, dict] = {}
    for section in args.sections:
        slide = Slide.of_section(section, args.genes, args.seed)
        results[section], choices[section] = section_rows(slide, models)
    labels = list(dict.fromkeys(lbl for rows in results.values() for lbl in rows))
    cmd = "python benchmarks/semi_synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Semi-synthetic HER2ST: real H&E, truth at every 10 µm pixel",
        "",
        f"Generated {_dt.datetime.now():%Y-%m-%d %H:%M} by `{cmd.strip()}` (stsr {stsr.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}, {args.threads} thread(s), total {time.time() - t0:.0f} s).",
        "",
        f"Each section: `stsr.datasets.semi_synthetic(her2st(section), 'he', n_genes={args.genes}, "
        f"seed={args.seed})`; maps scored against the generated field over the tissue. Cells: r / within-spot r "
        "(mean over genes). Sections marked * are ones weak / semi-synthetic training recipes train on (C3-C6); C2 "
        "is their validation section, A1, A2, B4 test sections.",
        "",
        "| method | " + " | ".join(s + ("*" if s in TRAINED_ON else "") for s in args.sections) + " |",
        "|---|" + "---|" * len(args.sections),
    ]
    for lbl in labels:
        cells = []
        for s in args.sections:
            v = results[s].get(lbl, (None, 0))[0]
            cells.append("failed" if v is None else f"{v['r']:.3f} / {v['within']:.3f}")
        lines.append(f"| {lbl} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time (s) per call:", "", "| method | " + " | ".join(args.sections) + " |"]
    lines.append("|---|" + "---|" * len(args.sections))
    for lbl in labels:
        lines.append(
            f"| {lbl} | "
            + " | ".join(f"{results[s].get(lbl, (None, 0))[1]:.0f}" for s in args.sections)
            + " |"
        )
    lines += [
        "",
        "What the default calls' self-checks chose (prior strength, diffusion residual) and their provenance record "
        "(its self-estimated r is of the map against the counts a pixel would hold, Poisson noise included, not "
        "against the noise-free field scored above):",
        "",
    ]
    for s in args.sections:
        for lbl, rec in choices[s].items():
            est = rec.get("self_check", {}) if isinstance(rec.get("self_check"), dict) else {}
            lines.append(
                f"- {s}, {lbl}: prior {rec.get('prior_strength')}, residual {rec.get('diffusion_residual')}"
                + (f"; self-estimate {est}" if est else "")
            )
    return B.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()

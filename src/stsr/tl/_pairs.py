"""Training pairs (histology, HR truth, observation model) built from a SpatialData.

Two sources of HR truth:

- an HR raster (``hr_key``: e.g. the synthetic ``"hr_truth"``, transcripts binned with :func:`stsr.pp.bin_transcripts`,
  or a DBiT-seq grid): the LR input is its pooling over square blocks of ``factor`` pixels;
- real spots on a regular lattice (``table_key``: legacy ST, DBiT-seq): the measured spots are the HR truth (one HR
  pixel per lattice position) and their pooling over ``factor x factor`` blocks of spots is the LR input — the
  self-supervised pairs used to adapt a model to a slide without HR data.

And one source of weak supervision, at the geometry ``super_resolve`` works on (``table_key`` with ``weak=True``):
real spots of any layout (legacy ST, Visium) on ``super_resolve``'s HR grid with the histology read as the model
reads it; the spots are *hidden* measurements (their footprints and counts), and groups of them (``factor x factor``
on a square lattice, hexagons of 7 or 19 spots on a hexagonal one; :func:`stsr.tl._self_check.spot_groups`) are the
LR input. No HR truth exists: :func:`stsr.models.fit` scores the prediction pooled over each hidden spot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import spatialdata as sd
from scipy import sparse

from .._elements import element_affine, shared_coordinate_system
from .._validate import check_counts, check_element, check_genes
from ..models import TrainingPair
from ..observation import Grid, ObservationModel
from ..pp import spots_observation_model, tissue_mask
from ..pp._grid import ImageFrame, image_frame
from ..pp._spots import table_region
from ..pp._transforms import raster_levels
from ._image_tiles import ImageSource

__all__ = ["training_pair", "raster_grid"]

log = logging.getLogger("stsr")

#: A spot lattice is read along the axes of the image's grid frame while its rotation moves no spot by more than
#: this share of the pitch over the lattice's extent (``|sin(angle)| x positions``; HER2ST B and C sections: at most
#: 0.12). Beyond it the pair's grid is laid along the lattice and the image is read through the rotation: HER2ST
#: A2, registered into A1's frame, is turned by 5.6 degrees, which an axis-aligned fit misplaces by up to 1.2
#: pitches.
LATTICE_ROTATION_TOL = 0.25


def raster_grid(sdata: sd.SpatialData, raster_key: str, image_key: str) -> Grid:
    """The grid of a raster element, in the reference frame of the HR grids of ``image_key``
    (:func:`stsr.pp.hr_grid`: the image's pixels unless the image is rotated or sheared).

    The raster and the image must share a coordinate system in which the raster is an axis-aligned, isotropically
    scaled grid over that frame (as every stsr raster is).
    """
    raster = check_element(sdata, raster_key, "images")
    frame = _frame(sdata, raster_key, image_key)
    # raster intrinsic -> the image's grid frame (y, x)
    m = np.linalg.inv(frame.to_cs) @ element_affine(raster, frame.coordinate_system, raster_key)
    sy, sx = m[0, 0], m[1, 1]
    if abs(m[0, 1]) > 1e-6 * abs(sy) or abs(m[1, 0]) > 1e-6 * abs(sx) or not np.isclose(sy, sx, rtol=1e-3):
        raise ValueError(
            f"Raster {raster_key!r} is not an axis-aligned, isotropically scaled grid over image {image_key!r} "
            f"(raster->image matrix {m[:2, :2].tolist()})."
        )
    h, w = raster_levels(raster)[0].shape[-2:]
    return Grid((h, w), float(sy), (float(m[0, 2]), float(m[1, 2])))


def _frame(sdata: sd.SpatialData, key: str, image_key: str) -> ImageFrame:
    """The grid frame of ``image_key`` in the coordinate system it shares with element ``key``."""
    cs = shared_coordinate_system(sdata, [key, image_key], None)
    return image_frame(sdata, image_key, cs)


def _image(
    sdata: sd.SpatialData, image_key: str, grid: Grid, image_scale: int, frame: ImageFrame
) -> np.ndarray:
    levels = raster_levels(check_element(sdata, image_key, "images"))
    source = ImageSource(levels, grid, image_scale, frame.to_image)
    img = source.region(0, 0, *grid.shape).numpy()
    return np.round(img * 255).astype(np.uint8)


def training_pair(
    sdata: sd.SpatialData,
    image_key: str,
    *,
    hr_key: str | None = None,
    table_key: str | None = None,
    genes: Sequence[str] | None = None,
    factor: int = 4,
    spots_key: str | None = None,
    image_scale: int = 4,
    mask: bool | np.ndarray = True,
    name: str | None = None,
    weak: bool = False,
    pixel_size: float | None = None,
) -> TrainingPair:
    """Build a :class:`~stsr.models.TrainingPair` from a SpatialData.

    Parameters
    ----------
    sdata
        The slide (not modified).
    image_key
        Histology image.
    hr_key
        HR truth raster (c = genes, y, x; counts per pixel) overlaying the image. Exclusive with ``table_key``.
    table_key
        Spot table on a regular square lattice (``obs["array_row"]``, ``obs["array_col"]``): the measured spots
        become the HR truth, one HR pixel per lattice position; positions without a spot are masked out. A lattice
        turned against the image (a section registered into another's frame) is read along the lattice, the image
        through the rotation.
    genes
        Genes to keep (default: all of the raster, or all of the table).
    factor
        Side of the square blocks pooled into one LR observation.
    spots_key
        With ``hr_key``: pool the HR raster over these spots (disks, e.g. a Visium layout) instead of square blocks,
        so training sees the LR geometry of real slides.
    image_scale
        Image pixels per HR pixel for the model (``ModelConfig.image_scale``).
    mask
        ``True``: restrict losses to tissue (raster) or measured positions (spots); ``False``: everything; or an
        explicit ``(H, W)`` boolean array.
    name
        Label of the pair.
    weak
        With ``table_key``: build a weakly supervised pair at native geometry instead of a lattice pair: the HR grid
        and histology of :func:`stsr.tl.super_resolve`, the spots as hidden measurements
        (:attr:`~stsr.models.TrainingPair.spots`) and groups of ``factor`` spots a side as the LR input. ``genes``
        default to 50 as in ``super_resolve``; the pair's ``hr`` is a stand-in (the spots' interpolation).
    pixel_size
        With ``weak``: the HR pixel side, in units of the coordinate system (default as in ``super_resolve``: a
        tenth of the spot diameter, no finer than 2 µm).

    Returns
    -------
    The pair; its LR measurements are the pooling of the HR truth by its observation model (square blocks of
    ``factor``, or the disks of ``spots_key``).
    """
    if (hr_key is None) == (table_key is None):
        raise ValueError(
            "Pass exactly one of hr_key= (an HR raster) or table_key= (a spot table on a lattice)."
        )
    if weak:
        if table_key is None or spots_key is not None or isinstance(mask, np.ndarray) or mask is not True:
            raise ValueError(
                "weak=True builds a weakly supervised pair from a spot table (table_key=) on the tissue; "
                "hr_key=, spots_key= and mask= do not apply to it."
            )
        return _weak_pair(sdata, image_key, table_key, genes, pixel_size, factor, image_scale, name)
    if hr_key is not None:
        frame = _frame(sdata, hr_key, image_key)
        grid = raster_grid(sdata, hr_key, image_key)
        raster = raster_levels(sdata[hr_key])[0]
        available = [str(c) for c in raster.coords["c"].values]
        genes = check_genes(genes if genes is not None else available, available, where=f"raster {hr_key!r}")
        idx = [available.index(g) for g in genes]
        hr = np.asarray(raster.data[idx], dtype=np.float32)
        check_counts(hr.reshape(len(genes), -1).T, genes, None, what=f"Raster {hr_key!r}")
        cs = frame.coordinate_system
        valid = tissue_mask(sdata, image_key, grid=grid, coordinate_system=cs) if mask is True else None
    else:
        _, spots_key_t, _, _ = table_region(sdata, table_key, None, image_key)
        frame = _frame(sdata, spots_key_t, image_key)
        grid, hr, genes, valid, frame = _lattice(sdata, table_key, image_key, genes, frame)
        valid = valid if mask is True else None
    if isinstance(mask, np.ndarray):
        valid = np.asarray(mask, bool)
    image = _image(sdata, image_key, grid, image_scale, frame)
    if spots_key is not None:
        if hr_key is None:
            raise ValueError("spots_key= applies to HR rasters (hr_key=); spot tables are pooled in blocks.")
        op = spots_observation_model(sdata, spots_key, grid, image_key, frame.coordinate_system)
    else:
        op = ObservationModel.blocks(grid.shape, factor)
    return TrainingPair(
        image=image, hr=hr, observation=op, genes=list(genes), mask=valid, name=name or (hr_key or table_key)
    )


def _weak_pair(
    sdata: sd.SpatialData,
    image_key: str,
    table_key: str,
    genes: Sequence[str] | None,
    pixel_size: float | None,
    factor: int,
    image_scale: int,
    name: str | None,
) -> TrainingPair:
    """Spots hidden behind groups of them, on the HR grid and histology ``super_resolve`` uses."""
    from ._inputs import prepare_inputs, spot_totals
    from ._self_check import group_sums, spot_groups

    if int(factor) < 2:
        raise ValueError(
            f"factor= must be at least 2 spots a side for a weakly supervised pair, got {factor}."
        )
    channels = raster_levels(check_element(sdata, image_key, "images"))[0].shape[0]
    inputs = prepare_inputs(
        sdata,
        image_key,
        list(genes) if genes is not None else None,
        table_key=table_key,
        pixel_size=pixel_size,
        coordinate_system=None,
        image_channels=channels,
    )
    op, lr = inputs.observation, inputs.lr
    # empty spots (no count of any gene: off the tissue) are no measurement of it, as in prepare_inputs
    measured = spot_totals(sdata, table_key, inputs.spots_key) > 0
    groups = spot_groups(op, int(factor))
    groups[~measured] = -1
    _, groups[measured] = np.unique(groups[measured], return_inverse=True)
    labels = op.owner_map().copy()
    labels[labels == op.n_obs] = -1
    labels[(labels >= 0) & ~measured[np.clip(labels, 0, None)]] = -1
    stand_in = op.interpolate(lr).astype(np.float32)
    source = ImageSource(inputs.image_levels, inputs.grid, image_scale)
    image = np.round(source.region(0, 0, *inputs.grid.shape).numpy() * 255).astype(np.uint8)
    return TrainingPair(
        image=image,
        hr=stand_in,
        observation=op.grouped(groups),
        genes=list(inputs.genes),
        mask=inputs.mask,
        lr=group_sums(lr, groups),
        name=name or f"{table_key}-groups{factor}",
        spots=labels,
        spot_counts=lr,
    )


def _lattice(
    sdata: sd.SpatialData, table_key: str, image_key: str, genes: Sequence[str] | None, frame: ImageFrame
) -> tuple[Grid, np.ndarray, list[str], np.ndarray, ImageFrame]:
    """Spots on a square lattice as an HR raster, with the lattice fitted to the image from the spot centres.

    Returns the raster's grid, its values, genes and measured positions, and the frame the grid lies in: ``frame``
    when the lattice runs along its axes (:data:`LATTICE_ROTATION_TOL`), else a frame laid along the lattice (the
    image is then read through the rotation)."""
    table, spots_key, region_key, instance_key = table_region(sdata, table_key, None, image_key)
    for col in ("array_row", "array_col"):
        if col not in table.obs:
            raise ValueError(
                f"Table {table_key!r} has no obs[{col!r}]: spot-level training pairs need the spots' lattice "
                "positions (array_row, array_col)."
            )
    genes = check_genes(
        genes if genes is not None else list(table.var_names), table.var_names, where=f"table {table_key!r}"
    )
    centres, index = _centres_in_frame(sdata, spots_key, frame)
    rows = np.flatnonzero((table.obs[region_key] == spots_key).to_numpy())
    pos = index.get_indexer(table.obs[instance_key].to_numpy()[rows])
    if (pos < 0).any():
        raise ValueError(f"Table {table_key!r} rows do not all match spots of {spots_key!r}.")
    ar = table.obs["array_row"].to_numpy()[rows].astype(int)
    ac = table.obs["array_col"].to_numpy()[rows].astype(int)
    yx = centres[pos]
    r0, c0 = ar.min(), ac.min()
    shape = (int(ar.max() - r0 + 1), int(ac.max() - c0 + 1))
    pitch, angle = _lattice_steps(ar, ac, yx, spots_key, image_key)
    if np.cos(angle) > 0 and abs(np.sin(angle)) * max(shape) <= LATTICE_ROTATION_TOL:
        # least-squares fit: y = a * array_row + b, x = c * array_col + d (an axis-aligned square lattice)
        a, b = np.polyfit(ar, yx[:, 0], 1)
        c, d = np.polyfit(ac, yx[:, 1], 1)
        pitch = float((a + c) / 2)
        grid = Grid(shape, pitch, (a * (r0 - 0.5) + b, c * (c0 - 0.5) + d))
    else:
        frame = _lattice_frame(frame, ar - r0, ac - c0, yx, pitch, angle, shape)
        grid = Grid(shape, pitch, (0.0, 0.0))
        log.info(
            "the spot lattice of %r is rotated by %.2f degrees against image %r: the pair's grid is laid along the "
            "lattice and the image read through the rotation",
            spots_key,
            np.degrees(angle),
            image_key,
        )
    gidx = table.var_names.get_indexer(genes)
    x = table.X[rows][:, gidx]
    check_counts(x, genes, list(table.obs_names[rows]), what=f"Counts of table {table_key!r}")
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    hr = np.zeros((len(genes), *shape), np.float32)
    hr[:, ar - r0, ac - c0] = x.T
    valid = np.zeros(shape, bool)
    valid[ar - r0, ac - c0] = True
    return grid, hr, list(genes), valid, frame


def _lattice_steps(
    ar: np.ndarray, ac: np.ndarray, yx: np.ndarray, spots_key: str, image_key: str
) -> tuple[float, float]:
    """Pitch and rotation (radians; 0 when ``array_row`` runs along y and ``array_col`` along x) of a square
    lattice, from the least-squares affine fit of the spot centres ``yx`` to their lattice positions."""
    design = np.stack([ar, ac, np.ones(len(ar))], 1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, yx, rcond=None)
    step_r, step_c = coef[0], coef[1]  # (dy, dx) per array_row and per array_col
    pr, pc = float(np.hypot(*step_r)), float(np.hypot(*step_c))
    ortho = abs(float(step_r @ step_c)) / max(pr * pc, 1e-300)
    angle_r = float(np.arctan2(step_r[1], step_r[0]))
    angle_c = float(np.arctan2(-step_c[0], step_c[1]))
    turn = (angle_r - angle_c + np.pi) % (2 * np.pi) - np.pi  # 0 unless the lattice is mirrored (or sheared)
    if not np.isclose(pr, pc, rtol=0.05) or pr <= 0 or ortho > 0.05 or abs(turn) > 0.05:
        raise ValueError(
            f"The spots of {spots_key!r} do not form a square lattice over image {image_key!r} (one array_row step "
            f"moves {np.round(step_r, 4).tolist()} and one array_col step {np.round(step_c, 4).tolist()} pixels "
            "(y, x); a square lattice has steps of one length at right angles, with array_row along y and "
            "array_col along x up to a rotation). Check the table's obs['array_row'] / obs['array_col'] and the "
            "spots' transformation."
        )
    return (pr + pc) / 2, angle_c + turn / 2


def _lattice_frame(
    frame: ImageFrame,
    i: np.ndarray,
    j: np.ndarray,
    yx: np.ndarray,
    pitch: float,
    angle: float,
    shape: tuple[int, int],
) -> ImageFrame:
    """``frame`` turned by ``angle`` so that lattice position ``(i, j)`` is pixel ``(i, j)`` of a grid of ``pitch``
    with its origin at the frame's origin; the translation is the least-squares fit of the centres ``yx``."""
    from dataclasses import replace

    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    local = np.stack([(i + 0.5) * pitch, (j + 0.5) * pitch], 1)
    shift = (yx - local @ rot.T).mean(0)
    to_frame = np.eye(3)
    to_frame[:2, :2], to_frame[:2, 2] = rot, shift
    return replace(
        frame,
        to_cs=frame.to_cs @ to_frame,
        to_image=frame.to_image @ to_frame,
        shape=(shape[0] * pitch, shape[1] * pitch),
    )


def _centres_in_frame(sdata: sd.SpatialData, shapes_key: str, frame: ImageFrame) -> tuple[np.ndarray, Any]:
    """``(n, 2)`` ``(y, x)`` centroids of any shapes (circles, squares, polygons) in the image's grid ``frame``."""
    shapes = check_element(sdata, shapes_key, "shapes")
    m = np.linalg.inv(frame.to_cs) @ element_affine(shapes, frame.coordinate_system, shapes_key)
    c = shapes.geometry.centroid
    yx = np.stack([c.y.to_numpy(float), c.x.to_numpy(float), np.ones(len(c))])
    return (m @ yx)[:2].T, shapes.index

"""Resolve what :func:`stsr.tl.super_resolve` needs from a SpatialData: keys, genes, HR grid, spots, mask."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import spatialdata as sd

from .._constants import CS_GLOBAL
from .._validate import check_element, close_matches
from ..observation import Grid, ObservationModel
from ..pp import hr_grid, select_genes, tissue_mask
from ..pp._spots import spot_counts, spot_footprint, spot_geometry
from ..pp._transforms import raster_levels

__all__ = ["SlideInputs", "prepare_inputs", "find_spot_table"]

log = logging.getLogger("stsr")

#: Default HR pixel size as a fraction of the spot diameter.
PIXELS_PER_SPOT_DIAMETER = 10


@dataclass
class SlideInputs:
    """Everything the tile loop needs about one slide.

    Attributes
    ----------
    observation
        Disk operator of the spots on ``grid`` (observation ``i`` = ``lr[:, i]``).
    lr
        ``(n_genes, n_spots)`` measured counts.
    mask
        ``(height, width)`` area to predict (tissue, plus every spot).
    """

    sdata: sd.SpatialData
    image_key: str
    table_key: str
    spots_key: str
    genes: list[str]
    coordinate_system: str
    pixel_size: float
    grid: Grid
    observation: ObservationModel
    lr: np.ndarray
    mask: np.ndarray
    image_levels: list[Any]


def find_spot_table(sdata: sd.SpatialData, table_key: str | None) -> str:
    """The table of spot counts: ``table_key`` if given, else the only table annotating spots (circles or bins)."""
    from spatialdata.models import get_table_keys

    if table_key is not None:
        check_element(sdata, table_key, "tables")
        return table_key
    candidates = []
    for key, table in sdata.tables.items():
        try:
            region = get_table_keys(table)[0]
        except (ValueError, KeyError, TypeError):
            continue
        regions = [region] if isinstance(region, str) else list(region)
        if any(r in sdata.shapes and _is_spots(sdata.shapes[r], r) for r in regions):
            candidates.append(key)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            "No table annotates a shapes element of spots (circles or square bins). stsr needs spot counts in a table linked to "
            "the spots (TableModel.parse(..., region=<spots key>, region_key=..., instance_key=...)). "
            f"Tables present: {list(sdata.tables)}."
        )
    raise ValueError(f"Several tables annotate spots: {candidates}. Pass table_key= to choose one.")


def _coordinate_system(sdata: sd.SpatialData, image_key: str, spots_key: str, requested: str | None) -> str:
    from spatialdata.transformations import get_transformation

    image_cs = set(get_transformation(sdata[image_key], get_all=True))
    spot_cs = set(get_transformation(sdata[spots_key], get_all=True))
    shared = image_cs & spot_cs
    if requested is not None:
        if requested not in shared:
            raise ValueError(
                f"Coordinate system {requested!r} is not shared by image {image_key!r} ({sorted(image_cs)}) and "
                f"spots {spots_key!r} ({sorted(spot_cs)})."
                + (
                    f" Did you mean {close_matches(requested, shared)}?"
                    if close_matches(requested, shared)
                    else ""
                )
            )
        return requested
    if not shared:
        raise ValueError(
            f"Image {image_key!r} (coordinate systems {sorted(image_cs)}) and spots {spots_key!r} "
            f"({sorted(spot_cs)}) share no coordinate system, so the spots cannot be placed on the image. Add a "
            "transformation to a common coordinate system with spatialdata.transformations.set_transformation."
        )
    return CS_GLOBAL if CS_GLOBAL in shared else sorted(shared)[0]


def prepare_inputs(
    sdata: sd.SpatialData,
    image_key: str,
    genes: list[str] | str | None,
    *,
    table_key: str | None,
    pixel_size: float | None,
    coordinate_system: str | None,
    image_channels: int,
    n_default_genes: int = 50,
) -> SlideInputs:
    """Validate the inputs of :func:`stsr.tl.super_resolve` and build the grid, operator and LR counts.

    Raises clear errors (unknown keys or genes with close matches, no shared coordinate system, spots outside the
    image, genes without counts, images with the wrong number of channels) before anything is computed.
    """
    image = check_element(sdata, image_key, "images")
    levels = raster_levels(image)
    channels = [str(c) for c in levels[0].coords["c"].values] if "c" in levels[0].coords else []
    if levels[0].shape[0] != image_channels:
        raise ValueError(
            f"Image {image_key!r} has {levels[0].shape[0]} channel(s) {channels}, but the model expects "
            f"{image_channels} ({'RGB H&E' if image_channels == 3 else 'image channels'}). Pass an RGB H&E image, "
            f"or train a model for this image type with stsr.tl.train (ModelConfig(image_channels="
            f"{levels[0].shape[0]}))."
        )
    table_key = find_spot_table(sdata, table_key)
    table = sdata.tables[table_key]
    from spatialdata.models import get_table_keys

    spots_key = get_table_keys(table)[0]
    spots_key = spots_key if isinstance(spots_key, str) else list(spots_key)[0]
    cs = _coordinate_system(sdata, image_key, spots_key, coordinate_system)
    if genes is None:
        genes = select_genes(table, n_top=n_default_genes)
        log.info("super_resolve: %d highly expressed genes chosen (pass genes= to choose)", len(genes))
    elif isinstance(genes, str):
        genes = [genes]
    if pixel_size is None:
        # a tenth of the spot diameter, in units of the coordinate system
        from spatialdata.transformations import get_transformation

        from ..pp._transforms import affine_yx

        spots = sdata.shapes[spots_key]
        footprint = spot_footprint(spots, spots_key)
        radius = float(
            spots["radius"].iloc[0] if footprint == "disks" else np.sqrt(spots.geometry.area.iloc[0]) / 2
        )
        scale = np.sqrt(abs(np.linalg.det(affine_yx(get_transformation(sdata[spots_key], cs))[:2, :2])))
        pixel_size = 2 * radius * scale / PIXELS_PER_SPOT_DIAMETER
    grid = hr_grid(sdata, image_key, pixel_size, cs)
    if spot_footprint(sdata.shapes[spots_key], spots_key) == "squares":
        grid = _align_to_bins(sdata, spots_key, grid, image_key, cs)
    op, lr, genes = spot_counts(sdata, table_key, spots_key, genes, grid, image_key, cs)
    empty = [g for g, total in zip(genes, lr.sum(1)) if total <= 0]
    if empty:
        raise ValueError(
            f"Gene(s) {empty} have no counts in any spot of table {table_key!r}; there is nothing to super-resolve. "
            "Remove them from genes=."
        )
    mask = (tissue_mask(sdata, image_key, grid=grid) & _near_spots(op)) | _between_spots(op)
    return SlideInputs(
        sdata=sdata,
        image_key=image_key,
        table_key=table_key,
        spots_key=spots_key,
        genes=list(genes),
        coordinate_system=cs,
        pixel_size=float(pixel_size),
        grid=grid,
        observation=op,
        lr=lr,
        mask=mask,
        image_levels=levels,
    )


def _near_spots(op: ObservationModel) -> np.ndarray:
    """Grid pixels within 0.75 spot pitch of a spot centre: the measured area (gaps of the lattice included)."""
    from scipy.spatial import cKDTree

    h, w = op.shape
    rr, cc = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    dist, _ = cKDTree(op.centres).query(
        np.stack([rr.ravel(), cc.ravel()], 1), distance_upper_bound=0.75 * op.pitch()
    )
    return np.isfinite(dist).reshape(h, w)


def _between_spots(op: ObservationModel) -> np.ndarray:
    """Grid pixels covered by a spot or lying in the gap between neighbouring spots (a morphological closing of the
    spot footprint). The gaps of a lattice of in-tissue spots are tissue, whatever the image's contrast (e.g. a
    fluorescence image where sparse, dim nuclei read as background); the outer border is not extended."""
    from scipy.ndimage import binary_closing

    covered = op.coverage > 0
    if op.n_obs < 2:
        return covered
    radius = np.sqrt(np.median(op.support_area[op.support_area > 0]) / np.pi)
    # the farthest a gap pixel can be from every spot edge: the centre of a square lattice cell
    r = int(np.ceil(max(0.71 * op.pitch() - radius, 0.0))) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = yy**2 + xx**2 <= r**2
    pad = r + 1  # closing near the grid border must not see the border as empty space
    closed = binary_closing(np.pad(covered, pad), structure=disk)[pad:-pad, pad:-pad]
    return closed | covered


def _is_spots(shapes: Any, key: str) -> bool:
    try:
        spot_footprint(shapes, key)
    except ValueError:
        return False
    return True


def _align_to_bins(sdata: sd.SpatialData, spots_key: str, grid: Grid, image_key: str, cs: str) -> Grid:
    """Shift the grid so that square bins start on pixel edges: each bin then owns whole pixels (no pixel is
    shared by two abutting bins), which keeps the consistency projection exact."""
    centres, half, _ = spot_geometry(sdata, spots_key, grid, image_key, cs)
    edge_y, edge_x = grid.to_reference(centres[0, 0] - half, centres[0, 1] - half)
    ps = grid.pixel_size
    oy, ox = float(np.mod(edge_y, ps)), float(np.mod(edge_x, ps))
    oy, ox = (oy - ps if oy > 1e-9 else 0.0), (ox - ps if ox > 1e-9 else 0.0)
    shape = (grid.shape[0] + (oy < 0), grid.shape[1] + (ox < 0))
    return Grid(shape, ps, (oy, ox))

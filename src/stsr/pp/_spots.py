"""Spot-based measurements (Visium, legacy ST) placed on the HR grid of an image."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from .._constants import IMAGE_HE, RASTER_LR, TABLE
from .._elements import coordinate_systems, element_affine, shared_coordinate_system
from .._validate import check_counts, check_element, check_genes, check_new_key
from ..observation import Grid, ObservationModel
from ._grid import ImageFrame, frame_grid, image_frame, raster_element
from ._provenance import grid_to_dict, record
from ._transforms import spatial_shape

log = logging.getLogger("stsr")

__all__ = [
    "Spots",
    "read_spots",
    "spots_observation_model",
    "rasterize_spots",
    "spot_counts",
    "spot_footprint",
    "footprint_operator",
    "table_region",
    "check_unique_instances",
]

#: Above this many genes, :func:`rasterize_spots` asks for an explicit gene list.
MAX_DEFAULT_GENES = 500
#: Spot centres up to this many image pixels outside the image still count as on it (the crop of
#: ``spatialdata.bounding_box_query`` rounds the image to whole pixels and keeps the spots by their centres).
EDGE_TOLERANCE_PX = 1.0


def spot_footprint(spots: Any, spots_key: str) -> str:
    """``"disks"`` for circles (points with a ``radius``), ``"squares"`` for square bins (e.g. Visium HD).

    Raises a clear error for any other shapes.
    """
    types = set(spots.geometry.geom_type.unique())
    if types == {"Point"}:
        if "radius" not in spots.columns:
            raise ValueError(
                f"Shapes element {spots_key!r} holds points without a 'radius' column: spots must be circles "
                "(spatialdata.models.ShapesModel.parse(..., radius=...)) or square bins (polygons)."
            )
        return "disks"
    if types == {"Polygon"}:
        b = spots.geometry.bounds
        w, h = (b["maxx"] - b["minx"]).to_numpy(), (b["maxy"] - b["miny"]).to_numpy()
        area = spots.geometry.area.to_numpy()
        if np.allclose(w, h, rtol=0.02) and np.allclose(area, w * h, rtol=0.02):
            return "squares"
    raise ValueError(
        f"Shapes element {spots_key!r} must hold circles (points with a radius) or axis-aligned square bins; "
        f"found {sorted(types)}. Convert other shapes with spatialdata.to_circles."
    )


def footprint_operator(
    footprint: str, shape: tuple[int, int], centres: np.ndarray, radius: float, supersample: int = 8
) -> ObservationModel:
    """The observation model of spots of a footprint: disks of ``radius`` or squares of side ``2 * radius``."""
    if footprint == "disks":
        return ObservationModel.disks(shape, centres, radius, supersample=supersample)
    return ObservationModel.squares(shape, centres, 2 * radius, supersample=supersample)


@dataclass(frozen=True, eq=False)
class Spots:
    """The spots of a shapes element placed on an image: what stsr needs to know about them, computed once.

    Build it with :func:`read_spots`. Positions and sizes are in units of ``coordinate_system``;
    :meth:`on_grid` and :meth:`operator` place them on an HR grid of the image (in ``frame``).

    Attributes
    ----------
    key
        Key of the shapes element.
    image_key
        The image the spots are placed on.
    footprint
        ``"disks"`` (circles) or ``"squares"`` (square bins, e.g. Visium HD); see :func:`spot_footprint`.
    coordinate_system
        The coordinate system relating spots and image.
    centres
        ``(n, 2)`` ``(y, x)`` spot centres in ``coordinate_system`` (row ``i`` is ``index[i]``).
    radius
        The spots' radius (half the side of square bins) in ``coordinate_system`` units (median over the spots).
    index
        The index of the shapes element.
    frame
        The :class:`~stsr.pp._grid.ImageFrame` of the image's HR grids in ``coordinate_system``.
    """

    key: str
    image_key: str
    footprint: str
    coordinate_system: str
    centres: np.ndarray
    radius: float
    index: Any
    frame: ImageFrame

    @property
    def diameter(self) -> float:
        """Spot diameter (side of square bins) in ``coordinate_system`` units."""
        return 2.0 * self.radius

    @functools.cached_property
    def pitch(self) -> float:
        """Median distance from each spot centre to its nearest neighbour (``coordinate_system`` units); the
        diameter for a single spot."""
        if len(self.centres) < 2:
            return self.diameter
        from scipy.spatial import cKDTree

        d, _ = cKDTree(self.centres).query(self.centres, k=2)
        return float(np.median(d[:, 1]))

    def on_grid(self, grid: Grid) -> tuple[np.ndarray, float]:
        """``(centres, radius)`` on ``grid`` (a grid in :attr:`frame`): ``(n, 2)`` continuous ``(row, col)``
        centres and the radius (half side) in grid pixels."""
        yx = np.linalg.inv(self.frame.to_cs) @ np.vstack([self.centres.T, np.ones(len(self.centres))])
        rows, cols = grid.to_grid(yx[0], yx[1])
        return np.stack([rows, cols], 1), self.radius / self.frame.unit / grid.pixel_size

    def pitch_on(self, grid: Grid) -> float:
        """:attr:`pitch` in pixels of ``grid``."""
        return self.pitch / self.frame.unit / grid.pixel_size

    def positions(self, ids: Any, table_key: str, instance_key: str) -> np.ndarray:
        """Rows of :attr:`centres` of the spot ids ``ids`` (a table's instance ids), with a clear error for ids
        that are not spots."""
        ids = np.asarray(ids)
        pos = self.index.get_indexer(ids)
        if (pos < 0).any():
            bad = ids[pos < 0][:5]
            raise ValueError(
                f"{int((pos < 0).sum())} rows of table {table_key!r} have {instance_key!r} values that are not in "
                f"the index of {self.key!r}, e.g. {list(bad)}."
            )
        return pos

    def operator(
        self, grid: Grid, positions: np.ndarray | None = None, supersample: int = 8
    ) -> ObservationModel:
        """The observation model of the spots (rows ``positions``, default all) on ``grid``: disks, or squares
        for square bins (:func:`footprint_operator`)."""
        centres, radius = self.on_grid(grid)
        if positions is not None:
            centres = centres[positions]
        return footprint_operator(self.footprint, grid.shape, centres, radius, supersample=supersample)


def read_spots(
    sdata: Any,
    spots_key: str,
    image_key: str,
    coordinate_system: str | None = None,
    frame: ImageFrame | None = None,
) -> Spots:
    """The :class:`Spots` of shapes element ``spots_key`` placed on image ``image_key``, checked.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object (not modified).
    spots_key
        Shapes element of circles (``radius`` column) or square bins.
    image_key
        The image the spots are placed on.
    coordinate_system
        Coordinate system relating spots and image (default: the one
        :func:`stsr._elements.shared_coordinate_system` picks, ``"global"`` when shared).
    frame
        The image's :class:`~stsr.pp._grid.ImageFrame` in that coordinate system, when already known.

    Raises
    ------
    ValueError
        For shapes that are not circles or square bins, no shared coordinate system, a singular transformation,
        spots of different sizes, spots outside the image.
    """
    spots = check_element(sdata, spots_key, "shapes")
    image = check_element(sdata, image_key, "images")
    footprint = spot_footprint(spots, spots_key)
    cs = shared_coordinate_system(sdata, [image_key, spots_key], coordinate_system, names=("image", "spots"))
    if frame is None or frame.coordinate_system != cs:
        frame = image_frame(sdata, image_key, cs)
    to_cs = element_affine(spots, cs, spots_key)
    points = spots.geometry if footprint == "disks" else spots.geometry.centroid
    yx = np.stack([points.y.to_numpy(float), points.x.to_numpy(float), np.ones(len(spots))])
    centres = (to_cs @ yx)[:2].T
    sv = np.linalg.svd(to_cs[:2, :2], compute_uv=False)
    if sv.min() <= 0:
        raise ValueError(
            f"The transformation from spots {spots_key!r} to coordinate system {cs!r} is singular; set an "
            "invertible one with spatialdata.transformations.set_transformation."
        )
    to_frame = np.linalg.svd((np.linalg.inv(frame.to_cs) @ to_cs)[:2, :2], compute_uv=False)
    if to_frame.max() / to_frame.min() > 1.02:
        warnings.warn(
            f"The transformation from spots {spots_key!r} to image {image_key!r} is anisotropic "
            f"(scales {to_frame.tolist()}); spots are treated as circles of the mean radius.",
            stacklevel=3,
        )
    size = (
        spots["radius"].to_numpy(float)
        if footprint == "disks"
        else np.sqrt(spots.geometry.area.to_numpy()) / 2
    )
    radii = size * float(np.sqrt(sv.prod()))
    if not np.all(np.isfinite(radii)) or np.any(radii <= 0):
        raise ValueError(f"Spots {spots_key!r} have missing or non-positive radii.")
    if radii.max() > 1.01 * radii.min():
        raise ValueError(
            f"Spots {spots_key!r} have different radii ({radii.min():.4g} to {radii.max():.4g} units of {cs!r}); "
            "stsr needs one spot size per shapes element."
        )
    h, w = spatial_shape(image)
    img = (element_affine(spots, cs, spots_key, to=image, to_key=image_key) @ yx)[:2].T
    # a centre within one pixel of the image's edge is on it: spatialdata.bounding_box_query keeps the spots whose
    # centres lie in the box and crops the image to whole pixels, which can leave an edge spot a fraction outside
    tol = EDGE_TOLERANCE_PX
    outside = ~((img[:, 0] >= -tol) & (img[:, 0] <= h + tol) & (img[:, 1] >= -tol) & (img[:, 1] <= w + tol))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{int(outside.sum())} of {len(spots)} spots of {spots_key!r} fall outside image {image_key!r} "
            f"({h} x {w} pixels) in coordinate system {cs!r}, e.g. spot {spots.index[i]!r} at image pixel "
            f"(y={img[i, 0]:.1f}, x={img[i, 1]:.1f}). Check the transformations of both elements, or crop the spots "
            "to the image first."
        )
    return Spots(spots_key, image_key, footprint, cs, centres, float(np.median(radii)), spots.index, frame)


def spots_observation_model(
    sdata: Any,
    spots_key: str,
    grid: Grid,
    image_key: str,
    coordinate_system: str | None = None,
    supersample: int = 8,
) -> ObservationModel:
    """The disk pooling operator of the spots of ``spots_key`` on ``grid``.

    Spot centres and radius are mapped into the grid's reference frame (the image's pixels, see
    :func:`stsr.pp.hr_grid`) through a coordinate system shared by the spots and the image (``"global"`` preferred).

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object (not modified).
    spots_key
        Shapes element of circles (``radius`` column).
    grid
        HR grid over ``image_key`` (see :func:`stsr.pp.hr_grid`), made in the same coordinate system.
    image_key
        The image the grid is aligned to.
    coordinate_system
        Force a shared coordinate system.
    supersample
        Sub-samples per pixel side for the area fractions.

    Returns
    -------
    :meth:`ObservationModel.disks <stsr.observation.ObservationModel.disks>` (or ``squares`` for square bins);
    observation ``i`` is row ``i`` of the
    spots element.
    """
    return read_spots(sdata, spots_key, image_key, coordinate_system).operator(grid, supersample=supersample)


def table_region(
    sdata: Any,
    table_key: str,
    spots_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
) -> tuple[Any, str, str, str]:
    """The table, the spots element it annotates, and its region/instance columns.

    A table may annotate several spot elements (samples put together with :func:`spatialdata.concatenate`, each
    placed with its own image). Without ``spots_key``, the one placed with ``image_key`` (in ``coordinate_system``
    when given) is chosen: the only one sharing a coordinate system with the image.

    Returns
    -------
    ``(table, spots_key, region_key, instance_key)``.
    """
    from spatialdata.models import get_table_keys

    table = check_element(sdata, table_key, "tables")
    try:
        region, region_key, instance_key = get_table_keys(table)
    except ValueError as err:
        raise ValueError(
            f"Table {table_key!r} does not say which element it annotates; parse it with "
            "spatialdata.models.TableModel.parse(table, region=..., region_key=..., instance_key=...)."
        ) from err
    regions = [region] if isinstance(region, str) else list(region)
    if spots_key is None:
        spots_key = (
            regions[0]
            if len(regions) == 1
            else _region_on_image(sdata, table_key, regions, image_key, coordinate_system)
        )
    elif spots_key not in regions:
        raise ValueError(f"Table {table_key!r} does not annotate {spots_key!r}; it annotates {regions}.")
    check_element(sdata, spots_key, "shapes")
    return table, spots_key, region_key, instance_key


def placed_with_image(
    sdata: Any, keys: Sequence[str], image_key: str, coordinate_system: str | None = None
) -> list[str]:
    """Of the shapes elements ``keys`` (others are skipped), those sharing a coordinate system with the image
    ``image_key`` (``coordinate_system`` when given)."""
    on_image = set(coordinate_systems(sdata.images[image_key]))
    if coordinate_system is not None:
        on_image &= {coordinate_system}
    return [k for k in keys if k in sdata.shapes and on_image & set(coordinate_systems(sdata.shapes[k]))]


def _region_on_image(
    sdata: Any, table_key: str, regions: list[str], image_key: str | None, coordinate_system: str | None
) -> str:
    """Of the elements ``regions`` a table annotates, the one placed with the image (see :func:`table_region`)."""
    if image_key is None:
        raise ValueError(
            f"Table {table_key!r} annotates several elements {regions}; pass spots_key= to choose."
        )
    check_element(sdata, image_key, "images")
    placed = placed_with_image(sdata, regions, image_key, coordinate_system)
    where = f"coordinate system {coordinate_system!r}" if coordinate_system else "a coordinate system"
    if len(placed) == 1:
        log.info(
            "table %r annotates %d elements; using %r, the one that shares %s with image %r",
            table_key,
            len(regions),
            placed[0],
            where,
            image_key,
        )
        return placed[0]
    if not placed:
        raise ValueError(
            f"Table {table_key!r} annotates several elements {regions}, and none of its spots shares {where} with "
            f"image {image_key!r} (its coordinate systems: {sorted(coordinate_systems(sdata[image_key]))}). Pass the "
            "image of one of these samples, or place the spots with the image (spatialdata.transformations."
            "set_transformation)."
        )
    raise ValueError(
        f"Table {table_key!r} annotates several spot elements placed with image {image_key!r} in {where}: "
        f"{placed}. Keep one sample, e.g. sdata.subset([{image_key!r}, {placed[0]!r}], filter_tables=True), or "
        "pass coordinate_system= naming the coordinate system of the one to use."
    )


def check_unique_instances(
    table: Any, table_key: str, spots_key: str, instance_key: str, rows: np.ndarray, spots_index: Any = None
) -> None:
    """Refuse a table in which two rows annotate the same spot, or a spots element with a duplicated index.

    ``rows`` are the table rows of region ``spots_key``. Two rows for one spot would make two identical observations
    (a singular system for the consistency projection), and would count the spot twice.

    Raises
    ------
    ValueError
        Naming the duplicated ids and how to fix the table.
    """
    import pandas as pd

    ids = pd.Series(table.obs[instance_key].to_numpy()[rows])
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        counts = dup.value_counts()
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in counts.head(5).items())
        more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
        raise ValueError(
            f"Table {table_key!r} has several rows for the same spot of {spots_key!r}: "
            f"table.obs[{instance_key!r}] repeats {shown}{more}. Each spot must have exactly one row "
            f"(table.obs[{instance_key!r}] unique within region {spots_key!r}): drop the duplicated rows "
            f"(table = table[~table.obs[{instance_key!r}].duplicated()]) or sum them into one row per spot."
        )
    if spots_index is not None and not spots_index.is_unique:
        rep = list(spots_index[spots_index.duplicated()].unique()[:5])
        raise ValueError(
            f"Shapes element {spots_key!r} has a duplicated index (e.g. {rep}); each spot needs its own id. Reset "
            "it (spots.index = range(len(spots))) and update the table's instance ids to match."
        )


def _spot_counts(
    sdata: Any,
    table_key: str,
    spots_key: str | None,
    genes: Sequence[str],
    grid: Grid,
    image_key: str,
    coordinate_system: str | None = None,
    layer: str | None = None,
    spots: Spots | None = None,
) -> tuple[ObservationModel, np.ndarray, list[str], list[str]]:
    table, spots_key, region_key, instance_key = table_region(sdata, table_key, spots_key)
    genes = check_genes(genes, table.var_names, where=f"table {table_key!r}")
    if layer is not None and layer not in table.layers:
        raise KeyError(f"Table {table_key!r} has no layer {layer!r}; layers: {list(table.layers)}.")
    rows = np.flatnonzero((table.obs[region_key] == spots_key).to_numpy())
    if rows.size == 0:
        raise ValueError(f"Table {table_key!r} has no rows for region {spots_key!r}.")
    check_unique_instances(table, table_key, spots_key, instance_key, rows, sdata.shapes[spots_key].index)
    if spots is None:
        spots = read_spots(sdata, spots_key, image_key, coordinate_system)
    pos = spots.positions(table.obs[instance_key].to_numpy()[rows], table_key, instance_key)
    x = table.layers[layer] if layer is not None else table.X
    x = x[rows][:, table.var_names.get_indexer(genes)]
    obs_names = [str(o) for o in table.obs_names[rows]]
    check_counts(x, genes, obs_names, what=f"Counts of table {table_key!r}")
    lr = (x.toarray() if sparse.issparse(x) else np.asarray(x)).astype(np.float64).T  # (genes, n_obs)
    return spots.operator(grid, pos), lr, list(genes), obs_names


def spot_counts(
    sdata: Any,
    table_key: str,
    spots_key: str | None,
    genes: Sequence[str],
    grid: Grid,
    image_key: str,
    coordinate_system: str | None = None,
    layer: str | None = None,
    spots: Spots | None = None,
) -> tuple[ObservationModel, np.ndarray, list[str]]:
    """The spots' disk operator on ``grid`` and their counts, checked (nothing is modified).

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    table_key
        Table of spot counts.
    spots_key
        Spots element annotated by the table (``None``: the table's only region).
    genes
        Genes to read (validated, with close matches for unknown names).
    grid
        HR grid over ``image_key`` (see :func:`stsr.pp.hr_grid`), made in the same coordinate system.
    image_key
        The image the grid is aligned to.
    coordinate_system
        Coordinate system relating spots and image (default: ``"global"`` if shared).
    layer
        Layer of raw counts (default ``X``).
    spots
        The spots' :class:`Spots` (:func:`read_spots`) when already read; default: read here.

    Returns
    -------
    ``(model, counts, genes)``: the :class:`~stsr.observation.ObservationModel` (observation ``i`` = ``i``-th table
    row annotating the spots), ``(n_genes, n_obs)`` float64 counts, and the gene names.
    """
    op, lr, genes, _ = _spot_counts(
        sdata, table_key, spots_key, genes, grid, image_key, coordinate_system, layer, spots
    )
    return op, lr, genes


def rasterize_spots(
    sdata: Any,
    *,
    pixel_size: float,
    table_key: str = TABLE,
    image_key: str = IMAGE_HE,
    genes: Sequence[str] | None = None,
    key_added: str = RASTER_LR,
    spots_key: str | None = None,
    layer: str | None = None,
    coordinate_system: str | None = None,
    sigma: float | None = None,
    scale_factors: list[int] | str | None = "auto",
    overwrite: bool = False,
) -> ObservationModel:
    """Place a spot table on the HR grid of an image, as the model's LR input.

    The spots' counts are turned into a smooth density map (counts per HR pixel) on the grid with
    :meth:`ObservationModel.interpolate <stsr.observation.ObservationModel.interpolate>` and added as a raster
    image element ``key_added`` (c = genes, float32) that overlays the image. What is needed to rebuild the operator
    is recorded in ``sdata.attrs["stsr"][key_added]`` (see :func:`stsr.pp.get_observations`).

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object; only ``key_added`` (and its attrs record) is added.
    pixel_size
        HR pixel side in units of ``coordinate_system`` (µm in ``"global"``).
    table_key
        Table of spot counts, annotating a shapes element of circles.
    image_key
        Image the grid is aligned to.
    genes
        Genes to rasterize (default: all genes of the table, if at most 500).
    key_added
        Key of the new raster element.
    spots_key
        Spots element, if the table annotates several.
    layer
        Layer of the table holding raw counts (default ``X``).
    coordinate_system
        Coordinate system of ``pixel_size`` (and used to relate spots and image).
    sigma
        Interpolation width in HR pixels (default: half the spot pitch).
    scale_factors
        Pyramid factors of the raster.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    The :class:`~stsr.observation.ObservationModel` of the spots on the grid; observation ``i`` is the ``i``-th row
    of the table that annotates ``spots_key``.
    """
    table, spots_key, _, _ = table_region(sdata, table_key, spots_key)
    check_element(sdata, image_key, "images")
    check_new_key(sdata, key_added, overwrite)
    if genes is None:
        if table.n_vars > MAX_DEFAULT_GENES:
            raise ValueError(
                f"Table {table_key!r} has {table.n_vars} genes; pass genes= (e.g. from stsr.pp.select_genes) to "
                f"rasterize at most a few hundred."
            )
        genes = list(map(str, table.var_names))
    genes = check_genes(genes, table.var_names, where=f"table {table_key!r}")
    spots = read_spots(sdata, spots_key, image_key, coordinate_system)
    grid = frame_grid(spots.frame, pixel_size)
    op, lr, genes, obs_names = _spot_counts(
        sdata, table_key, spots_key, genes, grid, image_key, spots.coordinate_system, layer, spots
    )
    density = op.interpolate(lr, sigma=sigma).astype(np.float32)
    element = raster_element(
        density,
        genes,
        grid,
        sdata,
        image_key,
        scale_factors=scale_factors,
        coordinate_system=spots.coordinate_system,
    )
    # all checks done: modify the SpatialData only now
    if key_added in sdata:
        del sdata[key_added]
    sdata.images[key_added] = element
    record(
        sdata,
        key_added,
        {
            "kind": "spots",
            "table_key": table_key,
            "spots_key": spots_key,
            "image_key": image_key,
            "layer": layer,
            "coordinate_system": coordinate_system,
            "pixel_size": float(pixel_size),
            "grid": grid_to_dict(grid),
            "genes": list(genes),
            "obs_names": obs_names,
            "radius": float(op.params["radius"]),
            "sigma": sigma,
            "supersample": int(op.params["supersample"]),
        },
    )
    return op

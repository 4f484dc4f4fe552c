"""The high-resolution (HR) grid aligned with an image, and raster elements placed on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._elements import resolve_coordinate_system
from .._validate import check_element
from ..observation import Grid
from ._transforms import (
    affine_yx,
    all_transformations,
    isotropic_scale,
    parse_raster,
    spatial_shape,
)

__all__ = ["hr_grid", "raster_element", "grid_transformations"]


def hr_grid(sdata: Any, image_key: str, pixel_size: float, coordinate_system: str | None = None) -> Grid:
    """A regular grid of square HR pixels over an image, in the image's intrinsic pixel frame.

    The grid's reference frame is the full-resolution level of the image (pixel ``(i, j)`` of the image spans
    ``[i, i + 1) x [j, j + 1)``). Its origin is the image's top-left corner and it has enough pixels to cover the whole
    image (the last row/column may extend past the image edge).

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    image_key
        Key of the image.
    pixel_size
        Side of an HR pixel in units of ``coordinate_system`` (e.g. µm in ``"global"``).
    coordinate_system
        Coordinate system in which ``pixel_size`` is expressed. Default: ``"global"`` if the image has it, else the
        image's only coordinate system. The image's transformation to it must be an isotropic scale plus translation.

    Returns
    -------
    The :class:`~stsr.observation.Grid` (``pixel_size`` in image pixels, ``origin=(0, 0)``).
    """
    image = check_element(sdata, image_key, "images")
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive number, got {pixel_size!r}.")
    cs = resolve_coordinate_system(image, image_key, coordinate_system)
    scale = isotropic_scale(
        affine_yx(all_transformations(image)[cs]), f"image {image_key!r} to coordinate system {cs!r}"
    )
    ps = float(pixel_size) / scale
    h, w = spatial_shape(image)
    shape = (max(1, math.ceil(h / ps - 1e-6)), max(1, math.ceil(w / ps - 1e-6)))
    return Grid(shape, ps, (0.0, 0.0))


def grid_transformations(grid: Grid, sdata: Any, image_key: str) -> dict[str, Any]:
    """Transformations of a raster on ``grid`` to every coordinate system of the image ``image_key``.

    Each is ``Sequence([Scale(grid.pixel_size), Translation(grid.origin), image_transformation])``: raster pixel
    ``(i, j)`` (intrinsic ``[i, i + 1) x [j, j + 1)``) lands exactly on grid pixel ``(i, j)`` of the image frame.
    """
    from spatialdata.transformations import Scale, Sequence, Translation

    image = check_element(sdata, image_key, "images")
    out = {}
    for cs, tf in all_transformations(image).items():
        out[cs] = Sequence(
            [
                Scale([grid.pixel_size, grid.pixel_size], axes=("y", "x")),
                Translation([grid.origin[0], grid.origin[1]], axes=("y", "x")),
                tf,
            ]
        )
    return out


def raster_element(
    data: Any,
    genes: Sequence[str],
    grid: Grid,
    sdata: Any,
    image_key: str,
    scale_factors: list[int] | str | None = "auto",
) -> Any:
    """Wrap a ``(c, y, x)`` array on ``grid`` as a multiscale image element that overlays the image exactly.

    Parameters
    ----------
    data
        ``(n_genes, height, width)`` numpy or dask array with ``(height, width) == grid.shape``.
    genes
        Channel names (one per gene, unique).
    grid
        The grid the array lives on, in the intrinsic frame of ``image_key`` (see :func:`hr_grid`).
    sdata
        The :class:`~spatialdata.SpatialData` holding the image (not modified).
    image_key
        Key of the image whose coordinate systems the raster gets.
    scale_factors
        Pyramid factors; ``"auto"`` halves while the smaller side stays at least 64 pixels; ``None`` or ``[]``
        gives a single level (still a multiscale element).

    Returns
    -------
    A multiscale :class:`~spatialdata.models.Image2DModel` element (``DataTree``) with transformations to every
    coordinate system of the image. Add it with ``sdata.images[key] = element``.
    """
    genes = [str(g) for g in genes]
    if data.ndim != 3:
        raise ValueError(f"data must be (c, y, x), got an array with {data.ndim} dimensions.")
    if tuple(data.shape[1:]) != grid.shape:
        raise ValueError(f"data has spatial shape {tuple(data.shape[1:])} but the grid is {grid.shape}.")
    if len(genes) != data.shape[0]:
        raise ValueError(f"data has {data.shape[0]} channels but {len(genes)} gene names were given.")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise ValueError(f"Gene names must be unique; duplicated: {dup}.")
    return parse_raster(data, genes, grid_transformations(grid, sdata, image_key), scale_factors)

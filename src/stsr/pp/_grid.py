"""The high-resolution (HR) grid aligned with an image, and raster elements placed on it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._elements import element_affine, shared_coordinate_system
from .._validate import check_element
from ..observation import Grid
from ._transforms import parse_raster, spatial_shape

__all__ = ["hr_grid", "raster_element", "grid_transformations", "image_frame", "ImageFrame", "frame_grid"]

log = logging.getLogger("stsr")

#: Largest shear or rotation (off-diagonal / diagonal of the image's linear map) still read as axis-aligned.
ALIGNED_RTOL = 1e-3
#: Largest anisotropy of an axis-aligned image scale under which the HR grid keeps the image's own pixel frame.
MAX_ANISOTROPY = 0.05


@dataclass(frozen=True, eq=False)
class ImageFrame:
    """The reference frame of the HR grids over an image, in a coordinate system.

    When the image maps to the coordinate system by a positive, (almost) isotropic, axis-aligned scale plus a
    translation, the frame is the image's own full-resolution pixels (``to_image`` is the identity: grid
    coordinates are image pixels, as everywhere in stsr). Any other affine (a rotation or shear, as a registered
    Xenium H&E carries; a flip; a strongly anisotropic scale) is honoured: the frame is then laid along the axes of
    the coordinate system, with the image's mean pixel size as unit and its origin at the corner of the image's
    bounding box, and the image is read through ``to_image``.

    Attributes
    ----------
    coordinate_system
        The coordinate system.
    to_cs
        ``3 x 3`` affine on ``(y, x)`` from the frame to ``coordinate_system``.
    to_image
        ``3 x 3`` affine on ``(y, x)`` from the frame to the image's full-resolution pixels.
    unit
        Coordinate-system units per frame unit (the side of an image pixel; geometric mean of the two scales).
    shape
        ``(height, width)`` in frame units of the box that covers the image.
    """

    coordinate_system: str
    to_cs: np.ndarray
    to_image: np.ndarray
    unit: float
    shape: tuple[float, float]

    @property
    def is_image(self) -> bool:
        """Whether the frame is the image's own pixels (``to_image`` is the identity)."""
        return bool(np.array_equal(self.to_image, np.eye(3)))


def image_frame(sdata: Any, image_key: str, coordinate_system: str | None = None) -> ImageFrame:
    """The :class:`ImageFrame` of the HR grids over image ``image_key`` in ``coordinate_system`` (default: the one
    :func:`stsr._elements.shared_coordinate_system` picks for the image)."""
    image = check_element(sdata, image_key, "images")
    cs = shared_coordinate_system(sdata, [image_key], coordinate_system, names="image")
    a = element_affine(image, cs, image_key)
    h, w = spatial_shape(image)
    lin = a[:2, :2]
    sy, sx = float(lin[0, 0]), float(lin[1, 1])
    size = max(float(np.abs(lin).max()), 1e-300)
    if (
        abs(lin[0, 1]) <= ALIGNED_RTOL * size
        and abs(lin[1, 0]) <= ALIGNED_RTOL * size
        and sy > 0
        and sx > 0
        and max(sy, sx) / min(sy, sx) - 1 <= MAX_ANISOTROPY
    ):
        return ImageFrame(cs, a, np.eye(3), float(np.sqrt(sy * sx)), (float(h), float(w)))
    det = abs(float(np.linalg.det(lin)))
    if not np.isfinite(det) or det <= 0:
        raise ValueError(
            f"The transformation of image {image_key!r} to coordinate system {cs!r} is singular (linear part "
            f"{np.round(lin, 6).tolist()}); set an invertible one with spatialdata.transformations.set_transformation."
        )
    unit = float(np.sqrt(det))
    corners = a @ np.array([[0, 0, h, h], [0, w, 0, w], [1, 1, 1, 1]], float)
    lo, hi = corners[:2].min(1), corners[:2].max(1)
    to_cs = np.array([[unit, 0.0, lo[0]], [0.0, unit, lo[1]], [0.0, 0.0, 1.0]])
    log.debug(
        "image %r maps to %r by a rotation, shear, flip or anisotropic scale (linear part %s): its HR grid is laid "
        "along the axes of %r and the image is resampled through its transformation",
        image_key,
        cs,
        np.round(lin, 4).tolist(),
        cs,
    )
    return ImageFrame(
        cs, to_cs, np.linalg.inv(a) @ to_cs, unit, (float(hi[0] - lo[0]) / unit, float(hi[1] - lo[1]) / unit)
    )


def frame_grid(frame: ImageFrame, pixel_size: float) -> Grid:
    """The HR grid of square pixels of side ``pixel_size`` (units of the frame's coordinate system) covering the
    image, in ``frame`` (origin at the frame's origin; the last row/column may extend past the image)."""
    if isinstance(pixel_size, bool) or not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive number, got {pixel_size!r}.")
    ps = float(pixel_size) / frame.unit
    h, w = frame.shape
    return Grid((max(1, math.ceil(h / ps - 1e-6)), max(1, math.ceil(w / ps - 1e-6))), ps, (0.0, 0.0))


def hr_grid(sdata: Any, image_key: str, pixel_size: float, coordinate_system: str | None = None) -> Grid:
    """A regular grid of square HR pixels over an image.

    The grid's reference frame is the image's :class:`ImageFrame`: for an image placed by a scale plus translation
    (the usual case), its full-resolution level (pixel ``(i, j)`` of the image spans ``[i, i + 1) x [j, j + 1)``);
    for an image placed by a rotation or shear, a frame along the axes of the coordinate system. The grid's origin
    is the frame's origin (the image's top-left corner) and it has enough pixels to cover the whole image (the last
    row/column may extend past the image edge).

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
        image's only coordinate system.

    Returns
    -------
    The :class:`~stsr.observation.Grid` (``pixel_size`` in frame units, i.e. image pixels, ``origin=(0, 0)``).
    """
    check_element(sdata, image_key, "images")
    if isinstance(pixel_size, bool) or not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive number, got {pixel_size!r}.")
    return frame_grid(image_frame(sdata, image_key, coordinate_system), pixel_size)


def grid_transformations(
    grid: Grid, sdata: Any, image_key: str, coordinate_system: str | None = None
) -> dict[str, Any]:
    """Transformations of a raster on ``grid`` to every coordinate system of the image ``image_key``.

    ``grid`` lies in the :class:`ImageFrame` of the image in ``coordinate_system`` (default as in :func:`hr_grid`).
    Each transformation is ``Sequence([Scale(grid.pixel_size), Translation(grid.origin), image_transformation])``
    (with the frame-to-image ``Affine`` before the image's transformation when the frame is not the image's pixels):
    raster pixel ``(i, j)`` (intrinsic ``[i, i + 1) x [j, j + 1)``) lands exactly on grid pixel ``(i, j)``.
    """
    from spatialdata.transformations import Affine, Scale, Sequence, Translation

    from .._elements import transformations

    image = check_element(sdata, image_key, "images")
    frame = image_frame(sdata, image_key, coordinate_system)
    steps = [
        Scale([grid.pixel_size, grid.pixel_size], axes=("y", "x")),
        Translation([grid.origin[0], grid.origin[1]], axes=("y", "x")),
    ]
    if not frame.is_image:
        steps.append(Affine(frame.to_image, input_axes=("y", "x"), output_axes=("y", "x")))
    return {cs: Sequence([*steps, tf]) for cs, tf in transformations(image).items()}


def raster_element(
    data: Any,
    genes: Sequence[str],
    grid: Grid,
    sdata: Any,
    image_key: str,
    scale_factors: list[int] | str | None = "auto",
    coordinate_system: str | None = None,
) -> Any:
    """Wrap a ``(c, y, x)`` array on ``grid`` as a multiscale image element that overlays the image exactly.

    Parameters
    ----------
    data
        ``(n_genes, height, width)`` numpy or dask array with ``(height, width) == grid.shape``.
    genes
        Channel names (one per gene, unique).
    grid
        The grid the array lives on, in the :class:`ImageFrame` of ``image_key`` (see :func:`hr_grid`).
    sdata
        The :class:`~spatialdata.SpatialData` holding the image (not modified).
    image_key
        Key of the image whose coordinate systems the raster gets.
    scale_factors
        Pyramid factors; ``"auto"`` halves while the smaller side stays at least 64 pixels; ``None`` or ``[]``
        gives a single level (still a multiscale element).
    coordinate_system
        The coordinate system the grid was made in (see :func:`hr_grid`); it matters only for an image placed by a
        rotation or shear, whose grid frame is laid along the axes of that coordinate system.

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
    return parse_raster(
        data, genes, grid_transformations(grid, sdata, image_key, coordinate_system), scale_factors
    )

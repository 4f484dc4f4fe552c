"""Small private helpers around raster elements (pyramids, parsing).

Transformations are read, and affines built, in :mod:`stsr._elements` only; ``affine_yx``, ``all_transformations``,
``scale0`` and ``raster_levels`` are its functions under the names older modules import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._elements import YX, affine_yx, scale0
from .._elements import levels as raster_levels
from .._elements import transformations as all_transformations

__all__ = [
    "YX",
    "affine_yx",
    "all_transformations",
    "auto_scale_factors",
    "parse_raster",
    "raster_levels",
    "scale0",
    "spatial_shape",
]


def spatial_shape(element: Any) -> tuple[int, int]:
    """``(height, width)`` of the full-resolution level."""
    arr = scale0(element)
    return int(arr.sizes["y"]), int(arr.sizes["x"])


def auto_scale_factors(shape: tuple[int, int], min_size: int = 64, max_levels: int = 5) -> list[int]:
    """Factors of 2 while the smaller side stays at least ``min_size`` (at least one level when possible).

    At least one downscaled level keeps the element multiscale after a zarr round trip (a single-level element is
    read back as a plain ``DataArray``).
    """
    n, side = 0, min(shape)
    while n < max_levels and side // 2 >= min_size:
        side //= 2
        n += 1
    if n == 0 and min(shape) >= 2:
        n = 1
    return [2] * n


def parse_raster(
    data: Any,
    channel_names: list[str] | None,
    transformations: dict[str, Any],
    scale_factors: list[int] | str | None = "auto",
    labels: bool = False,
) -> Any:
    """Wrap a ``(c, y, x)`` (or ``(y, x)`` when ``labels``) array as a multiscale raster element."""
    import dask.array as da
    from spatialdata.models import Image2DModel, Labels2DModel

    shape = tuple(data.shape[-2:])
    if isinstance(scale_factors, str):
        if scale_factors != "auto":
            raise ValueError(f"scale_factors must be 'auto', None or a list of ints, got {scale_factors!r}.")
        scale_factors = auto_scale_factors(shape)
    scale_factors = list(scale_factors or [])
    side = 512
    if labels:
        arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=(side, side))
        return Labels2DModel.parse(
            arr, dims=YX, transformations=transformations, scale_factors=scale_factors, chunks=(side, side)
        )
    n_c = int(data.shape[0])
    c_chunk = int(max(1, min(n_c, 64 * 2**20 // (side * side * max(np.dtype(data.dtype).itemsize, 1)))))
    arr = (
        data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=(c_chunk, side, side))
    )
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        c_coords=channel_names,
        transformations=transformations,
        scale_factors=scale_factors,
        chunks=(c_chunk, side, side),
    )

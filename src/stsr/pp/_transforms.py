"""Small private helpers around spatialdata transformations and raster elements."""

from __future__ import annotations

from typing import Any

import numpy as np

YX = ("y", "x")


def affine_yx(transformation: Any) -> np.ndarray:
    """``3 x 3`` homogeneous affine matrix of a transformation acting on ``(y, x)``."""
    return np.asarray(transformation.to_affine_matrix(input_axes=YX, output_axes=YX), dtype=float)


def all_transformations(element: Any) -> dict[str, Any]:
    """All transformations of an element (to the coordinate systems it lives in)."""
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))


def isotropic_scale(matrix: np.ndarray, what: str, rtol: float = 1e-3, max_anisotropy: float = 0.05) -> float:
    """Scale ``s`` of an affine ``matrix`` that must be ``diag(sy, sx)`` plus a translation, else raise.

    Real registrations are often very slightly anisotropic; up to ``max_anisotropy`` (relative) the geometric mean
    ``sqrt(sy * sx)`` is returned, beyond it a :class:`ValueError` is raised.
    """
    lin = matrix[:2, :2]
    sy, sx = lin[0, 0], lin[1, 1]
    if abs(lin[0, 1]) > rtol * max(abs(sy), abs(sx)) or abs(lin[1, 0]) > rtol * max(abs(sy), abs(sx)):
        raise ValueError(
            f"The transformation of {what} contains a rotation or shear (linear part {lin.tolist()}); only a scale "
            "plus translation is supported here. Use a coordinate system in which the image is axis-aligned (e.g. "
            "its intrinsic pixels) or resample the image first."
        )
    if sy <= 0 or sx <= 0:
        raise ValueError(
            f"The transformation of {what} flips an axis (scale y={sy}, x={sx}); this is not supported."
        )
    if max(sy, sx) / min(sy, sx) - 1 > max_anisotropy:
        raise ValueError(
            f"The transformation of {what} scales y and x differently (y={sy}, x={sx}); square HR pixels need an "
            f"(almost) isotropic scale (within {max_anisotropy:.0%})."
        )
    return float(np.sqrt(sy * sx))


def scale0(element: Any) -> Any:
    """The full-resolution ``DataArray`` of a (possibly multiscale) raster element."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        return next(iter(element["scale0"].values()))
    return element


def raster_levels(element: Any) -> list[Any]:
    """All pyramid levels (``DataArray``), finest first."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        names = sorted(element.children, key=lambda n: int(n.replace("scale", "")))
        return [next(iter(element[n].values())) for n in names]
    return [element]


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

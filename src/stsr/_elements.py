"""Shared helpers around raster elements: pyramid levels, gene channels, transformations into a coordinate system,
pixel geometry and crops by a bounding box.

Conventions (those of SpatialData): pixel ``(i, j)`` of a raster level covers the continuous intrinsic square
``[i, i + 1) x [j, j + 1)`` (rows along ``y``, columns along ``x``), so its centre is ``(i + 0.5, j + 0.5)``. The
transformation of a multiscale element is the one of its full-resolution level ``scale0``; level ``k`` maps to
``scale0`` by the ratio of the shapes (as SpatialData does). Affine matrices here are ``3 x 3`` homogeneous and act
on ``(y, x)``. Bounding boxes are ``(xmin, ymin, xmax, ymax)`` in coordinate-system units.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._constants import CS_GLOBAL, PROVENANCE_ATTR
from ._validate import check_element, check_genes, close_matches, element_type

__all__ = [
    "RasterWindow",
    "affine_yx",
    "axis_aligned",
    "bbox_to_pixels",
    "check_gene",
    "coordinate_systems",
    "crop",
    "element_affine",
    "get_level",
    "get_raster",
    "imshow_extent",
    "levels",
    "n_levels",
    "pick_level",
    "pixel_area",
    "pixel_centres",
    "provenance",
    "raster_genes",
    "resolve_coordinate_system",
    "sample_nearest",
    "scale0",
    "shared_coordinate_system",
    "transformations",
]

YX = ("y", "x")

log = logging.getLogger("stsr")


# ---------------------------------------------------------------------------------------------------- elements
def get_raster(sdata: Any, key: str, kind: str = "images") -> Any:
    """The raster element ``sdata.<kind>[key]`` (``kind`` is ``"images"`` or ``"labels"``), with a clear error."""
    return check_element(sdata, key, kind)


def _is_multiscale(element: Any) -> bool:
    return hasattr(element, "children") and "scale0" in getattr(element, "children", {})


def levels(element: Any) -> list[Any]:
    """All pyramid levels of a raster element as ``DataArray``, finest (``scale0``) first."""
    if _is_multiscale(element):
        names = sorted(element.children, key=lambda n: int(str(n).replace("scale", "")))
        return [next(iter(element[n].values())) for n in names]
    return [element]


def n_levels(element: Any) -> int:
    """Number of pyramid levels (1 for a single-scale element)."""
    return len(levels(element))


def scale0(element: Any) -> Any:
    """The full-resolution ``DataArray`` of a (possibly multiscale) raster element."""
    return levels(element)[0]


def get_level(element: Any, level: int = 0, key: str = "raster") -> Any:
    """Pyramid level ``level`` (``DataArray``) of a raster element; negative counts from the coarsest."""
    lv = levels(element)
    if isinstance(level, bool) or not isinstance(level, int | np.integer):
        raise TypeError(f"level must be an integer, got {level!r}.")
    if not -len(lv) <= level < len(lv):
        raise ValueError(
            f"Element {key!r} has {len(lv)} pyramid level(s) (0..{len(lv) - 1}); level {level} does not exist."
        )
    return lv[level]


def raster_genes(element: Any) -> list[str]:
    """Channel names (genes) of an image raster element (``c`` coordinate of ``scale0``)."""
    arr = scale0(element)
    if "c" not in arr.dims:
        raise ValueError("This raster element has no channel axis 'c' (is it a labels element?).")
    return [str(c) for c in arr.coords["c"].values]


def check_gene(element: Any, gene: str, key: str = "raster") -> str:
    """``gene`` if it is a channel of ``element``, else a :class:`KeyError` with close matches."""
    return check_genes([gene], raster_genes(element), where=f"the channels of raster {key!r}")[0]


def provenance(sdata: Any, key: str) -> dict[str, Any]:
    """The stsr provenance record of element ``key`` (element attrs, else ``sdata.attrs["stsr"][key]``), or ``{}``."""
    element = sdata[key]
    rec = None
    attrs = getattr(element, "attrs", None)
    if isinstance(attrs, dict):
        rec = attrs.get(PROVENANCE_ATTR)
    if not rec:
        rec = (sdata.attrs.get(PROVENANCE_ATTR, {}) or {}).get(key)
    return copy.deepcopy(dict(rec)) if isinstance(rec, dict) else {}


# ---------------------------------------------------------------------------------------------- transformations
# This section is the only place of stsr that reads transformations (``spatialdata.transformations.
# get_transformation``), picks a coordinate system and builds the affine of an element: every other module calls
# :func:`shared_coordinate_system` and :func:`element_affine` (``tests/pp/test_one_resolver.py`` keeps it so).
def affine_yx(transformation: Any) -> np.ndarray:
    """``3 x 3`` homogeneous affine matrix of a spatialdata transformation acting on ``(y, x)``."""
    return np.asarray(transformation.to_affine_matrix(input_axes=YX, output_axes=YX), dtype=float)


def transformations(element: Any) -> dict[str, Any]:
    """The transformations of an element, by the name of the coordinate system they map to."""
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))


def coordinate_systems(element: Any) -> list[str]:
    """Sorted names of the coordinate systems an element has a transformation to."""
    return sorted(transformations(element))


def _label(sdata: Any, key: str, name: str | None) -> str:
    if name is None:
        kind = element_type(sdata, key) if hasattr(sdata, "images") else None
        name = kind[:-1] if kind else "element"
    return f"{name} {key!r}"


def shared_coordinate_system(
    sdata: Any,
    keys: str | Sequence[str],
    requested: str | None = None,
    *,
    names: str | Sequence[str | None] | None = None,
) -> str:
    """The coordinate system in which the elements ``keys`` are placed together: the one resolver of stsr.

    ``requested`` if every element has it; else ``"global"`` if they all have it; else their only shared
    coordinate system; else (several shared, none ``"global"``) the first in alphabetical order, logged.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData`, or any mapping from the keys to the elements.
    keys
        Key(s) of the elements (``None`` entries are skipped).
    requested
        The coordinate system asked for by the user (``coordinate_system=``), or ``None``.
    names
        What to call each element in messages (e.g. ``("image", "spots")``); default: its element type.

    Raises
    ------
    ValueError
        If an element has no transformation to ``requested`` (naming its coordinate systems and close matches), or
        if the elements share no coordinate system; both say the fix.
    """
    keys = [keys] if isinstance(keys, str) else [k for k in keys if k is not None]
    if not keys:
        raise ValueError("No element to place in a coordinate system.")
    if names is None or isinstance(names, str):
        names = [names] * len(keys)
    labels = {k: _label(sdata, k, n) for k, n in zip(keys, names)}
    systems = {k: coordinate_systems(sdata[k]) for k in keys}
    shared = sorted(set.intersection(*(set(v) for v in systems.values())))
    fix = "spatialdata.transformations.set_transformation(sdata[{key!r}], transformation, to_coordinate_system={cs})"
    if requested is not None:
        missing = [k for k in keys if requested not in systems[k]]
        if not missing:
            return requested
        hits = close_matches(requested, shared or systems[missing[0]])
        hint = f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""
        if len(keys) == 1:
            where = f" It is in {systems[keys[0]]}."
        else:
            where = (
                " "
                + _cap("; ".join(f"{labels[k]} is in {systems[k]}" for k in keys))
                + f" (shared: {shared})."
            )
        raise ValueError(
            f"{_cap(' and '.join(labels[k] for k in missing))} {'has' if len(missing) == 1 else 'have'} no "
            f"transformation to coordinate system {requested!r}.{hint}{where} Pass "
            + ("one of these" if len(keys) == 1 else "a coordinate system they share")
            + " as coordinate_system=, or add a transformation with "
            + fix.format(key=missing[0], cs=repr(requested))
            + "."
        )
    if not shared:
        if len(keys) == 1:
            raise ValueError(
                f"{_cap(labels[keys[0]])} has no transformation to any coordinate system; add one with "
                + fix.format(key=keys[0], cs=repr(CS_GLOBAL))
                + "."
            )
        listing = " and ".join(f"{labels[k]} (coordinate systems {systems[k]})" for k in keys)
        raise ValueError(
            f"{_cap(listing)} share no coordinate system, so they cannot be placed on one another. Add a "
            "transformation to a common coordinate system with " + fix.format(key=keys[0], cs="...") + "."
        )
    if CS_GLOBAL in shared:
        return CS_GLOBAL
    if len(shared) > 1:
        log.info(
            "%s share the coordinate systems %s; using %r (pass coordinate_system= to choose another)",
            ", ".join(labels.values()),
            shared,
            shared[0],
        )
    return shared[0]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def resolve_coordinate_system(element: Any, key: str, coordinate_system: str | None = None) -> str:
    """:func:`shared_coordinate_system` of one element (``element`` under the name ``key``)."""
    return shared_coordinate_system({key: element}, [key], coordinate_system)


def element_affine(
    element: Any,
    coordinate_system: str,
    key: str = "element",
    level: int = 0,
    *,
    to: Any = None,
    to_key: str = "element",
    to_level: int = 0,
) -> np.ndarray:
    """``3 x 3`` affine on ``(y, x)`` from the intrinsic coordinates of an element to ``coordinate_system``, or to
    the intrinsic coordinates of another element ``to`` through ``coordinate_system``: the one affine builder of stsr.

    ``level`` (``to_level``) is the pyramid level of a raster whose pixels the matrix maps (a multiscale element's
    transformation is that of ``scale0``; level ``k`` maps to it by the ratio of the shapes). For shapes and points
    (no levels) use ``0``: the matrix then maps the element's own ``(y, x)``. Any affine is returned as it is
    (rotation, shear, flips).

    Raises
    ------
    ValueError
        If an element has no transformation to ``coordinate_system`` (see :func:`shared_coordinate_system`).
    """
    mat = _to_coordinate_system(element, coordinate_system, key, level)
    if to is None:
        return mat
    return np.linalg.inv(_to_coordinate_system(to, coordinate_system, to_key, to_level)) @ mat


def _to_coordinate_system(element: Any, coordinate_system: str, key: str, level: int) -> np.ndarray:
    tfs = transformations(element)
    if coordinate_system not in tfs:
        shared_coordinate_system({key: element}, [key], coordinate_system)  # raises, with the fix
    mat = affine_yx(tfs[coordinate_system])
    if level != 0:
        lv = levels(element)
        arr = get_level(element, level, key)
        h0, w0 = lv[0].sizes["y"], lv[0].sizes["x"]
        mat = mat @ np.diag([h0 / arr.sizes["y"], w0 / arr.sizes["x"], 1.0])
    return mat


def axis_aligned(
    matrix: np.ndarray, what: str = "the element", rtol: float = 1e-6
) -> tuple[float, float, float, float]:
    """``(sy, sx, ty, tx)`` of an affine that is a positive axis-aligned scale plus translation, else a ValueError."""
    m = np.asarray(matrix, float)
    lin = m[:2, :2]
    size = max(abs(lin[0, 0]), abs(lin[1, 1]), 1e-300)
    if abs(lin[0, 1]) > rtol * size or abs(lin[1, 0]) > rtol * size:
        raise ValueError(
            f"The transformation of {what} rotates or shears (linear part {np.round(lin, 6).tolist()}); only an "
            "axis-aligned scale plus translation can be drawn/cropped here. Choose a coordinate system in which "
            "the element is axis-aligned (e.g. the image's intrinsic pixels) or resample it first."
        )
    if lin[0, 0] <= 0 or lin[1, 1] <= 0:
        raise ValueError(
            f"The transformation of {what} flips or collapses an axis (scale y={lin[0, 0]}, x={lin[1, 1]}); only "
            "positive scales are supported here."
        )
    return float(lin[0, 0]), float(lin[1, 1]), float(m[0, 2]), float(m[1, 2])


def pixel_centres(matrix: np.ndarray, rows: Any, cols: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate-system ``(y, x)`` of the centres of pixels ``(rows, cols)`` under an affine ``matrix``."""
    r = np.asarray(rows, float) + 0.5
    c = np.asarray(cols, float) + 0.5
    m = np.asarray(matrix, float)
    return m[0, 0] * r + m[0, 1] * c + m[0, 2], m[1, 0] * r + m[1, 1] * c + m[1, 2]


def pixel_area(matrix: np.ndarray) -> float:
    """Area of one pixel in coordinate-system units (absolute determinant of the linear part)."""
    return float(abs(np.linalg.det(np.asarray(matrix, float)[:2, :2])))


def imshow_extent(
    matrix: np.ndarray, row0: int, row1: int, col0: int, col1: int, what: str = "the element"
) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` for :meth:`matplotlib.axes.Axes.imshow` of pixels ``[row0, row1) x [col0,
    col1)``, with ``bottom > top`` so that ``y`` grows downwards as in images (``origin="upper"``)."""
    sy, sx, ty, tx = axis_aligned(matrix, what)
    return (tx + sx * col0, tx + sx * col1, ty + sy * row1, ty + sy * row0)


def bbox_to_pixels(
    matrix: np.ndarray, bbox: tuple[float, float, float, float], shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Half-open pixel window ``(row0, row1, col0, col1)`` of a raster (of ``shape``) covering ``bbox``.

    ``bbox = (xmin, ymin, xmax, ymax)`` in coordinate-system units; every pixel that intersects it is included and
    the window is clipped to the raster (it may be empty: ``row1 <= row0`` or ``col1 <= col0``). Works for any
    invertible affine (the window bounds the bbox's corners mapped into pixels).
    """
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    if not (xmax > xmin and ymax > ymin):
        raise ValueError(
            f"Bounding box must be (xmin, ymin, xmax, ymax) with xmax > xmin and ymax > ymin, got {bbox}."
        )
    inv = np.linalg.inv(np.asarray(matrix, float))
    corners = np.array([[ymin, xmin, 1], [ymin, xmax, 1], [ymax, xmin, 1], [ymax, xmax, 1]], float).T
    rc = inv @ corners
    eps = 1e-9
    r0 = int(np.floor(rc[0].min() + eps))
    r1 = int(np.ceil(rc[0].max() - eps))
    c0 = int(np.floor(rc[1].min() + eps))
    c1 = int(np.ceil(rc[1].max() - eps))
    h, w = int(shape[0]), int(shape[1])
    return max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)


@dataclass
class RasterWindow:
    """A window of a raster level.

    Attributes
    ----------
    data
        The (lazy) ``DataArray`` of the window (``c, y, x`` or ``y, x``).
    row0, col0
        Position of the window's top-left pixel in the level.
    matrix
        Affine from the window's pixel coordinates to the coordinate system.
    level
        The pyramid level read.
    """

    data: Any
    row0: int
    col0: int
    matrix: np.ndarray
    level: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the window."""
        return int(self.data.sizes["y"]), int(self.data.sizes["x"])

    def extent(self, what: str = "the element") -> tuple[float, float, float, float]:
        """``imshow`` extent of the window in coordinate-system units (see :func:`imshow_extent`)."""
        h, w = self.shape
        return imshow_extent(self.matrix, 0, h, 0, w, what)


def pick_level(
    element: Any,
    coordinate_system: str,
    bbox: tuple[float, float, float, float] | None = None,
    max_pixels: int = 2048,
    key: str = "element",
) -> int:
    """The finest pyramid level on which ``bbox`` (default: the whole element) spans at most ``max_pixels`` pixels
    along its longer side; the coarsest level if none does."""
    lv = levels(element)
    for i, arr in enumerate(lv):
        shape = (arr.sizes["y"], arr.sizes["x"])
        if bbox is None:
            h, w = shape
        else:
            r0, r1, c0, c1 = bbox_to_pixels(element_affine(element, coordinate_system, key, i), bbox, shape)
            h, w = max(r1 - r0, 0), max(c1 - c0, 0)
        if max(h, w) <= max_pixels:
            return i
    return len(lv) - 1


def crop(
    element: Any,
    coordinate_system: str,
    bbox: tuple[float, float, float, float] | None = None,
    level: int = 0,
    key: str = "element",
) -> RasterWindow:
    """Lazy window of level ``level`` of a raster covering ``bbox`` (``None``: the whole level).

    Raises
    ------
    ValueError
        If the element is not in ``coordinate_system`` or ``bbox`` does not intersect it.
    """
    arr = get_level(element, level, key)
    mat = element_affine(element, coordinate_system, key, level)
    h, w = int(arr.sizes["y"]), int(arr.sizes["x"])
    if bbox is None:
        return RasterWindow(arr, 0, 0, mat, level)
    r0, r1, c0, c1 = bbox_to_pixels(mat, bbox, (h, w))
    if r1 <= r0 or c1 <= c0:
        full = imshow_extent(mat, 0, h, 0, w) if _aligned(mat) else None
        where = f" (it spans x {full[0]:.6g}..{full[1]:.6g}, y {full[3]:.6g}..{full[2]:.6g})" if full else ""
        raise ValueError(
            f"The bounding box {tuple(bbox)} (xmin, ymin, xmax, ymax) in {coordinate_system!r} does not overlap "
            f"element {key!r}{where}."
        )
    sub = arr.isel(y=slice(r0, r1), x=slice(c0, c1))
    shift = np.array([[1, 0, r0], [0, 1, c0], [0, 0, 1]], float)
    return RasterWindow(sub, r0, c0, mat @ shift, level)


def _aligned(matrix: np.ndarray) -> bool:
    try:
        axis_aligned(matrix)
    except ValueError:
        return False
    return True


def sample_nearest(
    element: Any,
    coordinate_system: str,
    y: np.ndarray,
    x: np.ndarray,
    key: str = "element",
    level: int = 0,
    fill: Any = 0,
) -> np.ndarray:
    """Values of a single-channel raster (labels, or an image with one channel) at coordinate-system points.

    Each point takes the value of the pixel containing it (nearest neighbour); points outside get ``fill``. Only the
    window of pixels bounding the points is read.
    """
    arr = get_level(element, level, key)
    if "c" in arr.dims:
        if arr.sizes["c"] != 1:
            raise ValueError(
                f"Element {key!r} has {arr.sizes['c']} channels; a mask must be a labels element or a "
                "single-channel image."
            )
        arr = arr.isel(c=0)
    y = np.asarray(y, float)
    x = np.asarray(x, float)
    out = np.full(y.shape, fill, dtype=arr.dtype)
    if y.size == 0:
        return out
    inv = np.linalg.inv(element_affine(element, coordinate_system, key, level))
    r = np.floor(inv[0, 0] * y + inv[0, 1] * x + inv[0, 2]).astype(np.int64)
    c = np.floor(inv[1, 0] * y + inv[1, 1] * x + inv[1, 2]).astype(np.int64)
    h, w = int(arr.sizes["y"]), int(arr.sizes["x"])
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    if not inside.any():
        return out
    r0, r1 = int(r[inside].min()), int(r[inside].max()) + 1
    c0, c1 = int(c[inside].min()), int(c[inside].max()) + 1
    block = np.asarray(arr.isel(y=slice(r0, r1), x=slice(c0, c1)).values)
    out[inside] = block[r[inside] - r0, c[inside] - c0]
    return out


ALPHA_NAMES = ("a", "alpha")


def alpha_fix(key: str, levels: Sequence[Any], new_key: str | None = None) -> str:
    """For an image of four channels whose last is named ``a``/``alpha`` (RGBA, e.g. read from a PNG): the code that
    adds its RGB channels as a new element (same pyramid and transformations); else ``""``. (In this module, the
    one that reads transformations, since the code it gives reads them.)"""
    level = levels[0]
    names = [str(c) for c in level.coords["c"].values] if "c" in level.coords else []
    if level.shape[0] != 4 or not names or names[-1].lower() not in ALPHA_NAMES:
        return ""
    new_key = new_key or f"{key}_rgb"
    factors = [2] * (len(levels) - 1)
    source = f'sdata[{key!r}]["scale0"]["image"]' if len(levels) > 1 else f"sdata[{key!r}]"
    return (
        f"Its last channel is an alpha channel; add the RGB channels as an image of their own and pass "
        f"{new_key!r}: rgba = {source}; sdata[{new_key!r}] = spatialdata.models.Image2DModel.parse(rgba.data[:3], "
        f'dims=("c", "y", "x"), c_coords={names[:3]!r}, transformations=spatialdata.transformations.'
        f"get_transformation(rgba, get_all=True)" + (f", scale_factors={factors}" if factors else "") + ")."
    )

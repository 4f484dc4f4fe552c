"""Drawing helpers shared by :mod:`stsr.pl`: elements placed in a coordinate system through their transformations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._constants import CS_GLOBAL, IMAGE_HE
from .._elements import (
    crop,
    element_affine,
    get_raster,
    imshow_extent,
    levels,
    pick_level,
    provenance,
    shared_coordinate_system,
)
from .._validate import element_type

#: Longest side, in pixels, of the window read from a pyramid for display (the finest level not exceeding it).
MAX_DISPLAY_PIXELS = 2048
#: Default unit of HR rasters.
DEFAULT_UNIT = "counts per HR pixel"
#: Units of the coordinate systems whose unit is known. SpatialData does not record units; every stsr loader (and
#: :func:`stsr.datasets.synthetic`) places its elements in :data:`~stsr._constants.CS_GLOBAL` in micrometres.
COORDINATE_UNITS = {CS_GLOBAL: "µm"}
#: Fully transparent: the colour of map pixels without a value.
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)

Bbox = tuple[float, float, float, float]


def check_crop(crop_box: Any) -> Bbox | None:
    """Validate ``crop=(xmin, ymin, xmax, ymax)``."""
    if crop_box is None:
        return None
    try:
        box = tuple(float(v) for v in crop_box)
    except TypeError as err:
        raise TypeError(f"crop must be (xmin, ymin, xmax, ymax) or None, got {crop_box!r}.") from err
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(
            f"crop must be (xmin, ymin, xmax, ymax) in coordinate-system units with xmax > xmin and ymax > ymin, "
            f"got {crop_box!r}."
        )
    return box  # type: ignore[return-value]


def default_image(sdata: Any, key: str | None, exclude: tuple[str, ...] = ()) -> str | None:
    """The histology image to draw under raster ``key``: its provenance ``image_key``, else the only image with
    at most 4 channels (``"he"`` preferred), else ``None`` when there is none."""
    if key is not None and key in sdata:
        rec = provenance(sdata, key).get("image_key")
        if isinstance(rec, str) and rec in sdata.images:
            return rec
    if IMAGE_HE in sdata.images and IMAGE_HE != key and IMAGE_HE not in exclude:
        return IMAGE_HE
    genes: set[str] = set()
    if key is not None and key in sdata.images:
        arr = levels(sdata.images[key])[0]
        genes = {str(c) for c in arr.coords["c"].values} if "c" in arr.coords else set()
    candidates = []
    for name, el in sdata.images.items():
        if name == key or name in exclude or (key is not None and name == f"{key}_std"):
            continue
        arr = levels(el)[0]
        channels = {str(c) for c in arr.coords["c"].values} if "c" in arr.coords else set()
        if arr.sizes.get("c", 1) <= 4 and not provenance(sdata, name) and not (channels & genes):
            candidates.append(name)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return None
    raise ValueError(
        f"Several images could lie under {key!r}: {sorted(candidates)}; pass image_key= to choose one (or "
        "show_image=False)."
    )


def shared_cs(sdata: Any, keys: list[str], coordinate_system: str | None) -> str:
    """The coordinate system in which to draw the elements ``keys`` together: the one resolver of stsr,
    :func:`stsr._elements.shared_coordinate_system` (``coordinate_system`` if given, checked, else ``"global"`` if
    shared, else their only or first shared one)."""
    return shared_coordinate_system(sdata, keys, coordinate_system)


def image_rgb(values: np.ndarray) -> np.ndarray:
    """``(c, y, x)`` image values as ``(y, x, 3)`` (or ``(y, x)`` grey) suitable for ``imshow``."""
    arr = np.asarray(values)
    if arr.shape[0] >= 3:
        arr = arr[:3]
    elif arr.shape[0] == 2:
        arr = arr[:1]
    arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == np.uint8:
        return arr[..., 0] if arr.shape[-1] == 1 else arr
    arr = arr.astype(np.float32)
    finite = arr[np.isfinite(arr)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    arr = np.clip((arr - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def draw_image(ax: Any, sdata: Any, image_key: str, cs: str, crop_box: Bbox | None) -> Any:
    """Draw an image (pyramid level chosen for the view) at its place in ``cs``; returns the ``AxesImage``.

    An image placed by a rotation or shear (e.g. a registered Xenium H&E) is drawn in its own pixels through its
    affine (a matplotlib ``Affine2D`` transform), so that it lies under maps drawn along the axes of ``cs``.
    """
    element = get_raster(sdata, image_key)
    lvl = pick_level(element, cs, crop_box, MAX_DISPLAY_PIXELS, image_key)
    win = crop(element, cs, crop_box, lvl, image_key)
    rgb = image_rgb(np.asarray(win.data.values))
    kwargs = {"cmap": "gray"} if rgb.ndim == 2 else {}
    try:
        extent = win.extent(f"image {image_key!r}")
    except (
        ValueError
    ):  # rotated or sheared: pixel (row, col) spans [row, row + 1) x [col, col + 1), then the affine
        from matplotlib.transforms import Affine2D

        h, w = win.shape
        m = win.matrix  # acts on (y, x); matplotlib's on (x, y)
        xy = np.array([[m[1, 1], m[1, 0], m[1, 2]], [m[0, 1], m[0, 0], m[0, 2]], [0.0, 0.0, 1.0]])
        kwargs["transform"] = Affine2D(xy) + ax.transData
        extent = (0.0, float(w), float(h), 0.0)
    art = ax.imshow(rgb, extent=extent, origin="upper", interpolation="antialiased", **kwargs)
    art.set_label(image_key)
    return art


def raster_window(
    sdata: Any, key: str, gene: str | None, cs: str, crop_box: Bbox | None, level: int | None
) -> tuple[np.ma.MaskedArray, tuple[float, float, float, float], np.ndarray]:
    """Values of one channel (``gene``; ``None`` for single-channel/labels) of raster ``key`` in the view.

    Pixels without a value are masked: NaN in ``gene``, or zero (or NaN) in every channel, which is how the maps
    stsr writes mark the pixels outside the tissue mask. A zero of ``gene`` where another channel is non-zero is a
    measured zero and stays unmasked; a single-channel raster's zeros are masked.

    Returns ``(values (y, x) float masked array, imshow extent, affine of the window's pixels)``.
    """
    import dask

    element = sdata[key]
    lvl = pick_level(element, cs, crop_box, MAX_DISPLAY_PIXELS, key) if level is None else level
    win = _window(element, cs, crop_box, lvl, key, "raster")
    data = win.data
    if "c" in data.dims:
        channel = data.sel(c=gene) if gene is not None else data.isel(c=0)
        measured = ((data != 0) & data.notnull()).any("c")
    else:
        channel = data
        measured = (data != 0) & data.notnull()
    # one pass over the chunks for both (the channel is read again from the same chunks otherwise)
    values, measured = dask.compute(channel.data, measured.data)
    values = np.asarray(values, dtype=np.float32)
    has_value = np.asarray(measured, dtype=bool) & np.isfinite(values)
    return np.ma.masked_array(values, mask=~has_value), win.extent(f"raster {key!r}"), win.matrix


def draw_map(
    ax: Any,
    values: np.ndarray,
    extent: tuple[float, float, float, float],
    cmap: Any,
    norm: Any,
    alpha: float,
) -> Any:
    """Draw a value map (``(y, x)``, masked where there is no value) with ``imshow``; masked and NaN pixels are
    fully transparent, so whatever lies underneath shows unchanged there. Returns the ``AxesImage``."""
    return ax.imshow(
        values,
        extent=extent,
        origin="upper",
        cmap=transparent_bad(cmap),
        norm=norm,
        alpha=alpha,
        interpolation="nearest",
    )


def opaque(mappable: Any) -> Any:
    """An opaque ``ScalarMappable`` for a colour bar of ``mappable``: same colour map and the same ``Normalize``
    object (so it follows ``set_clim``), without the layer's ``alpha``; the bar shows ``cmap(norm(value))``."""
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=mappable.norm, cmap=mappable.get_cmap())


def transparent_bad(cmap: Any) -> Any:
    """``cmap`` (a name or a ``Colormap``) with masked / NaN values drawn fully transparent."""
    import matplotlib

    return matplotlib.colormaps.get_cmap(cmap).with_extremes(bad=TRANSPARENT)


def _window(element: Any, cs: str, crop_box: Bbox | None, level: int, key: str, what: str) -> Any:
    # check alignment before reading
    mat = element_affine(element, cs, key, level)
    arr = levels(element)[level]
    imshow_extent(mat, 0, int(arr.sizes["y"]), 0, int(arr.sizes["x"]), f"{what} {key!r} in {cs!r}")
    return crop(element, cs, crop_box, level, key)


def color_limits(
    values: list[np.ndarray], vmin: float | None, vmax: float | None, percentile: tuple[float, float]
) -> tuple[float, float]:
    """``(vmin, vmax)``: given values, else percentiles of the finite, unmasked values pooled over ``values``."""
    if len(percentile) != 2 or not 0 <= percentile[0] < percentile[1] <= 100:
        raise ValueError(f"percentile must be (low, high) with 0 <= low < high <= 100, got {percentile!r}.")
    pooled = (
        np.concatenate([np.ravel(np.ma.filled(np.ma.asarray(v, dtype=np.float64), np.nan)) for v in values])
        if values
        else np.empty(0)
    )
    pooled = pooled[np.isfinite(pooled)]
    lo = vmin if vmin is not None else (float(np.percentile(pooled, percentile[0])) if pooled.size else 0.0)
    hi = vmax if vmax is not None else (float(np.percentile(pooled, percentile[1])) if pooled.size else 1.0)
    if hi <= lo:
        hi = lo + (abs(lo) * 1e-6 if lo else 1.0)
    return float(lo), float(hi)


def unit_of(sdata: Any, key: str) -> str:
    """Unit recorded in the provenance of ``key`` (default: counts per HR pixel)."""
    return str(provenance(sdata, key).get("unit", DEFAULT_UNIT))


def axis_label(axis: str, cs: str) -> str:
    """Axis label naming the coordinate system and its unit when known: ``"x (µm, global)"``, else
    ``"x (<cs> units)"``."""
    unit = COORDINATE_UNITS.get(cs)
    return f"{axis} ({unit}, {cs})" if unit else f"{axis} ({cs} units)"


def finish_axes(
    ax: Any, cs: str, extent: tuple[float, float, float, float] | None, crop_box: Bbox | None
) -> None:
    """Equal aspect, ``y`` downwards, limits on the crop (or ``extent``), axis labels naming ``cs`` and its unit."""
    if crop_box is not None:
        ax.set_xlim(crop_box[0], crop_box[2])
        ax.set_ylim(crop_box[3], crop_box[1])
    elif extent is not None:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel(axis_label("x", cs))
    ax.set_ylabel(axis_label("y", cs))


def save_figure(fig: Any, save: str | Path | None) -> None:
    """Save ``fig`` as an image (PNG by default) when ``save`` is given."""
    if save is None:
        return
    path = Path(save)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def is_raster(sdata: Any, key: str) -> bool:
    """Whether ``key`` is an image or labels element."""
    return element_type(sdata, key) in ("images", "labels")

"""Tissue masks from the image, on any grid."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .._validate import check_element, check_new_key
from ..observation import Grid
from ._grid import grid_transformations, hr_grid
from ._provenance import grid_to_dict, record
from ._transforms import parse_raster, raster_levels, spatial_shape

__all__ = ["tissue_mask"]

#: Largest pyramid level (pixels) read to compute a mask.
MAX_LEVEL_PIXELS = 16_000_000
#: Pixels darker than this (all channels, on a 0-1 scale) are a masked-out (black) background.
BLACK_LEVEL = 20 / 255


def _choose_level(levels: list[Any], full: tuple[int, int], grid_px: float) -> int:
    sizes = [(int(a.sizes["y"]), int(a.sizes["x"])) for a in levels]
    factors = [full[0] / s[0] for s in sizes]
    # coarsest level with at least ~2 level pixels per grid pixel, unless it is too large
    ok = [i for i, f in enumerate(factors) if f <= max(grid_px / 2, 1.0)] or [0]
    best = max(ok)
    while best < len(levels) - 1 and sizes[best][0] * sizes[best][1] > MAX_LEVEL_PIXELS:
        best += 1
    return best


def _to_unit(arr: np.ndarray) -> np.ndarray:
    is_int = np.issubdtype(arr.dtype, np.integer)
    arr = arr.astype(np.float32)
    top = float(arr.max(initial=0))
    if is_int or top > 1.0:
        arr = arr / (255.0 if top <= 255 else top)
    return arr


def _score(img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Tissue score (higher = tissue) and a mask of pixels that may be tissue (not black background)."""
    from scipy.ndimage import gaussian_filter

    if kind == "he":
        rgb = _to_unit(img[:3])
        mx, mn = rgb.max(0), rgb.min(0)
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
        dark = 1.0 - rgb.mean(0)
        black = mx < BLACK_LEVEL
        score = np.maximum(sat, dark)
        score[black] = 0.0  # a black (masked-out) background scores like a white one
        valid = ~black
    else:
        score = img.astype(np.float32).mean(0)
        valid = np.isfinite(score)
        score = np.where(valid, score, 0.0)
    score = gaussian_filter(score.astype(np.float32), 1.0)
    return score, valid


def tissue_mask(
    sdata: Any,
    image_key: str,
    grid: Grid | None = None,
    pixel_size: float | None = None,
    coordinate_system: str | None = None,
    method: Literal["otsu"] = "otsu",
    kind: Literal["auto", "he", "fluorescence"] = "auto",
    threshold: float | None = None,
    fill_holes: bool = False,
    level: int | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> np.ndarray:
    """Boolean tissue mask of an image, on an HR grid.

    For H&E (``kind="he"``, or ``"auto"`` with 3 or 4 channels) the tissue score is the larger of colour saturation
    and darkness; for fluorescence it is the mean intensity. The threshold is Otsu's on a downscaled pyramid level,
    ignoring black pixels (images whose background was masked to black, e.g. the HER2ST app PNGs, so black counts as
    background). A grid pixel is tissue when at least half of the level pixels inside it are.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    image_key
        Key of the image.
    grid
        Grid in the image's intrinsic frame (see :func:`hr_grid`). Either ``grid`` or ``pixel_size``.
    pixel_size
        HR pixel side in units of ``coordinate_system``, to build ``hr_grid(sdata, image_key, pixel_size)``.
    coordinate_system
        Coordinate system of ``pixel_size``.
    method
        Thresholding method (only ``"otsu"``).
    kind
        Image type: ``"auto"``, ``"he"`` or ``"fluorescence"``.
    threshold
        Fixed threshold on the tissue score instead of Otsu's.
    fill_holes
        Fill holes (e.g. lumens, fat) enclosed by tissue.
    level
        Pyramid level to read (default: the coarsest with at least ~2 level pixels per grid pixel).
    key_added
        If given, also add the mask as a labels element (1 = tissue) overlaying the image.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    ``(height, width)`` boolean array on the grid.
    """
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import threshold_otsu

    image = check_element(sdata, image_key, "images")
    if method != "otsu":
        raise ValueError(f"method must be 'otsu', got {method!r}.")
    if grid is None:
        if pixel_size is None:
            raise ValueError("Pass either grid= or pixel_size= to tissue_mask.")
        grid = hr_grid(sdata, image_key, pixel_size, coordinate_system)
    if key_added is not None:
        check_new_key(sdata, key_added, overwrite)
    levels = raster_levels(image)
    full = spatial_shape(image)
    if level is None:
        level = _choose_level(levels, full, grid.pixel_size)
    elif not 0 <= level < len(levels):
        raise ValueError(
            f"Image {image_key!r} has {len(levels)} pyramid levels; level={level} is out of range."
        )
    arr = levels[level]
    n_c = int(arr.sizes.get("c", 1))
    if kind == "auto":
        kind = "he" if n_c in (3, 4) else "fluorescence"
    if kind not in ("he", "fluorescence"):
        raise ValueError(f"kind must be 'auto', 'he' or 'fluorescence', got {kind!r}.")
    img = np.asarray(arr.transpose("c", "y", "x").data if "c" in arr.dims else arr.data[None])
    score, valid = _score(img, kind)
    if threshold is None:
        vals = score.ravel()  # black background pixels take part with score 0
        threshold = float(threshold_otsu(vals)) if vals.size and vals.min() < vals.max() else np.inf
    tissue = (score > threshold) & valid

    lh, lw = tissue.shape
    fy, fx = full[0] / lh, full[1] / lw
    h, w = grid.shape
    # fraction of level pixels (by centre) inside each grid pixel that are tissue
    rr, cc = grid.to_grid((np.arange(lh) + 0.5) * fy, (np.arange(lw) + 0.5) * fx)
    ri, ci = np.floor(rr).astype(np.int64), np.floor(cc).astype(np.int64)
    okr, okc = (ri >= 0) & (ri < h), (ci >= 0) & (ci < w)
    flat = (ri[okr][:, None] * w + ci[okc][None, :]).ravel()
    sub = tissue[np.ix_(okr, okc)].ravel()
    n = np.bincount(flat, minlength=h * w)
    t = np.bincount(flat, weights=sub.astype(float), minlength=h * w)
    frac = np.where(n > 0, t / np.maximum(n, 1), np.nan).reshape(h, w)
    # grid pixels finer than the level: nearest level pixel at the grid pixel centre
    if np.isnan(frac).any():
        gy, gx = grid.pixel_centres()
        li = np.clip(np.floor(gy / fy).astype(np.int64), 0, lh - 1)
        lj = np.clip(np.floor(gx / fx).astype(np.int64), 0, lw - 1)
        nearest = tissue[li, lj].astype(float)
        inside = (gy >= 0) & (gy < full[0]) & (gx >= 0) & (gx < full[1])
        frac = np.where(np.isnan(frac), np.where(inside, nearest, 0.0), frac)
    mask = frac >= 0.5
    if fill_holes:
        mask = binary_fill_holes(mask)
    if key_added is not None:
        labels = parse_raster(
            mask.astype(np.uint8), None, grid_transformations(grid, sdata, image_key), "auto", labels=True
        )
        if key_added in sdata:
            del sdata[key_added]
        sdata.labels[key_added] = labels
        record(
            sdata,
            key_added,
            {
                "kind": "tissue_mask",
                "image_key": image_key,
                "grid": grid_to_dict(grid),
                "threshold": float(threshold) if np.isfinite(threshold) else None,
            },
        )
    return mask

"""Tissue masks from the image, on any grid."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from .._elements import element_affine, shared_coordinate_system
from .._validate import check_element, check_new_key, image_value_scale
from ..observation import Grid
from ._grid import ImageFrame, frame_grid, grid_transformations, image_frame
from ._provenance import grid_to_dict, record
from ._transforms import parse_raster, raster_levels

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


def _score(img: np.ndarray, kind: str, scale: float = 255.0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue score (higher = tissue) and a mask of pixels that may be tissue (not black background).

    ``scale`` brings the image values to ``[0, 1]`` (:func:`stsr._validate.image_value_scale`, the rule the model's
    tiles use too).
    """
    from scipy.ndimage import gaussian_filter

    if kind == "he":
        rgb = np.clip(img[:3].astype(np.float32) / np.float32(scale), 0.0, 1.0)
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


#: Level pixels scored at once by :func:`tissue_mask`: the level is read chunk row by chunk row and scored in bands
#: of at most this many pixels (about 45 bytes each while scored), so it takes a few tens of MB whatever the size of
#: the level.
_BAND_PIXELS = 2**19
#: Rows of context the smoothing of the score (a Gaussian of sigma 1 truncated at 4 sigma) reaches on each side.
_SMOOTH_HALO = 4


def _score_bands(data: Any, kind: str, scale: float) -> Any:
    """Yield ``(row0, score, valid)`` for consecutive row bands of a ``(c, y, x)`` level (numpy or dask).

    Each band is scored (:func:`_score`) with :data:`_SMOOTH_HALO` rows of context on each side, so the bands are
    exactly the rows of the score of the whole level; the level is read once, one chunk row at a time.
    """
    lh, lw = int(data.shape[1]), int(data.shape[2])
    band = max(1, _BAND_PIXELS // max(lw, 1))
    chunks = getattr(data, "chunks", None)
    stops = np.cumsum(chunks[1]) if isinstance(chunks, tuple) and isinstance(chunks[1], tuple) else [lh]
    buf, start, end, done = None, 0, 0, 0  # buf: the raw rows [start, end); rows [0, done) are yielded
    for stop in stops:
        stop = int(stop)
        if stop <= end:
            continue
        new = np.asarray(data[:, end:stop])
        buf = new if buf is None else np.concatenate([buf, new], axis=1)
        end = stop
        ready = lh if end >= lh else end - _SMOOTH_HALO  # rows whose context has been read
        while done < ready:
            r1 = min(done + band, ready)
            a, b = max(done - _SMOOTH_HALO, 0), min(r1 + _SMOOTH_HALO, end)
            score, valid = _score(buf[:, a - start : b - start], kind, scale)
            yield done, score[done - a : r1 - a], valid[done - a : r1 - a]
            done = r1
        drop = max(done - _SMOOTH_HALO, 0)
        buf, start = buf[:, drop - start :], drop


def _otsu_threshold(data: Any, kind: str, scale: float) -> float:
    """Otsu's threshold of the score of every level pixel (``inf`` for a constant score), computed band by band:
    the same 256-bin histogram over the score's range as :func:`skimage.filters.threshold_otsu` of the whole level."""
    from skimage.filters import threshold_otsu

    # first pass: the range of the score (as numpy's histogram takes it); second pass: the histogram
    lo = hi = None
    for _, score, _ in _score_bands(data, kind, scale):
        if score.size:
            lo = score.min() if lo is None else min(lo, score.min())
            hi = score.max() if hi is None else max(hi, score.max())
    if lo is None or not lo < hi:
        return np.inf
    counts, edges = 0, None
    for _, score, _ in _score_bands(data, kind, scale):
        hist, edges = np.histogram(score, bins=256, range=(lo, hi))
        counts = counts + hist
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0)))


def _level_on_grid(
    data: Any,
    kind: str,
    scale: float,
    threshold: float,
    full: tuple[int, int],
    grid: Grid,
    to_image: np.ndarray | None = None,
) -> np.ndarray:
    """Grid pixels where at least half of the level pixels (by centre) inside are tissue (score above
    ``threshold``, not black); a grid pixel holding no level pixel centre takes the level pixel at its own centre
    (none outside the image). Band by band: memory is one band and a few bytes per grid pixel.

    ``to_image`` maps the grid's frame to the image's full-resolution pixels (:class:`stsr.pp._grid.ImageFrame`);
    other than the identity (a rotated or sheared image), the level's pixels are placed through it
    (:func:`_level_on_grid_affine`)."""
    if to_image is not None and not np.array_equal(to_image, np.eye(3)):
        return _level_on_grid_affine(data, kind, scale, threshold, full, grid, np.asarray(to_image, float))
    lh, lw = int(data.shape[1]), int(data.shape[2])
    fy, fx = full[0] / lh, full[1] / lw
    h, w = grid.shape
    rr, cc = grid.to_grid((np.arange(lh) + 0.5) * fy, (np.arange(lw) + 0.5) * fx)
    ri, ci = np.floor(rr).astype(np.int64), np.floor(cc).astype(np.int64)
    okc = (ci >= 0) & (ci < w)
    cols = ci[okc]
    # the level pixel at each grid pixel centre (rows and columns apart: the grid is axis-aligned)
    gy, gx = grid.to_reference(np.arange(h) + 0.5, np.arange(w) + 0.5)
    li = np.clip(np.floor(gy / fy).astype(np.int64), 0, lh - 1)
    lj = np.clip(np.floor(gx / fx).astype(np.int64), 0, lw - 1)
    n = np.zeros((h, w), np.int32)
    t = np.zeros((h, w), np.int32)
    nearest = np.zeros((h, w), bool)
    for r0, score, valid in _score_bands(data, kind, scale):
        r1 = r0 + score.shape[0]
        tissue = (score > threshold) & valid
        rows = ri[r0:r1]
        okr = (rows >= 0) & (rows < h)
        if okr.any() and cols.size:
            g0, g1 = int(rows[okr].min()), int(rows[okr].max()) + 1
            flat = ((rows[okr] - g0)[:, None] * w + cols[None, :]).ravel()
            sub = tissue[np.ix_(okr, okc)].ravel()
            n[g0:g1] += np.bincount(flat, minlength=(g1 - g0) * w).reshape(g1 - g0, w).astype(np.int32)
            t[g0:g1] += np.bincount(flat[sub], minlength=(g1 - g0) * w).reshape(g1 - g0, w).astype(np.int32)
            del flat, sub
        here = np.flatnonzero((li >= r0) & (li < r1))
        if here.size:
            nearest[here] = tissue[li[here] - r0][:, lj]
        del score, valid, tissue  # not held while the next band is scored
    # t / n >= 0.5 exactly when 2 t >= n (integer counts, t <= n); empty grid pixels: the nearest level pixel,
    # none outside the image. 11 bytes per grid pixel in all.
    mask = np.multiply(t, 2, out=t) >= n
    del t
    empty = n == 0
    del n
    nearest[~((gy >= 0) & (gy < full[0])), :] = False
    nearest[:, ~((gx >= 0) & (gx < full[1]))] = False
    mask[empty] = nearest[empty]
    return mask


def _level_on_grid_affine(
    data: Any,
    kind: str,
    scale: float,
    threshold: float,
    full: tuple[int, int],
    grid: Grid,
    to_image: np.ndarray,
) -> np.ndarray:
    """:func:`_level_on_grid` for a grid placed on the image by any affine ``to_image`` (frame -> full-resolution
    image pixels): each level pixel centre is mapped to the grid through it. The level's tissue is kept (one byte
    per level pixel) for the grid pixels holding no level pixel centre."""
    lh, lw = int(data.shape[1]), int(data.shape[2])
    fy, fx = full[0] / lh, full[1] / lw
    h, w = grid.shape
    ps, (oy, ox) = grid.pixel_size, grid.origin
    grid_to_level = (
        np.diag([1 / fy, 1 / fx, 1.0]) @ to_image @ np.array([[ps, 0, oy], [0, ps, ox], [0, 0, 1.0]])
    )
    m = np.linalg.inv(grid_to_level)  # level pixel -> grid
    n = np.zeros(h * w, np.int32)
    t = np.zeros(h * w, np.int32)
    level_tissue = np.zeros((lh, lw), bool)
    cols = np.arange(lw) + 0.5
    for r0, score, valid in _score_bands(data, kind, scale):
        r1 = r0 + score.shape[0]
        tissue = (score > threshold) & valid
        level_tissue[r0:r1] = tissue
        rows = (np.arange(r0, r1) + 0.5)[:, None]
        gi = np.floor(m[0, 0] * rows + m[0, 1] * cols + m[0, 2]).astype(np.int64)
        gj = np.floor(m[1, 0] * rows + m[1, 1] * cols + m[1, 2]).astype(np.int64)
        ok = (gi >= 0) & (gi < h) & (gj >= 0) & (gj < w)
        flat = gi[ok] * w + gj[ok]
        u, c = np.unique(flat, return_counts=True)
        n[u] += c.astype(np.int32)
        u, c = np.unique(flat[tissue[ok]], return_counts=True)
        t[u] += c.astype(np.int32)
        del score, valid, tissue, gi, gj, ok, flat
    out = 2 * t.astype(np.int64) >= n
    empty = np.flatnonzero(n == 0)  # the level pixel at the grid pixel's centre, none outside the image
    for a in range(0, empty.size, 2**20):
        idx = empty[a : a + 2**20]
        r, c = idx // w + 0.5, idx % w + 0.5
        ly = grid_to_level[0, 0] * r + grid_to_level[0, 1] * c + grid_to_level[0, 2]
        lx = grid_to_level[1, 0] * r + grid_to_level[1, 1] * c + grid_to_level[1, 2]
        inside = (ly >= 0) & (ly < lh) & (lx >= 0) & (lx < lw)
        li = np.clip(np.floor(ly).astype(np.int64), 0, lh - 1)
        lj = np.clip(np.floor(lx).astype(np.int64), 0, lw - 1)
        out[idx] = inside & level_tissue[li, lj]
    return out.reshape(h, w)


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
    tissue: Any = None,
) -> np.ndarray:
    """Boolean tissue mask of an image, on an HR grid.

    For H&E (``kind="he"``, or ``"auto"`` with 3 or 4 channels) the tissue score is the larger of colour saturation
    and darkness; for fluorescence it is the mean intensity. The threshold is Otsu's on a downscaled pyramid level,
    ignoring black pixels (images whose background was masked to black, e.g. the HER2ST app PNGs, so black counts as
    background). A grid pixel is tissue when at least half of the level pixels inside it are.

    With ``tissue``, the tissue is given instead (e.g. a segmentation made with sopa, or Space Ranger's tissue) and
    only placed on the grid.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    image_key
        Key of the image.
    grid
        HR grid over the image (see :func:`hr_grid`), made in ``coordinate_system``. Either ``grid`` or
        ``pixel_size``.
    pixel_size
        HR pixel side in units of ``coordinate_system``, to build ``hr_grid(sdata, image_key, pixel_size)``.
    coordinate_system
        Coordinate system of ``pixel_size`` and of ``grid``, and in which a ``tissue`` element is placed on the
        image (default: ``"global"`` if shared by both, else another coordinate system they share). The image may be
        placed by any affine (rotation, shear): it is read through it.
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
    tissue
        The tissue, given instead of thresholding the image (``method``, ``kind``, ``threshold`` and ``level`` are
        then unused). One of:

        - the key of a labels element: nonzero pixels are tissue (e.g. Space Ranger's or sopa's tissue labels);
        - the key of a shapes element: the inside of its polygons or multipolygons (holes excluded; circles with a
          ``radius`` too) is tissue (e.g. sopa's ``"region_of_interest"``);
        - a boolean ``(height, width)`` array or :class:`xarray.DataArray` (integer: nonzero = tissue) of the
          shape of the image's full-resolution level (pixel ``(i, j)`` = image pixel ``(i, j)``), or of ``grid``
          (used as it is), or of ``hr_grid(sdata, image_key, pixel_size).shape`` when ``grid`` differs from it
          (e.g. shifted onto square bins).

        Elements are placed through their transformations to ``coordinate_system``. A grid pixel is tissue when at
        least half of it is covered, measured on 4 x 4 sub-samples per grid pixel (each takes the value of the
        labels pixel or array pixel it falls in, or whether it is inside the polygons).

    Returns
    -------
    ``(height, width)`` boolean array on the grid.
    """
    from scipy.ndimage import binary_fill_holes

    image = check_element(sdata, image_key, "images")
    if method != "otsu":
        raise ValueError(f"method must be 'otsu', got {method!r}.")
    if grid is None and pixel_size is None:
        raise ValueError("Pass either grid= or pixel_size= to tissue_mask.")
    frame = image_frame(sdata, image_key, coordinate_system)
    if grid is None:
        grid = frame_grid(frame, pixel_size)
    if key_added is not None:
        check_new_key(sdata, key_added, overwrite)
    if tissue is not None:
        mask = _given_tissue(sdata, tissue, grid, image_key, coordinate_system, frame=frame)
        if fill_holes:
            mask = binary_fill_holes(mask)
        if key_added is not None:
            source = tissue if isinstance(tissue, str) else "array"
            _add_mask(sdata, key_added, mask, grid, image_key, frame, {"tissue": source, "threshold": None})
        return mask
    levels = raster_levels(image)
    full = (int(levels[0].sizes["y"]), int(levels[0].sizes["x"]))
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
    # read band by band (memory: one band of the level and a few bytes per grid pixel, whatever the level's size)
    data = arr.transpose("c", "y", "x").data if "c" in arr.dims else arr.data[None]
    scale = image_value_scale(levels, image_key)
    if threshold is None:  # black background pixels take part with score 0
        threshold = _otsu_threshold(data, kind, scale)
    mask = _level_on_grid(data, kind, scale, threshold, full, grid, frame.to_image)
    if fill_holes:
        mask = binary_fill_holes(mask)
    if key_added is not None:
        _add_mask(
            sdata,
            key_added,
            mask,
            grid,
            image_key,
            frame,
            {"threshold": float(threshold) if np.isfinite(threshold) else None},
        )
    return mask


def _add_mask(
    sdata: Any, key_added: str, mask: np.ndarray, grid: Grid, image_key: str, frame: ImageFrame, info: dict
) -> None:
    """Add ``mask`` as a labels element (1 = tissue) overlaying the image, with its provenance record."""
    tfs = grid_transformations(grid, sdata, image_key, frame.coordinate_system)
    labels = parse_raster(mask.astype(np.uint8), None, tfs, "auto", labels=True)
    if key_added in sdata:
        del sdata[key_added]
    sdata.labels[key_added] = labels
    record(
        sdata,
        key_added,
        {"kind": "tissue_mask", "image_key": image_key, "grid": grid_to_dict(grid), **info},
    )


# ------------------------------------------------------------------------------------------ tissue given by the user
#: Sub-samples per HR pixel side when a given tissue is placed on the grid: a pixel is tissue when at least 8 of its
#: 16 sub-samples are.
TISSUE_SUBSAMPLE = 4
#: Sub-samples placed at once (bounds the memory of the rasterisation to a few tens of MB).
_BLOCK_SAMPLES = 2**20


def _given_tissue(
    sdata: Any,
    tissue: Any,
    grid: Grid,
    image_key: str,
    coordinate_system: str | None = None,
    subsample: int = TISSUE_SUBSAMPLE,
    frame: ImageFrame | None = None,
) -> np.ndarray:
    """A tissue given by the user (labels or shapes key, or a boolean array), as a boolean mask on ``grid``.

    See the ``tissue`` parameter of :func:`tissue_mask`. A grid pixel is tissue when at least half of its
    ``subsample x subsample`` sub-samples fall on the tissue (the fraction of the pixel covered, to 1/16).
    ``frame`` is the image's :class:`~stsr.pp._grid.ImageFrame` that ``grid`` lies in (default: that of
    ``coordinate_system``).
    """
    if frame is None:
        frame = image_frame(sdata, image_key, coordinate_system)
    if isinstance(tissue, str):
        return _tissue_element(sdata, tissue, grid, image_key, coordinate_system, subsample, frame)
    arr = _tissue_array(tissue)
    if arr.shape == grid.shape:
        return arr.copy()
    image_level = raster_levels(sdata.images[image_key])[0]
    h_img, w_img = int(image_level.sizes["y"]), int(image_level.sizes["x"])
    ps = grid.pixel_size
    hr = Grid(tuple(max(1, math.ceil(s / ps - 1e-6)) for s in frame.shape), ps)
    to_frame = _grid_affine(grid)
    sources = (
        (hr, np.linalg.inv(_grid_affine(hr)) @ to_frame),  # grid -> pixels of the HR grid of the same frame
        (Grid((h_img, w_img), 1.0), frame.to_image @ to_frame),  # grid -> image pixels
    )
    for source, to_source in sources:
        if arr.shape == source.shape:
            return _coverage(grid, lambda rows, cols, m=to_source: _lookup(arr, m, rows, cols), subsample)
    shapes = [f"the image's full-resolution level {(h_img, w_img)}", f"the HR grid {grid.shape}"]
    if hr.shape != grid.shape:
        shapes.append(f"stsr.pp.hr_grid(sdata, {image_key!r}, pixel_size).shape {hr.shape}")
    raise ValueError(
        f"The tissue array has shape {arr.shape}; it must be a boolean (height, width) array on "
        f"{' or '.join(shapes)} (True = tissue). To place a labels or shapes element through its "
        "transformations, pass its key instead."
    )


def _tissue_array(tissue: Any) -> np.ndarray:
    import xarray as xr

    if isinstance(tissue, xr.DataArray):
        if "c" in tissue.dims:
            if tissue.sizes["c"] != 1:
                raise ValueError(
                    f"The tissue DataArray has {tissue.sizes['c']} channels; pass one (y, x) boolean mask."
                )
            tissue = tissue.isel(c=0)
        tissue = tissue.transpose("y", "x").data if {"y", "x"} <= set(tissue.dims) else tissue.data
    arr = np.asarray(tissue)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"The tissue array must be 2-D (height, width), got shape {arr.shape}.")
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    if np.issubdtype(arr.dtype, np.floating) and np.isin(arr, (0.0, 1.0)).all():
        return arr == 1.0
    raise TypeError(
        f"The tissue array must be boolean (or integer, nonzero = tissue), got dtype {arr.dtype}"
        + (" with values other than 0 and 1" if np.issubdtype(arr.dtype, np.floating) else "")
        + "; threshold it first (e.g. probability > 0.5)."
    )


def _grid_affine(grid: Grid) -> np.ndarray:
    """``3 x 3`` affine from continuous ``grid`` coordinates to its reference frame."""
    ps, (oy, ox) = grid.pixel_size, grid.origin
    return np.array([[ps, 0.0, oy], [0.0, ps, ox], [0.0, 0.0, 1.0]])


def _lookup(arr: np.ndarray, to_source: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of ``arr`` at continuous grid coordinates ``rows x cols`` mapped to its pixels by the affine
    ``to_source`` (False off it)."""
    m = to_source
    if m[0, 1] == 0 and m[1, 0] == 0:  # axis-aligned: rows and columns apart
        ri = np.floor(m[0, 0] * rows + m[0, 2]).astype(np.int64)
        ci = np.floor(m[1, 1] * cols + m[1, 2]).astype(np.int64)
        okr = (ri >= 0) & (ri < arr.shape[0])
        okc = (ci >= 0) & (ci < arr.shape[1])
        out = np.zeros((rows.size, cols.size), bool)
        out[np.ix_(okr, okc)] = arr[np.ix_(ri[okr], ci[okc])]
        return out
    rr, cc = rows[:, None], cols[None, :]
    ri = np.floor(m[0, 0] * rr + m[0, 1] * cc + m[0, 2]).astype(np.int64)
    ci = np.floor(m[1, 0] * rr + m[1, 1] * cc + m[1, 2]).astype(np.int64)
    ok = (ri >= 0) & (ri < arr.shape[0]) & (ci >= 0) & (ci < arr.shape[1])
    out = np.zeros((rows.size, cols.size), bool)
    out[ok] = arr[ri[ok], ci[ok]]
    return out


def _coverage(grid: Grid, inside: Any, subsample: int) -> np.ndarray:
    """Grid pixels of which at least half the ``subsample x subsample`` sub-samples are ``inside``.

    ``inside(rows, cols)`` takes the continuous grid coordinates of a block of sub-sample rows and of all sub-sample
    columns and returns a ``(rows.size, cols.size)`` boolean array; blocks bound the memory.
    """
    s = int(subsample)
    h, w = grid.shape
    sub = (np.arange(s) + 0.5) / s
    cols = (np.arange(w)[:, None] + sub[None, :]).ravel()
    step = max(1, _BLOCK_SAMPLES // (w * s * s))
    out = np.empty((h, w), bool)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        rows = (np.arange(r0, r1)[:, None] + sub[None, :]).ravel()
        hit = np.asarray(inside(rows, cols), bool).reshape(r1 - r0, s, w, s)
        out[r0:r1] = hit.sum(axis=(1, 3)) * 2 >= s * s
    return out


def _tissue_element(
    sdata: Any,
    key: str,
    grid: Grid,
    image_key: str,
    coordinate_system: str | None,
    subsample: int,
    frame: ImageFrame,
) -> np.ndarray:
    """A labels element (nonzero = tissue) or a shapes element (inside the polygons = tissue) on ``grid`` (in the
    image's ``frame``)."""
    from .._elements import n_levels, pixel_area, sample_nearest
    from .._validate import close_matches, element_type

    kind = element_type(sdata, key)
    if kind not in ("labels", "shapes"):
        if kind is None:
            choices = list(sdata.labels) + list(sdata.shapes)
            hits = close_matches(key, choices)
            raise KeyError(
                f"tissue={key!r}: no labels or shapes element of that name in the SpatialData."
                + (f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else "")
                + f" Labels: {list(sdata.labels)}; shapes: {list(sdata.shapes)}."
            )
        raise ValueError(
            f"tissue={key!r} is a {kind[:-1]} element; pass a labels element (nonzero = tissue), a shapes element "
            "of polygons (the tissue is inside them) or a boolean array."
        )
    element = sdata[key]
    cs = shared_coordinate_system(
        sdata, [image_key, key], coordinate_system, names=("image", "tissue element")
    )
    image = sdata.images[image_key]
    # grid -> the frame -> image pixels -> cs
    grid_to_cs = element_affine(image, cs, image_key) @ frame.to_image @ _grid_affine(grid)
    if kind == "labels":
        # the coarsest level still at least as fine as the sub-samples
        spacing = pixel_area(grid_to_cs) / subsample**2
        fine = [
            i
            for i in range(n_levels(element))
            if pixel_area(element_affine(element, cs, key, i)) <= spacing * 1.001
        ]
        level = max(fine) if fine else 0

        def inside(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            rr, cc = np.meshgrid(rows, cols, indexing="ij")
            y = grid_to_cs[0, 0] * rr + grid_to_cs[0, 1] * cc + grid_to_cs[0, 2]
            x = grid_to_cs[1, 0] * rr + grid_to_cs[1, 1] * cc + grid_to_cs[1, 2]
            return sample_nearest(element, cs, y, x, key, level, fill=0) != 0

        return _coverage(grid, inside, subsample)
    edges = _polygon_edges(element, key, np.linalg.inv(grid_to_cs) @ element_affine(element, cs, key))
    return _coverage(grid, lambda rows, cols: _scanline_fill(edges, rows, cols, subsample), subsample)


def _polygon_edges(shapes: Any, key: str, to_grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Non-horizontal edges ``(y0, x0, y1, x1)`` in grid coordinates of the rings of the union of the polygons of a
    shapes element (circles are turned into polygons)."""
    import shapely

    geoms = shapes.geometry
    types = set(geoms.geom_type.unique())
    if types <= {"Point"} and "radius" in shapes.columns:
        geoms = geoms.buffer(shapes["radius"].to_numpy(float))
    elif not types <= {"Polygon", "MultiPolygon", "GeometryCollection"}:
        raise ValueError(
            f"Shapes element {key!r} holds {sorted(types)}; a tissue must be polygons or multipolygons (e.g. sopa's "
            "region_of_interest) or circles (points with a radius)."
        )
    parts, polygons = [shapely.union_all(shapely.make_valid(np.asarray(geoms.values)))], []
    while parts:  # the polygons of the union, through (nested) collections; lines and points are dropped
        g = parts.pop()
        if g.geom_type == "Polygon" and not g.is_empty:
            polygons.append(g)
        elif g.geom_type in ("MultiPolygon", "GeometryCollection"):
            parts.extend(shapely.get_parts(g))
    rings = [ring for p in polygons for ring in (p.exterior, *p.interiors)]
    ys, xs, ye, xe = [], [], [], []
    for ring in rings:
        xy = np.asarray(ring.coords, float)[:, :2]  # closed: the first vertex is repeated at the end
        rc = to_grid @ np.stack([xy[:, 1], xy[:, 0], np.ones(len(xy))])
        ys.append(rc[0, :-1])
        xs.append(rc[1, :-1])
        ye.append(rc[0, 1:])
        xe.append(rc[1, 1:])
    if not rings:
        return tuple(np.zeros(0) for _ in range(4))
    y0, x0, y1, x1 = (np.concatenate(v) for v in (ys, xs, ye, xe))
    keep = y0 != y1
    return y0[keep], x0[keep], y1[keep], x1[keep]


def _scanline_fill(
    edges: tuple[np.ndarray, ...], rows: np.ndarray, cols: np.ndarray, subsample: int
) -> np.ndarray:
    """Even-odd fill of polygon ``edges`` at the sub-sample points ``rows x cols`` (continuous grid coordinates,
    evenly spaced by ``1 / subsample``, ``cols`` starting at the grid's left edge): a point is inside when a ray from it
    crosses the rings an odd number of times (holes are outside)."""
    y0, x0, y1, x1 = edges
    n_rows, n_cols, s = rows.size, cols.size, subsample
    if y0.size == 0:
        return np.zeros((n_rows, n_cols), bool)
    t0 = rows[0]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # sub-sample rows crossed by each edge, half-open [lo, hi) so that a shared vertex is counted once
    k0 = np.clip(np.ceil((lo - t0) * s), 0, n_rows).astype(np.int64)
    k1 = np.clip(np.ceil((hi - t0) * s), 0, n_rows).astype(np.int64)
    n = k1 - k0
    idx = np.flatnonzero(n > 0)
    if idx.size == 0:
        return np.zeros((n_rows, n_cols), bool)
    n = n[idx]
    rep = np.repeat(idx, n)
    k = np.repeat(k0[idx], n) + np.arange(rep.size) - np.repeat(np.cumsum(n) - n, n)
    y = t0 + k / s
    x = x0[rep] + (y - y0[rep]) * (x1[rep] - x0[rep]) / (y1[rep] - y0[rep])
    order = np.lexsort((x, k))
    k, x = k[order], x[order]
    # a closed ring is crossed an even number of times on every row: consecutive crossings bound the inside
    c0 = np.clip(np.ceil(x[0::2] * s - 0.5), 0, n_cols).astype(np.int64)
    c1 = np.clip(np.ceil(x[1::2] * s - 0.5), 0, n_cols).astype(np.int64)
    diff = np.zeros((n_rows, n_cols + 1), np.int32)
    np.add.at(diff, (k[0::2], c0), 1)
    np.add.at(diff, (k[0::2], c1), -1)
    return np.cumsum(diff, axis=1)[:, :n_cols] > 0

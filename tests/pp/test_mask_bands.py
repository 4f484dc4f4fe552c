"""``tissue_mask`` reads the image band by band: the same mask as scoring the whole level at once, in bounded memory."""

from __future__ import annotations

import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
from skimage.filters import threshold_otsu
from spatialdata.models import Image2DModel

import stsr
from stsr.observation import Grid
from stsr.pp import _mask
from stsr.pp._transforms import raster_levels, spatial_shape


def _whole_level_mask(sdata, key: str, grid: Grid, level: int, kind: str, threshold=None) -> np.ndarray:
    """The reference: the score of the whole level in memory, Otsu's threshold of all of it, and the fraction of
    level pixels (by centre) inside each grid pixel that are tissue (the level pixel at the centre where none is)."""
    levels = raster_levels(sdata[key])
    full, arr = spatial_shape(sdata[key]), levels[level]
    score, valid = _mask._score(np.asarray(arr.transpose("c", "y", "x").data), kind, 255.0)
    if threshold is None:
        threshold = float(threshold_otsu(score.ravel()))
    tissue = (score > threshold) & valid
    (lh, lw), (h, w) = tissue.shape, grid.shape
    fy, fx = full[0] / lh, full[1] / lw
    rr, cc = grid.to_grid((np.arange(lh) + 0.5) * fy, (np.arange(lw) + 0.5) * fx)
    ri, ci = np.floor(rr).astype(int), np.floor(cc).astype(int)
    okr, okc = (ri >= 0) & (ri < h), (ci >= 0) & (ci < w)
    flat = (ri[okr][:, None] * w + ci[okc][None, :]).ravel()
    n = np.bincount(flat, minlength=h * w)
    t = np.bincount(flat, weights=tissue[np.ix_(okr, okc)].ravel().astype(float), minlength=h * w)
    gy, gx = grid.pixel_centres()
    li = np.clip(np.floor(gy / fy).astype(int), 0, lh - 1)
    lj = np.clip(np.floor(gx / fx).astype(int), 0, lw - 1)
    inside = (gy >= 0) & (gy < full[0]) & (gx >= 0) & (gx < full[1])
    nearest = np.where(inside, tissue[li, lj], False).astype(float)
    frac = np.where(n > 0, t / np.maximum(n, 1), np.nan).reshape(h, w)
    return np.where(np.isnan(frac), nearest, frac) >= 0.5


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(450, 450), n_genes=2, seed=3)


@pytest.mark.parametrize("band_pixels", [_mask._BAND_PIXELS, 700, 3000])
def test_banded_mask_equals_the_whole_level(slide, monkeypatch, band_pixels):
    """Bands of a few rows (halo of the smoothing crossing several bands) give the same mask, bit for bit, on a grid
    coarser than the level, a grid finer than it (grid pixels holding no level pixel) and a shifted grid, for both
    kinds of score and a fixed threshold."""
    monkeypatch.setattr(_mask, "_BAND_PIXELS", band_pixels)
    coarse = stsr.pp.hr_grid(slide, "he", 5.5)
    cases = [
        (coarse, 1, "he", None),
        (stsr.pp.hr_grid(slide, "he", 1.5), 1, "he", None),
        (Grid((90, 70), 5.5, (-13.2, 20.7)), 0, "he", None),
        (coarse, 1, "fluorescence", None),
        (coarse, 0, "he", 0.3),
    ]
    for grid, level, kind, threshold in cases:
        got = stsr.pp.tissue_mask(slide, "he", grid=grid, level=level, kind=kind, threshold=threshold)
        want = _whole_level_mask(slide, "he", grid, level, kind, threshold)
        assert 0.2 < want.mean() < 0.9
        np.testing.assert_array_equal(got, want)


def test_mask_memory_is_bounded_by_a_band():
    """A 3000 x 3000 px level, computed chunk by chunk (never in memory as a whole): scoring it whole would take
    about 50 bytes per level pixel (450 MB), the bands a few tens of MB."""
    size, chunk = 3000, 750

    def render(block_info=None):
        (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
        y = np.arange(r0, r1, dtype=np.float32)[:, None] / size
        x = np.arange(c0, c1, dtype=np.float32)[None, :] / size
        tissue = (y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.12
        out = np.full((3, r1 - r0, c1 - c0), 245, np.uint8)  # stained tissue on a white background
        out[0][tissue], out[2][tissue] = 210, 180
        out[1][tissue] = (120 + 40 * np.sin(40 * x * y)).astype(np.uint8)[tissue]
        return out

    image = da.map_blocks(render, chunks=((3,), (chunk,) * 4, (chunk,) * 4), dtype=np.uint8)
    sdata = sd.SpatialData(images={"big": Image2DModel.parse(image, dims=("c", "y", "x"))})
    grid = Grid((300, 300), 10.0)
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):  # one chunk rendered at a time
            mask = stsr.pp.tissue_mask(sdata, "big", grid=grid, level=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rr, cc = (np.mgrid[0:300, 0:300] + 0.5) / 300
    disk = (rr - 0.5) ** 2 + (cc - 0.5) ** 2 < 0.12
    assert (mask == disk).mean() > 0.99
    assert peak < 64 * 2**20, peak / 2**20


@pytest.mark.parametrize("band_pixels", [_mask._BAND_PIXELS, 700])
def test_mask_through_an_affine_equals_the_axis_aligned_mask(slide, monkeypatch, band_pixels):
    """The path of rotated or sheared images (each level pixel placed on the grid through the full affine, the
    level's tissue kept for grid pixels holding no level pixel) gives the axis-aligned path's mask when the affine
    is a scale plus translation: a grid in a frame scaled by 1.3 and shifted is the image-pixel grid scaled back."""
    monkeypatch.setattr(_mask, "_BAND_PIXELS", band_pixels)
    levels = raster_levels(slide["he"])
    full = spatial_shape(slide["he"])
    to_image = np.array([[1.3, 0.0, -7.1], [0.0, 1.3, 4.9], [0.0, 0.0, 1.0]])
    for grid, level in ((Grid((70, 60), 4.3, (2.2, -3.1)), 1), (Grid((300, 250), 1.1, (0.4, 0.7)), 1)):
        in_image = Grid(
            grid.shape, 1.3 * grid.pixel_size, (1.3 * grid.origin[0] - 7.1, 1.3 * grid.origin[1] + 4.9)
        )
        data = levels[level].transpose("c", "y", "x").data
        threshold = _mask._otsu_threshold(data, "he", 255.0)
        got = _mask._level_on_grid(data, "he", 255.0, threshold, full, grid, to_image)
        want = _mask._level_on_grid(data, "he", 255.0, threshold, full, in_image)
        assert 0.2 < want.mean() < 0.9
        np.testing.assert_array_equal(got, want)

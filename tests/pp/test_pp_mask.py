"""Tissue masks: tissue_mask."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, get_transformation

import stsr.pp as pp


def _affine(tf) -> np.ndarray:
    return np.asarray(tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def _add_image(sdata, key, arr, um_per_px=1.0):
    sdata.images[key] = Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        scale_factors=[2],
        transformations={"global": Scale([um_per_px, um_per_px], axes=("y", "x"))},
    )


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_mask_matches_synthetic_tissue(syn):
    mask = pp.tissue_mask(syn, "he", pixel_size=5.5)
    truth = syn["regions"]["scale0"].image.values > 0
    assert mask.shape == truth.shape and mask.dtype == bool
    assert (mask == truth).mean() > 0.95
    assert 0.2 < mask.mean() < 0.8


def test_mask_black_background_and_white_holes(tiny_sd):
    rng = np.random.default_rng(0)
    shape = (120, 160)
    tissue = _disk(shape, (60, 80), 45)
    hole = _disk(shape, (60, 80), 12)  # white lumen inside the tissue
    black = ~_disk(shape, (60, 80), 55)  # masked-out background (HER2ST app PNGs)
    img = np.empty((3, *shape))
    img[:] = np.array([245.0, 245.0, 245.0])[:, None, None]  # white
    img[:, tissue] = np.array([225.0, 140.0, 200.0])[:, None]  # pink
    img[:, hole] = 245.0
    img[:, black] = 0.0
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    _add_image(tiny_sd, "app", img)
    mask = pp.tissue_mask(tiny_sd, "app", pixel_size=4.0)
    expected = (tissue & ~hole).reshape(30, 4, 40, 4).mean(axis=(1, 3)) >= 0.5
    assert (mask == expected).mean() > 0.97
    assert not mask[0, 0] and not mask[15, 20]  # black corner, white hole
    filled = pp.tissue_mask(tiny_sd, "app", pixel_size=4.0, fill_holes=True)
    assert filled[15, 20] and filled.sum() > mask.sum()


def test_mask_fluorescence_and_fine_grid(tiny_sd):
    rng = np.random.default_rng(1)
    shape = (64, 64)
    blob = _disk(shape, (30, 34), 18)
    img = (np.where(blob, 3000.0, 200.0) + rng.normal(0, 50, shape))[None].astype(np.uint16)
    _add_image(tiny_sd, "dapi", img, um_per_px=2.0)
    coarse = pp.tissue_mask(tiny_sd, "dapi", pixel_size=4.0)
    assert (coarse == (blob.reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5)).mean() > 0.97
    # a grid finer than the image: every image pixel becomes 2 x 2 grid pixels (nearest)
    fine = pp.tissue_mask(tiny_sd, "dapi", pixel_size=1.0, level=0)
    assert fine.shape == (128, 128)
    assert (fine == np.repeat(np.repeat(blob, 2, 0), 2, 1)).mean() > 0.97


def test_mask_as_labels_and_errors(syn, unchanged):
    grid = pp.hr_grid(syn, "he", 11.0)
    snap = unchanged.snap(syn)
    with pytest.raises(ValueError, match="grid= or pixel_size="):
        pp.tissue_mask(syn, "he")
    with pytest.raises(KeyError, match="Did you mean 'he'"):
        pp.tissue_mask(syn, "hee", grid=grid)
    with pytest.raises(KeyError, match="already has a image element 'hr_truth'"):
        pp.tissue_mask(syn, "he", grid=grid, key_added="hr_truth")
    with pytest.raises(ValueError, match="out of range"):
        pp.tissue_mask(syn, "he", grid=grid, level=9)
    unchanged.check(syn, snap)
    mask = pp.tissue_mask(syn, "he", grid=grid, key_added="tissue")
    lab = syn["tissue"]["scale0"].image.values
    np.testing.assert_array_equal(lab, mask.astype(np.uint8))
    ref = pp.raster_element(mask[None].astype(np.float32), ["m"], grid, syn, "he")
    np.testing.assert_allclose(
        _affine(get_transformation(syn["tissue"], "global")), _affine(get_transformation(ref, "global"))
    )

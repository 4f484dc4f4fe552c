"""An image placed by any affine (rotation, shear, as a registered Xenium H&E is) is read through it, not refused:
the HR grid is laid along the axes of the coordinate system, and the image tiles, the tissue mask, the spots and the
prior map are those of the same slide with an upright image."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy import ndimage
from spatialdata.models import Image2DModel
from spatialdata.transformations import Affine

import stsr
from stsr._elements import element_affine
from stsr.tl._image_tiles import ImageSource
from stsr.tl._inputs import prepare_inputs

GENES = ["gene_000", "gene_001", "gene_002"]
HR_UM = 5.5  # the synthetic slide's default HR pixel: a tenth of its 55 um spots


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


SHEAR = np.array([[1.0, 0.25], [0.1, 0.95]]) @ _rotation(10.0)


def _tilted(
    sdata: sd.SpatialData, image_key: str, linear: np.ndarray, step: float
) -> tuple[sd.SpatialData, tuple[int, int]]:
    """``sdata`` with image ``image_key`` resampled into a tilted raster whose transformation undoes the tilt: the
    raster's pixel ``p`` (continuous ``(y, x)``) shows the upright image at ``linear @ p + t``.

    ``t`` puts the corner of the tilted raster's bounding box at ``-pad * step`` upright pixels (``pad`` returned, two
    integers), so that the HR grid of the tilted image (laid along the axes, from that corner) holds the upright
    image's grid shifted by ``pad`` HR pixels when ``step`` is the HR pixel in upright pixels.
    """
    image = sdata[image_key]
    upright = np.asarray(image["scale0"]["image"].values)
    h, w = upright.shape[1:]
    inv = np.linalg.inv(linear)
    q = inv @ np.array([[0, 0, h, h], [0, w, 0, w]], float)  # the upright corners in raster pixels, for t = 0
    margin = 2 * step * np.abs(inv).sum(1).max() + 4
    size = np.ceil(q.max(1) - q.min(1) + 2 * margin).astype(int)
    t = linear @ (q.min(1) - margin)  # the upright image `margin` raster pixels in from the raster's edges
    lo = (linear @ np.array([[0, 0, size[0], size[0]], [0, size[1], 0, size[1]]], float)).min(1) + t
    pad = np.ceil(-lo / step).astype(int)
    t = t - pad * step - lo  # a shift of less than `step` per axis
    # scipy's index convention: output[o] = input[linear @ o + offset], pixel centres at integer indices
    offset = linear @ np.full(2, 0.5) + t - 0.5
    tilted = np.stack(
        [
            ndimage.affine_transform(c.astype(np.float32), linear, offset, tuple(size), order=3, cval=255.0)
            for c in upright
        ]
    )
    tilted = np.clip(np.round(tilted), 0, 255).astype(np.uint8)
    raster_to_upright = np.eye(3)
    raster_to_upright[:2, :2], raster_to_upright[:2, 2] = linear, t
    to_global = element_affine(image, "global", image_key) @ raster_to_upright
    out = sd.deepcopy(sdata)
    del out[image_key]
    out.images[image_key] = Image2DModel.parse(
        tilted,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={"global": Affine(to_global, input_axes=("y", "x"), output_axes=("y", "x"))},
    )
    return out, (int(pad[0]), int(pad[1]))


def _prepare(sdata, image_key="he", genes=GENES):
    return prepare_inputs(
        sdata, image_key, genes, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(450, 450), n_genes=4, seed=3)


@pytest.fixture(scope="module")
def upright(slide):
    return _prepare(slide)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("linear", [_rotation(30.0), SHEAR], ids=["rotated_30", "sheared"])
def test_tilted_image_gives_the_same_inputs_and_tiles(slide, upright, linear):
    tilted, (py, px) = _tilted(slide, "he", linear, HR_UM)
    inputs = _prepare(tilted)
    # the grid: the same HR pixels along the axes of "global", (py, px) pixels in from the tilted image's corner
    assert inputs.grid.pixel_size == pytest.approx(HR_UM / np.sqrt(abs(np.linalg.det(linear))))
    np.testing.assert_allclose(inputs.um_per_px, upright.um_per_px)
    assert not np.allclose(inputs.image_levels.to_image, np.eye(3))
    h, w = upright.grid.shape
    assert inputs.grid.shape[0] >= py + h and inputs.grid.shape[1] >= px + w
    # the spots, their counts and footprints, on the shifted grid
    np.testing.assert_allclose(inputs.observation.centres, upright.observation.centres + [py, px], atol=1e-6)
    np.testing.assert_array_equal(inputs.lr, upright.lr)
    np.testing.assert_allclose(inputs.observation.support_area, upright.observation.support_area, rtol=1e-6)
    # the tissue mask is read through the affine: it agrees with the upright one, and is empty off the slide
    window = (slice(py, py + h), slice(px, px + w))
    assert (inputs.mask[window] == upright.mask).mean() > 0.97
    assert inputs.mask.sum() == pytest.approx(upright.mask.sum(), rel=0.03)
    # the image tiles the model sees equal the upright image's (to interpolation), away from the slide's edge; also
    # read from a coarser level, area-filtered (k = 1: 5.5 image pixels per model pixel)
    for k in (4, 1):
        mine = ImageSource(inputs.image_levels, inputs.grid, k).region(py, px, h, w).numpy()
        ref = ImageSource(upright.image_levels, upright.grid, k).region(0, 0, h, w).numpy()
        inner = (slice(None), slice(8 * k, -8 * k), slice(8 * k, -8 * k))
        assert _corr(mine[inner], ref[inner]) > 0.98
        np.testing.assert_allclose(mine[inner].mean(), ref[inner].mean(), atol=0.01)
    # read as if the image were upright (the affine ignored), the tiles would not match
    ignored = ImageSource(list(inputs.image_levels), inputs.grid, 1).region(py, px, h, w).numpy()
    assert _corr(ignored[inner], ref[inner]) < 0.8
    k = 4
    ref = ImageSource(upright.image_levels, upright.grid, k).region(0, 0, h, w).numpy()
    tiles = ImageSource(inputs.image_levels, inputs.grid, k).tiles(np.array([[py + 20, px + 30]]), 24).numpy()
    assert _corr(tiles[0], ref[:, 20 * k : 44 * k, 30 * k : 54 * k]) > 0.98


def test_prior_map_of_a_rotated_image_is_the_upright_map(slide, upright):
    tilted, (py, px) = _tilted(slide, "he", _rotation(30.0), HR_UM)
    ref = sd.deepcopy(slide)
    stsr.tl.prior_map(tilted, "he", GENES, progress=False)
    stsr.tl.prior_map(ref, "he", GENES, progress=False)
    h, w = upright.grid.shape
    mine = np.asarray(tilted["stsr_prior"]["scale0"]["image"].values)[:, py : py + h, px : px + w]
    expected = np.asarray(ref["stsr_prior"]["scale0"]["image"].values)
    for g in range(len(GENES)):
        assert _corr(mine[g], expected[g]) > 0.95
    # the map overlays the slide: HR pixel (py, px) of the tilted map is pixel (0, 0) of the upright one
    m = element_affine(tilted["stsr_prior"], "global", "stsr_prior")
    np.testing.assert_allclose(
        m @ [py, px, 1], element_affine(ref["stsr_prior"], "global", "stsr_prior") @ [0, 0, 1], atol=1e-9
    )
    np.testing.assert_allclose(m[:2, :2], HR_UM * np.eye(2), atol=1e-9)


def test_real_xenium_he_goes_through_prepare_inputs(xenium):
    """The Xenium fixture's H&E is placed by a plain scale (2.125 um/px; its registration was resampled when the
    fixture was made); it goes through prepare_inputs, and so does the same H&E carrying a registration-like affine
    (rotation and slight shear, as a Xenium alignment matrix), with the same cells and tissue."""
    m = element_affine(xenium["he"], "global", "he")
    np.testing.assert_allclose(m, np.diag([2.125, 2.125, 1.0]))
    totals = np.asarray(xenium["table"].X.sum(0)).ravel()
    genes = [str(g) for g in xenium["table"].var_names[np.argsort(-totals)[:5]]]
    upright = _prepare(xenium, genes=genes)
    assert upright.observation.n_obs == 200 and np.array_equal(upright.image_levels.to_image, np.eye(3))
    linear = np.array([[1.0, 0.02], [-0.01, 1.0]]) @ _rotation(-12.0)
    # HR pixels of 2 um (a tenth of the 20 um cells) are 2 / 2.125 upright image pixels
    tilted, (py, px) = _tilted(xenium, "he", linear, upright.grid.pixel_size)
    inputs = _prepare(tilted, genes=genes)
    assert inputs.pixel_size == pytest.approx(2.0)
    # the cells land on the same HR pixels, (py, px) pixels in from the tilted image's corner
    np.testing.assert_allclose(inputs.observation.centres, upright.observation.centres + [py, px], atol=1e-6)
    np.testing.assert_array_equal(inputs.lr, upright.lr)
    h, w = upright.grid.shape
    assert (inputs.mask[py : py + h, px : px + w] == upright.mask).mean() > 0.97


def test_given_tissue_and_mask_element_on_a_rotated_image(slide, upright):
    """A tissue given as a labels element (placed through its own transformation) or as an array on the rotated
    image's pixels lands where it does on the upright slide; a mask added as an element overlays the grid."""
    tilted, (py, px) = _tilted(slide, "he", _rotation(30.0), HR_UM)
    grid = _prepare(tilted).grid
    h, w = upright.grid.shape
    window = (slice(py, py + h), slice(px, px + w))
    # labels "regions" live on the upright slide's HR grid: the same HR pixels of the tilted grid
    got = stsr.pp.tissue_mask(tilted, "he", grid=grid, tissue="regions")
    want = stsr.pp.tissue_mask(slide, "he", grid=upright.grid, tissue="regions")
    assert 0.2 < want.mean() < 0.9
    np.testing.assert_array_equal(got[window], want)
    assert got.sum() == want.sum()  # nothing off the upright slide
    # an array on the image's full-resolution pixels: the dark pixels of each image
    dark_tilted = np.asarray(tilted["he"]["scale0"]["image"].values).mean(0) < 200
    dark_upright = np.asarray(slide["he"]["scale0"]["image"].values).mean(0) < 200
    got = stsr.pp.tissue_mask(tilted, "he", grid=grid, tissue=dark_tilted)
    want = stsr.pp.tissue_mask(slide, "he", grid=upright.grid, tissue=dark_upright)
    assert 0.2 < want.mean() < 0.9
    assert (got[window] == want).mean() > 0.97
    assert got.sum() == pytest.approx(want.sum(), rel=0.03)
    # the Otsu mask as a labels element: its pixels are the grid's, along the axes of "global"
    mask = stsr.pp.tissue_mask(tilted, "he", grid=grid, key_added="tissue")
    np.testing.assert_array_equal(
        np.asarray(tilted["tissue"]["scale0"]["image"].values), mask.astype(np.uint8)
    )
    m = element_affine(tilted["tissue"], "global", "tissue")
    np.testing.assert_allclose(m @ [py, px, 1], [0.0, 0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(m[:2, :2], HR_UM * np.eye(2), atol=1e-9)

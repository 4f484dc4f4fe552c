"""HR grid helpers: hr_grid, raster_element (alignment, pyramid, zarr round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel, get_channel_names
from spatialdata.transformations import Affine, Scale, get_transformation

import stsr.pp as pp
from stsr.observation import Grid


def _affine(tf) -> np.ndarray:
    return np.asarray(tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def test_hr_grid_converts_pixel_size_to_image_pixels(tiny_sd):
    grid = pp.hr_grid(tiny_sd, "img", 5.0)  # 5 µm = 2.5 image pixels (2 µm/px)
    assert isinstance(grid, Grid)
    assert grid.pixel_size == pytest.approx(2.5)
    assert grid.origin == (0.0, 0.0)
    assert grid.shape == (24, 32)  # 60 / 2.5, 80 / 2.5
    # a pixel size that does not divide the image: the last row/column covers the edge
    assert pp.hr_grid(tiny_sd, "img", 7.0).shape == (18, 23)  # ceil(60/3.5), ceil(80/3.5)
    # another coordinate system: "aligned" has 0.5 units per image pixel
    assert pp.hr_grid(tiny_sd, "img", 1.0, coordinate_system="aligned").pixel_size == pytest.approx(2.0)


def test_hr_grid_errors(tiny_sd):
    with pytest.raises(KeyError, match="Did you mean 'img'"):
        pp.hr_grid(tiny_sd, "imgg", 5.0)
    with pytest.raises(ValueError, match="positive"):
        pp.hr_grid(tiny_sd, "img", -1.0)
    with pytest.raises(ValueError, match="coordinate system 'globl'.*Did you mean 'global'"):
        pp.hr_grid(tiny_sd, "img", 5.0, coordinate_system="globl")


def test_rotated_sheared_and_anisotropic_images_get_a_grid_along_the_coordinate_axes(tiny_sd):
    """Any affine of the image is honoured: the grid is laid along the axes of the coordinate system (pixel side
    ``pixel_size`` there), covers the image's bounding box, and a raster on it lands where the grid says."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = Affine(
        np.array([[c, -s, 5.0], [s, c, -3.0], [0, 0, 1.0]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    shear = Affine(
        np.array([[2.0, 0.6, 0.0], [0.0, 2.0, 0.0], [0, 0, 1.0]]),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    aniso = Scale([1.0, 2.0], axes=("y", "x"))
    for name, tf in (("rot", rot), ("shear", shear), ("aniso", aniso)):
        tiny_sd.images[name] = Image2DModel.parse(
            np.zeros((1, 10, 10), np.uint8), dims=("c", "y", "x"), transformations={"global": tf}
        )
        m_img = _affine(get_transformation(tiny_sd[name], "global"))
        corners = m_img @ np.array([[0, 0, 10, 10], [0, 10, 0, 10], [1, 1, 1, 1]], float)
        lo, hi = corners[:2].min(1), corners[:2].max(1)
        grid = pp.hr_grid(tiny_sd, name, 0.5)
        np.testing.assert_array_equal(grid.shape, np.ceil((hi - lo) / 0.5 - 1e-6).astype(int))
        el = pp.raster_element(np.zeros((1, *grid.shape), np.float32), ["a"], grid, tiny_sd, name)
        m = _affine(get_transformation(el, "global"))
        # square pixels of 0.5 along the axes, from the corner of the image's bounding box
        np.testing.assert_allclose(m[:2, :2], 0.5 * np.eye(2), atol=1e-12)
        np.testing.assert_allclose(m[:2, 2], lo, atol=1e-9)
    assert pp.hr_grid(tiny_sd, "rot", 1.0).shape == (13, 13)  # 10 * (cos 0.3 + sin 0.3) = 12.5
    assert pp.hr_grid(tiny_sd, "aniso", 1.0).shape == (10, 20)
    # a singular transformation is refused
    tiny_sd.images["flat"] = Image2DModel.parse(
        np.zeros((1, 10, 10), np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Scale([0.0, 1.0], axes=("y", "x"))},
    )
    with pytest.raises(ValueError, match="singular"):
        pp.hr_grid(tiny_sd, "flat", 1.0)
    # a slightly anisotropic registration (as in real data) is accepted: geometric mean of the two scales
    tiny_sd.images["slight"] = Image2DModel.parse(
        np.zeros((1, 10, 10), np.uint8),
        dims=("c", "y", "x"),
        transformations={"global": Scale([0.686, 0.690], axes=("y", "x"))},
    )
    assert pp.hr_grid(tiny_sd, "slight", 10.0).pixel_size == pytest.approx(10.0 / np.sqrt(0.686 * 0.690))


def test_raster_overlays_image(tiny_sd):
    grid = pp.hr_grid(tiny_sd, "img", 5.0)
    data = np.random.default_rng(0).random((2, *grid.shape)).astype(np.float32)
    el = pp.raster_element(data, ["a", "b"], grid, tiny_sd, "img")
    img_tfs = get_transformation(tiny_sd["img"], get_all=True)
    ras_tfs = get_transformation(el, get_all=True)
    assert set(ras_tfs) == set(img_tfs) == {"global", "aligned"}
    for cs in img_tfs:
        m_img, m_ras = _affine(img_tfs[cs]), _affine(ras_tfs[cs])
        # every grid pixel centre lands at the same place through both transformations
        rr, cc = np.meshgrid(np.arange(grid.shape[0]) + 0.5, np.arange(grid.shape[1]) + 0.5, indexing="ij")
        via_raster = m_ras @ np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)])
        gy, gx = grid.to_reference(rr.ravel(), cc.ravel())
        via_image = m_img @ np.stack([gy, gx, np.ones(gy.size)])
        np.testing.assert_allclose(via_raster, via_image, atol=1e-9)
    # a known position in µm: (51, 73) is image pixel (20.5, 26.5), i.e. grid (8.2, 10.6) with 2.5 px HR pixels
    m = _affine(ras_tfs["global"])
    row, col, _ = np.linalg.inv(m) @ np.array([51.0, 73.0, 1.0])
    np.testing.assert_allclose([row, col], [8.2, 10.6])
    iy, ix, _ = np.linalg.inv(_affine(img_tfs["global"])) @ np.array([51.0, 73.0, 1.0])
    np.testing.assert_allclose([iy, ix], [20.5, 26.5])
    np.testing.assert_allclose(grid.to_grid(iy, ix), (row, col))
    # top-left corner of raster pixel (0, 0) is the image's top-left corner (10, 20) µm
    np.testing.assert_allclose((m @ [0, 0, 1])[:2], [10.0, 20.0])


def test_raster_element_channels_and_pyramid(tiny_sd):
    grid = Grid((300, 200), 0.25)
    data = np.ones((3, 300, 200), np.float32)
    el = pp.raster_element(data, ["g1", "g2", "g3"], grid, tiny_sd, "img")
    assert list(get_channel_names(el)) == ["g1", "g2", "g3"]
    assert list(el.children) == ["scale0", "scale1"]  # 200 -> 100 (>= 64), then 50 would be < 64
    single = pp.raster_element(data, ["g1", "g2", "g3"], grid, tiny_sd, "img", scale_factors=None)
    assert list(single.children) == ["scale0"]
    small = pp.raster_element(data[:, :20, :10], ["g1", "g2", "g3"], Grid((20, 10), 1.0), tiny_sd, "img")
    assert list(small.children) == ["scale0", "scale1"]  # always multiscale, also after a zarr round trip
    with pytest.raises(ValueError, match="unique"):
        pp.raster_element(data, ["g1", "g1", "g3"], grid, tiny_sd, "img")
    with pytest.raises(ValueError, match="spatial shape"):
        pp.raster_element(data[:, :10], ["g1", "g2", "g3"], grid, tiny_sd, "img")
    with pytest.raises(ValueError, match="channels"):
        pp.raster_element(data, ["g1", "g2"], grid, tiny_sd, "img")


def test_raster_roundtrip_zarr(tiny_sd, tmp_path):
    grid = pp.hr_grid(tiny_sd, "img", 5.0)
    data = np.random.default_rng(1).random((2, *grid.shape)).astype(np.float32)
    tiny_sd.images["ras"] = pp.raster_element(data, ["Actb", "Gapdh"], grid, tiny_sd, "img")
    path = tmp_path / "rt.zarr"
    tiny_sd.write(path)
    back = sd.read_zarr(path)
    before = get_transformation(tiny_sd["ras"], get_all=True)
    after = get_transformation(back["ras"], get_all=True)
    assert set(before) == set(after)
    for cs in before:
        np.testing.assert_allclose(_affine(after[cs]), _affine(before[cs]))
    assert list(get_channel_names(back["ras"])) == ["Actb", "Gapdh"]
    np.testing.assert_array_equal(back["ras"]["scale0"].image.values, data)
    assert back["ras"]["scale0"].image.dtype == np.float32

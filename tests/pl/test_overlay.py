"""stsr.pl.overlay: the gene map lands on the image through the transformations."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from _pl_data import HR_UM, IMG_SHAPE, IMG_UM, ORIGIN_IMG_PX
from spatialdata.transformations import Affine, Identity, Scale, set_transformation

import stsr
from stsr.pl import _draw

RASTER_X = (ORIGIN_IMG_PX[1] * IMG_UM, ORIGIN_IMG_PX[1] * IMG_UM + 30 * HR_UM)  # 2 .. 62 µm
RASTER_Y = (ORIGIN_IMG_PX[0] * IMG_UM, ORIGIN_IMG_PX[0] * IMG_UM + 20 * HR_UM)  # 4 .. 44 µm


def test_extents_values_and_colorbar(sdata, tmp_path):
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", save=tmp_path / "o.png")
    image, gene_map = ax.images
    # image: 96 x 128 pixels at 0.5 µm -> (left, right, bottom, top) = (0, 64, 48, 0)
    np.testing.assert_allclose(image.get_extent(), [0, IMG_SHAPE[1] * IMG_UM, IMG_SHAPE[0] * IMG_UM, 0])
    np.testing.assert_allclose(gene_map.get_extent(), [RASTER_X[0], RASTER_X[1], RASTER_Y[1], RASTER_Y[0]])
    truth = sdata["stsr"]["scale0"]["image"].sel(c="ERBB2").values
    np.testing.assert_array_equal(gene_map.get_array(), truth)
    lo, hi = gene_map.get_clim()
    assert lo == pytest.approx(truth.min()) and hi == pytest.approx(np.percentile(truth, 99.5))
    assert gene_map.get_alpha() == 0.6
    assert ax.get_xlim() == pytest.approx((0, 64)) and ax.get_ylim() == pytest.approx((48, 0))  # y downwards
    cbar_ax = [a for a in ax.figure.axes if a is not ax][0]
    assert cbar_ax.get_ylabel() == "ERBB2 (counts per HR pixel)"
    png = (tmp_path / "o.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert plt.imread(tmp_path / "o.png").shape[-1] in (3, 4)


def test_crop_reads_only_the_window(sdata, tmp_path):
    crop = (10.0, 9.0, 21.0, 20.0)  # µm
    fig, ax0 = plt.subplots()
    ax = stsr.pl.overlay(sdata, "stsr", "KRT19", crop=crop, ax=ax0, vmin=0, vmax=2, colorbar=False)
    assert ax is ax0 and len(fig.axes) == 1
    image, gene_map = ax.images
    # HR pixels [2 + 2j, 4 + 2j) µm in x: pixels 4..9 cover x 10..22; in y [4 + 2i, ...): pixels 2..7 cover 8..20
    np.testing.assert_allclose(gene_map.get_extent(), [10, 22, 20, 8])
    assert gene_map.get_array().shape == (6, 6)
    # image pixels of 0.5 µm: x 20..42 -> 10..21, y 18..40 -> 9..20
    np.testing.assert_allclose(image.get_extent(), [10, 21, 20, 9])
    assert gene_map.get_clim() == (0, 2)
    assert ax.get_xlim() == (10, 21) and ax.get_ylim() == (20, 9)


def test_image_level_follows_view(sdata, monkeypatch):
    monkeypatch.setattr(_draw, "MAX_DISPLAY_PIXELS", 40)
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", colorbar=False)
    image = ax.images[0]
    # 96 x 128 image; levels 48 x 64 and 24 x 32: the finest with <= 40 pixels is level 2
    assert image.get_array().shape[:2] == (24, 32)
    np.testing.assert_allclose(image.get_extent(), [0, 64, 48, 0])
    # the raster (20 x 30, then 10 x 15) is read at level 0
    assert ax.images[1].get_array().shape == (20, 30)


def test_other_coordinate_system_and_no_image(sdata):
    # raster and image also in an "aligned" system in image pixels; without the image in it, draw the raster alone
    set_transformation(sdata["he"], Identity(), to_coordinate_system="pixels")
    set_transformation(sdata["stsr"], Scale([4.0, 4.0], axes=("y", "x")), to_coordinate_system="pixels")
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", coordinate_system="pixels", colorbar=False)
    np.testing.assert_allclose(ax.images[0].get_extent(), [0, IMG_SHAPE[1], IMG_SHAPE[0], 0])
    np.testing.assert_allclose(ax.images[1].get_extent(), [0, 120, 80, 0])
    # the unit of a coordinate system other than stsr's "global" (µm) is unknown
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (pixels units)", "y (pixels units)")
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", show_image=False, colorbar=False)
    assert len(ax.images) == 1
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x (µm, global)", "y (µm, global)")


def test_errors(sdata):
    with pytest.raises(KeyError, match="did you mean 'ERBB2'"):
        stsr.pl.overlay(sdata, "stsr", "ERBB3")
    with pytest.raises(KeyError, match="Did you mean 'stsr'"):
        stsr.pl.overlay(sdata, "stsr_", "ERBB2")
    with pytest.raises(ValueError, match="coordinate system 'globl'"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2", coordinate_system="globl")
    with pytest.raises(ValueError, match="does not overlap"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2", crop=(500, 500, 600, 600))
    with pytest.raises(ValueError, match="xmax > xmin"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2", crop=(5, 5, 1, 1))
    # a rotation cannot be drawn with imshow extents
    rot = Affine(
        np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    set_transformation(sdata["he"], rot, to_coordinate_system="rotated")
    set_transformation(sdata["stsr"], rot, to_coordinate_system="rotated")
    with pytest.raises(ValueError, match="rotates or shears"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2", coordinate_system="rotated")


def test_no_shared_coordinate_system(sdata):
    set_transformation(sdata["stsr"], {"other": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="share no coordinate system"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2")
    with pytest.raises(ValueError, match="no transformation to coordinate system 'global'"):
        stsr.pl.overlay(sdata, "stsr", "ERBB2", coordinate_system="global")
    # alone, in its own system, it draws
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", show_image=False, colorbar=False)
    np.testing.assert_allclose(ax.images[0].get_extent(), [0, 30, 20, 0])


def test_rotated_image_is_drawn_through_its_affine(sdata):
    """An H&E placed by a rotation (as a registered Xenium H&E) lies under the map: drawn in its pixels through its
    affine, each pixel corner where the transformation puts it."""
    c, s = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
    xy = np.array([[IMG_UM * c, -IMG_UM * s, 10.0], [IMG_UM * s, IMG_UM * c, -5.0], [0.0, 0.0, 1.0]])
    set_transformation(sdata["he"], Affine(xy, input_axes=("x", "y"), output_axes=("x", "y")), "global")
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", colorbar=False)
    image, gene_map = ax.images
    np.testing.assert_allclose(gene_map.get_extent(), [RASTER_X[0], RASTER_X[1], RASTER_Y[1], RASTER_Y[0]])
    assert image.get_array().shape[:2] == IMG_SHAPE and image.get_extent() == [
        0,
        IMG_SHAPE[1],
        IMG_SHAPE[0],
        0,
    ]
    to_data = image.get_transform() - ax.transData
    for col, row in ((0, 0), (IMG_SHAPE[1], 0), (37, 51)):
        np.testing.assert_allclose(to_data.transform([col, row]), (xy @ [col, row, 1])[:2], atol=1e-9)

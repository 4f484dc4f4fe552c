"""What stsr.pl draws, pixel by pixel: the image shows unchanged where the map has no value (outside the tissue,
NaN), the map is blended at ``alpha`` over it inside, and without an image the colours are the colour bar's."""

from __future__ import annotations

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from matplotlib.colors import Normalize
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Scale, Sequence, Translation

import stsr

YX = ("y", "x")
IMG_SHAPE = (60, 80)  # image pixels of 1 µm: x 0..80, y 0..60
COLOUR_LEFT = np.array([235, 200, 225])  # image colour for x < 40 µm
COLOUR_RIGHT = np.array([150, 90, 170])  # and for x >= 40 µm
GRID_UM, GRID_ORIGIN, GRID_SHAPE = 4.0, (10.0, 10.0), (10, 15)  # HR pixels of 4 µm over x 10..70, y 10..50
TISSUE = (
    slice(2, 8),
    slice(3, 12),
)  # grid rows 2..7 and columns 3..11 are tissue; zero in every gene elsewhere
NAN_PIXEL = (5, 8)  # a tissue pixel whose G1 is NaN (no value: transparent)
ZERO_PIXEL = (3, 4)  # a tissue pixel where G1 is a measured 0 (G2 is not): drawn
VMIN, VMAX = -1.0, 4.0  # colour limits that put G1's values 0..3 strictly inside the colour bar
CMAP = "magma"
TOL = 3  # 8-bit rounding of Agg's blending and of the colour bar's 256 segments


def _tissue_mask() -> np.ndarray:
    mask = np.zeros(GRID_SHAPE, bool)
    mask[TISSUE] = True
    return mask


def _g1() -> np.ndarray:
    """G1 in the grid: ``col % 4`` (0..3) in the tissue, NaN at ``NAN_PIXEL``, 0 outside."""
    cols = np.broadcast_to(np.arange(GRID_SHAPE[1]) % 4, GRID_SHAPE).astype(np.float32)
    g1 = np.where(_tissue_mask(), cols, 0).astype(np.float32)
    g1[NAN_PIXEL] = np.nan
    return g1


def make_slide(with_spots: bool = False) -> sd.SpatialData:
    """A two-colour image in µm and a 2-gene map over it, zero in both genes outside the tissue rectangle."""
    img = np.empty((3, *IMG_SHAPE), np.uint8)
    img[:, :, :40] = COLOUR_LEFT[:, None, None]
    img[:, :, 40:] = COLOUR_RIGHT[:, None, None]
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Scale([1.0, 1.0], axes=YX)},
    )
    rows = np.broadcast_to(np.arange(GRID_SHAPE[0])[:, None], GRID_SHAPE)
    g2 = np.where(_tissue_mask(), 2.0 + rows % 2, 0)  # 2 or 3 in the tissue
    values = np.stack([_g1(), g2]).astype(np.float32)
    grid_tf = Sequence([Scale([GRID_UM, GRID_UM], axes=YX), Translation(list(GRID_ORIGIN), axes=YX)])
    kw = dict(dims=("c", "y", "x"), c_coords=["G1", "G2"], transformations={"global": grid_tf})
    elements = {
        "images": {
            "he": image,
            "stsr": Image2DModel.parse(values, **kw),
            "stsr_std": Image2DModel.parse(values * 0.1, **kw),
        }
    }
    if with_spots:
        # two 6 µm spots in the left half; only the first has a row in the table (the second: no value)
        elements["shapes"] = {
            "spots": ShapesModel.parse(
                np.array([[20.0, 30.0], [25.0, 52.0]]),
                geometry=0,
                radius=np.array([6.0, 6.0]),
                transformations={"global": Scale([1.0, 1.0], axes=("x", "y"))},
            )
        }
        counts = 2.0 * np.pi * 6.0**2 / GRID_UM**2  # density 2 counts per HR pixel
        table = ad.AnnData(
            X=np.array([[counts, 1.0]], np.float32),
            obs=pd.DataFrame({"region": pd.Categorical(["spots"]), "instance_id": [0]}, index=["s0"]),
            var=pd.DataFrame(index=["G1", "G2"]),
        )
        elements["tables"] = {
            "table": TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
        }
    sdata = sd.SpatialData(**elements)
    sdata["stsr"].attrs["stsr"] = {"image_key": "he", "unit": "counts per HR pixel"}
    return sdata


# ---------------------------------------------------------------------------------------------------- helpers
def render(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def pixel(buf: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """Rendered colour at data point ``(x, y)`` of ``ax``."""
    dx, dy = ax.transData.transform((x, y))
    return buf[int(buf.shape[0] - dy), int(dx)]


def grid_centre(row: int, col: int) -> tuple[float, float]:
    return GRID_ORIGIN[1] + (col + 0.5) * GRID_UM, GRID_ORIGIN[0] + (row + 0.5) * GRID_UM


def colour(value: float, norm: Normalize, cmap: str = CMAP) -> np.ndarray:
    return np.round(np.asarray(matplotlib.colormaps[cmap](norm(value)))[:3] * 255)


def colorbar_colour(buf: np.ndarray, cbar_ax, value: float) -> np.ndarray:
    """Rendered colour of a vertical colour bar at ``value``."""
    (x0, _), (x1, _) = cbar_ax.get_window_extent().get_points()
    _, dy = cbar_ax.transData.transform((0.0, value))
    return buf[int(buf.shape[0] - dy), int((x0 + x1) / 2)]


def screen_grid(buf: np.ndarray, ax) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every rendered pixel of ``ax``'s area: grid row, column, whether it is inside the grid, and whether it
    lies at least 2 screen pixels from any grid line (unambiguous)."""
    h = buf.shape[0]
    (x0, y0), (x1, y1) = ax.get_window_extent().get_points()
    cols, rows = np.meshgrid(
        np.arange(int(np.ceil(x0)), int(x1)), np.arange(int(np.ceil(h - y1)), int(h - y0))
    )
    pts = ax.transData.inverted().transform(np.c_[cols.ravel() + 0.5, h - rows.ravel() - 0.5])
    gx = (pts[:, 0] - GRID_ORIGIN[1]) / GRID_UM
    gy = (pts[:, 1] - GRID_ORIGIN[0]) / GRID_UM
    px_per_cell = abs(ax.transData.transform((GRID_UM, 0))[0] - ax.transData.transform((0, 0))[0])
    margin = 2.0 / px_per_cell
    clear = (np.abs(gx - np.round(gx)) > margin) & (np.abs(gy - np.round(gy)) > margin)
    gr, gc = np.floor(gy).astype(int), np.floor(gx).astype(int)
    inside = (gr >= 0) & (gr < GRID_SHAPE[0]) & (gc >= 0) & (gc < GRID_SHAPE[1])
    return (rows.ravel(), cols.ravel()), (gr, gc), inside, clear


def image_alone(ax_position, figsize, dpi) -> np.ndarray:
    """Render of the image alone (plain imshow) with the same axes placement and limits."""
    fig = plt.figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes(ax_position)
    img = np.empty((*IMG_SHAPE, 3), np.uint8)
    img[:, :40], img[:, 40:] = COLOUR_LEFT, COLOUR_RIGHT
    ax.imshow(img, extent=(0, IMG_SHAPE[1], IMG_SHAPE[0], 0), origin="upper", interpolation="antialiased")
    ax.set_xlim(0, IMG_SHAPE[1])
    ax.set_ylim(IMG_SHAPE[0], 0)
    ax.set_aspect("equal")
    return render(fig)


# ---------------------------------------------------------------------------------------------------- overlay
def test_overlay_image_unchanged_outside_tissue_and_blended_inside():
    sdata = make_slide()
    figsize, dpi, position = (8, 6), 50, [0.0, 0.0, 1.0, 1.0]
    fig = plt.figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes(position)
    alpha = 0.6
    stsr.pl.overlay(sdata, "stsr", "G1", vmin=VMIN, vmax=VMAX, colorbar=False, alpha=alpha, ax=ax)
    buf = render(fig)
    ref = image_alone(position, figsize, dpi)
    assert buf.shape == ref.shape
    norm = Normalize(VMIN, VMAX)

    # (a) outside the tissue (zero in every gene), at the NaN pixel and off the grid: the image's own colour
    for row, col in [(0, 0), (9, 14), (1, 5), (8, 11), NAN_PIXEL]:
        expected = COLOUR_LEFT if grid_centre(row, col)[0] < 40 else COLOUR_RIGHT
        np.testing.assert_allclose(pixel(buf, ax, *grid_centre(row, col)), expected, atol=1)
    np.testing.assert_allclose(pixel(buf, ax, 5.0, 5.0), COLOUR_LEFT, atol=1)
    np.testing.assert_allclose(pixel(buf, ax, 75.0, 55.0), COLOUR_RIGHT, atol=1)
    # (b) inside: the colour map's colour of the value blended at alpha over the image, the measured 0 included
    for row, col in [(2, 3), (4, 6), (7, 11), ZERO_PIXEL]:
        x, y = grid_centre(row, col)
        value = float(_g1()[row, col])
        under = COLOUR_LEFT if x < 40 else COLOUR_RIGHT
        expected = alpha * colour(value, norm) + (1 - alpha) * under
        np.testing.assert_allclose(pixel(buf, ax, x, y), expected, atol=TOL)
    assert np.abs(pixel(buf, ax, *grid_centre(*ZERO_PIXEL)) - COLOUR_LEFT).max() > 30

    # every rendered pixel: the image alone where the map has no value, the blend elsewhere
    (rows, cols), (gr, gc), inside, clear = screen_grid(buf, ax)
    drawn, reference = buf[rows, cols], ref[rows, cols]
    g1 = _g1()
    has_value = np.zeros(rows.shape, bool)
    has_value[inside] = _tissue_mask()[gr[inside], gc[inside]] & np.isfinite(g1[gr[inside], gc[inside]])
    np.testing.assert_array_equal(drawn[~has_value & clear], reference[~has_value & clear])
    assert (~has_value & clear).sum() > 0.5 * rows.size
    sel = has_value & clear
    lut = np.round(matplotlib.colormaps[CMAP](norm(g1[gr[sel], gc[sel]]))[:, :3] * 255)
    np.testing.assert_allclose(drawn[sel], alpha * lut + (1 - alpha) * reference[sel], atol=TOL)


def test_overlay_colour_limits_ignore_pixels_without_value():
    ax = stsr.pl.overlay(make_slide(), "stsr", "G2", colorbar=False)
    # G2 is 2 or 3 in the tissue and 0 outside: the limits are those of the tissue
    assert ax.images[-1].get_clim() == pytest.approx((2.0, 3.0))
    assert ax.images[-1].get_array().mask.sum() == GRID_SHAPE[0] * GRID_SHAPE[1] - _tissue_mask().sum()


def test_overlay_without_image_matches_colorbar():
    sdata = make_slide()
    fig = plt.figure(figsize=(8, 6), dpi=50)
    ax = fig.add_axes([0.05, 0.05, 0.7, 0.9])
    stsr.pl.overlay(sdata, "stsr", "G1", show_image=False, vmin=VMIN, vmax=VMAX, alpha=0.3, ax=ax)
    buf = render(fig)
    cbar_ax = [a for a in fig.axes if a is not ax][0]
    norm = Normalize(VMIN, VMAX)
    for value, (row, col) in zip([0.0, 1.0, 2.0, 3.0], [(2, 4), (2, 5), (6, 6), (7, 3)]):
        assert _g1()[row, col] == value
        drawn = pixel(buf, ax, *grid_centre(row, col))
        np.testing.assert_allclose(drawn, colorbar_colour(buf, cbar_ax, value), atol=TOL)
        np.testing.assert_allclose(drawn, colour(value, norm), atol=TOL)
    # no value: the axes' background (white)
    np.testing.assert_array_equal(pixel(buf, ax, *grid_centre(0, 0)), [255, 255, 255])
    np.testing.assert_array_equal(pixel(buf, ax, *grid_centre(*NAN_PIXEL)), [255, 255, 255])


# ---------------------------------------------------------------------------------------------------- panels
def _panel(fig, title: str):
    return next(a for a in fig.axes if a.get_title() == title)


def test_panels_draw_over_the_image_like_overlay():
    sdata = make_slide(with_spots=True)
    alpha = 0.5
    fig = stsr.pl.panels(sdata, "G1", vmin=VMIN, vmax=VMAX, alpha=alpha, panel_size=3.0)
    fig.set_dpi(60)
    buf = render(fig)
    norm = Normalize(VMIN, VMAX)
    lr, hr, std = (
        _panel(fig, "LR spots (density)"),
        _panel(fig, "HR stsr"),
        _panel(fig, "uncertainty stsr_std"),
    )
    for ax in (lr, hr, std):
        # outside the tissue, at the NaN pixel and off the grid: the image unchanged
        for row, col in [(0, 0), (9, 14), NAN_PIXEL]:
            expected = COLOUR_LEFT if grid_centre(row, col)[0] < 40 else COLOUR_RIGHT
            np.testing.assert_allclose(pixel(buf, ax, *grid_centre(row, col)), expected, atol=1)
        np.testing.assert_allclose(pixel(buf, ax, 75.0, 55.0), COLOUR_RIGHT, atol=1)
    # HR: the blend of the shared scale's colour over the image
    for row, col in [(2, 3), (4, 6), ZERO_PIXEL]:
        x, y = grid_centre(row, col)
        under = COLOUR_LEFT if x < 40 else COLOUR_RIGHT
        expected = alpha * colour(float(_g1()[row, col]), norm) + (1 - alpha) * under
        np.testing.assert_allclose(pixel(buf, hr, x, y), expected, atol=TOL)
    # uncertainty (0.1 x G1, its own scale, viridis): blended inside too, the measured zero included
    std_norm = std.images[-1].norm
    for row, col in [(4, 6), ZERO_PIXEL]:
        x, y = grid_centre(row, col)
        expected = (
            alpha * colour(0.1 * float(_g1()[row, col]), std_norm, "viridis") + (1 - alpha) * COLOUR_LEFT
        )
        np.testing.assert_allclose(pixel(buf, std, x, y), expected, atol=TOL)
    # LR: the spot with counts is blended (density 2), the spot without a table row shows the image
    np.testing.assert_allclose(
        pixel(buf, lr, 20.0, 30.0), alpha * colour(2.0, norm) + (1 - alpha) * COLOUR_LEFT, atol=TOL
    )
    np.testing.assert_allclose(pixel(buf, lr, 25.0, 52.0), COLOUR_LEFT, atol=1)


def test_panels_without_image_match_colorbars():
    sdata = make_slide(with_spots=True)
    fig = stsr.pl.panels(sdata, "G1", vmin=VMIN, vmax=VMAX, alpha=0.4, show_image=False, panel_size=3.0)
    fig.set_dpi(60)
    buf = render(fig)
    hr, lr = _panel(fig, "HR stsr"), _panel(fig, "LR spots (density)")
    cbar = next(a for a in fig.axes if a.get_ylabel() == "G1 (counts per HR pixel)")
    norm = Normalize(VMIN, VMAX)
    for value, (row, col) in zip([0.0, 1.0, 2.0, 3.0], [(2, 4), (2, 5), (6, 6), (7, 3)]):
        drawn = pixel(buf, hr, *grid_centre(row, col))
        np.testing.assert_allclose(drawn, colorbar_colour(buf, cbar, value), atol=TOL)
        np.testing.assert_allclose(drawn, colour(value, norm), atol=TOL)
    np.testing.assert_allclose(pixel(buf, lr, 20.0, 30.0), colorbar_colour(buf, cbar, 2.0), atol=TOL)
    np.testing.assert_array_equal(pixel(buf, hr, *grid_centre(0, 0)), [255, 255, 255])
    # the uncertainty panel against its own colour bar
    std = _panel(fig, "uncertainty stsr_std")
    std_cbar = next(a for a in fig.axes if a.get_ylabel() == "G1 std (counts per HR pixel)")
    lo, hi = std.images[-1].get_clim()
    row, col = 4, 6
    value = 0.1 * float(_g1()[row, col])
    assert lo < value < hi
    np.testing.assert_allclose(
        pixel(buf, std, *grid_centre(row, col)), colorbar_colour(buf, std_cbar, value), atol=TOL
    )
    assert hr.get_xlabel() == "x (µm, global)" and hr.get_ylabel() == "y (µm, global)"

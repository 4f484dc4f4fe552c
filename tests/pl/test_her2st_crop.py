"""to_table, aggregate, overlay and panels on a crop of a real HER2ST section (C2, H&E at ~0.69 µm/px).

The HR raster is built on the real H&E frame: a 10 µm grid over a 600 µm window around the middle spot, holding
each spot's counts spread uniformly over its disk (the observation model's minimum-norm lift for disjoint spots).
"""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy import sparse
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation, get_transformation

import stsr
from stsr._elements import element_affine, pixel_area
from stsr.observation import ObservationModel
from stsr.tl._aggregate import aggregate
from stsr.tl._to_table import to_table

GENES = ["ERBB2", "ACTB", "GAPDH"]
HR_UM = 10.0
HALF_UM = 300.0


@pytest.fixture(scope="module")
def crop_sdata(her2st_c2):
    src = her2st_c2
    sdata = sd.SpatialData(
        images={"he": src["he"]}, shapes={"spots": src["spots"]}, tables={"table": src["table"]}
    )
    img_tf = get_transformation(sdata["he"], "global")
    sy, sx = np.diag(img_tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")))[:2]
    xy = np.c_[sdata["spots"].geometry.x, sdata["spots"].geometry.y]
    centre = xy[np.argmin(np.linalg.norm(xy - np.median(xy, 0), axis=1))]
    x0, y0 = centre - HALF_UM
    n = int(2 * HALF_UM / HR_UM)
    # grid in image pixels: pixel size HR_UM / s along each axis, origin at (y0, x0) µm
    grid_tf = Sequence(
        [
            Scale([HR_UM / sy, HR_UM / sx], axes=("y", "x")),
            Translation([y0 / sy, x0 / sx], axes=("y", "x")),
            img_tf,
        ]
    )
    # spots inside the window, in grid coordinates (row, col)
    rowcol = np.c_[(xy[:, 1] - y0) / HR_UM, (xy[:, 0] - x0) / HR_UM]
    op = ObservationModel.disks((n, n), rowcol, 50.0 / HR_UM)
    table = sdata["table"]
    counts = np.asarray(table[:, GENES].X.toarray(), dtype=np.float64)  # instance_id = shapes index = row
    density = counts / np.maximum(op.support_area, 1e-9)[:, None]
    hr = op.adjoint(density.T)  # (genes, n, n): uniform density over each (clipped) disk
    sdata.images["stsr"] = Image2DModel.parse(
        hr.astype(np.float32),
        dims=("c", "y", "x"),
        c_coords=GENES,
        transformations={"global": grid_tf},
        scale_factors=[2],
    )
    sdata["stsr"].attrs["stsr"] = {"image_key": "he", "spots_key": "spots", "table_key": "table"}
    inside = (np.abs(xy - centre) <= HALF_UM - 50.0).all(1)
    return sdata, (x0, y0), centre, inside, counts, xy


def test_real_crop_table_aggregate_and_plots(crop_sdata, tmp_path):
    sdata, (x0, y0), centre, inside, counts, xy = crop_sdata
    assert inside.sum() >= 9  # a 3 x 3 block of spots (200 µm pitch) lies fully in the window
    hr = sdata["stsr"]["scale0"]["image"].values
    px_area = pixel_area(element_affine(sdata["stsr"], "global"))
    assert px_area == pytest.approx(HR_UM**2)

    # to_table: one observation per pixel covered by a spot, at its real position in µm
    adata = to_table(sdata, "stsr", inplace=False)
    assert adata.n_obs == int((hr.sum(0) > 0).sum())
    d = np.min(np.linalg.norm(adata.obsm["spatial"][:, None, :] - xy[None], axis=2), axis=1)
    assert d.max() <= 50.0 + HR_UM * np.sqrt(2) / 2 + 1e-6
    rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    expected_xy = np.c_[x0 + (cols + 0.5) * HR_UM, y0 + (rows + 0.5) * HR_UM]
    np.testing.assert_allclose(adata.obsm["spatial"], expected_xy, atol=1e-6)
    x = adata.X.toarray() if sparse.issparse(adata.X) else adata.X
    np.testing.assert_allclose(x.sum(0), hr.sum((1, 2)), rtol=1e-5)

    # aggregate over the real spot circles: spots fully inside get back their counts (the lift preserves them and
    # aggregation weights are area fractions), within the disagreement of two supersamplings of the disk edge
    agg = aggregate(sdata, "stsr", "spots")
    ax_ = agg.X.toarray() if sparse.issparse(agg.X) else np.asarray(agg.X)
    area = np.pi * 50.0**2 / px_area
    np.testing.assert_allclose(agg.obs["area"].to_numpy()[inside], area, rtol=0.02)
    np.testing.assert_allclose(agg.obsm["spatial"], xy, atol=1e-6)
    # HR pixel p of spot i holds density_i * f(p) (f = area fraction in the disk); aggregating weighs it by f(p)
    # again, so a spot gets density_i * sum_p f(p)^2: its counts on interior pixels, less on the edge pixels
    op = ObservationModel.disks(hr.shape[1:], np.c_[(xy[:, 1] - y0) / HR_UM, (xy[:, 0] - x0) / HR_UM], 5.0)
    f2 = np.asarray(op.matrix.multiply(op.matrix).sum(1)).ravel()
    expected = counts[:, 0] / np.maximum(op.support_area, 1e-9) * f2
    np.testing.assert_allclose(ax_[inside, 0], expected[inside], rtol=0.02)
    assert np.all(ax_[inside, 0] <= counts[inside, 0] * 1.02)

    # overlay: the map lands on the H&E in µm
    crop = (centre[0] - 250, centre[1] - 250, centre[0] + 250, centre[1] + 250)
    ax = stsr.pl.overlay(sdata, "stsr", "ERBB2", crop=crop, save=tmp_path / "overlay.png")
    image, gene_map = ax.images
    left, right, bottom, top = gene_map.get_extent()
    assert left <= crop[0] < left + HR_UM and right - HR_UM < crop[2] <= right
    assert top <= crop[1] < top + HR_UM and bottom - HR_UM < crop[3] <= bottom
    il, ir, ib, it = image.get_extent()
    assert il <= crop[0] and ir >= crop[2] and it <= crop[1] and ib >= crop[3]
    assert image.get_array().shape[0] >= 500 / 0.69 - 2  # full-resolution level for a 500 µm view
    assert (tmp_path / "overlay.png").stat().st_size > 10_000

    # panels: spot densities (counts / spot area in HR px) equal the HR values at the spot centres
    fig = stsr.pl.panels(sdata, "ERBB2", crop=crop, save=tmp_path / "panels.png")
    coll = fig.axes[0].collections[0]
    dens = np.asarray(coll.get_array())
    np.testing.assert_allclose(dens, counts[:, 0] / area, rtol=1e-6)
    r = ((xy[inside, 1] - y0) // HR_UM).astype(int)
    c = ((xy[inside, 0] - x0) // HR_UM).astype(int)
    np.testing.assert_allclose(hr[0, r, c], dens[inside], rtol=0.02)
    assert coll.get_clim() == fig.axes[1].images[-1].get_clim()
    assert (tmp_path / "panels.png").stat().st_size > 10_000


def test_real_crop_overlay_pixels(crop_sdata):
    """On the real H&E: between the spots (the map is 0 in every gene there) the rendered overlay is the H&E
    unchanged; on a spot it is the colour map's colour blended at alpha over the H&E."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from stsr.pl._draw import draw_image

    sdata, _, centre, inside, counts, xy = crop_sdata
    crop = (centre[0] - 150, centre[1] - 150, centre[0] + 150, centre[1] + 150)
    figsize, dpi, position = (5, 5), 100, [0.0, 0.0, 1.0, 1.0]

    def render(fig):
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)

    fig = plt.figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes(position)
    alpha = 0.6
    stsr.pl.overlay(sdata, "stsr", "ERBB2", crop=crop, vmin=0.0, colorbar=False, alpha=alpha, ax=ax)
    buf = render(fig)
    ref_fig = plt.figure(figsize=figsize, dpi=dpi)
    ref_ax = ref_fig.add_axes(position)
    draw_image(ref_ax, sdata, "he", "global", crop)
    ref_ax.set_xlim(crop[0], crop[2])
    ref_ax.set_ylim(crop[3], crop[1])
    ref_ax.set_aspect("equal")
    ref = render(ref_fig)
    assert buf.shape == ref.shape

    def block(arr, axes, x, y, half_um):
        (x0, y0), (x1, y1) = axes.transData.transform(
            [(x - half_um, y - half_um), (x + half_um, y + half_um)]
        )
        h = arr.shape[0]
        return arr[int(h - y0) : int(h - y1), int(x0) : int(x1)].reshape(-1, 3)

    # the point of the crop farthest from every spot centre (> 50 µm + one HR pixel): no value there
    gx, gy = np.meshgrid(
        np.linspace(crop[0] + 20, crop[2] - 20, 61), np.linspace(crop[1] + 20, crop[3] - 20, 61)
    )
    pts = np.c_[gx.ravel(), gy.ravel()]
    dist = np.min(np.linalg.norm(pts[:, None] - xy[None], axis=2), axis=1)
    far = pts[np.argmax(dist)]
    assert dist.max() > 50 + HR_UM * np.sqrt(2) + 10
    gap = block(buf, ax, *far, 10.0)
    assert gap.shape[0] > 100 and np.ptp(block(ref, ax, *far, 10.0)) > 0  # real H&E texture
    np.testing.assert_array_equal(gap, block(ref, ax, *far, 10.0))
    # the middle spot: uniform density counts / area; drawn blended over the H&E (inner 30 µm of the 100 µm disk)
    gene_map = ax.images[-1]
    norm = Normalize(*gene_map.get_clim())
    value = counts[np.argmin(np.linalg.norm(xy - centre, axis=1)), 0] / (np.pi * 50.0**2 / HR_UM**2)
    rgb = np.round(np.asarray(plt.get_cmap("magma")(norm(value)))[:3] * 255)
    np.testing.assert_allclose(
        block(buf, ax, *centre, 15.0), alpha * rgb + (1 - alpha) * block(ref, ax, *centre, 15.0), atol=3
    )

"""stsr.pl.panels: LR / HR / uncertainty / truth side by side on one colour scale."""

from __future__ import annotations

import numpy as np
import pytest
from _pl_data import GENES, HR_UM, SPOT_COUNTS, SPOT_RADIUS, grid_tf
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence

import stsr

YX = ("y", "x")


def _expression_artist(ax):
    """The panel's expression layer: the last AxesImage, or the spots' PatchCollection."""
    colls = [c for c in ax.collections if isinstance(c, PatchCollection)]
    return colls[0] if colls else ax.images[-1]


def _add_truth_and_lr(sdata, hr: np.ndarray) -> None:
    # truth on a 2x finer grid (1 µm): each HR pixel's counts split over 4 pixels
    fine = np.kron(hr, np.ones((1, 2, 2))) / 4.0
    tf_fine = Sequence([Scale([0.5, 0.5], axes=YX), grid_tf()])
    sdata.images["hr_truth"] = Image2DModel.parse(
        fine.astype(np.float32), dims=("c", "y", "x"), c_coords=GENES, transformations={"global": tf_fine}
    )
    # LR raster on a 2x coarser grid (4 µm): counts summed over 2 x 2 HR pixels
    c, h, w = hr.shape
    coarse = hr.reshape(c, h // 2, 2, w // 2, 2).sum((2, 4))
    tf_coarse = Sequence([Scale([2.0, 2.0], axes=YX), grid_tf()])
    sdata.images["lr"] = Image2DModel.parse(
        coarse.astype(np.float32), dims=("c", "y", "x"), c_coords=GENES, transformations={"global": tf_coarse}
    )


def test_spots_density_and_shared_limits(sdata, tmp_path):
    hr = sdata["stsr"]["scale0"]["image"].values
    _add_truth_and_lr(sdata, hr)
    fig = stsr.pl.panels(sdata, "ERBB2", truth="hr_truth", save=tmp_path / "p.png")
    assert isinstance(fig, Figure)
    axes = fig.axes[:4]
    assert [a.get_title() for a in axes] == [
        "LR spots (density)",
        "HR stsr",
        "uncertainty stsr_std",
        "truth hr_truth",
    ]
    lr, hr_art, std_art, truth_art = (_expression_artist(a) for a in axes)
    # spot counts -> counts per HR pixel: divide by the spot area in HR pixels (pi r^2 / 2^2)
    spot_px = np.pi * SPOT_RADIUS**2 / HR_UM**2
    density = SPOT_COUNTS[:, 0] / spot_px
    np.testing.assert_allclose(np.asarray(lr.get_array()), density, rtol=1e-6)
    # the truth (1 µm pixels) is shown per HR pixel too: equal to the HR map here
    np.testing.assert_allclose(truth_art.get_array(), np.kron(hr[0], np.ones((2, 2))), rtol=1e-6)
    # one colour scale for LR, HR and truth, from the pooled values; its own for the uncertainty
    pooled = np.r_[hr[0].ravel(), density, np.kron(hr[0], np.ones((2, 2))).ravel()]
    expected = (pooled.min(), np.percentile(pooled, 99.5))
    for art in (lr, hr_art, truth_art):
        np.testing.assert_allclose(art.get_clim(), expected, rtol=1e-6)
    std = sdata["stsr_std"]["scale0"]["image"].sel(c="ERBB2").values
    np.testing.assert_allclose(std_art.get_clim(), (std.min(), np.percentile(std, 99.5)), rtol=1e-5)
    labels = [a.get_ylabel() for a in fig.axes[4:]]
    assert "ERBB2 (counts per HR pixel)" in labels and "ERBB2 std (counts per HR pixel)" in labels
    assert (tmp_path / "p.png").stat().st_size > 2000


def test_lr_raster_crop_and_options(sdata):
    hr = sdata["stsr"]["scale0"]["image"].values
    _add_truth_and_lr(sdata, hr)
    crop = (10.0, 8.0, 30.0, 24.0)
    fig = stsr.pl.panels(sdata, "KRT19", lr="lr", std=False, crop=crop, vmin=0.0, vmax=1.0, show_image=False)
    axes = fig.axes[:2]
    assert [a.get_title() for a in axes] == ["LR lr (density)", "HR stsr"]
    lr_art, hr_art = (a.images[-1] for a in axes)
    assert lr_art.get_clim() == hr_art.get_clim() == (0.0, 1.0)
    # LR pixel value (sum of a 2x2 block of 0.5) shown as density 0.5 per HR pixel
    np.testing.assert_allclose(lr_art.get_array(), 0.5)
    # LR pixels of 4 µm from x = 2 and y = 4: the crop x 10..30, y 8..24 -> pixels x 2..7, y 1..5
    np.testing.assert_allclose(lr_art.get_extent(), [10, 30, 24, 8])
    assert axes[0].get_xlim() == (10, 30) and axes[1].get_ylim() == (24, 8)
    fig = stsr.pl.panels(sdata, "KRT19", lr=False, std=False)
    assert [a.get_title() for a in fig.axes[:1]] == ["HR stsr"]


def test_errors(sdata):
    with pytest.raises(KeyError, match="did you mean 'PTPRC'"):
        stsr.pl.panels(sdata, "PTPRB")
    with pytest.raises(KeyError, match="No image element 'truth'"):
        stsr.pl.panels(sdata, "PTPRC", truth="truth")
    del sdata.tables["table"]
    with pytest.raises(KeyError, match="No table annotates shapes 'spots'"):
        stsr.pl.panels(sdata, "PTPRC")
    with pytest.raises(ValueError, match="coordinate system 'um'"):
        stsr.pl.panels(sdata, "PTPRC", lr=False, coordinate_system="um")


def test_spot_values_follow_instance_ids(sdata):
    table = sdata.tables["table"]
    table.obs["instance_id"] = [2, 0, 1]  # rows in another order than the shapes
    values = stsr.pl.spot_values(sdata, "spots", "ERBB2")
    np.testing.assert_array_equal(values.to_numpy(), SPOT_COUNTS[[1, 2, 0], 0])
    with pytest.raises(KeyError, match="does not annotate shapes 'spots'"):
        sdata.tables["other"] = sdata.tables["table"][:, :1].copy()
        sdata.tables["other"].uns["spatialdata_attrs"]["region"] = "cells"
        stsr.pl.spot_values(sdata, "spots", "ERBB2", table_key="other")

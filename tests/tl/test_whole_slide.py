"""The public maps on a WHOLE real slide (HER2ST C2, uncropped), whose spots cover only part of the image.

Regression: windows of the grid that no spot reaches made ``ObservationModel.interpolate`` (and with it
``pixel_factors``, the guide of ``prior_map`` and the prior's reweighting in ``super_resolve``) fail with
``ValueError: cannot reshape array of size 0``. These tests run the public functions on the whole slide and check the
values: every spot keeps its measured counts, the map is finite, zero outside the measured area and follows the
spots' data. The teacher reads 2 image pixels per HR pixel instead of 13 (0.75 µm per pixel: a 40th of the pixels)
and ``super_resolve`` runs the shipped ``"fast"`` model for 2 steps, to keep them short.
"""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy.spatial import cKDTree

import stsr
from stsr.observation import Grid
from stsr.pp._spots import spot_counts
from stsr.tl import _semantic_prior

GENES = ["ERBB2", "CD74", "MUC1"]


@pytest.fixture
def whole_c2(her2st_c2) -> sd.SpatialData:
    """The whole C2 slide in a new SpatialData (the session's fixture is left as it is)."""
    return sd.SpatialData(
        images={"he": her2st_c2["he"]},
        shapes={"spots": her2st_c2["spots"]},
        tables={"table": her2st_c2["table"]},
    )


def _check_whole_slide_map(sdata: sd.SpatialData, key: str) -> None:
    """The map ``sdata[key]`` on the whole slide: consistent with every spot, finite, non-negative, zero outside
    the measured area, and following the spots' data (the interpolated LR input) inside it."""
    prov = sdata[key].attrs["stsr"]
    out = np.asarray(sdata[key]["scale0"]["image"].values).astype(np.float64)
    grid = Grid(
        tuple(prov["grid_shape"]), prov["grid_pixel_size_image_px"], tuple(prov["grid_origin_image_px"])
    )
    assert out.shape == (len(GENES), *grid.shape)
    # the grid is the whole image (about 9900 x 9300 px at 10 µm HR pixels), not a crop around the spots
    assert grid.shape[0] * grid.pixel_size >= 9900 - grid.pixel_size
    op, lr, genes = spot_counts(sdata, "table", "spots", GENES, grid, "he")
    assert genes == GENES and op.n_obs == 187
    # spots cover only part of the slide: some windows of the teacher and of the map are beyond every spot's reach
    # (6 sigma of the interpolation, 3 spot pitches), the case that failed
    reach, size = 3 * op.pitch(), _semantic_prior.PRIOR_WINDOW
    tree = cKDTree(op.centres)
    far_windows = [
        (r, c)
        for r in range(0, grid.shape[0], size)
        for c in range(0, grid.shape[1], size)
        if not tree.query_ball_point([r + size / 2, c + size / 2], size / np.sqrt(2) + reach)
    ]
    assert far_windows
    assert np.isfinite(out).all() and out.min() >= 0
    # consistency: pooled over each spot (stsr's own operator, on the element's grid), its expected count (the
    # counts as Poisson draws)
    totals = np.asarray(sdata["table"].X.sum(1)).ravel()  # size factors; 0: the spot stays empty
    want = op.expected_counts(lr, empty=totals == 0, depth=totals)
    np.testing.assert_allclose(op.pool(out), want, rtol=1e-4, atol=1e-3)
    # zero outside the measured area: nothing further than a spot pitch from every spot centre
    rr, cc = np.meshgrid(np.arange(grid.shape[0]) + 0.5, np.arange(grid.shape[1]) + 0.5, indexing="ij")
    dist, _ = tree.query(np.stack([rr.ravel(), cc.ravel()], 1))
    outside = (dist > op.pitch()).reshape(grid.shape)
    assert outside.mean() > 0.5  # most of the whole slide
    assert not out[:, outside].any()
    for r, c in far_windows:
        assert not out[:, r : r + size, c : c + size].any()
    # inside, the map follows the spots' data: it correlates with their interpolated densities
    measured = out.sum(0) > 0
    assert measured.sum() > 0.8 * (op.coverage > 0).sum()
    lr_input = op.interpolate(lr)
    for g in range(len(GENES)):
        r = np.corrcoef(out[g][measured], lr_input[g][measured])[0, 1]
        assert r > 0.5, (GENES[g], r)


def test_prior_map_on_the_whole_her2st_slide(whole_c2):
    stsr.tl.prior_map(whole_c2, "he", GENES, image_scale=2, progress=False)
    assert whole_c2["stsr_prior"].attrs["stsr"]["image_scale"] == 2
    _check_whole_slide_map(whole_c2, "stsr_prior")


def test_super_resolve_with_the_semantic_prior_on_the_whole_her2st_slide(whole_c2, monkeypatch):
    monkeypatch.setattr("stsr.tl._super_resolve.teacher_image_scale", lambda inputs: 2)  # a cheap teacher
    stsr.tl.super_resolve(  # the default call, with a short core
        whole_c2,
        "he",
        GENES,
        model="fast",
        steps=2,
        tile_size=64,
        overlap=8,
        batch_size=8,
        progress=False,
    )
    prov = whole_c2["stsr"].attrs["stsr"]
    assert prov["semantic_prior"] and len(prov["teacher_sha256"]) == 64
    # the self-check ran on the slide: groups of spots predicted back, a strength chosen, an estimate recorded
    check = prov["self_check"]
    assert check["spot_groups"] > 40 and prov["prior_strength"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert check["spot_level_r"] > 0.6 and prov["diffusion_residual"] == 0.0  # a 2-step core adds nothing
    # the self-estimate on the map's 10 µm pixels (about 78 per 100 µm spot): their counts would be far noisier
    assert 70 < check["pixels_per_spot"] < 85 and 0 < check["self_estimated_r"] < check["spot_level_r"]
    std = np.asarray(whole_c2["stsr_std"]["scale0"]["image"].values)
    out = np.asarray(whole_c2["stsr"]["scale0"]["image"].values)
    np.testing.assert_allclose(std, out * np.sqrt(prov["dispersion"])[:, None, None], rtol=1e-5, atol=1e-6)
    _check_whole_slide_map(whole_c2, "stsr")

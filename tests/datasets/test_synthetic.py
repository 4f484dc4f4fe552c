"""The procedurally generated slide: stsr.datasets._synthetic.synthetic."""

from __future__ import annotations

import time

import dask.array as da
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree
from spatialdata.models import get_channel_names
from spatialdata.transformations import get_transformation

import stsr.pp as pp
from stsr.datasets._synthetic import synthetic


@pytest.fixture(scope="module")
def slide():
    return synthetic(size_um=(400.0, 400.0), n_genes=8, seed=1)


@pytest.fixture(scope="module")
def wide():
    return synthetic(size_um=(900.0, 700.0), n_genes=6, seed=4)


def _affine(tf) -> np.ndarray:
    return np.asarray(tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def test_contents_and_conventions(slide):
    assert set(slide.images) == {"he", "hr_truth"}
    assert (
        set(slide.labels) == {"regions"} and set(slide.shapes) == {"spots"} and set(slide.tables) == {"table"}
    )
    he = slide["he"]
    assert isinstance(he["scale0"].image.data, da.Array)  # lazy
    assert he["scale0"].image.shape == (3, 400, 400) and he["scale0"].image.dtype == np.uint8
    assert list(get_channel_names(he)) == ["r", "g", "b"]
    np.testing.assert_allclose(_affine(get_transformation(he, "global")), np.eye(3))  # 1 µm / px
    truth = slide["hr_truth"]
    assert list(get_channel_names(truth)) == [f"gene_{i:03d}" for i in range(8)]
    grid = pp.hr_grid(slide, "he", 5.5)
    assert truth["scale0"].image.shape == (8, *grid.shape) and truth["scale0"].image.dtype == np.float32
    np.testing.assert_allclose(np.diag(_affine(get_transformation(truth, "global")))[:2], [5.5, 5.5])
    # spots: 55 µm circles, 100 µm hexagonal pitch, wholly inside the slide
    spots = slide["spots"]
    assert np.all(spots["radius"] == 27.5)
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(d[:, 1], 100.0)
    assert (xy.min() >= 27.5) and (xy.max() <= 400 - 27.5)
    t = slide["table"]
    assert t.n_obs == len(spots) and t.uns["spatialdata_attrs"]["region"] == "spots"
    assert t.X.format == "csr" and np.all(t.X.data == np.round(t.X.data))
    np.testing.assert_array_equal(t.obs["instance_id"].to_numpy(), spots.index.to_numpy())
    assert slide.attrs["stsr_synthetic"]["seed"] == 1 and t.uns["stsr_synthetic"]["n_genes"] == 8
    # the truth lives only on tissue, and the region labels match it
    values = truth["scale0"].image.values
    regions = slide["regions"]["scale0"].image.values
    assert values[:, regions == 0].max() == 0 and values[:, regions > 0].min() > 0
    assert set(np.unique(regions)) - {0} <= {1, 2, 3, 4} and len(np.unique(regions)) >= 3


def test_spot_counts_are_poisson_draws_of_pooled_truth(wide):
    grid = pp.hr_grid(wide, "he", 5.5)
    op = pp.spots_observation_model(wide, "spots", grid, "he")
    np.testing.assert_allclose(op.support_area, np.pi * 5.0**2, rtol=0.02)
    truth = wide["hr_truth"]["scale0"].image.values.astype(np.float64)
    pooled = op.pool(truth).T
    t = wide["table"]
    np.testing.assert_allclose(t.layers["expected"], pooled, rtol=1e-5)  # the one pooling definition
    counts = t.X.toarray()
    e = pooled[pooled > 1]
    c = counts[pooled > 1]
    assert abs(c.sum() - e.sum()) < 4 * np.sqrt(e.sum())
    assert 0.8 < np.mean((c - e) ** 2 / e) < 1.25  # Poisson: variance equals the mean
    assert np.all(counts[pooled == 0] == 0)
    off = t.obs["tissue_fraction"].to_numpy() == 0
    assert off.any() and np.all(counts[off] == 0)


def _image_features(sdata, grid):
    img = sdata["he"]["scale0"].image.values.astype(float) / 255
    h, w = img.shape[1:]
    rr, cc = grid.to_grid(np.arange(h) + 0.5, np.arange(w) + 0.5)
    idx = (np.floor(rr).astype(int)[:, None] * grid.shape[1] + np.floor(cc).astype(int)[None, :]).ravel()
    n = np.bincount(idx, minlength=grid.shape[0] * grid.shape[1])

    def mean(v):
        return (np.bincount(idx, weights=v.ravel(), minlength=n.size) / np.maximum(n, 1)).reshape(grid.shape)

    rgb = [mean(img[k]) for k in range(3)]
    dark = mean((img.mean(0) < 0.6).astype(float))  # local darkness: fraction of nuclear pixels
    feats = (
        rgb
        + [dark, gaussian_filter(dark, 1), gaussian_filter(dark, 2)]
        + [gaussian_filter(c, 2) for c in rgb]
    )
    return np.stack(feats, -1)


def test_expression_is_predictable_from_the_image(slide):
    grid = pp.hr_grid(slide, "he", 5.5)
    x = _image_features(slide, grid)
    y = slide["hr_truth"]["scale0"].image.values.transpose(1, 2, 0).astype(np.float64)
    tissue = slide["regions"]["scale0"].image.values > 0
    held_out = np.random.default_rng(0).random(grid.shape) < 0.5
    train, test = tissue & ~held_out, tissue & held_out

    def design(m):
        return np.c_[np.ones(m.sum()), x[m], x[m] ** 2]

    a = design(train)
    coef = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ y[train])  # ridge
    pred = design(test) @ coef
    ss_res = ((y[test] - pred) ** 2).sum(0)
    ss_const = ((y[test] - y[train].mean(0)) ** 2).sum(0)  # constant predictor fitted on the training pixels
    r2 = 1 - ss_res / ss_const
    assert r2.mean() > 0.3 and np.all(r2 > 0)
    # the structure also shows in the raw pixels: nuclear darkness correlates with at least some genes
    corr = [abs(np.corrcoef(x[tissue][:, 4], y[tissue][:, g])[0, 1]) for g in range(y.shape[-1])]
    assert max(corr) > 0.3


def test_determinism_by_seed(slide):
    again = synthetic(size_um=(400.0, 400.0), n_genes=8, seed=1)
    np.testing.assert_array_equal(again["he"]["scale0"].image.values, slide["he"]["scale0"].image.values)
    np.testing.assert_array_equal(
        again["hr_truth"]["scale0"].image.values, slide["hr_truth"]["scale0"].image.values
    )
    np.testing.assert_array_equal(again["table"].X.toarray(), slide["table"].X.toarray())
    other = synthetic(size_um=(400.0, 400.0), n_genes=8, seed=2)
    assert not np.array_equal(
        other["hr_truth"]["scale0"].image.values, slide["hr_truth"]["scale0"].image.values
    )
    assert not np.array_equal(other["he"]["scale0"].image.values, slide["he"]["scale0"].image.values)


def test_chunking_only_changes_pixel_noise(slide):
    """Nuclei crossing chunk borders are drawn whole: a finely chunked render differs only by noise."""
    fine = synthetic(size_um=(400.0, 400.0), n_genes=8, seed=1, chunk_px=96)
    assert fine["he"]["scale0"].image.data.numblocks == (1, 5, 5)
    a = fine["he"]["scale0"].image.values.astype(float)
    b = slide["he"]["scale0"].image.values.astype(float)
    diff = gaussian_filter(a - b, (0, 3, 3))  # averaging removes the independent pixel noise
    assert np.abs(diff).max() < 4 and abs((a - b).mean()) < 0.2
    np.testing.assert_array_equal(
        fine["hr_truth"]["scale0"].image.values, slide["hr_truth"]["scale0"].image.values
    )


def test_options_and_bad_parameters():
    s = synthetic(
        size_um=(300.0, 250.0), n_genes=3, um_per_px=2.0, hr_pixel_um=10.0, lattice="square", seed=3
    )
    assert s["he"]["scale0"].image.shape == (3, 150, 125)
    assert s["hr_truth"]["scale0"].image.shape == (3, 30, 25)
    xy = np.c_[s["spots"].geometry.x, s["spots"].geometry.y]
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(d[:, 1], 100.0)
    with pytest.raises(ValueError, match="um_per_px"):
        synthetic(size_um=(300.0, 300.0), um_per_px=0)
    with pytest.raises(ValueError, match="No spot"):
        synthetic(size_um=(40.0, 40.0))
    with pytest.raises(ValueError, match="lattice"):
        synthetic(size_um=(300.0, 300.0), lattice="hexagonal")


def test_transcripts_option():
    s = synthetic(size_um=(300.0, 300.0), n_genes=4, transcripts=True, seed=2)
    pts = s["transcripts"].compute()
    assert set(pts["gene"].cat.categories) == set(get_channel_names(s["hr_truth"]))
    pp.bin_transcripts(s, "transcripts", 5.5, image_key="he", key_added="binned")
    binned = s["binned"]["scale0"].image.values
    truth = s["hr_truth"]["scale0"].image.values
    assert binned.sum() == len(pts)
    assert abs(binned.sum() - truth.sum()) < 5 * np.sqrt(truth.sum())
    assert binned[:, truth.sum(0) == 0].sum() == 0


@pytest.mark.slow
def test_full_capture_area_stays_lazy():
    t0 = time.perf_counter()
    s = synthetic(size_um=(6500.0, 6500.0), um_per_px=0.5, n_genes=4, seed=0)
    assert time.perf_counter() - t0 < 90
    img = s["he"]["scale0"].image
    assert img.shape == (3, 13000, 13000) and isinstance(img.data, da.Array)
    assert s["table"].n_obs > 4000
    block = img.data.blocks[0, 6, 6].compute()  # one chunk renders on its own
    assert block.shape == (3, 1024, 1024) and block.std() > 5

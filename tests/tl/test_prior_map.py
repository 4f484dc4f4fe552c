"""``stsr.tl.prior_map``: the deterministic histology-guided map, window by window, written like super_resolve."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

import stsr
from stsr.models import prior_guide, semantic_prior, teacher_features
from stsr.models.prior import tissue_windows
from stsr.tl import _semantic_prior
from stsr.tl._image_tiles import ImageSource
from stsr.tl._inputs import expected_inputs, prepare_inputs, teacher_image_scale

GENES = ["gene_000", "gene_001", "gene_002"]


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(450, 450), n_genes=4, seed=3)


def test_prior_map_is_the_slide_guide_and_keeps_the_spot_counts(slide, monkeypatch):
    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 48)  # several windows and chunks
    sdata = sd.deepcopy(slide)
    stsr.tl.prior_map(sdata, "he", GENES, progress=False)
    out = np.asarray(sdata["stsr_prior"]["scale0"]["image"].values)
    measured = prepare_inputs(
        slide, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    inputs = expected_inputs(measured)  # the counts as Poisson draws (poisson=True, the default)
    assert not np.allclose(inputs.lr, measured.lr) and np.allclose(
        inputs.lr.sum(), measured.lr.sum(), rtol=0.05
    )
    op, h, w = inputs.observation, *inputs.grid.shape
    assert out.shape == (3, h, w) and out.dtype == np.float32 and out.min() >= 0
    # the teacher reads about 0.75 um per pixel: 7 image pixels per 5.5 um HR pixel of this 1 um/px image
    assert teacher_image_scale(inputs) == 7 == sdata["stsr_prior"].attrs["stsr"]["image_scale"]
    image = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs)).region(0, 0, h, w)
    prior = semantic_prior(teacher_features(image, (h, w)), inputs.lr, op, mask=inputs.mask)
    expected = prior_guide(prior, inputs.lr, op, mask=inputs.mask, strength=0.25)
    np.testing.assert_allclose(out, expected, rtol=5e-3, atol=1e-4 * expected.max())
    assert not out[:, ~inputs.mask].any()  # nothing off the tissue
    # it differs from the plain interpolation, and every spot keeps its expected counts
    assert not np.allclose(out, op.interpolate(inputs.lr) * inputs.mask, rtol=0.05)
    has = inputs.lr > 0
    np.testing.assert_allclose(op.pool(out.astype(np.float64))[has], inputs.lr[has], rtol=1e-4)
    # spots without a count of any gene (off the tissue) are no Poisson draws: they stay empty in the map
    totals = np.asarray(slide["table"].X.sum(1)).ravel()
    assert (totals == 0).sum() >= 3 and not inputs.lr[:, totals == 0].any()
    assert not op.pool(out.astype(np.float64))[:, totals == 0].any()
    # the raster overlays the image on the same HR grid as super_resolve, with its provenance
    t = get_transformation(sdata["stsr_prior"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(t)[:2], 5.5, rtol=1e-6)
    prov = sdata["stsr_prior"].attrs["stsr"]
    assert prov["method"] == "prior_map" and prov["genes"] == GENES and prov["prior_strength"] == 0.25
    assert len(prov["teacher_sha256"]) == 64
    assert sdata.attrs["stsr"]["stsr_prior"]["unit"] == "counts per HR pixel"


def test_slide_prior_reads_each_window_once_when_the_first_pass_fits_in_memory(slide, monkeypatch):
    """The features of the windows read for the principal axes serve the second pass: the same prior, with one
    teacher pass per window when they all fit (and a second pass only for the ones that do not)."""
    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 32)
    monkeypatch.setattr(_semantic_prior, "PRIOR_PCA_WINDOWS", 100)  # every window is read for the axes
    inputs = prepare_inputs(
        slide, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    source = ImageSource(inputs.image_levels, inputs.grid, 4)
    n_windows = len(tissue_windows(inputs.mask, 32))
    calls = []

    def counted(image, *args, **kwargs):
        calls.append(image.shape)
        return teacher_features(image, *args, **kwargs)

    monkeypatch.setattr(_semantic_prior, "teacher_features", counted)
    kept = _semantic_prior.slide_prior(inputs, source)
    assert n_windows > 4 and len(calls) == n_windows
    calls.clear()
    monkeypatch.setattr(_semantic_prior, "PRIOR_FEATURE_CACHE_BYTES", 0)
    _semantic_prior.clear_scores_cache()  # else the second call reuses the first one's scores
    again = _semantic_prior.slide_prior(inputs, source)
    assert len(calls) == 2 * n_windows
    np.testing.assert_allclose(kept.scores, again.scores, rtol=0, atol=0)
    np.testing.assert_allclose(kept.coef, again.coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kept.intercept, again.intercept, rtol=1e-9, atol=1e-12)


def test_the_teacher_reads_only_the_tissue_of_each_window(slide, monkeypatch):
    """Each window asks the teacher for its own tissue pixels (``needed``): over all windows every tissue pixel once,
    and on a slide whose tissue is a part of the image the trunk reads a matching part of the image."""
    from dataclasses import replace

    from stsr.models.prior import DenseNetTrunk

    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 32)
    monkeypatch.setattr(_semantic_prior, "PRIOR_PCA_WINDOWS", 100)  # every window read once
    monkeypatch.setattr(_semantic_prior, "TEACHER_TILE", 64)
    inputs = prepare_inputs(
        slide, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    needed, pixels = [], []
    trunk_forward = DenseNetTrunk.forward

    def recorded(image, hr_shape, **kwargs):
        needed.append(int(kwargs["needed"].sum()))
        return teacher_features(image, hr_shape, **kwargs)

    def counted(self, x):
        pixels.append(x.shape[2] * x.shape[3])
        return trunk_forward(self, x)

    monkeypatch.setattr(_semantic_prior, "teacher_features", recorded)
    monkeypatch.setattr(DenseNetTrunk, "forward", counted)
    source = ImageSource(inputs.image_levels, inputs.grid, 4)
    _semantic_prior.slide_prior(inputs, source)
    assert sum(needed) == int(inputs.mask.sum()) and inputs.mask.mean() > 0.5
    read_all = sum(pixels)
    needed.clear(), pixels.clear()
    part = np.zeros_like(inputs.mask)
    part[:, : part.shape[1] // 3] = inputs.mask[:, : part.shape[1] // 3]
    _semantic_prior.clear_scores_cache()
    _semantic_prior.slide_prior(replace(inputs, mask=part), source)
    assert sum(needed) == int(part.sum())
    assert sum(pixels) < 0.5 * read_all


def test_a_second_call_on_the_same_slide_reuses_the_scores_and_fits_its_own_genes(
    slide, tmp_path, monkeypatch
):
    """The scores depend on the histology alone: a second call on the same slide (other genes, prior_map after
    super_resolve) reads no image and gives the prior a fresh fit would; another image, tissue or grid is read."""
    calls = []

    def counted(image, *args, **kwargs):
        calls.append(image.shape)
        return teacher_features(image, *args, **kwargs)

    monkeypatch.setattr(_semantic_prior, "teacher_features", counted)
    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 64)

    def inputs_of(sdata, genes, **kw):
        return prepare_inputs(
            sdata,
            "he",
            genes,
            table_key=None,
            pixel_size=None,
            coordinate_system=None,
            image_channels=3,
            **kw,
        )

    first = inputs_of(slide, GENES[:2])
    _semantic_prior.slide_prior(first, ImageSource(first.image_levels, first.grid, 4))
    n_read = len(calls)
    assert n_read > 0
    other = inputs_of(slide, GENES[2:])
    source = ImageSource(other.image_levels, other.grid, 4)
    reused = _semantic_prior.slide_prior(other, source)
    assert len(calls) == n_read  # no image read
    assert not reused.scores.flags.writeable  # shared with the cache: nothing may write into it
    stored = _semantic_prior.slide_prior(
        other, source, store=tmp_path / "scores.zarr"
    )  # as super_resolve runs it
    assert len(calls) == n_read
    np.testing.assert_array_equal(stored.scores[:], reused.scores)
    _semantic_prior.clear_scores_cache()
    fresh = _semantic_prior.slide_prior(other, source)
    assert len(calls) == 2 * n_read
    np.testing.assert_array_equal(reused.scores, fresh.scores)
    np.testing.assert_allclose(reused.coef, fresh.coef, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(reused.intercept, fresh.intercept, rtol=1e-6, atol=1e-9)
    # the public calls: prior_map after super_resolve on the same slide reads no image either
    sdata = stsr.datasets.synthetic(size_um=(450, 450), n_genes=4, seed=3)
    stsr.tl.prior_map(sdata, "he", GENES[:2], progress=False)
    n_public = len(calls)
    stsr.tl.prior_map(sdata, "he", GENES[2:], key_added="again", progress=False)
    assert len(calls) == n_public
    # another image (one pixel changed), grid or tissue is read anew
    from spatialdata.models import Image2DModel

    level = sdata["he"]["scale0"]["image"]
    image = level.values.copy()
    image[:, 0, 0] = 255 - image[:, 0, 0]
    sdata["he"] = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=level.coords["c"].values,
        transformations=get_transformation(level, get_all=True),
    )
    stsr.tl.prior_map(sdata, "he", GENES[:2], key_added="changed_image", progress=False)
    assert len(calls) > n_public
    n_public = len(calls)
    stsr.tl.prior_map(
        sdata, "he", GENES[:2], key_added="coarser", pixel_size=2 * first.pixel_size, progress=False
    )
    assert len(calls) > n_public


def test_slide_prior_in_a_store_is_read_window_by_window_and_pickles_small(slide, tmp_path, monkeypatch):
    """With a store, the scores are a zarr array (the same values): a window task that reads the prior carries a
    reference to it, not the slide's scores."""
    import pickle

    import zarr

    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 32)
    inputs = prepare_inputs(
        slide, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    source = ImageSource(inputs.image_levels, inputs.grid, 4)
    in_memory = _semantic_prior.slide_prior(inputs, source)
    _semantic_prior.clear_scores_cache()  # computed afresh into the store
    stored = _semantic_prior.slide_prior(inputs, source, store=tmp_path / "scores.zarr")
    assert isinstance(stored.scores, zarr.Array) and stored.scores.chunks[1:] == (32, 32)
    np.testing.assert_array_equal(stored.scores[:], in_memory.scores)
    np.testing.assert_allclose(stored.coef, in_memory.coef, rtol=1e-9)
    np.testing.assert_allclose(stored.weights(5, 7, 40, 30, 0.5), in_memory.weights(5, 7, 40, 30, 0.5))
    assert len(pickle.dumps(stored)) < 0.05 * in_memory.scores.nbytes < len(pickle.dumps(in_memory))
    guides = [_semantic_prior.slide_guide(inputs, p, 0.25) for p in (stored, in_memory)]
    np.testing.assert_allclose(guides[0].window(0, 0, 50, 60), guides[1].window(0, 0, 50, 60), rtol=1e-6)


def test_prior_map_refuses_to_overwrite_and_bad_parameters(slide):
    sdata = sd.deepcopy(slide)
    stsr.tl.prior_map(sdata, "he", GENES[:1], key_added="guide", progress=False)
    before = np.asarray(sdata["guide"]["scale0"]["image"].values)
    with pytest.raises(ValueError, match="overwrite=True"):
        stsr.tl.prior_map(sdata, "he", GENES[1:2], key_added="guide", progress=False)
    np.testing.assert_array_equal(np.asarray(sdata["guide"]["scale0"]["image"].values), before)
    stsr.tl.prior_map(
        sdata, "he", GENES[1:2], key_added="guide", overwrite=True, progress=False, prior_strength=0.0
    )
    assert sdata["guide"].attrs["stsr"]["genes"] == GENES[1:2]
    with pytest.raises(ValueError, match="strength"):
        stsr.tl.prior_map(sdata, "he", GENES, key_added="other", prior_strength=5.0, progress=False)
    with pytest.raises(ValueError, match="image_scale"):
        stsr.tl.prior_map(sdata, "he", GENES, key_added="other", image_scale=0, progress=False)
    assert "other" not in sdata
    # a one-channel (bright-field) image is read as grey; two channels are refused with the fix
    from spatialdata.models import Image2DModel

    he = np.asarray(
        sdata["he"]["scale0"]["image"].values if hasattr(sdata["he"], "keys") else sdata["he"].values
    )
    transform = get_transformation(sdata["he"], get_all=True)
    sdata["grey"] = Image2DModel.parse(
        he.mean(0, keepdims=True).astype(he.dtype), dims=("c", "y", "x"), transformations=transform
    )
    stsr.tl.prior_map(sdata, "grey", GENES[:1], key_added="from_grey", progress=False)
    assert sdata["from_grey"].attrs["stsr"]["image_key"] == "grey"
    sdata["two"] = Image2DModel.parse(he[:2], dims=("c", "y", "x"), transformations=transform)
    with pytest.raises(ValueError, match="greyscale"):
        stsr.tl.prior_map(sdata, "two", GENES[:1], key_added="other", progress=False)


@pytest.mark.slow
def test_prior_map_on_a_distributed_cluster_gives_the_same_map(slide, monkeypatch):
    from dask.distributed import Client, LocalCluster, get_task_stream

    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 48)  # several chunks for the workers
    ref = sd.deepcopy(slide)
    stsr.tl.prior_map(ref, "he", GENES, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client, get_task_stream(client) as tasks:
            dist = sd.deepcopy(slide)
            stsr.tl.prior_map(dist, "he", GENES, progress=False)
            got = np.asarray(dist["stsr_prior"]["scale0"]["image"].values)
    assert len(tasks.data) > 0  # the windows ran on the workers
    want = np.asarray(ref["stsr_prior"]["scale0"]["image"].values)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prior_map_writes_into_a_backed_store_and_a_failure_leaves_it_as_it_was(slide, tmp_path, monkeypatch):
    path = tmp_path / "slide.zarr"
    sd.deepcopy(slide).write(path)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    sdata = sd.read_zarr(path)

    def broken(*args, **kwargs):
        raise RuntimeError("window failed")

    with monkeypatch.context() as m:
        m.setattr(_semantic_prior.SlideGuide, "window", broken)
        with pytest.raises(RuntimeError, match="window failed"):
            stsr.tl.prior_map(sdata, "he", GENES, progress=False)
    assert "stsr_prior" not in sdata.images
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before  # the store as it was
    assert not (tmp_path / "slide.zarr.stsr-cache").exists()  # and the prior's scores are gone with the cache
    stsr.tl.prior_map(sdata, "he", GENES, progress=False)
    back = sd.read_zarr(path)
    got = np.asarray(back["stsr_prior"]["scale0"]["image"].values)
    ref = sd.deepcopy(slide)
    stsr.tl.prior_map(ref, "he", GENES, progress=False)
    np.testing.assert_allclose(got, np.asarray(ref["stsr_prior"]["scale0"]["image"].values), rtol=1e-6)
    assert back.attrs["stsr"]["stsr_prior"]["method"] == "prior_map"
    assert not (tmp_path / "slide.zarr.stsr-cache").exists()

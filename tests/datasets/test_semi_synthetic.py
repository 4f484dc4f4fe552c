"""``stsr.datasets.semi_synthetic``: a real H&E slide with a generated expression field that follows its histology."""

from __future__ import annotations

import numpy as np
import pytest

import stsr


@pytest.fixture(scope="module")
def c2_part(her2st_c2_semi):
    return her2st_c2_semi[0]


@pytest.fixture(scope="module")
def semi(her2st_c2_semi):
    return her2st_c2_semi[1]


def _truth(sdata) -> np.ndarray:
    return np.asarray(sdata["hr_truth"]["scale0"].image.values, np.float64)


def test_counts_are_poisson_draws_of_the_field_pooled_over_the_real_spots(c2_part, semi):
    table = semi["table"]
    # the same spots as the source slide, in the same order, with their obs
    source = c2_part["table"]
    assert list(table.obs_names) == list(source.obs_names)
    assert (table.obs["array_row"].to_numpy() == source.obs["array_row"].to_numpy()).all()
    # the expected counts are the field pooled over the spots as training_pair pools it
    pair = stsr.tl.training_pair(semi, "he", hr_key="hr_truth", spots_key="spots", image_scale=4)
    pooled = pair.observation.pool(pair.hr.double().numpy()).T
    expected = np.asarray(table.layers["expected"], np.float64)
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-3)
    counts = table.X.toarray()
    assert np.array_equal(counts, np.round(counts))
    ratio = counts.sum() / expected.sum()
    assert 0.97 < ratio < 1.03, ratio
    # nothing outside the tissue of the slide
    truth = _truth(semi)
    classes = np.asarray(semi["tissue_classes"]["scale0"].image.values)
    assert truth.shape[1:] == classes.shape
    assert (truth[:, classes == 0] == 0).all()
    assert (truth[:, classes > 0] > 0).all()


def test_each_gene_has_the_depth_of_one_of_the_slides_genes(c2_part, semi):
    expected = np.asarray(semi["table"].layers["expected"], np.float64)
    measured = np.asarray(c2_part["table"].X.sum(1)).ravel() > 0
    means = expected[measured].mean(0)
    real = np.asarray(c2_part["table"][:, stsr.pp.select_genes(c2_part["table"], n_top=50)].X.toarray())
    real_means = real[measured].mean(0)
    for m in means:
        assert np.isclose(real_means, m, rtol=1e-3).any(), m


def test_the_field_follows_the_histology_the_model_is_shown(semi):
    """The gene that follows nuclear density most is highest where the training pair's image is darkest in
    haematoxylin: the field and the image lie on the same pixels."""
    from skimage.color import rgb2hed

    pair = stsr.tl.training_pair(semi, "he", hr_key="hr_truth", spots_key="spots", image_scale=4)
    img = pair.image.numpy().astype(np.float64) / 255.0  # (3, 4H, 4W)
    h, w = pair.hr.shape[1:]
    hema = rgb2hed(np.moveaxis(img, 0, -1))[..., 0].reshape(h, 4, w, 4).mean((1, 3))
    var = semi["table"].var
    truth = _truth(semi)
    tissue = np.asarray(semi["tissue_classes"]["scale0"].image.values) > 0
    g = int(np.argmax(np.abs(var["density_coef"].to_numpy())))
    r = np.corrcoef(truth[g][tissue], hema[tissue])[0, 1]
    assert np.sign(r) == np.sign(var["density_coef"].iloc[g]) and abs(r) > 0.2, r
    # shifting the image by a spot radius breaks the match: the relation is local, not a slide-wide trend
    shifted = np.roll(hema, 5, axis=1)
    r_shift = np.corrcoef(truth[g][tissue], shifted[tissue])[0, 1]
    assert abs(r_shift) < abs(r) - 0.05, (r, r_shift)
    # and the field varies within spots (what a super-resolution model must recover)
    owner = pair.observation.owner_map()
    inside = owner < pair.observation.n_obs
    cv = [
        truth[g][inside & (owner == i)].std() / truth[g][inside & (owner == i)].mean()
        for i in np.unique(owner[inside])
    ]
    assert np.median(cv) > 0.1, np.median(cv)


def test_seeded(c2_part, semi):
    again = stsr.datasets.semi_synthetic(c2_part, "he", n_genes=12, seed=3)
    np.testing.assert_array_equal(_truth(again), _truth(semi))
    np.testing.assert_array_equal(again["table"].X.toarray(), semi["table"].X.toarray())
    other = stsr.datasets.semi_synthetic(c2_part, "he", n_genes=12, seed=4)
    assert not np.allclose(_truth(other), _truth(semi))
    assert semi.attrs["stsr_semi_synthetic"]["seed"] == 3
    # the source slide is not modified
    assert set(c2_part.images) == {"he"} and "hr_truth" not in c2_part.images


def test_bad_input_is_refused_with_the_fix(c2_part):
    with pytest.raises(ValueError, match="n_genes"):
        stsr.datasets.semi_synthetic(c2_part, "he", n_genes=0)
    with pytest.raises(KeyError, match="nope"):
        stsr.datasets.semi_synthetic(c2_part, "nope")


def test_a_visium_like_slide_gets_its_field_pooled_over_its_hexagonal_spots():
    """Any slide with an RGB image and spots: here a procedural Visium-like slide (55 µm spots, hexagonal lattice),
    whose spots only partly cover the tissue."""
    src = stsr.datasets.synthetic(size_um=(500, 500), n_genes=5, seed=1)
    semi = stsr.datasets.semi_synthetic(src, "he", n_genes=4, seed=0)
    truth = _truth(semi)
    assert truth.shape[0] == 4 and semi.attrs["stsr_semi_synthetic"]["pixel_size"] == pytest.approx(5.5)
    pair = stsr.tl.training_pair(semi, "he", hr_key="hr_truth", spots_key="spots", image_scale=4)
    pooled = pair.observation.pool(pair.hr.double().numpy()).T
    np.testing.assert_allclose(pooled, semi["table"].layers["expected"], rtol=1e-4, atol=1e-3)
    assert semi["table"].n_obs == src["table"].n_obs

"""The self-check of ``super_resolve``: spots hidden behind groups of spots and predicted back, no truth needed."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy.spatial import cKDTree

import stsr
from stsr.models.prior import SlidePrior
from stsr.observation import ObservationModel
from stsr.tl._self_check import (
    calibrate_dispersion,
    gain_lower_bound,
    lattice_angle,
    run_self_check,
    spot_groups,
    used_strength,
)


def _square_spots(n: int = 12, pitch: int = 10, radius: float = 3.5) -> ObservationModel:
    shape = (n * pitch, n * pitch)
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], 1) * pitch + pitch / 2
    return ObservationModel.disks(shape, centres, radius)


def _field(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A positive field with structure at the scale of a spot (what the prior should find inside the spots)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    f = 1 + 0.8 * np.sin(yy / 3.1 + rng.uniform(0, 6)) * np.cos(xx / 2.3 + rng.uniform(0, 6))
    return f + 0.5 * (xx / shape[1])


def _case(seed: int = 0):
    op = _square_spots()
    truth = np.stack([_field(op.shape, seed + g) * (g + 1) * 40 for g in range(3)])  # (3, h, w) rates
    lr = op.pool(truth)  # high counts: exact sums
    mask = np.ones(op.shape, bool)
    return op, truth, lr, mask


def _prior(scores: np.ndarray, n_genes: int) -> SlidePrior:
    # coefficients are refitted by the self-check; these only carry the shapes
    return SlidePrior(
        scores.astype(np.float32), np.zeros((scores.shape[0], n_genes)), np.zeros(n_genes), "test"
    )


def test_spot_groups_are_2x2_on_a_square_lattice_and_about_7_on_a_hexagonal_one():
    groups = spot_groups(_square_spots(8))
    assert np.bincount(groups).tolist() == [4] * 16
    # hexagonal lattice (Visium): rows offset by half a pitch, rows sqrt(3)/2 apart
    pitch, centres = 10.0, []
    for i in range(16):
        for j in range(16):
            centres.append((i * pitch * np.sqrt(3) / 2 + 5, j * pitch + (pitch / 2 if i % 2 else 0) + 5))
    op = ObservationModel.disks((150, 175), np.array(centres), 3.0)
    sizes = np.bincount(spot_groups(op))
    inner = sizes[sizes >= 3]  # groups cut by the slide's edge aside
    assert 6.0 <= inner.mean() <= 8.0


def test_a_prior_that_carries_the_truth_is_chosen_and_one_of_noise_is_not():
    op, truth, lr, mask = _case()
    good = _prior(np.log1p(truth.mean(0))[None], 3)
    rng = np.random.default_rng(1)
    noise = _prior(rng.normal(size=(1, *op.shape)), 3)
    with_truth = run_self_check(op, lr, mask, good, window=64)
    with_noise = run_self_check(op, lr, mask, noise, window=64)
    assert with_truth.checked_strength >= 0.75 and with_truth.strength == used_strength(
        with_truth.checked_strength
    )
    assert with_noise.checked_strength <= 0.25 and with_noise.strength <= 0.25
    # the self-estimate says which one helps: within-group r far higher with the informative prior
    assert with_truth.within_r > with_noise.within_r + 0.2
    # the scores reported are those of the strength used
    for check in (with_truth, with_noise):
        used = next(c for c in check.candidates if c.strength == check.strength)
        assert (check.r, check.within_r) == (used.r, used.within_r)
        top = max(check.candidates, key=lambda c: c.score)
        assert top.strength == check.checked_strength


def test_the_strength_used_is_a_quarter_of_the_checked_optimum_on_the_candidates():
    assert [used_strength(s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert used_strength(0.75, (0.75,)) == 0.75  # a strength the user fixed is used as given
    assert used_strength(1.0, (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)) == 0.2
    assert used_strength(4.0) == 1.0


def test_the_diffusion_residual_is_kept_only_when_it_predicts_the_hidden_spots_better():
    op, truth, lr, mask = _case(3)
    flat = _prior(np.zeros((1, *op.shape)), 3)

    def oracle(group_op, group_lr, origins):  # a core that knows the truth
        return np.stack([truth[:, r : r + 40, c : c + 40] for r, c in origins])

    def noise(group_op, group_lr, origins):  # a core that invents structure
        rng = np.random.default_rng(0)
        return np.stack([truth.mean() * rng.gamma(0.3, size=(3, 40, 40)) for _ in origins])

    origins = np.array([(r, c) for r in range(0, 120, 40) for c in range(0, 120, 40)])
    kw = {"window": 64, "tile_origins": origins, "tile_size": 40}
    helped = run_self_check(op, lr, mask, flat, coarse_tiles=oracle, **kw)
    harmed = run_self_check(op, lr, mask, flat, coarse_tiles=noise, **kw)
    assert helped.residual == 1.0 and harmed.residual == 0.0
    assert helped.within_r > harmed.within_r + 0.2


def test_a_core_that_only_adds_histology_contrast_is_not_kept():
    """The check at the group level prefers a stronger prior than maps the pixels best; a core whose map is the
    histology's own contrast beats the prior map used (a quarter of the check's optimum strength) there, but not the
    prior map of the optimum strength: it is not kept. A core that knows the truth beats both and is kept."""
    op, truth, lr, mask = _case()
    good = _prior(np.log1p(truth.mean(0))[None], 3)

    def contrast(group_op, group_lr, origins):  # the histology score itself, the same for every gene
        f = 1 + truth.mean(0)
        return np.stack([np.broadcast_to(f[r : r + 40, c : c + 40], (3, 40, 40)) for r, c in origins])

    def oracle(group_op, group_lr, origins):
        return np.stack([truth[:, r : r + 40, c : c + 40] for r, c in origins])

    origins = np.array([(r, c) for r in range(0, 120, 40) for c in range(0, 120, 40)])
    kw = {"window": 64, "tile_origins": origins, "tile_size": 40}
    sharpened = run_self_check(op, lr, mask, good, coarse_tiles=contrast, **kw)
    assert sharpened.checked_strength == 1.0 and sharpened.strength == 0.25
    assert sharpened.residual == 0.0
    # it does beat the prior map used, on the same spots, by the check's margin: with no stronger candidate (the
    # optimum is the strength used) it is kept
    weak_only = run_self_check(op, lr, mask, good, coarse_tiles=contrast, strengths=(0.0, 0.25), **kw)
    assert weak_only.checked_strength == weak_only.strength == 0.25 and weak_only.residual > 0
    helped = run_self_check(op, lr, mask, good, coarse_tiles=oracle, **kw)
    assert helped.residual == 1.0 and helped.within_r > sharpened.within_r + 0.2


def test_a_gain_within_chance_is_not_a_gain():
    """The lower bound of a residual's gain over resampled spot groups: above 0 for a prediction that is better on
    many groups, below 0 for a worse one, 0 for the same prediction; between two equally good predictions it lies
    further below their point gain on a few groups than on many."""
    from stsr.tl._self_check import spot_scores

    rng = np.random.default_rng(0)

    def slide(n_groups: int):
        groups = np.repeat(np.arange(n_groups), 4)
        rate = rng.gamma(2.0, 10.0, (20, groups.size))
        return groups, rate, rng.poisson(rate).astype(float)

    groups, rate, y = slide(100)
    worse = rate * rng.lognormal(0.0, 0.6, rate.shape)
    assert gain_lower_bound(rate, worse, y, groups) > 0.05
    assert gain_lower_bound(worse, rate, y, groups) < -0.05
    assert gain_lower_bound(rate, rate, y, groups) == 0.0

    def spread(n_groups: int) -> float:
        groups, rate, y = slide(n_groups)
        a, b = (rate * rng.lognormal(0.0, 0.4, rate.shape) for _ in range(2))
        point = sum(spot_scores(a, y, groups)) - sum(spot_scores(b, y, groups))
        lo, mid, hi = (gain_lower_bound(a, b, y, groups, quantile=q) for q in (0.05, 0.5, 0.95))
        assert lo < mid < hi and lo < point < hi
        return point - lo

    assert spread(6) > 2 * spread(150)


def test_a_core_far_behind_on_half_the_check_tiles_is_not_run_on_the_rest():
    """The core runs on half of the check's tiles first: one that trails the prior map by more than
    EARLY_STOP_DEFICIT there is not run on the other half; one that helps, or trails by less, runs on all."""
    from stsr.tl import _self_check

    op, truth, lr, mask = _case(3)
    flat = _prior(np.zeros((1, *op.shape)), 3)
    seen: list[int] = []

    def counted(make):
        def run(group_op, group_lr, origins):
            seen.append(len(origins))
            return make(origins)

        return run

    def oracle(origins):
        return np.stack([truth[:, r : r + 40, c : c + 40] for r, c in origins])

    def inverted(origins):  # a core whose structure inside the spots is the opposite of the truth's
        return np.stack([2 * truth.max() - truth[:, r : r + 40, c : c + 40] for r, c in origins])

    origins = np.array([(r, c) for r in range(0, 120, 40) for c in range(0, 120, 40)])
    kw = {"window": 64, "tile_origins": origins, "tile_size": 40}
    harmed = run_self_check(op, lr, mask, flat, coarse_tiles=counted(inverted), **kw)
    n_tiles = len(_self_check._check_tiles(op, spot_groups(op), origins, 40))
    assert n_tiles == _self_check.CHECK_TILES and seen == [(n_tiles + 1) // 2]
    assert harmed.residual == 0.0 and harmed.provenance()["diffusion_tiles_checked"] == (n_tiles + 1) // 2
    trailing = [c for c in harmed.candidates if c.residual > 0]
    base = next(c for c in harmed.candidates if c.residual == 0 and c.strength == harmed.strength)
    assert trailing and all(c.score < base.score - _self_check.EARLY_STOP_DEFICIT for c in trailing)
    seen.clear()
    helped = run_self_check(op, lr, mask, flat, coarse_tiles=counted(oracle), **kw)
    assert seen == [(n_tiles + 1) // 2, n_tiles // 2] and helped.residual == 1.0
    assert helped.provenance()["diffusion_tiles_checked"] == n_tiles


def test_the_dispersion_is_calibrated_to_cover_90_percent():
    rng = np.random.default_rng(0)
    mu = rng.gamma(2.0, 20.0, size=(4, 3000))
    phi = np.array([0.05, 0.2, 0.5, 1.0])
    rate = rng.gamma(1 / phi[:, None], mu * phi[:, None])
    y = rng.poisson(rate)
    got = calibrate_dispersion(mu, y)
    from scipy.stats import nbinom

    n = 1 / got[:, None]
    lo, hi = nbinom.ppf(0.05, n, n / (n + mu)), nbinom.ppf(0.95, n, n / (n + mu))
    assert ((y >= lo) & (y <= hi)).mean() == pytest.approx(0.9, abs=0.01)
    assert np.corrcoef(np.log(got), np.log(phi))[0, 1] > 0.95  # the genes' order of spread is kept


def test_default_super_resolve_checks_itself_and_never_does_worse_than_the_prior_map(tiny_model):
    """With an untrained core, the self-check keeps none of its map: the result is the prior map with the chosen
    strength, the spot counts are kept, and the self-estimate and the calibrated spread are recorded."""
    slide = stsr.datasets.synthetic(size_um=(600, 600), n_genes=3, seed=2)
    genes = ["gene_000", "gene_001"]
    sdata = sd.deepcopy(slide)
    stsr.tl.super_resolve(
        sdata, "he", genes, model=tiny_model, steps=2, tile_size=32, overlap=12, progress=False
    )
    prov = sdata.attrs["stsr"]["stsr"]
    check = prov["self_check"]
    assert prov["diffusion_residual"] == 0.0 and prov["n_tiles"] == 0
    assert -1 <= check["self_estimated_r"] <= 1 and check["spot_groups"] > 4
    assert len(check["candidates"]) >= 5 and len(prov["dispersion"]) == 2
    out = np.asarray(sdata["stsr"]["scale0"]["image"].values)
    ref = sd.deepcopy(slide)
    stsr.tl.prior_map(ref, "he", genes, prior_strength=prov["prior_strength"], progress=False)
    np.testing.assert_allclose(
        out, np.asarray(ref["stsr_prior"]["scale0"]["image"].values), rtol=1e-5, atol=1e-6
    )
    std = np.asarray(sdata["stsr_std"]["scale0"]["image"].values)
    phi = np.sqrt(np.asarray(prov["dispersion"]))[:, None, None]
    np.testing.assert_allclose(std, out * phi, rtol=1e-5, atol=1e-7)


def test_pixel_factors_carry_a_score_against_spots_to_one_against_pixels():
    """A perfect map (the rates themselves) correlates less with noisy pixel counts than with spot counts, the more
    so the fewer the counts: the factors predict the pixels' r from the spots' within 0.03."""
    from stsr.metrics import _corr_rows
    from stsr.tl._self_check import pixel_factors

    rng = np.random.default_rng(0)
    n, b, genes = 256, 4, 6  # pixels a side, spots of b x b pixels, groups of 2 x 2 spots
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij")
    freq = np.sqrt(fy**2 + fx**2)
    freq[0, 0] = 1.0
    side = n // b
    groups = ((np.arange(side)[:, None] // 2) * (side // 2) + np.arange(side)[None, :] // 2).ravel()

    def pool(x):
        return x.reshape(genes, side, b, side, b).sum((2, 4)).reshape(genes, -1)

    for depth in (0.05, 0.3, 3.0):
        z = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(genes, n, n))) * freq**-1.5))
        z = (z - z.mean((1, 2), keepdims=True)) / z.std((1, 2), keepdims=True)
        rate = np.exp(0.7 * z)
        rate *= depth / rate.mean()
        counts = rng.poisson(rate).astype(float)
        r_spots = _corr_rows(pool(rate), pool(counts))
        r_pixels = _corr_rows(rate.reshape(genes, -1), counts.reshape(genes, -1))
        fr, fw = pixel_factors(pool(counts), groups, b * b)
        assert np.all(fr < 1) and np.all(fw < 1)
        assert abs(np.mean(r_spots * fr) - np.mean(r_pixels)) < 0.03
        assert np.mean(r_spots) - np.mean(r_pixels) > 0.15  # the factors had work to do
    assert np.allclose(pixel_factors(pool(counts), groups, 1.0), 1.0)  # pixels as large as spots


@pytest.mark.parametrize("angle", [0.0, 5.6, 30.0, -40.0])
def test_spot_groups_lie_along_a_turned_lattice(angle):
    """On a square lattice turned against the grid (a section registered into another's frame: HER2ST A2, 5.6
    degrees) the groups are still 2 x 2 spots: the cells are laid along the lattice. A hexagonal lattice with rows
    along x is read as unturned."""
    n, pitch = 12, 10.0
    t = np.radians(angle)
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    local = np.stack([yy.ravel(), xx.ravel()], 1) * pitch
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centres = local @ rot.T + 100.0
    op = ObservationModel.disks((250, 250), centres, 3.0)
    groups = spot_groups(op)
    assert np.bincount(groups).tolist() == [4] * 36
    # each group is a 2 x 2 block of the lattice
    for g in range(36):
        members = local[groups == g] / pitch
        assert np.ptp(members, 0).tolist() == [1.0, 1.0]
    tree = cKDTree(centres)
    assert np.degrees(lattice_angle(centres, tree, 4)) == pytest.approx((angle + 45) % 90 - 45, abs=1e-6)
    hexagonal = np.array(
        [
            (i * pitch * np.sqrt(3) / 2, j * pitch + (pitch / 2 if i % 2 else 0))
            for i in range(10)
            for j in range(10)
        ]
    )
    assert lattice_angle(hexagonal, cKDTree(hexagonal), 6) == pytest.approx(0.0, abs=1e-9)


def test_scattered_centres_have_no_lattice_angle():
    centres = np.random.default_rng(0).uniform(0, 200, (300, 2))
    assert lattice_angle(centres, cKDTree(centres), 4) == 0.0


def _visium_like(n: int = 20, pitch: float = 10.0, radius: float = 2.75) -> ObservationModel:
    """Disks on a hexagonal lattice with Visium's proportions (55 µm spots every 100 µm)."""
    centres = [
        (i * pitch * np.sqrt(3) / 2 + pitch / 2, j * pitch + (pitch / 2 if i % 2 else 0) + pitch / 2)
        for i in range(n)
        for j in range(n)
    ]
    shape = (int(n * pitch * np.sqrt(3) / 2 + pitch), int((n + 1) * pitch))
    return ObservationModel.disks(shape, np.array(centres), radius)


def test_gap_share_and_hidden_classes_of_visium_legacy_st_and_bins():
    from stsr.tl._self_check import gap_share, hidden_classes

    visium = _visium_like()
    # 1 - (pi 27.5^2) / (100^2 sqrt(3) / 2) = 0.73 (the disks' pixels round it)
    assert gap_share(visium) == pytest.approx(
        1 - visium.support_area.mean() / (100 * np.sqrt(3) / 2), abs=0.01
    )
    assert 0.65 < gap_share(visium) < 0.8
    assert 0.7 < gap_share(_square_spots(12, 10, 2.5)) < 0.85  # legacy ST: 100 µm spots every 200 µm
    assert gap_share(ObservationModel.blocks((40, 40), 4)) == 0.0  # bins tile the slide
    classes = hidden_classes(visium)
    tree = cKDTree(visium.centres)
    for i, j in tree.query_pairs(1.9 * visium.pitch()):
        assert classes[i] != classes[j]  # a hidden spot's neighbours and next neighbours stay measured
    assert classes.max() + 1 == 4 and np.bincount(classes).min() > 0.2 * len(classes)  # a quarter each
    assert hidden_classes(_square_spots(12)).max() + 1 == 4


def test_the_self_estimate_counts_the_map_between_the_spots():
    """On a Visium-like slide most of the map lies between the spots, where it is interpolated from the spots
    around. The self-check scores it on whole hidden spots and weighs it by its share of the lattice: the score
    tracks the true r of the map's pixels between the spots, and the self-estimate of every pixel comes closer to
    the truth than the estimate from inside the spots alone."""
    from scipy.ndimage import gaussian_filter

    from stsr.metrics import _corr_rows
    from stsr.models.prior import PriorReweighting

    op = _visium_like()
    h, w = op.shape
    genes = 6
    rng = np.random.default_rng(0)
    z = gaussian_filter(rng.normal(size=(genes, h, w)), (0, 12, 12), mode="wrap")
    z = (z - z.mean((1, 2), keepdims=True)) / z.std((1, 2), keepdims=True)
    rate = np.exp(0.8 * z) * np.linspace(1.0, 4.0, genes)[:, None, None]
    counts = rng.poisson(rate).astype(float)
    lr = op.pool(counts)
    mask = np.ones((h, w), bool)
    prior = _prior(np.zeros((1, h, w)), genes)  # no histology: the map is the interpolated spots
    check = run_self_check(op, lr, mask, prior, window=256)
    assert 0.65 < check.gap_share < 0.8 and np.isfinite(check.between_r)

    rw = PriorReweighting(
        op, lr, lambda r0, c0, hh, ww: prior.weights(r0, c0, hh, ww, check.strength), mask * 1.0
    )
    base = op.interpolate(lr, area=op.tissue_area(mask))
    rw.fit(*rw.pooled(base, 0, 0))
    mapped = rw.apply(base, 0, 0)
    between = op.coverage.reshape(h, w) == 0
    true_r = np.mean(_corr_rows(mapped.reshape(genes, -1), counts.reshape(genes, -1)))
    true_between = np.mean(_corr_rows(mapped[:, between], counts[:, between]))
    assert abs(check.between_r - true_between) < 0.03
    assert abs(check.pixel_r - true_r) < 0.05
    spots_alone = (check.pixel_r - check.gap_share * check.between_r) / (1 - check.gap_share)
    assert (
        abs(spots_alone - true_r) > abs(check.pixel_r - true_r) + 0.03
    )  # without the gaps it was further off
    record = check.provenance()
    assert record["gap_share"] == round(check.gap_share, 3)
    assert record["self_estimated_between_r"] == round(check.between_r, 4)
    # bins that tile the slide have no gaps: nothing is hidden, the estimate is that of the spots
    bins = ObservationModel.blocks((h - h % 8, w - w % 8), 8)
    tiled = run_self_check(
        bins,
        bins.pool(counts[:, : bins.shape[0], : bins.shape[1]]),
        mask[: bins.shape[0], : bins.shape[1]],
        _prior(np.zeros((1, *bins.shape)), genes),
        window=256,
    )
    assert tiled.gap_share == 0.0 and np.isnan(tiled.between_r)
    assert tiled.provenance()["self_estimated_between_r"] is None


def test_a_slide_of_too_few_spot_groups_is_checked_spot_by_spot():
    """A small crop (2 x 4 spots: 2 groups of 2 x 2) has too few groups to refit the prior on: each spot is predicted
    from the other spots instead, which calibrates the spread and gives the self-estimate; the prior map at
    prior_map's strength is used, without the diffusion core. Under 4 spots on tissue the check says what to do."""
    from stsr.metrics import _corr_rows
    from stsr.tl._self_check import hidden_spot_predictions

    yy, xx = np.meshgrid(np.arange(2), np.arange(4), indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], 1) * 10.0 + 5.0
    op = ObservationModel.disks((20, 40), centres, 3.5)
    truth = np.stack([_field(op.shape, g) * 30 * (g + 1) for g in range(3)])
    lr = op.pool(truth)
    mask = np.ones(op.shape, bool)
    prior = _prior(np.log1p(truth.mean(0))[None], 3)
    called = []
    check = run_self_check(op, lr, mask, prior, window=64, coarse_tiles=lambda *a: called.append(a))
    assert check.n_groups == 2 and check.strength == 0.25 and check.residual == 0.0 and not called
    pred, idx = hidden_spot_predictions(op, lr, mask, prior, 64, 0.25, None)
    assert sorted(idx.tolist()) == list(range(8))  # every spot predicted from the others
    assert check.r == pytest.approx(np.mean(_corr_rows(pred, lr[:, idx])))
    np.testing.assert_allclose(check.dispersion, calibrate_dispersion(pred, lr[:, idx]))
    assert np.isnan(check.within_r) and check.candidates == []
    assert (
        run_self_check(op, lr, mask, prior, window=64, strengths=(0.5,)).strength == 0.5
    )  # a strength given
    few = ObservationModel.disks((20, 40), centres[:3], 3.5)
    with pytest.raises(ValueError, match=r"3 spot\(s\) on tissue, too few .*self_check=False"):
        run_self_check(few, few.pool(truth), mask, prior, window=64)

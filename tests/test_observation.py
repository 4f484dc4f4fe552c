"""The observation model: the one definition of pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stsr.observation import Grid, ObservationModel


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_blocks_preserve_total_counts_exactly(rng):
    hr = rng.poisson(4.0, size=(3, 37, 29)).astype(np.float64)  # not a multiple of the factor
    op = ObservationModel.blocks(hr.shape[-2:], 4)
    lr = op.pool(hr)
    assert op.params["lr_shape"] == (10, 8)
    assert lr.shape == (3, 80)
    np.testing.assert_array_equal(lr.sum(-1), hr.sum((-2, -1)))
    # block (1, 2) holds rows 4..7, cols 8..11
    np.testing.assert_array_equal(lr[:, 1 * 8 + 2], hr[:, 4:8, 8:12].sum((-2, -1)))
    # the partial corner block (rows 36, cols 28)
    np.testing.assert_array_equal(lr[:, -1], hr[:, 36:, 28:].sum((-2, -1)))


def test_disk_rows_cover_disk_area():
    centres = np.array([[20.0, 20.0], [20.3, 60.7], [61.5, 40.2]])
    for radius in (3.3, 7.25, 12.0):
        op = ObservationModel.disks((90, 90), centres, radius, supersample=16)
        np.testing.assert_allclose(op.support_area, np.pi * radius**2, rtol=0.01)
        assert op.is_disjoint
    # a disk cut by the grid edge keeps only its inside part
    op = ObservationModel.disks((40, 40), [[0.0, 20.0]], 10.0, supersample=16)
    np.testing.assert_allclose(op.support_area, np.pi * 100 / 2, rtol=0.02)


def test_disks_reject_bad_geometry():
    with pytest.raises(ValueError, match="NaN"):
        ObservationModel.disks((10, 10), [[np.nan, 1.0]], 2.0)
    with pytest.raises(ValueError, match="radius"):
        ObservationModel.disks((10, 10), [[5.0, 5.0]], -1.0)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_project_reproduces_measurement(rng, mode):
    op = ObservationModel.disks((64, 64), [[16, 16], [16, 48], [48, 16], [48, 48]], 9.0)
    truth = rng.gamma(2.0, 1.0, size=(5, 64, 64))
    lr = op.pool(truth)
    guess = rng.gamma(2.0, 1.0, size=(5, 64, 64))
    out = op.project(guess, lr, mode=mode)
    np.testing.assert_allclose(op.pool(out), lr, rtol=1e-10)
    # pixels outside every spot are untouched
    outside = op.coverage == 0
    np.testing.assert_array_equal(out[:, outside], guess[:, outside])
    if mode == "multiplicative":
        assert out.min() >= 0


def test_project_additive_is_least_change(rng):
    """The additive projection is the orthogonal projection: the change lies in the row space of A."""
    op = ObservationModel.blocks((16, 16), 4)
    guess = rng.normal(size=(16, 16))
    lr = rng.normal(size=op.n_obs) * 10
    out = op.project(guess, lr)
    delta = (out - guess).reshape(-1)
    # within each block the correction is constant (row space of a 0/1 block operator)
    blocks = delta.reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(16, 16)
    np.testing.assert_allclose(blocks.std(axis=1), 0, atol=1e-12)


def test_overlapping_disks_solve_exactly(rng):
    op = ObservationModel.disks((40, 40), [[20, 15], [20, 24]], 8.0)
    assert not op.is_disjoint
    lr = np.array([50.0, 80.0])
    out = op.project(np.zeros((40, 40)), lr)
    np.testing.assert_allclose(op.pool(out), lr, rtol=1e-10)


def test_torch_matches_numpy(rng):
    op = ObservationModel.disks((32, 32), [[8, 8], [8, 24], [24, 16]], 6.0)
    hr = rng.gamma(2.0, 1.0, size=(2, 3, 32, 32))
    lr = op.pool(hr) * 1.3
    t_out = op.project(
        torch.tensor(hr, dtype=torch.float32), torch.tensor(lr, dtype=torch.float32), "multiplicative"
    )
    assert isinstance(t_out, torch.Tensor)
    np.testing.assert_allclose(t_out.numpy(), op.project(hr, lr, "multiplicative"), rtol=1e-4, atol=1e-5)
    pooled = op.pool(t_out)
    assert torch.max(torch.abs(pooled - torch.tensor(lr, dtype=torch.float32)) / torch.tensor(lr)) < 1e-4


def test_lift_and_interpolate(rng):
    op = ObservationModel.blocks((12, 12), 3)
    lr = rng.uniform(1, 10, size=op.n_obs)
    lifted = op.lift(lr)
    np.testing.assert_allclose(op.pool(lifted), lr)
    np.testing.assert_allclose(lifted[:3, :3], lr[0] / 9)
    # a constant density is reproduced exactly everywhere by the interpolation, gaps included
    disks = ObservationModel.disks(
        (50, 50), [[10 + 15 * i, 10 + 15 * j] for i in range(3) for j in range(3)], 4.0
    )
    dens = disks.interpolate(disks.support_area * 2.5)
    np.testing.assert_allclose(dens, 2.5)
    # a linear ramp in density is interpolated monotonically between spots
    ramp = disks.interpolate(disks.support_area * disks.centres[:, 1])
    assert np.all(np.diff(ramp[25, 10:41]) > 0)


def test_interpolate_counts_per_tissue_pixel():
    """``area=tissue_area(mask)``: a spot half off the tissue has the density of its tissue half, spots without
    tissue are left out; the default spreads counts over the whole disk."""
    disks = ObservationModel.disks(
        (50, 50), [[10 + 15 * i, 10 + 15 * j] for i in range(3) for j in range(3)], 4.0
    )
    mask = np.zeros((50, 50), bool)
    mask[:, :25] = True  # the middle column of spots is cut in half, the right one has no tissue
    area = disks.tissue_area(mask)
    np.testing.assert_allclose(area[[0, 3, 6]], disks.support_area[[0, 3, 6]])
    np.testing.assert_allclose(area[[1, 4, 7]], disks.support_area[[1, 4, 7]] / 2, rtol=0.05)
    np.testing.assert_array_equal(area[[2, 5, 8]], 0.0)
    lr = disks.pool(np.where(mask, 2.5, 0.0)[None])  # counts of a constant density on the tissue
    np.testing.assert_allclose(disks.interpolate(lr, area=area), 2.5)
    assert disks.interpolate(lr)[0, 10, 25] < 2.0  # the half spot looks diluted without the tissue area
    with pytest.raises(ValueError, match="one value per observation"):
        disks.interpolate(lr, area=area[:-1])
    with pytest.raises(ValueError, match="observation grid"):
        disks.tissue_area(mask[:-1])


def test_crop_keeps_whole_observations(rng):
    op = ObservationModel.blocks((16, 16), 4)
    sub, keep = op.crop(2, 4, 10, 12)  # whole blocks inside: block rows 1-2, block cols 1-3
    np.testing.assert_array_equal(keep, [5, 6, 7, 9, 10, 11])
    hr = rng.poisson(3, size=(16, 16)).astype(float)
    np.testing.assert_array_equal(sub.pool(hr[2:12, 4:16]), op.pool(hr)[keep])


def test_grid_round_trip():
    g = Grid((10, 20), 2.5, origin=(100.0, -5.0))
    y, x = g.pixel_centres()
    assert (y[0, 0], x[0, 0]) == (101.25, -3.75)
    r, c = g.to_grid(y, x)
    np.testing.assert_allclose(r[:, 0], np.arange(10) + 0.5)
    sub = g.crop(2, 3, 4, 5)
    np.testing.assert_allclose(sub.pixel_centres()[0], y[2:6, 3:8])
    with pytest.raises(ValueError, match="pixel_size"):
        Grid((3, 3), 0.0)


def test_windows_match_the_whole_grid(rng):
    """Interpolation and pooling computed window by window equal the whole-grid results (tiling independence)."""
    centres = [[8 + 14 * i + (j % 2) * 3, 6 + 14 * j] for i in range(5) for j in range(5)]
    op = ObservationModel.disks((70, 72), centres, 4.0)
    lr = rng.gamma(2.0, 30.0, size=(3, op.n_obs))
    full = op.interpolate(lr)
    np.testing.assert_allclose(op.interpolate(lr, window=(10, 20, 30, 25)), full[:, 10:40, 20:45], rtol=1e-12)
    hr = rng.gamma(2.0, 1.0, size=(3, 70, 72))
    parts = sum(op.pool_window(hr[:, r : r + 35, c : c + 36], r, c) for r in (0, 35) for c in (0, 36))
    np.testing.assert_allclose(parts, op.pool(hr), rtol=1e-12)
    owner = op.owner_map()
    assert owner.shape == (70, 72)
    assert set(np.unique(owner)) == set(range(op.n_obs + 1))


def test_square_bins_cover_their_area_and_tile_exactly():
    centres = [[5 + 10 * i, 5 + 10 * j] for i in range(4) for j in range(4)]
    op = ObservationModel.squares((40, 40), centres, 10.0)
    np.testing.assert_allclose(op.support_area, 100.0)
    np.testing.assert_allclose(op.coverage, 1.0)  # abutting bins tile the grid exactly
    off = ObservationModel.squares((20, 20), [[10.3, 9.6]], 4.5, supersample=16)
    np.testing.assert_allclose(off.support_area, 4.5**2, rtol=0.01)


def test_pixel_factors_spread_one_factor_per_observation(rng):
    centres = np.array([[8.0, 8.0], [8.0, 24.0], [24.0, 8.0], [24.0, 24.0]])
    op = ObservationModel.disks((32, 32), centres, 4.0)
    ratio = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    f = op.pixel_factors(ratio)
    assert f.shape == (2, 32, 32)
    owner = op.owner_map()
    inside = owner < op.n_obs
    # inside a spot: exactly its factor (as the multiplicative projection scales it)
    np.testing.assert_array_equal(f[0][inside], ratio[0][owner[inside]])
    # between spots: within the range of the factors around, equal to a constant factor where all are equal
    assert (~inside).any()
    assert f[0][~inside].min() >= 1.0 - 1e-9 and f[0][~inside].max() <= 4.0 + 1e-9
    np.testing.assert_allclose(f[1], 0.5)
    # halfway between spots 0 and 1 the factor is near their mean
    assert abs(f[0, 8, 16] - 1.5) < 0.3
    # a window (also one reaching beyond the grid) is the crop of the whole
    np.testing.assert_allclose(op.pixel_factors(ratio, window=(5, 9, 12, 14)), f[:, 5:17, 9:23], rtol=1e-9)
    edge = op.pixel_factors(ratio, window=(28, 28, 8, 8))
    np.testing.assert_allclose(edge[:, :4, :4], f[:, 28:, 28:], rtol=1e-6)
    with pytest.raises(ValueError):
        op.pixel_factors(ratio[:, :3])


def _corner_spots() -> ObservationModel:
    """A 3 x 3 square lattice of disks (pitch 10) in the top-left corner of a 200 x 200 grid: most of the grid, as
    on a whole slide whose spots cover part of the image, is far from every spot."""
    centres = np.array([(10.0 + 10 * i, 10.0 + 10 * j) for i in range(3) for j in range(3)])
    return ObservationModel.disks((200, 200), centres, 2.75)


def test_interpolate_is_zero_in_windows_far_from_every_spot():
    op = _corner_spots()
    lr = np.vstack([np.arange(1.0, 10.0), np.full(9, 4.0)]) * op.support_area
    reach = 6 * 0.5 * op.pitch()  # 6 sigma: the Gaussian's cut, 30 grid pixels here
    far = (120, 130, 40, 50)  # no spot within reach of any pixel (the regression: a ValueError on reshape)
    out = op.interpolate(lr, window=far)
    assert out.shape == (2, 40, 50) and out.dtype == np.float64
    np.testing.assert_array_equal(out, 0.0)
    # one gene (no leading axis), and counts per tissue pixel
    np.testing.assert_array_equal(op.interpolate(lr[1], window=far), np.zeros((40, 50)))
    tissue_area = op.tissue_area(np.ones((200, 200)))
    np.testing.assert_array_equal(op.interpolate(lr, window=far, area=tissue_area), 0.0)
    np.testing.assert_array_equal(op.interpolate(lr, window=(230, -70, 20, 20)), 0.0)  # beyond the grid too
    # the whole grid: the spots' densities near them, 0 beyond the Gaussian's reach, and windows are its crops
    full = op.interpolate(lr)
    np.testing.assert_allclose(full[1, :45, :45], 4.0, rtol=1e-12)
    assert full[0, 30, 30] > 0
    assert not full[:, int(30 + reach) + 1 :, :].any() and not full[:, :, int(30 + reach) + 1 :].any()
    np.testing.assert_array_equal(full[:, 120:160, 130:180], out)
    np.testing.assert_allclose(op.interpolate(lr, window=(40, 40, 30, 30)), full[:, 40:70, 40:70], rtol=1e-12)


def test_pixel_factors_are_zero_far_from_every_spot():
    op = _corner_spots()
    ratio = np.vstack([np.linspace(0.5, 2.0, 9), np.full(9, 3.0)])
    far = op.pixel_factors(ratio, window=(120, 130, 40, 50))
    assert far.shape == (2, 40, 50)
    np.testing.assert_array_equal(far, 0.0)  # as documented: no spot reaches, so nothing is kept there
    np.testing.assert_array_equal(op.pixel_factors(ratio, window=(190, 190, 30, 30)), 0.0)  # and off the grid
    full = op.pixel_factors(ratio)
    owner = op.owner_map()
    inside = owner < op.n_obs
    np.testing.assert_array_equal(full[0][inside], ratio[0][owner[inside]])
    # the gaps between the spots (and a margin around them) take the spots' factors; far pixels are 0
    np.testing.assert_allclose(full[1, :40, :40], 3.0, rtol=1e-12)
    assert not full[:, 61:, :].any() and not full[:, :, 61:].any()
    np.testing.assert_array_equal(full[:, 120:160, 130:180], far)
    np.testing.assert_allclose(
        op.pixel_factors(ratio, window=(25, 25, 40, 40)), full[:, 25:65, 25:65], rtol=1e-9
    )


def test_expected_counts_cut_the_rate_error_at_low_depth_and_keep_it_at_high_depth():
    """Counts are Poisson draws of smooth rates: the expected counts are closer to the rates than the counts where
    counts are low, and no further from them where counts are high."""
    n, pitch = 24, 10
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], 1) * pitch + pitch / 2
    op = ObservationModel.disks((n * pitch, n * pitch), centres, 4.0)
    rr, cc = np.mgrid[: n * pitch, : n * pitch]
    rng = np.random.default_rng(0)
    errors = {}
    for depth in (0.5, 2.0, 500.0):
        ratios = []
        for g in range(6):  # genes with smooth patterns of different directions
            a = rng.uniform(0, 2 * np.pi)
            field = 1.2 + np.sin((np.cos(a) * rr + np.sin(a) * cc) / 40.0 + g)
            rate = op.pool(field[None])[0]
            rate = rate / rate.mean() * depth
            y = rng.poisson(rate)[None].astype(float)
            shrunk = op.expected_counts(y)[0]
            ratios.append(np.sqrt(((shrunk - rate) ** 2).mean()) / np.sqrt(((y[0] - rate) ** 2).mean()))
        errors[depth] = float(np.mean(ratios))
    assert errors[0.5] < 0.45 and errors[2.0] < 0.45  # low depth: the error falls
    assert errors[500.0] <= 1.0  # high depth: not worse
    # rates that jump from spot to spot (neighbours say little): at high depth the counts are kept as they are
    rough = rng.gamma(2.0, 250.0, size=(4, op.n_obs))
    y = rng.poisson(rough).astype(float)
    shrunk = op.expected_counts(y)
    assert np.sqrt(((shrunk - rough) ** 2).mean()) <= 1.01 * np.sqrt(((y - rough) ** 2).mean())
    assert np.abs(shrunk - y).max() < 0.05 * y.max()
    # observations marked empty (no count of any gene: off the tissue) keep their counts and are no neighbours
    y = rng.poisson(np.full((2, op.n_obs), 1.0)).astype(float)
    empty = np.zeros(op.n_obs, bool)
    empty[: n * 4] = True  # the first four rows of spots
    y[:, empty] = 0.0
    out = op.expected_counts(y, empty=empty)
    assert not out[:, empty].any()
    assert out[:, n * 4 : n * 5].mean() > 0.7  # the next row is not pulled toward the empty ones
    assert op.expected_counts(y)[:, : n * 4].mean() > 0.05  # unmarked, zeros among zeros move toward the edge
    with pytest.raises(ValueError, match="empty must be"):
        op.expected_counts(y, empty=empty[:-1])
    # totals are kept roughly, and observations stay non-negative
    y = rng.poisson(np.full((2, op.n_obs), 0.3))
    out = op.expected_counts(y)
    assert out.min() >= 0 and abs(out.sum() - y.sum()) < 0.1 * y.sum()


def test_expected_counts_with_depth_follow_each_spots_capture():
    """Spots whose capture (cells, efficiency) differs move all their genes together: with each spot's total count
    of every gene as its size factor, the expected counts track the spot's rates, where the neighbours' densities
    alone pull every spot toward the local mean."""
    n, pitch = 14, 10.0
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    centres = np.stack([yy.ravel(), xx.ravel()], 1) * pitch + pitch / 2
    op = ObservationModel.disks((n * pitch, n * pitch), centres, 4.0)
    rng = np.random.default_rng(1)
    capture = rng.lognormal(0.0, 0.5, op.n_obs)  # a factor common to all genes of a spot
    n_genes = 300
    smooth = 1.0 + 0.5 * np.sin(centres[:, 0] / 40.0 + rng.uniform(0, 6, (n_genes, 1)))
    share = rng.dirichlet(np.ones(n_genes))[:, None]  # most genes low, a few high
    rate = share * smooth * capture[None] * 3000.0
    y = rng.poisson(rate).astype(float)
    depth = y.sum(0)
    genes = slice(0, 20)
    plain = op.expected_counts(y[genes])
    sized = op.expected_counts(y[genes], depth=depth)

    def err(x: np.ndarray) -> float:
        return float(np.sqrt(((x - rate[genes]) ** 2).mean()))

    assert err(sized) < 0.8 * err(plain) and err(sized) < 0.8 * err(y[genes])
    # a spot's own count of the gene is left out of its size factor: a gene alone in the table keeps the densities
    one = y[:1]
    np.testing.assert_allclose(op.expected_counts(one, depth=one[0]), op.expected_counts(one))
    # the same capture everywhere: the size factors change little
    flat = rng.poisson(share * smooth * 3000.0).astype(float)
    a, b = op.expected_counts(flat[genes]), op.expected_counts(flat[genes], depth=flat.sum(0))
    truth = (share * smooth * 3000.0)[genes]
    assert np.sqrt(((b - truth) ** 2).mean()) <= 1.1 * np.sqrt(((a - truth) ** 2).mean())
    with pytest.raises(ValueError, match="depth must be"):
        op.expected_counts(y[genes], depth=depth[:-1])
    with pytest.raises(ValueError, match="at least its count"):
        op.expected_counts(y[genes], depth=y[0])

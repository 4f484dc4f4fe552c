"""Noise field, normalisation, schedule, DDIM and the model's sampler (values, not only shapes)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from models_testing import tiny_config

from stsr.models._diffusion import (
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    diffusion_loss,
    noised,
    q_sample,
    to_x0_eps,
    training_target,
)
from stsr.models._model import STSRModel
from stsr.models._noise import gaussian_field, gene_ids_from_names
from stsr.models._normalize import GeneNormalizer
from stsr.observation import ObservationModel


# ---------------------------------------------------------------------------------------------------- noise field
def test_noise_crop_equals_field_of_crop():
    ids = torch.tensor([3, 17, 123456789012])
    big = gaussian_field(7, ids, -5, 100, 64, 48, sample=2)
    crop = gaussian_field(7, ids[1:], 20, 113, 10, 9, sample=2)
    assert torch.equal(crop, big[1:, 25:35, 13:22])
    # the same window twice is bit-identical, and the dtype/shape are as documented
    assert torch.equal(big, gaussian_field(7, ids, -5, 100, 64, 48, sample=2))
    assert big.shape == (3, 64, 48) and big.dtype == torch.float32


def test_noise_is_standard_normal():
    z = gaussian_field(0, torch.arange(8), 0, 0, 128, 128).double().ravel()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.05  # Gaussian kurtosis
    # quantiles of N(0, 1)
    q = torch.quantile(z[:100_000], torch.tensor([0.025, 0.5, 0.975], dtype=torch.float64))
    assert torch.allclose(q, torch.tensor([-1.96, 0.0, 1.96], dtype=torch.float64), atol=0.03)


def test_noise_independent_across_genes_seeds_samples_and_pixels():
    ids = torch.tensor([1, 2])
    a = gaussian_field(0, ids, 0, 0, 128, 128)
    b = gaussian_field(1, ids, 0, 0, 128, 128)
    c = gaussian_field(0, ids, 0, 0, 128, 128, sample=1)
    d = gaussian_field(0, ids, 0, 0, 128, 128, stream=1)

    def corr(x, y):
        return float(torch.corrcoef(torch.stack([x.ravel(), y.ravel()]))[0, 1])

    for x, y in [
        (a[0], a[1]),
        (a[0], b[0]),
        (a[0], c[0]),
        (a[0], d[0]),
        (a[0, :, :-1], a[0, :, 1:]),
        (a[0, :-1], a[0, 1:]),
    ]:
        assert abs(corr(x, y)) < 0.02


def test_gene_ids_are_crc32():
    ids = gene_ids_from_names(["ACTB", "CD74"])
    assert ids.dtype == torch.int64
    assert ids.tolist() == [zlib.crc32(b"ACTB"), zlib.crc32(b"CD74")]


# ---------------------------------------------------------------------------------------------------- normalisation
def test_normalizer_round_trip_and_range():
    rng = np.random.default_rng(0)
    counts = torch.as_tensor(rng.gamma(0.5, 2.0, (2, 5, 16, 16)))  # (B, G, h, w) float64
    counts[0, 0, :4] = 0
    norm = GeneNormalizer(torch.tensor([0.5, 1.0, 2.0, 1e-3, 10.0]))
    z = norm.normalize(counts)
    assert torch.allclose(norm.denormalize(z), counts, rtol=1e-12, atol=1e-12)
    z32 = norm.normalize(counts.float())
    assert torch.allclose(norm.denormalize(z32), counts.float(), rtol=1e-5, atol=1e-6)
    # 0 -> -1, high * scale -> +1, the gene's scale -> 2 log 2 / log(1 + high) - 1
    s = norm.scale
    probe = torch.stack([torch.zeros(5), s, norm.high * s], 0)[:, :, None, None].double()
    zp = norm.normalize(probe)[..., 0, 0]
    assert torch.allclose(zp[0], torch.full((5,), -1.0, dtype=torch.float64))
    assert torch.allclose(zp[2], torch.ones(5, dtype=torch.float64))
    assert torch.allclose(
        zp[1], torch.full((5,), 2 * np.log(2) / np.log1p(norm.high) - 1, dtype=torch.float64)
    )
    # negative counts map like 0; values below -1 decode to 0 counts
    assert torch.equal(norm.normalize(-probe[2:]), norm.normalize(torch.zeros_like(probe[2:])))
    assert torch.all(norm.denormalize(torch.full((5, 2, 2), -3.0)) == 0)


def test_normalizer_from_density_is_slide_level():
    dens = torch.rand(3, 20, 30) + 0.1
    dens[1] = 0.0
    dens[2, 0, 0] = float("nan")
    mask = torch.ones(20, 30, dtype=torch.bool)
    mask[:, :10] = False
    norm = GeneNormalizer.from_density(dens, mask=mask, floor=1e-3)
    assert torch.allclose(norm.scale[0], dens[0][:, 10:].double().mean())
    assert float(norm.scale[1]) == 1e-3  # never-detected gene gets the floor
    assert torch.isfinite(norm.scale).all()
    # normalisation is pointwise: normalising a tile equals cropping the normalised slide
    full = norm.normalize(dens.nan_to_num())
    assert torch.equal(norm.normalize(dens.nan_to_num()[:, 5:13, 7:19]), full[:, 5:13, 7:19])
    # from the LR measurements: the mean over observations of lr / area
    op = ObservationModel.disks(
        (20, 30), np.array([[5.0, 5.0], [5.0, 15.0], [14.0, 25.0], [40.0, 40.0]]), 3.0
    )
    lr = np.abs(np.random.default_rng(0).normal(size=(3, 4))) * 20
    lr[1] = 0
    on = GeneNormalizer.from_observations(lr, op.support_area)
    area = op.support_area
    assert area[3] == 0  # a spot outside the grid is ignored
    assert np.allclose(on.scale.numpy(), [(lr[0, :3] / area[:3]).mean(), 1e-4, (lr[2, :3] / area[:3]).mean()])
    sub = norm.subset([2, 0])
    assert torch.equal(sub.scale, norm.scale[[2, 0]])
    assert torch.equal(GeneNormalizer.from_dict(norm.to_dict()).scale, norm.scale)
    with pytest.raises(ValueError, match="genes"):
        norm.normalize(torch.ones(4, 5, 5))
    with pytest.raises(ValueError, match="positive"):
        GeneNormalizer(torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_properties(kind):
    sch = NoiseSchedule(kind, 1000)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ab = sch.alpha_bar(t)
    assert float(ab[0]) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(ab[1:] < ab[:-1])  # strictly decreasing
    assert float(ab[-1]) == (0.0 if kind == "cosine" else pytest.approx(float(np.exp(-10.05)), rel=1e-9))
    a, s = sch.alpha_sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    ts = sch.sample_t(10_000, torch.Generator().manual_seed(0))
    assert float(ts.min()) >= 1e-3 and float(ts.max()) <= 1.0
    assert torch.allclose(ts * 1000, (ts * 1000).round(), atol=1e-3)
    assert abs(float(ts.mean()) - 0.5) < 0.02


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_parameterisations_are_consistent(prediction):
    sch = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, generator=g)
    eps = torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0.01, 0.2, 0.5, 0.7, 0.9, 0.99])
    xt = q_sample(sch, x0, t, eps)
    target = training_target(sch, x0, t, eps, prediction)
    x0_hat, eps_hat = to_x0_eps(sch, target, xt, t, prediction)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.allclose(eps_hat, eps, atol=1e-4)
    assert float(diffusion_loss(target, target)) == 0.0
    mask = torch.zeros(6, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    err = target.clone()
    err[..., 2:, :] += 5  # errors only outside the mask
    assert float(diffusion_loss(err, target, mask)) == 0.0


def test_ddim_timesteps():
    ts = ddim_timesteps(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert ddim_timesteps(4, start=0.4).tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    with pytest.raises(ValueError, match="at least 1"):
        ddim_timesteps(0)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"starting diffusion time must be in \(0, 1\]"):
            ddim_timesteps(4, start=bad)


@pytest.mark.parametrize(("prediction", "steps"), [("v", 1), ("v", 5), ("v", 20), ("x0", 3), ("eps", 5)])
def test_ddim_with_oracle_returns_truth(prediction, steps):
    sch = NoiseSchedule("cosine", 1000)
    truth = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def oracle(x, t):
        a, s = sch.alpha_sigma(t)
        a, s = a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)
        eps = (x - a * truth) / s.clamp_min(1e-12)
        return {"v": a * eps - s * truth, "eps": eps, "x0": truth}[prediction]

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = ddim_sample(oracle, noise, sch, steps, prediction)
    assert torch.allclose(out, truth, atol=1e-4)
    # a hook that replaces the clean map steers the trajectory to it
    target = torch.zeros_like(truth)
    out = ddim_sample(oracle, noise, sch, steps, prediction, x0_hook=lambda x0, i: target)
    assert torch.equal(out, target)
    # a partial run (SDEdit) from a noised estimate at t = 0.3 also lands on the truth with the oracle
    start = noised(sch, torch.zeros_like(truth), noise, 0.3)
    out = ddim_sample(oracle, start, sch, steps, prediction, start=0.3)
    assert torch.allclose(out, truth, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- model sampler
def _tile_inputs(op: ObservationModel, n_genes: int = 3, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = op.shape
    hr = rng.gamma(1.0, 1.0, (batch, n_genes, h, w))
    lr = op.pool(hr)  # (B, G, n_obs)
    dens = torch.as_tensor(np.stack([op.interpolate(x) for x in lr]), dtype=torch.float32)
    image = torch.rand(batch, 3, 4 * h, 4 * w, generator=torch.Generator().manual_seed(seed))
    norm = GeneNormalizer.from_density(dens[0], mask=op.coverage > 0)
    obs = [(op, lr[b]) for b in range(batch)]
    return image, dens, norm, obs, lr


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STSRModel(tiny_config())


def _disks(shape=(32, 32)):
    centres = [(r, c) for r in np.arange(4.0, shape[0], 8.0) for c in np.arange(4.0, shape[1], 8.0)]
    return ObservationModel.disks(shape, np.array(centres), radius=3.0)


@pytest.mark.parametrize("kind", ["blocks", "disks"])
def test_sample_consistency_matches_lr(model, kind):
    op = ObservationModel.blocks((32, 32), 4) if kind == "blocks" else _disks()
    assert op.is_disjoint
    image, dens, norm, obs, lr = _tile_inputs(op)
    ids = gene_ids_from_names(["a", "b", "c"])
    kw = dict(origins=[(0, 0), (32, 64)], gene_ids=ids, steps=4)
    mean, std = model.sample(image, dens, norm, observations=obs, consistency=True, **kw)
    assert std is None and mean.shape == (2, 3, 32, 32) and mean.dtype == torch.float32
    assert torch.all(mean >= 0)
    pooled = op.pool(mean.double().numpy())
    np.testing.assert_allclose(pooled, lr, rtol=1e-4, atol=1e-6)
    # without consistency the untrained network does not reproduce the measurements
    raw, _ = model.sample(image, dens, norm, observations=obs, consistency=False, **kw)
    assert torch.all(raw >= 0)
    assert np.abs(op.pool(raw.double().numpy()) - lr).max() > 1e-2
    if kind == "disks":  # pixels between spots are not constrained by the projection, but still non-negative
        assert (op.coverage == 0).any()


def test_sample_deterministic_and_seeded(model):
    op = ObservationModel.blocks((32, 32), 4)
    image, dens, norm, obs, _ = _tile_inputs(op)
    kw = dict(observations=obs, origins=[(0, 0), (0, 32)], gene_ids=torch.tensor([5, 6, 7]), steps=3)
    a, _ = model.sample(image, dens, norm, seed=1, **kw)
    b, _ = model.sample(image, dens, norm, seed=1, **kw)
    c, _ = model.sample(image, dens, norm, seed=2, **kw)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    # batch independence: a tile sampled alone equals the tile sampled in a batch
    kw1 = dict(observations=obs[1:], origins=[(0, 32)], gene_ids=torch.tensor([5, 6, 7]), steps=3)
    single, _ = model.sample(image[1:], dens[1:], norm, seed=1, **kw1)
    assert torch.allclose(single[0], a[1], rtol=1e-4, atol=1e-5)
    # the noise follows the tile's global origin: another origin gives another result
    kw2 = dict(kw1, origins=[(8, 32)])
    moved, _ = model.sample(image[1:], dens[1:], norm, seed=1, **kw2)
    assert (moved[0] - a[1]).abs().max() > 1e-3
    # uint8 images are accepted and scaled by 1/255
    img8 = (image * 255).round().to(torch.uint8)
    u8, _ = model.sample(img8, dens, norm, seed=1, **kw)
    f8, _ = model.sample(img8.float() / 255, dens, norm, seed=1, **kw)
    assert torch.equal(u8, f8)


def test_sample_several_samples(model):
    op = ObservationModel.blocks((32, 32), 4)
    image, dens, norm, obs, lr = _tile_inputs(op, batch=1)
    kw = dict(observations=obs, origins=[(0, 0)], gene_ids=torch.tensor([1, 2, 3]), steps=3, seed=4)
    mean, std = model.sample(image, dens, norm, n_samples=2, **kw)
    s0, _ = model.sample(image, dens, norm, n_samples=1, **kw)
    s1, _ = model.sample(image, dens, norm, n_samples=1, sample_offset=1, **kw)
    assert torch.allclose(mean, (s0 + s1) / 2, atol=1e-6)
    assert torch.allclose(std, (s0 - s1).abs() / np.sqrt(2), atol=1e-6)
    assert float(std.max()) > 0 and torch.all(std >= 0)
    np.testing.assert_allclose(op.pool(mean.double().numpy()), lr, rtol=1e-4, atol=1e-6)


def test_sample_rejects_bad_input(model):
    op = ObservationModel.blocks((32, 32), 4)
    image, dens, norm, obs, _ = _tile_inputs(op)
    kw = dict(origins=[(0, 0), (0, 32)], gene_ids=torch.tensor([1, 2, 3]), steps=2)
    with pytest.raises(ValueError, match="image_scale"):
        model.sample(image[..., :64, :64], dens, norm, observations=obs, **kw)
    with pytest.raises(ValueError, match="observations"):
        model.sample(image, dens, norm, observations=None, **kw)
    with pytest.raises(ValueError, match="gene_ids"):
        model.sample(image, dens, norm, observations=obs, **dict(kw, gene_ids=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="origins"):
        model.sample(image, dens, norm, observations=obs, **dict(kw, origins=[(0, 0)]))
    other, _ = op.crop(0, 0, 16, 16)
    with pytest.raises(ValueError, match="crop"):
        model.sample(image, dens, norm, observations=[(other, obs[0][1]), obs[1]], **kw)


def test_sample_with_feature_cache_stays_consistent_and_counts_full_steps(model, monkeypatch):
    op = ObservationModel.blocks((32, 32), 4)
    image, dens, norm, obs, lr = _tile_inputs(op, batch=1)
    kw = dict(observations=obs, origins=[(0, 0)], gene_ids=torch.tensor([1, 2, 3]), steps=5, seed=2)
    ref, _ = model.sample(image, dens, norm, **kw)
    one, _ = model.sample(image, dens, norm, cache_interval=1, **kw)
    assert torch.equal(one, ref)
    calls = []
    deep = model.denoiser._deep
    monkeypatch.setattr(model.denoiser, "_deep", lambda *a: calls.append(1) or deep(*a))
    two, _ = model.sample(image, dens, norm, cache_interval=2, **kw)
    assert len(calls) == 3  # steps 0, 2 and 4 are full evaluations
    assert (two - ref).abs().max() > 0  # the cached steps change the trajectory a little
    np.testing.assert_allclose(op.pool(two.double().numpy()), lr, rtol=1e-4, atol=1e-6)
    calls.clear()
    model.sample(image, dens, norm, cache_interval=2, n_samples=2, **kw)
    assert len(calls) == 2 * 3  # every sample starts afresh with a full evaluation
    with pytest.raises(ValueError, match="interval"):
        model.sample(image, dens, norm, cache_interval=0, **kw)

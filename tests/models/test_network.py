"""Tests of the stsr denoiser network (shapes, switches, panel-agnosticism, alignment, discriminator, gradients)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stsr.models._alignment import SpatialAlignment, warp
from stsr.models._coexpression import lr_correlation
from stsr.models._config import ModelConfig
from stsr.models._denoiser import Denoiser, FeatureCache
from stsr.models._discriminator import (
    ChannelDiscriminator,
    build_discriminator,
    discriminator_loss,
    generator_adversarial_loss,
)
from stsr.models._encoder import HistologyFeatures
from stsr.models._layers import count_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest and immune to OpenMP oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SWITCHES = ("use_distillation", "use_cross_attention", "use_disentangle", "use_alignment", "use_coexpression")
MODULE_OF = {
    "use_distillation": ["distill"],
    "use_cross_attention": ["cross_attn"],
    "use_disentangle": ["modulate"],
    "use_alignment": ["align"],
    "use_coexpression": ["coexpr"],
}
H = W = 16
K = 2


def tiny(**kw) -> ModelConfig:
    base = dict(
        image_scale=K,
        width=8,
        hist_width=8,
        groups=4,
        n_heads=2,
        time_dim=16,
        shared_dim=8,
        distill_dim=8,
        align_dim=8,
        disc_width=8,
        n_tokens=4,
    )
    base.update(kw)
    return ModelConfig(**base)


def make(config: ModelConfig, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(config).eval()


def inputs(b: int = 1, g: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, K * H, K * W, generator=gen)
    x = torch.randn(b, g, H, W, generator=gen)
    lr = F.avg_pool2d(torch.randn(b * g, 1, H, W, generator=gen), 5, 1, 2).reshape(b, g, H, W) * 3
    t = torch.rand(b, generator=gen)
    return image, x, lr, t


# ---------------------------------------------------------------------------------------------------- config
def test_config_roundtrip_and_validation():
    cfg = tiny(use_alignment=False)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.channel_mult == (1, 2, 3)
    assert ModelConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="image_scale"):
        ModelConfig(image_scale=3)
    with pytest.raises(ValueError, match="groups"):
        ModelConfig(width=12, groups=8)
    with pytest.raises(ValueError, match="Unknown ModelConfig"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="prediction"):
        ModelConfig(prediction="score")


def test_default_size_budget():
    model = Denoiser(ModelConfig())
    n = count_parameters(model)
    assert 0.5e6 < n < 5e6  # ~1-5 M params, far below 30 MB
    assert count_parameters(ChannelDiscriminator(ModelConfig())) * 4 < 30e6


# ---------------------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=len(SWITCHES))))
def test_shapes_every_switch_combination(flags):
    cfg = tiny(**dict(zip(SWITCHES, flags)))
    model = make(cfg)
    image, x, lr, t = inputs(b=2, g=3)
    with torch.no_grad():
        feats = model.encode_histology(image)
        out = model(x, lr, t, feats)
        out2, losses = model.forward_train(x, lr, t, feats)
    assert out.shape == (2, 3, H, W)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out2)
    assert set(losses) == ({"disentangle"} if cfg.use_disentangle else set())
    for switch, names in MODULE_OF.items():
        for name in names:
            assert (getattr(model, name) is None) == (not getattr(cfg, switch))


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_removes_its_parameters_and_compute(switch):
    on = make(tiny())
    off = make(tiny(**{switch: False}))
    removed = sum(count_parameters(getattr(on, n)) for n in MODULE_OF[switch])
    assert removed > 0
    extra = 0
    if switch == "use_distillation":  # the stem also loses its third input channel
        extra = on.stem.weight[:, 2:].numel()
    assert count_parameters(on) - count_parameters(off) == removed + extra
    assert not any(k.split(".")[0] in MODULE_OF[switch] for k in off.state_dict())
    # same shared weights, module removed -> different output
    shared = {
        k: v
        for k, v in on.state_dict().items()
        if k in off.state_dict() and v.shape == off.state_dict()[k].shape
    }
    off.load_state_dict(shared, strict=False)
    image, x, lr, t = inputs()
    with torch.no_grad():
        diff = (
            (on(x, lr, t, on.encode_histology(image)) - off(x, lr, t, off.encode_histology(image)))
            .abs()
            .max()
        )
    assert diff > 1e-4


def test_adversarial_switch():
    assert isinstance(build_discriminator(tiny()), ChannelDiscriminator)
    assert build_discriminator(tiny(use_adversarial=False)) is None
    # the discriminator is never part of the denoiser
    assert count_parameters(make(tiny())) == count_parameters(make(tiny(use_adversarial=False)))


# ---------------------------------------------------------------------------------------------------- panel-agnostic
def test_same_weights_any_gene_count_and_gene_independence_without_coexpression():
    model = make(tiny(use_coexpression=False, use_alignment=False))
    image, x, lr, t = inputs(g=50)
    with torch.no_grad():
        feats = model.encode_histology(image)
        full = model(x, lr, t, feats)
        single = model(x[:, :1], lr[:, :1], t, feats)
        x2 = x.clone()
        lr2 = lr.clone()
        x2[:, 1:] = torch.randn_like(x2[:, 1:])
        lr2[:, 1:] = torch.randn_like(lr2[:, 1:])
        changed = model(x2, lr2, t, feats)
    assert single.shape == (1, 1, H, W)
    torch.testing.assert_close(single[:, 0], full[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(changed[:, 0], full[:, 0], atol=1e-5, rtol=1e-4)


def test_coexpression_couples_genes_and_works_for_one_gene():
    model = make(tiny(use_alignment=False))
    image, x, lr, t = inputs(g=6)
    with torch.no_grad():
        feats = model.encode_histology(image)
        full = model(x, lr, t, feats)
        single = model(x[:, :1], lr[:, :1], t, feats)
        lr2 = lr.clone()
        lr2[:, 1:] = lr2[:, 1:].flip(-1)
        changed = model(x, lr2, t, feats)
    assert torch.isfinite(single).all()
    assert (single[:, 0] - full[:, 0]).abs().max() > 1e-4
    assert (changed[:, 0] - full[:, 0]).abs().max() > 1e-4


def test_gene_permutation_equivariance_all_modules_on():
    model = make(tiny())
    image, x, lr, t = inputs(g=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.encode_histology(image)
        out = model(x, lr, t, feats)
        out_p = model(x[:, perm], lr[:, perm], t, feats)
        aux = model.aux_expression(feats, lr)
        aux_p = model.aux_expression(feats, lr[:, perm])
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux_p, aux[:, perm], atol=1e-5, rtol=1e-4)


def test_lr_correlation_values():
    lr = torch.randn(2, 4, 6, 5)
    lr[1, 3] = 2.0  # constant map
    corr = lr_correlation(lr)
    expected = np.corrcoef(lr[0].reshape(4, -1).numpy())
    np.testing.assert_allclose(corr[0].numpy(), expected, atol=1e-5)
    assert torch.all(corr[1, 3] == 0)


# ---------------------------------------------------------------------------------------------------- reuse / determinism
def test_histology_encoded_once_and_reused(monkeypatch):
    model = make(tiny())
    image, x, lr, _ = inputs(b=2, g=4)
    with torch.no_grad():
        feats = model.encode_histology(image)
        assert isinstance(feats, HistologyFeatures)
        assert feats.fine.shape == (2, 8, H, W)
        assert feats.mid.shape == (2, 16, H // 2, W // 2)
        assert feats.coarse.shape == (2, 16, H // 4, W // 4)
        assert feats.tokens.shape == (2, 16, 16)

        def boom(*args, **kwargs):
            raise AssertionError("the histology encoder must not run inside forward")

        monkeypatch.setattr(model.encoder, "forward", boom)
        outs = [model(x, lr, torch.full((2,), s), feats) for s in (0.1, 0.5, 0.9)]
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # the time conditioning matters
    # tile 1's output does not depend on tile 0's features
    with torch.no_grad():
        sub = model(x[1:], lr[1:], torch.full((1,), 0.1), feats.select(slice(1, 2)))
    torch.testing.assert_close(sub[0], outs[0][1], atol=1e-5, rtol=1e-4)


def test_prepared_conditioning_is_exact_and_computed_once(monkeypatch):
    model = make(tiny())
    image, x, lr, _ = inputs(b=2, g=4)
    with torch.no_grad():
        feats = model.encode_histology(image)
        direct = [model(x, lr, torch.full((2,), s), feats) for s in (0.2, 0.7)]
        cond = model.prepare(feats, lr)
        assert cond.aux.shape == (2, 4, H, W) and cond.corr.shape == (2, 4, 4)
        calls = []
        monkeypatch.setattr(model.align, "forward", lambda *a: calls.append(a))  # would break if called
        cached = [model(x, lr, torch.full((2,), s), cond) for s in (0.2, 0.7)]
        assert calls == []
        for a, b in zip(direct, cached):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="prepared for other LR maps"):
            model(x, lr + 1.0, torch.full((2,), 0.2), cond)


def test_histology_changes_output():
    model = make(tiny())
    image, x, lr, t = inputs()
    with torch.no_grad():
        a = model(x, lr, t, model.encode_histology(image))
        b = model(x, lr, t, model.encode_histology(image.flip(-1)))
    assert (a - b).abs().max() > 1e-4


def test_deterministic_in_eval_mode():
    image, x, lr, t = inputs()
    m1, m2 = make(tiny(), seed=5), make(tiny(), seed=5)
    with torch.no_grad():
        f1 = m1.encode_histology(image)
        o1 = m1(x, lr, t, f1)
        o1b = m1(x, lr, t, f1)
        o2 = m2(x, lr, t, m2.encode_histology(image))
    assert torch.equal(o1, o1b)
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = make(tiny())
    image, x, lr, t = inputs()
    feats = model.encode_histology(image)
    with pytest.raises(ValueError, match="same|shape"):
        model(x, lr[:, :2], t, feats)
    with pytest.raises(ValueError, match="image_scale"):
        model(x[..., :12, :12], lr[..., :12, :12], t, feats)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(x[..., :14, :14], lr[..., :14, :14], t, feats)
    with pytest.raises(ValueError, match="image_channels"):
        model.encode_histology(image[:, :2])
    with pytest.raises(RuntimeError, match="use_distillation"):
        make(tiny(use_distillation=False)).aux_expression(feats, lr)


# ---------------------------------------------------------------------------------------------------- distillation
def test_aux_expression_from_histology_with_lr_scale():
    model = make(tiny())
    image, _, lr, _ = inputs(g=3)
    with torch.no_grad():
        feats = model.encode_histology(image)
        aux = model.aux_expression(feats, lr)
        # the same gene with another image gets another pattern
        aux_other = model.aux_expression(model.encode_histology(image.flip(-2)), lr)
        # a constant LR map (no contrast) predicts (almost) its constant
        const = torch.full_like(lr[:, :1], 1.5)
        aux_const = model.aux_expression(feats, const)
    assert aux.shape == lr.shape
    assert (aux - aux_other).abs().max() > 1e-3
    assert (aux_const - 1.5).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------- alignment
def test_warp_integer_shift_values():
    f = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 1.0  # dy = +1: out(y, x) = f(y + 1, x)
    flow[:, 1] = -2.0  # dx = -2
    out = warp(f, flow, (8, 8))
    torch.testing.assert_close(out[:, :, :7, 2:], f[:, :, 1:, :6])


def _smooth(x: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, 1)
    return x / x.std(dim=(-2, -1), keepdim=True)


def _toy_alignment_batch(b: int, gen: torch.Generator, shift=None, n: int = 32):
    """Histology features and an expression map equal to feature channel 0 seen through a shifted image."""
    fine = _smooth(torch.randn(b, 8, n, n, generator=gen))
    s = torch.randint(-2, 3, (b, 2), generator=gen) if shift is None else torch.tensor(shift).expand(b, 2)
    # the image is displaced: the expression at x is the histology at x + s  ->  the ideal flow is s
    y = torch.stack([torch.roll(fine[i, 0], (-int(s[i, 0]), -int(s[i, 1])), (0, 1)) for i in range(b)])[
        :, None
    ]
    wide = fine.repeat(1, 2, 1, 1)
    feats = HistologyFeatures(
        fine=fine,
        mid=F.avg_pool2d(wide, 2),
        coarse=F.avg_pool2d(wide, 4),
        tokens=wide[:, :, :4, :4].flatten(2).mT,
    )
    return feats, y, s.float()


def test_alignment_learns_to_recover_a_shifted_image():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    module = SpatialAlignment(tiny())
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    for _ in range(60):  # random shifts in [-2, 2]^2 per sample
        feats, y, _ = _toy_alignment_batch(6, gen)
        aligned, _ = module(feats, y)
        loss = F.mse_loss(aligned.fine[:, :1][inner], y[inner])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for shift in [(1, -2), (-2, 1), (0, 2)]:
            feats, y, s = _toy_alignment_batch(4, gen, shift)
            aligned, flow = module(feats, y)
            before = F.mse_loss(feats.fine[:, :1][inner], y[inner])
            after = F.mse_loss(aligned.fine[:, :1][inner], y[inner])
            mean_flow = flow[inner].mean(dim=(0, 2, 3))
            assert after < 0.1 * before, (shift, before, after)
            assert torch.all((mean_flow - s[0]).abs() < 0.4), (shift, mean_flow)
            assert flow.abs().max() <= 2.0 + 1e-5  # bounded by align_radius


def test_alignment_flow_is_bounded_and_uses_lr():
    model = make(tiny())
    image, _, lr, _ = inputs()
    with torch.no_grad():
        feats = model.encode_histology(image)
        _, flow = model.condition(feats, lr)
        _, flow2 = model.condition(feats, lr.flip(-1))
    assert flow.shape == (1, 2, H, W)
    assert flow.abs().max() <= model.config.align_radius
    assert (flow - flow2).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------------- discriminator
def test_discriminator_per_gene_logits_and_training():
    torch.manual_seed(0)
    cfg = tiny()
    disc = ChannelDiscriminator(cfg)
    model = make(cfg)
    image, _, lr, _ = inputs(b=2, g=6)
    feats = model.encode_histology(image).detach()
    real = lr + 0.1 * torch.randn_like(lr)
    logits = disc(real, lr, feats)
    assert logits.shape == (2, 6)
    # per-gene: a gene's logit ignores the other genes of its tile (eval: no spectral-norm power iteration)
    disc.eval()
    other = real.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    with torch.no_grad():
        torch.testing.assert_close(disc(other, lr, feats)[:, 0], disc(real, lr, feats)[:, 0])
    disc.train()
    # trivial problem: real = consistent with LR, fake = pure noise
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(25):
        fake = torch.randn_like(lr)
        loss = discriminator_loss(disc(real, lr, feats), disc(fake, lr, feats))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert (disc(real, lr, feats) > disc(torch.randn_like(lr), lr, feats)).float().mean() > 0.9
    # the generator loss gives gradients to the generated maps
    fake = torch.randn_like(lr, requires_grad=True)
    generator_adversarial_loss(disc(fake, lr, feats)).backward()
    assert fake.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("flags", [(True,) * 5, (False, True, False, True, False)])
def test_gradients_reach_every_enabled_module(flags):
    cfg = tiny(**dict(zip(SWITCHES, flags)))
    model = make(cfg).train()
    image, x, lr, t = inputs(b=2, g=3)
    feats = model.encode_histology(image)
    out, losses = model.forward_train(x, lr, t, feats)
    loss = (out - torch.randn_like(out)).pow(2).mean() + sum(losses.values())
    if cfg.use_distillation:
        loss = loss + (model.aux_expression(feats, lr) - x).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------- feature cache
def test_feature_cache_interval_one_is_exact_and_two_reuses_the_deep_features(monkeypatch):
    model = make(tiny())
    image, x, lr, _ = inputs(b=2, g=3)
    times = [torch.full((2,), s) for s in (0.9, 0.6, 0.3, 0.1)]
    xs = [x * (1 + i) for i in range(4)]
    with torch.no_grad():
        cond = model.prepare(model.encode_histology(image), lr)
        exact = [model(xi, lr, t, cond) for xi, t in zip(xs, times)]
        one = FeatureCache(1)
        assert all(torch.equal(model(xi, lr, t, cond, one), e) for xi, t, e in zip(xs, times, exact))
        deep_calls = []
        full_deep = model._deep
        monkeypatch.setattr(model, "_deep", lambda *a: deep_calls.append(1) or full_deep(*a))
        cache = FeatureCache(2)
        out = [model(xi, lr, t, cond, cache) for xi, t in zip(xs, times)]
        assert len(deep_calls) == 2 and cache.calls == 4  # steps 0 and 2 are full, 1 and 3 reuse
        assert torch.equal(out[0], exact[0]) and torch.equal(out[2], exact[2])
        # the cached steps recompute the full-resolution level only: close to, not equal to, the exact output
        for i in (1, 3):
            assert 0 < (out[i] - exact[i]).abs().max() < (exact[i] - exact[i - 1]).abs().max()
        # a cached step at the same input as the full step before it reproduces that step exactly, and does not
        # modify the cached tensor
        cache = FeatureCache(2)
        full = model(x, lr, times[0], cond, cache)
        kept = cache.deep.clone()
        assert torch.equal(model(x, lr, times[0], cond, cache), full)
        assert torch.equal(cache.deep, kept)
        # a cache for another tile shape is not reused
        cache = FeatureCache(3)
        model(x, lr, times[0], cond, cache)
        deep_calls.clear()
        cond1 = model.prepare(model.encode_histology(image[:1]), lr[:1])
        model(x[:1], lr[:1], times[0][:1], cond1, cache)
        assert len(deep_calls) == 1
    with pytest.raises(RuntimeError, match="no_grad"):
        model(x, lr, times[0], cond, FeatureCache(2))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_feature_cache_rejects_bad_intervals(bad):
    with pytest.raises((ValueError, TypeError), match="interval"):
        FeatureCache(bad)

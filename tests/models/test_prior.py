"""The semantic prior: the pretrained image teacher and the per-slide read-out fitted on LR data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

import stsr
from stsr import metrics as M
from stsr.models import (
    TEACHER_UM_PER_PX,
    apply_prior,
    load_teacher,
    prior_guide,
    semantic_prior,
    teacher_features,
)
from stsr.models.prior import TEACHER_CHANNELS, DenseNetTrunk
from stsr.observation import ObservationModel


def _histology_driven_slide(seed: int = 0, shape=(48, 48), n_genes: int = 6, depth: float = 30.0):
    """Smooth feature fields, expression log-linear in them, Poisson counts, 4 x 4 blocks."""
    rng = np.random.default_rng(seed)
    feats = np.stack([gaussian_filter(rng.normal(size=shape), 1.5) for _ in range(8)])
    feats /= feats.std(axis=(1, 2), keepdims=True)
    beta = rng.normal(scale=0.6, size=(n_genes, 3))
    lam = depth * np.exp(np.einsum("gk,khw->ghw", beta, feats[:3]))
    counts = rng.poisson(lam).astype(np.float64)
    op = ObservationModel.blocks(shape, 4)
    return feats, lam, counts, op


def test_semantic_prior_recovers_the_histology_driven_split():
    feats, lam, counts, op = _histology_driven_slide()
    lr = op.pool(counts)
    prior = semantic_prior(feats, lr, op, n_components=5)
    pred = apply_prior(op.lift(lr), prior, lr, op, strength=1.0)
    oracle = M.oracle_split(lam, lr, op)
    wb_pred = M.within_block_pearson(pred, counts, op).mean()
    wb_oracle = M.within_block_pearson(oracle, counts, op).mean()
    # fitted on the LR blocks alone, the read-out finds most of the structure inside the blocks
    assert wb_oracle > 0.5
    assert wb_pred > 0.8 * wb_oracle
    # and the reweighted map pools back to the LR input exactly
    np.testing.assert_allclose(op.pool(pred), lr, rtol=1e-9, atol=1e-9)
    # features that carry no information give (almost) nothing
    noise = np.random.default_rng(1).normal(size=feats.shape)
    wb_noise = M.within_block_pearson(
        apply_prior(op.lift(lr), semantic_prior(noise, lr, op), lr, op), counts, op
    )
    assert wb_noise.mean() < 0.3 * wb_pred


def test_prior_guide_is_the_reweighted_interpolation_and_keeps_the_lr_sums():
    feats, lam, counts, op = _histology_driven_slide(seed=3)
    lr = op.pool(counts)
    prior = semantic_prior(feats, lr, op)
    guide = prior_guide(prior, lr, op)
    assert guide.dtype == np.float32 and guide.shape == counts.shape and guide.min() >= 0
    np.testing.assert_allclose(guide, apply_prior(op.interpolate(lr), prior, lr, op), rtol=1e-5)
    np.testing.assert_allclose(op.pool(guide.astype(np.float64)), lr, rtol=1e-5)
    # the guide carries the histology-driven structure inside the blocks that the interpolation lacks
    wb_guide = M.within_block_pearson(guide, counts, op).mean()
    wb_interp = M.within_block_pearson(op.interpolate(lr), counts, op).mean()
    assert wb_guide > wb_interp + 0.2
    # strength 0 is the (projected) interpolation
    flat = prior_guide(prior, lr, op, strength=0.0)
    np.testing.assert_allclose(flat, op.project(op.interpolate(lr), lr, mode="multiplicative"), rtol=1e-5)


def test_prior_guide_on_the_tissue_puts_each_block_count_on_its_tissue_pixels():
    """With a tissue mask, the guide interpolates counts per tissue pixel and spreads each block's count over its
    tissue pixels only: at a tissue edge that cuts through blocks it follows the truth (zero off the tissue) far
    better than the guide without the mask restricted to the tissue afterwards, which loses part of the counts."""
    feats, lam, counts, op = _histology_driven_slide(seed=5)
    rr, cc = np.mgrid[:48, :48]
    mask = (rr - 24.0) ** 2 + (cc - 22.0) ** 2 < 19.0**2  # a disk of tissue, its edge inside many blocks
    counts = counts * mask
    lr = op.pool(counts)
    prior = semantic_prior(feats, lr, op, mask=mask)
    guide = prior_guide(prior, lr, op, mask=mask)
    assert not guide[:, ~mask].any()
    has = op.tissue_area(mask) > 0
    np.testing.assert_allclose(op.pool(guide.astype(np.float64))[:, has], lr[:, has], rtol=1e-5)
    plain = prior_guide(prior, lr, op) * mask
    assert op.pool(plain.astype(np.float64)).sum() < 0.97 * lr.sum()  # the part put off the tissue is lost
    r_masked = M.pearson(guide, counts, mask).mean()
    r_plain = M.pearson(plain, counts, mask).mean()
    assert r_masked > r_plain + 0.03
    # strength 0 on a flat field: counts per tissue pixel, the same inside and at the edge of the tissue
    flat = np.where(mask, 3.0, 0.0)[None]
    edge = prior_guide(np.ones_like(flat), op.pool(flat), op, mask=mask, strength=0.0)
    np.testing.assert_allclose(edge[:, mask], 3.0, rtol=1e-5)
    with pytest.raises(ValueError, match="observation grid"):
        prior_guide(prior, lr, op, mask=mask[:-1])


def test_apply_prior_is_scale_free_between_spots_too():
    """A constant prior carries no information: it has the effect of no prior (strength 0), inside the spots and
    between them (the gaps are rescaled with the interpolated factors of their neighbours, not left at the weights'
    absolute scale)."""
    rng = np.random.default_rng(4)
    centres = np.array([[r, c] for r in (6.0, 18.0, 30.0) for c in (6.0, 18.0, 30.0)])
    op = ObservationModel.disks((36, 36), centres, 4.0)
    assert (op.coverage == 0).mean() > 0.3
    hr = rng.gamma(2.0, 1.0, size=(2, 36, 36))
    lr = op.pool(hr)
    base = op.interpolate(lr)
    flat = np.full(hr.shape, 25.0)  # weights 5 at strength 0.5
    none = apply_prior(base, flat, lr, op, strength=0.0)
    np.testing.assert_allclose(apply_prior(base, flat, lr, op), none, rtol=1e-6)
    # strength 0 makes the base consistent: the spots exactly, the gaps with their neighbours' factors
    inside = op.coverage > 0
    np.testing.assert_allclose(
        none[:, inside], op.project(base, lr, mode="multiplicative")[:, inside], rtol=1e-9
    )
    pooled = op.pool(base)
    factors = op.pixel_factors(lr / pooled)
    np.testing.assert_allclose(none[:, ~inside], (base * factors)[:, ~inside], rtol=1e-9)
    # an informative prior changes the gaps relative to the base only through its relative values
    varying = flat * rng.uniform(0.5, 2.0, size=hr.shape)
    out = apply_prior(base, varying, lr, op)
    gap = op.coverage == 0
    ratio = out[:, gap] / base[:, gap]
    assert 0.3 < np.median(ratio) < 3.0  # the absolute scale (x5) cancelled
    np.testing.assert_allclose(op.pool(out), lr, rtol=1e-9)


def test_rescaling_the_gaps_beats_leaving_them_at_the_weights_scale():
    """On spots with gaps (Visium-like), the pixels between spots are rescaled with their neighbours' factors: their
    level matches the truth, where the weights' absolute scale (about sqrt(count per pixel)) would inflate it."""
    feats, lam, _, _ = _histology_driven_slide(seed=5, shape=(64, 64), depth=30.0)
    centres = np.array([[r, c] for r in np.arange(4.0, 64, 8.0) for c in np.arange(4.0, 64, 8.0)])
    op = ObservationModel.disks((64, 64), centres, 2.5)
    gap = op.coverage == 0
    assert gap.mean() > 0.4
    lr = op.pool(lam)
    base = op.interpolate(lr)
    prior = semantic_prior(feats, lr, op)
    out = apply_prior(base, prior, lr, op)
    # the map before this rescaling: the gaps left at base x weights
    old = np.where(gap, base * (prior + 1e-3) ** 0.5, out)
    level_new = out[:, gap].sum(1) / lam[:, gap].sum(1)
    level_old = old[:, gap].sum(1) / lam[:, gap].sum(1)
    assert np.all(np.abs(np.log(level_new)) < 0.5) and np.abs(np.log(level_new)).mean() < 0.15
    assert np.abs(np.log(level_new)).mean() < 0.5 * np.abs(np.log(level_old)).mean()
    r_new = M.pearson(out, lam).mean()
    r_old = M.pearson(old, lam).mean()
    assert r_new > r_old


def test_apply_prior_strength_zero_keeps_the_base_and_masks_are_respected():
    feats, _, counts, op = _histology_driven_slide(seed=2)
    lr = op.pool(counts)
    base = op.lift(lr) * (1 + 0.1 * np.random.default_rng(0).random(counts.shape))
    base = op.project(base, lr, mode="multiplicative")
    prior = semantic_prior(feats, lr, op)
    np.testing.assert_allclose(apply_prior(base, prior, lr, op, strength=0.0), base, rtol=1e-9)
    # features outside the mask are not used: changing them leaves the prior on the tissue unchanged
    mask = np.ones(op.shape, bool)
    mask[:, :8] = False
    other = feats.copy()
    other[:, :, :8] = 1e3
    a = semantic_prior(feats, lr, op, mask=mask)
    b = semantic_prior(other, lr, op, mask=mask)
    np.testing.assert_allclose(a[:, :, 8:], b[:, :, 8:], rtol=1e-6)


def test_semantic_prior_errors_name_the_problem():
    feats, _, counts, op = _histology_driven_slide()
    lr = op.pool(counts)
    with pytest.raises(ValueError, match="features must be"):
        semantic_prior(feats[:, :10], lr, op)
    with pytest.raises(ValueError, match="lr must be"):
        semantic_prior(feats, lr[:, :5], op)
    with pytest.raises(ValueError, match="n_components"):
        semantic_prior(feats, lr, op, n_components=0)
    with pytest.raises(ValueError, match="constant"):
        semantic_prior(np.ones_like(feats), lr, op)
    small = ObservationModel.blocks((8, 8), 4)  # 4 observations: the read-out falls back to 2 components
    assert semantic_prior(feats[:, :8, :8], small.pool(counts[:, :8, :8]), small).shape == (6, 8, 8)
    tiny = ObservationModel.blocks((8, 4), 4)
    with pytest.raises(ValueError, match="observation\\(s\\) cover tissue"):
        semantic_prior(feats[:, :8, :4], tiny.pool(counts[:, :8, :4]), tiny)
    with pytest.raises(ValueError, match="strength"):
        apply_prior(counts, counts, lr, op, strength=-1)


# ---------------------------------------------------------------------------------------------------- teacher
def test_teacher_is_filled_from_the_pretrained_weights():
    teacher = load_teacher()
    fresh = DenseNetTrunk()
    assert len(teacher.keras_order()) == 2 + 6 * 4 + 2 + 12 * 4 + 2
    for (name, p), q in zip(teacher.state_dict().items(), fresh.state_dict().values()):
        if p.dtype.is_floating_point:
            assert not torch.equal(p, q), f"{name} kept its initial value"
    assert len(teacher.weights_hash) == 64
    assert load_teacher() is teacher  # cached
    # eval-mode ImageNet batch norms: a natural-looking input gives finite, non-degenerate features
    img = np.random.default_rng(0).integers(0, 255, (3, 128, 160), dtype=np.uint8)
    f8, f16 = teacher(torch.as_tensor(img).float()[None] / 255)
    assert f8.shape == (1, 128, 16, 20) and f16.shape == (1, 256, 8, 10)
    assert torch.isfinite(f16).all() and f16.std() > 0


def test_teacher_fast_forward_computes_the_reference_layers():
    """The folded, channels-last forward is the Keras layer sequence (any size, batch and odd feature maps)."""
    teacher = load_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 128, 160), (2, 3, 120, 136), (1, 3, 48, 80)]:
        img = torch.as_tensor(gaussian_filter(rng.random(shape), (0, 0, 2, 2)), dtype=torch.float32)
        with torch.no_grad():
            fast, ref = teacher(img), teacher.reference_forward(img)
        for f, r in zip(fast, ref):
            assert f.shape == r.shape
            assert float((f - r).abs().max()) < 1e-4 * float(r.abs().max())
    # the folding works on copies: the weights are untouched
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


class _CountingTrunk(torch.nn.Module):
    """The teacher, counting the pieces it reads."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        super().__init__()
        self.trunk, self.pieces = trunk, []

    def forward(self, x):
        self.pieces.append(tuple(x.shape[2:]))
        return self.trunk(x)


def test_teacher_features_read_only_the_pieces_that_hold_needed_pixels():
    """``needed`` skips the pieces without a needed HR pixel; the needed pixels get the features they get without it
    (the same pieces, read the same way), the pixels of skipped pieces none."""
    rng = np.random.default_rng(1)
    img = (gaussian_filter(rng.random((3, 320, 320)), (0, 3, 3)) * 255).astype(np.uint8)
    hr = (20, 20)  # 16 image pixels per HR pixel: pieces of 128 hold 8 x 8 HR pixels, 3 x 3 pieces in all
    needed = np.zeros(hr, bool)
    needed[7:9, 2] = True  # HR rows 7-8 are image rows 112-144: the first two pieces of the first column
    full_trunk, part_trunk = _CountingTrunk(load_teacher()), _CountingTrunk(load_teacher())
    full = teacher_features(img, hr, teacher=full_trunk, tile=128, halo=32)
    part = teacher_features(img, hr, teacher=part_trunk, tile=128, halo=32, needed=needed)
    assert len(full_trunk.pieces) == 9 and len(part_trunk.pieces) == 2
    np.testing.assert_array_equal(part[:, needed], full[:, needed])
    np.testing.assert_array_equal(part[-6:], full[-6:])  # the colour statistics are everywhere
    deep = slice(0, TEACHER_CHANNELS - 6)
    assert not part[deep, 16:, :].any() and not part[deep, :, 8:].any()  # pixels of skipped pieces only
    assert np.abs(full[deep, 16:, :]).max() > 0
    np.testing.assert_array_equal(part[:, :16, :8], full[:, :16, :8])  # all of the two pieces read
    with pytest.raises(ValueError, match="needed must be a boolean mask of the HR grid"):
        teacher_features(img, hr, tile=128, needed=np.ones((10, 10), bool))


def test_teacher_features_do_not_depend_on_the_tiling():
    rng = np.random.default_rng(0)
    img = (gaussian_filter(rng.random((3, 300, 340)), (0, 3, 3)) * 255).astype(np.uint8)
    whole = teacher_features(img, (15, 17), tile=1024)
    tiled = teacher_features(img, (15, 17), tile=128, halo=96)
    assert whole.shape == (TEACHER_CHANNELS, 15, 17)
    scale = np.abs(whole).max(axis=(1, 2), keepdims=True) + 1e-6
    assert np.max(np.abs(whole - tiled) / scale) < 0.02
    grey = teacher_features(img[:1], (15, 17))
    np.testing.assert_allclose(
        grey, teacher_features(np.repeat(img[:1], 3, 0), (15, 17)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="RGB"):
        teacher_features(img[:2], (15, 17))
    with pytest.raises(ValueError, match="cover the HR grid"):
        teacher_features(img, (400, 17))


def test_semantic_prior_adds_structure_inside_the_spots_on_her2st(her2st_c2):
    """Real data (HER2ST C2, the validation section): measured 100 µm spots as truth, 2 x 2 spots as input."""
    genes = stsr.pp.select_genes(her2st_c2["table"], n_top=12)
    k = 2 ** round(np.log2(200.0 / TEACHER_UM_PER_PX))  # 200 µm lattice pixels at the teacher's resolution
    pair = stsr.tl.training_pair(her2st_c2, "he", table_key="table", genes=genes, factor=2, image_scale=k)
    op, hr, mask = pair.observation, pair.hr.double().numpy(), pair.mask.numpy()
    lr = op.pool(hr)
    base = np.clip(op.project(np.clip(op.interpolate(lr), 1e-9, None), lr, mode="multiplicative"), 0, None)
    # the teacher reads only the pieces of image that hold spots' pixels (exact there; the slide's features)
    features = teacher_features(pair.image.numpy(), op.shape, needed=mask > 0)
    prior = semantic_prior(features, lr, op, mask=mask)
    pred = apply_prior(base, prior, lr, op)
    before = M.summarize(M.gene_metrics(base, hr, op, lr=lr, mask=mask))
    after = M.summarize(M.gene_metrics(pred, hr, op, lr=lr, mask=mask))
    assert after["within_block"][0] > before["within_block"][0] + 0.05
    assert after["pearson"][0] > before["pearson"][0] - 0.005
    assert after["lr_rel_error"][0] < 1e-9


def test_feature_blocks_weigh_the_same_in_the_principal_axes():
    """A list of encoders: 10 informative channels next to 500 of another, correlated signal. Standardised alone,
    the 500 fill the first axes and the 10 barely show; with blocks each encoder weighs the same and the 10 get an
    axis of their own."""
    from stsr.models._prior import FeatureMoments, pca_scores

    rng = np.random.default_rng(0)
    n = 4000
    big_signal, small_signal = rng.normal(size=n), rng.normal(size=n)
    big = big_signal[None] * rng.uniform(0.5, 1.5, (500, 1)) + rng.normal(size=(500, n))
    big = np.concatenate([big, rng.normal(size=(500, n)) + 0.3 * rng.normal(size=(1, n))])  # more of it
    small = small_signal[None] + 0.5 * rng.normal(size=(10, n))
    x = np.concatenate([big, small]).astype(np.float32)
    m = FeatureMoments(x.shape[0])
    m.add(x)

    def best_r(blocks):
        scores = pca_scores(x, *m.pca(2, blocks))
        return max(abs(np.corrcoef(s, small_signal)[0, 1]) for s in scores)

    assert best_r(None) < 0.3 and best_r([1000, 10]) > 0.9
    with pytest.raises(ValueError, match="blocks"):
        m.pca(2, [1000, 11])

"""Tests of stsr.metrics, stsr.tl.evaluate and the accuracy benchmark's building blocks (benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from stsr import metrics as M
from stsr.models import ModelConfig, STSRModel, TrainingPair
from stsr.observation import ObservationModel
from stsr.tl._evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablations as AB  # noqa: E402
import accuracy as A  # noqa: E402
import baselines as B  # noqa: E402


def _field(rng: np.random.Generator, g: int, shape: tuple[int, int], depth: float) -> np.ndarray:
    """Smooth positive expression ``(G, H, W)`` with mean about ``depth`` counts per pixel."""
    z = np.stack([gaussian_filter(rng.normal(size=shape), s) for s in rng.uniform(1.0, 4.0, g)])
    z /= z.std(axis=(1, 2), keepdims=True)
    return depth * np.exp(0.8 * z - 0.32)


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        width=8,
        hist_width=8,
        time_dim=16,
        shared_dim=8,
        distill_dim=8,
        align_dim=4,
        disc_width=8,
        groups=4,
        n_heads=2,
        n_tokens=2,
        coexpr_grid=4,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------- basic metrics
def test_pearson_values_and_conventions():
    rng = np.random.default_rng(0)
    t = rng.poisson(3.0, (3, 8, 9)).astype(float)
    p = t.copy()
    p[1] = -t[1]
    p[2] = 5.0  # constant prediction
    r = M.pearson(p, t)
    np.testing.assert_allclose(r, [1.0, -1.0, 0.0], atol=1e-12)
    t2 = t.copy()
    t2[0] = 2.0  # constant truth
    assert np.isnan(M.pearson(t, t2)[0])
    # mask: only the selected pixels count
    mask = np.zeros((8, 9), bool)
    mask[:4] = True
    q = t.copy()
    q[:, 4:] = rng.normal(size=(3, 4, 9))
    np.testing.assert_allclose(M.pearson(q, t, mask), 1.0, atol=1e-12)
    # agrees with numpy's corrcoef
    a, b = rng.normal(size=(1, 5, 5)), rng.normal(size=(1, 5, 5))
    assert M.pearson(a, b)[0] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_block_means_and_within_block():
    rng = np.random.default_rng(1)
    op = ObservationModel.blocks((10, 12), 2)
    t = rng.poisson(4.0, (2, 10, 12)).astype(float)
    bm = M.block_means(t, op)
    manual = t.reshape(2, 5, 2, 6, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(bm, np.repeat(np.repeat(manual, 2, 1), 2, 2))
    lr = op.pool(t)
    # uniform split: exactly 0 (no within-block structure); the truth itself: 1
    np.testing.assert_array_equal(M.within_block_pearson(op.lift(lr), t, op), 0.0)
    np.testing.assert_allclose(M.within_block_pearson(t, t, op), 1.0)
    # invariant to any block-constant offset of the prediction, unlike the plain r
    offset = op.lift(rng.normal(0, 50, lr.shape)) * 4
    np.testing.assert_allclose(M.within_block_pearson(t + offset, t, op), 1.0)
    assert M.pearson(t + offset, t).max() < 0.5
    # with a mask, block means are over the masked pixels of each block
    mask = np.ones((10, 12), bool)
    mask[0, 0] = False
    bm = M.block_means(t, op, mask)
    assert bm[0, 0, 1] == pytest.approx(t[0, :2, :2].ravel()[1:].mean())


def test_normalized_rmse_ssim_and_lr_error():
    rng = np.random.default_rng(2)
    t = rng.poisson(5.0, (2, 16, 16)).astype(float)
    # min-max normalisation: a positive affine map of the truth is perfect
    np.testing.assert_allclose(M.rmse_normalized(3 * t + 1, t), 0.0, atol=1e-12)
    np.testing.assert_allclose(M.ssim_normalized(3 * t + 1, t), 1.0, atol=1e-9)
    # a known value: prediction 0 everywhere vs a map normalised to [0, 1]
    truth = np.zeros((1, 8, 8))
    truth[0, :4] = 1.0  # half the pixels at 1
    assert M.rmse_normalized(np.zeros_like(truth), truth)[0] == pytest.approx(np.sqrt(0.5))
    assert M.ssim_normalized(rng.normal(size=(2, 16, 16)), t).max() < 0.3
    op = ObservationModel.blocks((16, 16), 4)
    lr = op.pool(t)
    np.testing.assert_allclose(M.lr_relative_error(op.lift(lr), lr, op), 0.0, atol=1e-12)
    np.testing.assert_allclose(M.lr_relative_error(2 * t, lr, op), 1.0)
    with pytest.raises(ValueError, match="same"):
        M.pearson(t, t[:, :8])


def test_summarize_and_headroom():
    s = M.summarize({"a": [1.0, 2.0, np.nan, 3.0]})
    assert s["a"] == (2.0, 1.0, 3)
    assert M.headroom_closed(0.9, 0.8, 1.0) == pytest.approx(0.5)
    assert M.headroom_closed(0.7, 0.8, 1.0) == pytest.approx(-0.5)
    assert np.isnan(M.headroom_closed(0.9, 0.8, 0.8))


# ---------------------------------------------------------------------------------------------------- noise ceiling
@pytest.mark.parametrize(("factor", "depth"), [(2, 3.0), (4, 3.0), (2, 10.0), (4, 0.5)])
def test_noise_ceiling_matches_the_oracle_split_on_poisson_data(factor, depth):
    """Simulate a known smooth field, draw Poisson counts, and compare the true scores of the oracle split (which
    knows the field) with the ceiling estimated from the counts alone."""
    rng = np.random.default_rng(factor * 100 + int(depth * 10))
    g, shape = 16, (96, 96)
    lam = _field(rng, g, shape, depth)
    x = rng.poisson(lam).astype(float)
    op = ObservationModel.blocks(shape, factor)
    oracle = M.oracle_split(lam, op.pool(x), op)
    np.testing.assert_allclose(op.pool(oracle), op.pool(x), atol=1e-9)  # it reproduces the LR sums
    true_r = M.pearson(oracle, x)
    true_w = M.within_block_pearson(oracle, x, op)
    true_rel = M.pearson(lam, x)
    est = M.noise_ceiling(x, op)
    # mean over genes within a few percent; per gene within sampling noise
    tol = 0.03 if depth >= 3 else 0.06
    assert est["pearson"].mean() == pytest.approx(true_r.mean(), rel=0.02)
    assert est["within_block"].mean() == pytest.approx(true_w.mean(), rel=tol)
    assert est["reliability"].mean() == pytest.approx(true_rel.mean(), rel=0.02)
    np.testing.assert_allclose(est["pearson"], true_r, rtol=0.05)
    np.testing.assert_allclose(est["within_block"], true_w, atol=0.1)  # per gene: sampling noise of both
    # the ceiling is far above the uniform split and the oracle beats the noise-free field itself
    assert np.all(est["pearson"] >= M.pearson(op.lift(op.pool(x)), x) - 0.01)
    assert true_r.mean() > true_rel.mean()


def test_noise_ceiling_respects_the_mask_and_rejects_bad_inputs():
    rng = np.random.default_rng(5)
    lam = _field(rng, 8, (64, 64), 4.0)
    x = rng.poisson(lam).astype(float)
    op = ObservationModel.blocks((64, 64), 2)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    xm = x * mask
    oracle = M.oracle_split(lam * mask, op.pool(xm), op)
    est = M.noise_ceiling(x, op, mask)
    assert est["pearson"].mean() == pytest.approx(M.pearson(oracle, x, mask).mean(), rel=0.03)
    with pytest.warns(UserWarning, match="integer"):
        nan = M.noise_ceiling(lam, op)
    assert np.all(np.isnan(nan["pearson"]))
    disks = ObservationModel.disks((64, 64), np.array([[10.0, 10.0], [30.0, 30.0]]), 4.5)
    with pytest.raises(ValueError, match="0/1 weights"):
        M.noise_ceiling(x, disks)


# ---------------------------------------------------------------------------------------------------- evaluate
def _pair(shape=(22, 26), g=4, factor=2, seed=0) -> TrainingPair:
    rng = np.random.default_rng(seed)
    lam = _field(rng, g, shape, 5.0)
    image = rng.integers(0, 256, (3, 4 * shape[0], 4 * shape[1]), dtype=np.uint8)
    mask = np.ones(shape, bool)
    mask[:3, :3] = False
    return TrainingPair(
        image=image,
        hr=rng.poisson(lam).astype(np.float32),
        observation=ObservationModel.blocks(shape, factor),
        genes=[f"g{i}" for i in range(g)],
        mask=mask,
    )


def test_evaluate_table():
    pair = _pair()
    op = pair.observation
    lr = B.pair_lr(pair)
    table = evaluate(B.uniform_split(lr, op), pair)
    assert list(table.index) == pair.genes
    assert {"pearson", "within_block", "rmse", "ssim", "lr_rel_error", "ceiling_pearson"} <= set(
        table.columns
    )
    np.testing.assert_array_equal(table["within_block"], 0.0)
    np.testing.assert_allclose(table["lr_rel_error"], 0.0, atol=1e-12)
    assert (table["ceiling_pearson"] > table["pearson"]).all()
    perfect = evaluate(pair.hr, pair, ceiling=False)
    np.testing.assert_allclose(perfect["pearson"], 1.0)
    assert "ceiling_pearson" not in perfect
    arr = evaluate(pair.hr.numpy(), pair.hr.numpy(), op, mask=pair.mask)
    np.testing.assert_allclose(arr["within_block"], 1.0)
    with pytest.raises(ValueError, match="observation"):
        evaluate(pair.hr, pair.hr)


# ---------------------------------------------------------------------------------------------------- baselines
def test_simple_baselines():
    op = ObservationModel.blocks((10, 11), 2)  # partial blocks at the right edge
    const = np.full((1, 10, 11), 3.0)
    lr = op.pool(const)
    np.testing.assert_allclose(B.bicubic(lr, op), 3.0, atol=1e-9)
    np.testing.assert_allclose(B.uniform_split(lr, op), 3.0)
    rng = np.random.default_rng(3)
    x = rng.poisson(4.0, (2, 10, 11)).astype(float)
    lr = op.pool(x)
    np.testing.assert_allclose(op.pool(B.bicubic_mass(lr, op)), lr, atol=1e-9)
    assert B.bicubic(lr, op).min() >= 0
    # a linear ramp of block densities is reproduced by the bicubic map in the interior
    ramp = np.tile(np.arange(11, dtype=float), (10, 1))[None]
    up = B.bicubic(op.pool(ramp), op)
    np.testing.assert_allclose(up[0, 2:-2, 2:-3], ramp[0, 2:-2, 2:-3], atol=0.3)
    # on the tissue: every block keeps its count, all of it on its tissue pixels
    mask = np.ones((10, 11), bool)
    mask[:, 5] = False  # cuts through the blocks of columns 4-5
    on_tissue = B.bicubic_mass_on_tissue(lr, op, mask)
    assert not on_tissue[:, ~mask].any()
    np.testing.assert_allclose(op.pool(on_tissue), lr, atol=1e-9)


def test_adaptation_pair_uses_only_the_lr_input():
    pair = _pair(shape=(20, 24), factor=2)
    op, lr = pair.observation, B.pair_lr(pair)
    ap = B.adaptation_pair(pair.image, op, lr, pair.genes, pair.mask.numpy())
    assert ap.shape == (10, 12) and ap.image.shape == (3, 40, 48)
    np.testing.assert_allclose(ap.hr.numpy(), lr.reshape(4, 10, 12))
    # block (0, 0) lies in the masked corner; block (1, 1) has 3 of its 4 pixels in the mask (>= 0.75)
    assert not bool(ap.mask[0, 0]) and bool(ap.mask[1, 1]) and bool(ap.mask[5, 5])
    # its LR input pools 2 x 2 blocks of the case's LR input (4 x 4 pixels of the case): the truth is not used
    coarse = lr.reshape(4, 5, 2, 6, 2).sum((2, 4)).reshape(4, -1)
    np.testing.assert_allclose(ap.observation.pool(ap.hr.double().numpy()), coarse, rtol=1e-6)
    # the image keeps image_scale pixels per (coarser) HR pixel: a 2 x 2 average
    img = pair.image.double().numpy()
    assert abs(float(ap.image[0, 0, 0]) - img[0, :2, :2].mean()) <= 0.5


def test_fluorescence_to_he():
    img = np.zeros((2, 8, 8), np.uint8)
    img[0, :4] = 200  # nuclei
    img[1, 4:] = 200  # cytoplasm
    rgb = B.fluorescence_to_he(img)
    assert rgb.shape == (3, 8, 8) and rgb.dtype == np.uint8
    nuc, cyt = rgb[:, 0, 0].astype(int), rgb[:, 7, 0].astype(int)
    assert nuc[0] < 120 and nuc[1] < 120 and nuc[2] > nuc[0]  # purple
    assert cyt[0] > 200 and cyt[2] > 200 and cyt[1] < 170  # pink
    np.testing.assert_array_equal(B.fluorescence_to_he(np.zeros((2, 4, 4), np.uint8)), 255)  # empty = white
    with pytest.raises(ValueError, match="DAPI"):
        B.fluorescence_to_he(np.zeros((3, 4, 4)))


def test_model_runners_are_lr_consistent_on_odd_grids():
    pair = _pair(shape=(18, 22), g=3)  # not a multiple of 4: padded inside the runners
    op, lr = pair.observation, B.pair_lr(pair)
    torch.manual_seed(0)
    model = STSRModel(_tiny_config())
    pred = B.stsr_predict(model, pair.image, op, lr, pair.genes, steps=2)
    assert pred.shape == (3, 18, 22) and pred.min() >= 0
    np.testing.assert_allclose(op.pool(pred), lr, rtol=1e-4, atol=1e-3)
    net = B.train_regression([pair], _tiny_config(), steps=2, batch_size=2, tile_size=8, genes_per_batch=2)
    reg = B.regression_predict(net, pair.image, op, lr)
    assert reg.shape == (3, 18, 22)
    np.testing.assert_allclose(op.pool(reg), lr, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- harness
def test_harness_tables():
    pair = _pair()
    case = A.Case("toy", pair, B.pair_lr(pair), notes=["a note"])
    op, lr = pair.observation, case.lr
    rows = [
        A.run(case, "bicubic", lambda: B.bicubic(lr, op)),
        A.run(case, "bicubic + mass", lambda: B.bicubic_mass(lr, op)),
        A.run(case, "uniform split", lambda: B.uniform_split(lr, op)),
        A.run(case, "oracle", lambda: pair.hr.numpy()),
        A.run(case, "broken", lambda: 1 / 0),
    ]
    assert rows[2].values["within_block"][0] == 0.0
    assert rows[3].values["pearson"][0] == pytest.approx(1.0)
    assert rows[4].values is None and "ZeroDivisionError" in rows[4].note
    ceiling = M.summarize(M.noise_ceiling(pair.hr.numpy(), op, case.mask))
    text = A.case_table(case, rows, ceiling)
    assert "| uniform split |" in text and "a note" in text
    best = max(r.values["pearson"][0] for r in rows[:3])
    expected = (1.0 - best) / (ceiling["pearson"][0] - best)
    assert f"{expected:+.2f}" in text.split("| oracle |")[1].split("\n")[0]
    summary = A.summary_table([(case, rows, ceiling)])
    assert summary.count("\n") == 2 + 1 + len(rows)


def test_ablation_harness_pairs_seeds_and_reports_spread():
    (built,) = A.build_cases({"synthetic"}, [], 3, 4, synthetic_size=200.0)
    assert built.name == "synthetic (x4)" and len(built.pair.genes) == 3 and built.lr.shape[0] == 3
    configs = AB.variants(_tiny_config())
    assert list(configs)[0] == AB.FULL and len(configs) == 1 + len(A.SWITCHES)
    assert configs["- alignment"].use_alignment is False and configs["- alignment"].use_coexpression is True
    pair = _pair(g=2)
    real = A.Case("HER2ST toy (x2)", pair, B.pair_lr(pair))
    synthetic = A.Case("synthetic (x4)", pair, B.pair_lr(pair))
    torch.manual_seed(0)
    model = STSRModel(_tiny_config())
    got = AB.scores([real], {(AB.FULL, 0): model}, steps=2)[(AB.FULL, 0)]
    pred = B.stsr_predict(model, pair.image, pair.observation, real.lr, pair.genes, steps=2)
    want = A.score(real, pred)
    np.testing.assert_allclose(got[0], [want[m][0] for m, _ in AB.METRICS])
    # known per-seed scores: the effect is the paired difference over the real cases only
    full = {0: np.array([[0.5, 0.2, 0.6], [0.9, 0.9, 0.9]]), 1: np.array([[0.6, 0.3, 0.7], [0.1, 0.1, 0.1]])}
    result = {}
    for s in (0, 1):
        result[(AB.FULL, s)] = full[s]
        result[("- alignment", s)] = full[s] + np.array([[-0.1, -0.2 - 0.1 * s, 0.05], [0.5, 0.5, 0.5]])
    eff = AB.effects(result, [AB.FULL, "- alignment"], [0, 1], np.array([True, False]))
    np.testing.assert_allclose(eff["- alignment"], [[-0.1, -0.2, 0.05], [-0.1, -0.3, 0.05]])
    text = AB.report([real, synthetic], result, [AB.FULL, "- alignment"], [0, 1], ["# header", ""])
    assert "| - alignment | -0.100 ± 0.000 (2/2) | -0.250 ± 0.071 (2/2) | +0.050 ± 0.000 (2/2) |" in text
    assert (
        "| all modules | 0.550 ± 0.071 / 0.250 ± 0.071 | 0.500 ± 0.566 / 0.500 ± 0.566 | 0.550 ± 0.071 / 0.250 ± 0.071 |"
        in text
    )


def test_prior_rows_and_teacher_scale(monkeypatch):
    import argparse

    import stsr

    assert stsr.models.TEACHER_UM_PER_PX == 0.75
    assert A.teacher_scale(200.0) == 256 and A.teacher_scale(25.0) == 32 and A.teacher_scale(5.5) == 8
    assert A.teacher_scale(0.5) == 1
    # --teacher-um: the reports made with the teacher at 1.5 µm per pixel
    monkeypatch.setattr(
        stsr.models, "TEACHER_UM_PER_PX", stsr.models.TEACHER_UM_PER_PX
    )  # restored afterwards
    parser = argparse.ArgumentParser()
    A.add_teacher_option(parser)
    A.use_teacher_option(parser.parse_args(["--teacher-um", "1.5"]))
    assert A.teacher_scale(200.0) == 128 and A.teacher_scale(25.0) == 16 and A.teacher_scale(5.5) == 4
    monkeypatch.undo()
    # the variant that never reads an image finer than it is: HER2ST A (3.2 µm/px) and C (0.69 µm/px) sections
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    def slide(um_per_px: float) -> sd.SpatialData:
        image = np.zeros((3, 8, 8), np.uint8)
        scale = Scale([um_per_px, um_per_px], axes=("y", "x"))
        return sd.SpatialData(images={"he": Image2DModel.parse(image, transformations={"global": scale})})

    assert A.native_teacher_scale(slide(3.2), "he", 200.0) == 62
    assert A.native_teacher_scale(slide(0.69), "he", 200.0) == 256
    # the public-function scale: round(µm per HR pixel / TEACHER_UM_PER_PX), as stsr.tl.prior_map reads a grid
    assert A.public_teacher_scale(200.0) == 267 and A.public_teacher_scale(25.0) == 33
    assert A.public_teacher_scale(5.5) == 7 and A.public_teacher_scale(0.3) == 1
    pair = _pair()
    op = pair.observation
    bare = A.Case("toy", pair, B.pair_lr(pair))
    assert all(
        r.values is None and "no teacher image" in r.note for r in A.prior_rows(bare, None, None, "stsr")
    )
    pair = A._with(pair, hr=pair.hr * pair.mask)  # counts on the tissue only, as on a real slide
    case = A.Case("toy", pair, B.pair_lr(pair), teacher_image=np.asarray(pair.image))
    # without a user's slide only the in-memory row runs (the public rows: tests/test_benchmarks_public.py)
    (row,) = A.prior_rows(case, None, None, "stsr")
    assert row.method == "bicubic + mass × semantic prior"
    assert row.values["lr_rel_error"][0] < 1e-6  # the reweighted map keeps the LR sums (float32 map)
    assert row.seconds > 0 and row.note == "teacher image 4 px per HR pixel"
    feats = stsr.models.teacher_features(case.teacher_image, op.shape)
    prior = stsr.models.semantic_prior(feats, case.lr, op)  # the user's slide has no truth positions
    want = A.score(case, stsr.models.apply_prior(B.bicubic_mass(case.lr, op), prior, case.lr, op))
    assert row.values["pearson"] == pytest.approx(want["pearson"])


def test_tesla_baseline_when_installed():
    """The optional TESLA baseline (``pip install --no-deps teslaforst opencv-python-headless``)."""
    if not B.tesla_available():
        pytest.skip(B.TESLA_NOTE)
    op = ObservationModel.blocks((12, 12), 3)
    const = np.full((2, 12, 12), 2.0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 48, 48), dtype=np.uint8)
    pred = B.tesla(op.pool(const), op, image)
    assert pred.shape == (2, 12, 12)
    np.testing.assert_allclose(pred, 2.0, rtol=1e-5)  # a weighted average of equal densities


def test_truth_readout_recovers_an_exact_log_linear_field():
    """The read-out fitted on the truth (prior_readout.py's upper bound) recovers expression that is log-linear in the
    features, only on the tissue pixels it is given; and it is no better than the truth allows on pure noise."""
    import prior_readout as P

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 20, 24))
    coef = rng.normal(scale=0.2, size=(6, 3))
    truth = np.expm1(4.0 + np.einsum("dg,dhw->ghw", coef, feats))
    mask = np.ones((20, 24), bool)
    fitted = P.truth_readout(feats, truth, mask, 6)
    np.testing.assert_allclose(fitted, truth, rtol=0.02, atol=0.02)
    # features unrelated to the expression: the fit explains (almost) nothing
    noise = P.truth_readout(rng.normal(size=(6, 20, 24)), truth, mask, 6)
    r = [np.corrcoef(noise[g].ravel(), truth[g].ravel())[0, 1] for g in range(3)]
    assert max(r) < 0.3


def test_cross_fitted_readout_predicts_each_band_from_the_others():
    """``prior_readout.cross_fitted`` recovers a log-linear field out of sample, and, on expression unrelated to the
    regressors, scores no better than chance (it never sees the band it predicts) where the in-sample fit overfits."""
    import prior_readout as P

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 20, 30))
    truth = np.expm1(4.0 + np.einsum("dg,dhw->ghw", rng.normal(scale=0.2, size=(5, 2)), x))
    mask = np.ones((20, 30), bool)
    np.testing.assert_allclose(P.cross_fitted(x, truth, mask, "ridge"), truth, rtol=0.02, atol=0.02)
    unrelated = rng.poisson(5.0, size=(2, 20, 30)).astype(float)
    many = rng.normal(size=(40, 20, 30))
    out = P.cross_fitted(many, unrelated, mask, "ridge")
    inside = P.truth_readout(many, unrelated, mask, 40)
    r_out = np.mean([np.corrcoef(out[g].ravel(), unrelated[g].ravel())[0, 1] for g in range(2)])
    r_in = np.mean([np.corrcoef(inside[g].ravel(), unrelated[g].ravel())[0, 1] for g in range(2)])
    assert r_out < 0.15 < r_in

"""Training: a real (tiny) learning run that beats bicubic upsampling, weights I/O, checkpoints and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models_testing import synthetic_pair, tiny_config

import stsr
from stsr.models import (
    GeneNormalizer,
    STSRModel,
    TrainConfig,
    TrainingPair,
    WeightsError,
    available_weights,
    fit,
    load,
)
from stsr.models._checkpoint import CHECKPOINT_JSON
from stsr.models.training import PreparedPair, ValidationSet, checkpoint_model, draw_batch, stain_jitter
from stsr.observation import ObservationModel

TILE = 32


@pytest.fixture(scope="module")
def trained():
    """Train the tiny network on 3 procedural slides (about a minute on 2 CPU cores)."""
    torch.set_num_threads(2)
    pairs = [synthetic_pair(s) for s in range(3)]
    val = synthetic_pair(100)
    model = stsr.tl.train(
        pairs,
        validation=val,
        model_config=tiny_config(),
        steps=120,
        batch_size=4,
        tile_size=TILE,
        genes_per_batch=6,
        learning_rate=2e-3,
        warmup_steps=20,
        ema_decay=0.99,
        val_every=60,
        val_steps=5,
        val_tiles=4,
        log_every=10,
        progress=False,
    )
    return model, val


def _heldout_tiles(pair: TrainingPair):
    vs = ValidationSet(PreparedPair(pair), TILE, 4, 64, 0.2, 4)
    tiles = vs.tiles
    return vs, tiles


def _rmse(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _pearson(a, b):
    rs = []
    for g in range(a.shape[1]):
        x, y = a[:, g].double().ravel(), b[:, g].double().ravel()
        rs.append(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    return float(np.mean(rs))


def test_loss_decreases(trained):
    model, _ = trained
    hist = model.metadata["training"]["history"]["loss"]
    assert [h["step"] for h in hist] == list(range(10, 121, 10))
    first, last = hist[0], hist[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["diffusion"] < 0.5 * first["diffusion"]
    # every switched-on loss term was used
    assert {"diffusion", "distillation", "disentangle", "adversarial", "discriminator"} <= set(last)
    val = model.metadata["training"]["history"]["validation"]
    assert [v["step"] for v in val] == [60, 120]
    assert val[-1]["val_pearson"] > val[-1]["val_pearson_lr"]


def test_trained_model_beats_bicubic(trained):
    model, val = trained
    vs, tiles = _heldout_tiles(val)
    factor = 4
    lr_side = TILE // factor
    mean, _ = model.sample(
        torch.stack([t["image"] for t in tiles]),
        torch.stack([t["density"] for t in tiles]),
        vs.normalizer,
        observations=[t["obs"] for t in tiles],
        origins=[t["origin"] for t in tiles],
        gene_ids=vs.gene_ids,
        steps=5,
    )
    truth = torch.stack([t["truth"] for t in tiles])
    bicubic, rescaled = [], []
    for t in tiles:
        op, lr = t["obs"]
        dens = torch.as_tensor(lr, dtype=torch.float32).reshape(-1, 1, lr_side, lr_side) / factor**2
        up = F.interpolate(dens, size=(TILE, TILE), mode="bicubic", align_corners=False)[:, 0].clamp_min(0)
        bicubic.append(up)
        rescaled.append(op.project(up.double(), torch.as_tensor(lr), mode="multiplicative").float())
    bicubic, rescaled = torch.stack(bicubic), torch.stack(rescaled)
    # the output reproduces the LR measurements, like the mass-rescaled baseline
    for i, t in enumerate(tiles):
        op, lr = t["obs"]
        np.testing.assert_allclose(op.pool(mean[i].double().numpy()), lr, rtol=1e-4, atol=1e-6)
    rmse_model = _rmse(mean, truth)
    r_model = _pearson(mean, truth)
    for base in (bicubic, rescaled):
        assert rmse_model < 0.85 * _rmse(base, truth)
        assert r_model > _pearson(base, truth) + 0.05


def test_save_load_reproduces_outputs(trained, tmp_path):
    model, val = trained
    path = model.save(tmp_path / "weights", name="tiny-synthetic")
    meta = json.loads((path / "config.json").read_text())
    assert meta["sha256"] == model.weights_hash
    assert meta["stsr_version"] == stsr.__version__
    assert meta["name"] == "tiny-synthetic"
    assert meta["metadata"]["training"]["steps"] == 120
    assert meta["config"] == model.config.to_dict()

    loaded = stsr.models._weights.load(path)
    assert loaded.weights_hash == model.weights_hash
    assert loaded.name == "tiny-synthetic"
    assert loaded.config == model.config
    assert STSRModel.load(path / "model.safetensors").weights_hash == model.weights_hash

    vs, tiles = _heldout_tiles(val)
    args = (
        torch.stack([t["image"] for t in tiles[:2]]),
        torch.stack([t["density"] for t in tiles[:2]]),
        vs.normalizer,
    )
    kw = dict(
        observations=[t["obs"] for t in tiles[:2]],
        origins=[t["origin"] for t in tiles[:2]],
        gene_ids=vs.gene_ids,
        steps=3,
        seed=3,
    )
    a, _ = model.sample(*args, **kw)
    b, _ = loaded.sample(*args, **kw)
    assert torch.equal(a, b)


def test_corrupted_or_missing_weights_are_refused(trained, tmp_path):
    model, _ = trained
    path = model.save(tmp_path / "w")
    wfile = path / "model.safetensors"
    data = bytearray(wfile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-1] ^= 0x01
    wfile.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load(path)
    # a config whose recorded hash does not match is refused too
    model.save(tmp_path / "w2")
    cfg = json.loads((tmp_path / "w2" / "config.json").read_text())
    cfg["sha256"] = "0" * 64
    (tmp_path / "w2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="SHA-256"):
        load(tmp_path / "w2")
    (tmp_path / "w3").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load(tmp_path / "w3")
    with pytest.raises(WeightsError, match="Shipped weights"):
        load("no-such-weights")
    import stsr.models._weights as weights_module

    shipped = weights_module.SHIPPED_DIR
    weights_module.SHIPPED_DIR = tmp_path / "nothing_shipped"
    try:
        assert available_weights() == []
        with pytest.raises(WeightsError, match=r"stsr\.tl\.train"):
            load()
    finally:
        weights_module.SHIPPED_DIR = shipped


def _small_run(tmp_path, steps, ckdir, seed=0):
    # constant learning rate after warm-up, so that a 4-step run is a prefix of a 6-step run (the cosine decay
    # spans ``steps``, as when a run is interrupted and resumed with the same ``steps``)
    torch.manual_seed(seed)
    model = STSRModel(tiny_config())
    cfg = TrainConfig(
        steps=steps,
        batch_size=2,
        tile_size=TILE,
        genes_per_batch=3,
        warmup_steps=2,
        checkpoint_every=2,
        val_every=0,
        progress=False,
        log_every=1,
        seed=seed,
        min_lr_ratio=1.0,
    )
    return fit(model, [synthetic_pair(0), synthetic_pair(1)], cfg, checkpoint_dir=ckdir)


def test_checkpoint_resume_continues_exactly(tmp_path):
    straight = _small_run(tmp_path, 6, tmp_path / "a")
    _small_run(tmp_path, 4, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / CHECKPOINT_JSON).read_text())
    assert meta["step"] == 4
    assert meta["pairs"] == [synthetic_pair(0).name, synthetic_pair(1).name]  # what the run trained on
    resumed = _small_run(tmp_path, 6, tmp_path / "b")
    steps = [h["step"] for h in resumed.metadata["training"]["history"]["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed.metadata["training"]["steps"] == 6
    assert json.loads((tmp_path / "b" / CHECKPOINT_JSON).read_text())["step"] == 6
    sa, sb = straight.denoiser.state_dict(), resumed.denoiser.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [h["loss"] for h in straight.metadata["training"]["history"]["loss"]]
    lb = [h["loss"] for h in resumed.metadata["training"]["history"]["loss"]]
    assert la == lb
    # a checkpoint of another architecture is refused
    torch.manual_seed(0)
    other = STSRModel(tiny_config(use_coexpression=False))
    with pytest.raises(ValueError, match="different model configuration"):
        fit(
            other,
            [synthetic_pair(0)],
            TrainConfig(steps=8, tile_size=TILE, progress=False),
            checkpoint_dir=tmp_path / "b",
        )


def test_checkpoint_model_holds_the_ema_weights(tmp_path):
    trained = _small_run(tmp_path, 3, tmp_path / "c")  # fit returns the EMA weights
    model, meta = checkpoint_model(tmp_path / "c")
    assert meta["step"] == 3 and meta["model_config"] == trained.config.to_dict()
    assert model.config == trained.config
    sa, sb = trained.denoiser.state_dict(), model.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with pytest.raises(ValueError, match="holds no training checkpoint"):
        checkpoint_model(tmp_path / "empty")


def test_batches_are_augmented_consistently():
    # HR truth = block mean of the image's first channel, so every augmented crop must keep hr == pool(image)
    rng = np.random.default_rng(0)
    img = rng.random((3, 4 * 40, 4 * 40)).astype(np.float32)
    hr = img[0].reshape(40, 4, 40, 4).mean(axis=(1, 3))
    hr = np.stack([hr, 2 * hr])
    pair = TrainingPair(img, hr, ObservationModel.blocks((40, 40), 4), ["a", "b"])
    cfg = TrainConfig(batch_size=16, tile_size=16, genes_per_batch=2, progress=False)
    prep = PreparedPair(pair)
    batch = draw_batch([prep], cfg, 4, torch.Generator().manual_seed(0))
    pooled = F.avg_pool2d(batch["image"][:, :1], 4)[:, 0]
    assert torch.allclose(batch["hr"][:, 0], pooled, atol=1e-6)
    assert torch.allclose(batch["hr"][:, 1], 2 * pooled, atol=1e-6)
    assert isinstance(batch["normalizer"], GeneNormalizer)
    # the LR input is the slide-level interpolation of pool(hr), cropped like the truth
    assert batch["density"].shape == (16, 2, 16, 16)
    full = pair.observation.interpolate(pair.observation.pool(hr))
    np.testing.assert_allclose(
        prep.density(torch.tensor([1]), 5, 7, 16, 16).numpy(), full[1:, 5:21, 7:23], rtol=1e-5
    )
    # block-mean LR interpolated: the density keeps the slide mean and is smoother than the truth
    assert abs(float(batch["density"].mean()) - float(batch["hr"].mean())) < 0.1 * float(batch["hr"].mean())

    # a pair that gives another network input (the one hook, input_density) has it cropped and augmented exactly
    # like the truth
    class Tripled(TrainingPair):
        def input_density(self, lr, genes, r0, c0, height, width):
            return 3 * self.hr[torch.as_tensor(np.asarray(genes)), r0 : r0 + height, c0 : c0 + width]

    other = Tripled(img, hr, pair.observation, ["a", "b"])
    batch = draw_batch([PreparedPair(other)], cfg, 4, torch.Generator().manual_seed(0))
    assert torch.allclose(batch["density"], 3 * batch["hr"], atol=1e-5)


def test_stain_jitter():
    img = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    assert torch.equal(stain_jitter(img, 0.0, torch.Generator()), img)
    # the HED round trip without perturbation is the identity
    out = stain_jitter(img, 1e-12, torch.Generator().manual_seed(1))
    assert torch.allclose(out, img, atol=1e-4)
    out = stain_jitter(img, 0.1, torch.Generator().manual_seed(1))
    assert out.min() >= 0 and out.max() <= 1
    assert 1e-3 < float((out - img).abs().mean()) < 0.2
    assert float(torch.corrcoef(torch.stack([out.ravel(), img.ravel()]))[0, 1]) > 0.9
    two = stain_jitter(torch.rand(2, 2, 8, 8), 0.1, torch.Generator().manual_seed(1))
    assert two.shape == (2, 2, 8, 8)


def test_training_pair_validation():
    op = ObservationModel.blocks((16, 16), 4)
    img = np.zeros((3, 64, 64), np.float32)
    hr = np.ones((2, 16, 16))
    with pytest.raises(ValueError, match="gene names"):
        TrainingPair(img, hr, op, ["a"])
    with pytest.raises(ValueError, match="integer multiple"):
        TrainingPair(img[:, :60], hr, op, ["a", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        TrainingPair(img, -hr, op, ["a", "b"])
    with pytest.raises(ValueError, match="grid"):
        TrainingPair(img, hr, ObservationModel.blocks((8, 8), 4), ["a", "b"])
    with pytest.raises(ValueError, match="mask selects no pixel"):
        TrainingPair(img, hr, op, ["a", "b"], mask=np.zeros((16, 16), bool))
    pair = TrainingPair((img * 255).astype(np.uint8), hr, op, ["a", "b"])
    assert pair.image.dtype == torch.uint8 and pair.image_scale == 4
    with pytest.raises(ValueError, match="tile_size"):
        stsr.tl.train(pair, model_config=tiny_config(), steps=1, tile_size=32, progress=False)
    with pytest.raises(ValueError, match="image_scale"):
        stsr.tl.train(pair, model_config=tiny_config(image_scale=2), steps=1, tile_size=16, progress=False)


def test_fine_tuning_leaves_the_init_model_unchanged(trained):
    model, _ = trained
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    tuned = stsr.tl.train(
        synthetic_pair(0),
        init=model,
        steps=3,
        batch_size=2,
        tile_size=TILE,
        genes_per_batch=4,
        progress=False,
        val_every=0,
        learning_rate=1e-2,
    )
    after = model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before[k], v) for k, v in tuned.denoiser.state_dict().items())


def test_distillation_into_a_narrower_network_approaches_the_teacher(trained):
    teacher, _ = trained
    narrow = tiny_config(width=8, channel_mult=(1, 2, 2))

    def gap(model: STSRModel) -> float:
        """Mean squared difference of the two denoisers on fixed held-out noisy inputs."""
        pair = synthetic_pair(101)
        gen = torch.Generator().manual_seed(3)
        img = pair.image[None, :, : 4 * TILE, : 4 * TILE].float() / 255.0
        lr = torch.randn(1, 6, TILE, TILE, generator=gen)
        with torch.no_grad():
            out = []
            for t in (0.2, 0.5, 0.9):
                x = torch.randn(1, 6, TILE, TILE, generator=gen)
                tt = torch.tensor([t])
                out.append(
                    (
                        model.denoiser(x, lr, tt, model.denoiser.encode_histology(img))
                        - teacher.denoiser(x, lr, tt, teacher.denoiser.encode_histology(img))
                    )
                    .pow(2)
                    .mean()
                )
        return float(torch.stack(out).mean())

    kw = dict(
        model_config=narrow,
        steps=60,
        batch_size=4,
        tile_size=TILE,
        genes_per_batch=6,
        learning_rate=2e-3,
        warmup_steps=10,
        ema_decay=0.9,
        val_every=0,
        progress=False,
        seed=1,
        loss_weights={
            "diffusion": 0.0,
            "teacher": 1.0,
            "distillation": 0.5,
            "disentangle": 0.1,
            "adversarial": 0.0,
        },
    )
    pairs = [synthetic_pair(s) for s in range(3)]
    start = stsr.tl.train(pairs, **{**kw, "steps": 1, "learning_rate": 1e-9})
    student = stsr.tl.train(pairs, teacher=teacher, **kw)
    assert student.denoiser.module_parameters()["total"] < teacher.denoiser.module_parameters()["total"]
    assert "teacher" in student.metadata["training"]["history"]["loss"][-1]
    assert gap(student) < 0.5 * gap(start)
    with pytest.raises(ValueError, match="teacher's prediction"):
        stsr.tl.train(
            pairs,
            teacher=teacher,
            model_config=tiny_config(prediction="eps"),
            steps=1,
            tile_size=TILE,
            progress=False,
        )

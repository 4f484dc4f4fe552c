"""Feature distillation: ``stsr.tl.train(image_features=...)`` teaches the light histology encoder an image
encoder's features (a module the user has, the DenseNet teacher, nuclei)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testing import synthetic_pair, tiny_config

import stsr
from stsr.models import ModelConfig, STSRModel, TrainConfig, TrainingPair, fit, load_pairs, save_pairs
from stsr.models.prior import resolve_image_features
from stsr.models.training import PreparedPair, draw_batch, feature_targets


class MeanColour:
    """A weight-free encoder: each HR pixel's mean colour, its squares and a constant channel (rank 6 + 1)."""

    name = "mean-colour"
    n_channels = 7
    fingerprint = "mean-colour"
    um_per_px = None
    halo_px = 0

    def features(self, image, hr_shape):
        img = np.asarray(image, np.float64)
        c, hh, ww = img.shape
        k = hh // hr_shape[0]
        mean = img.reshape(c, hr_shape[0], k, hr_shape[1], k).mean(axis=(2, 4))
        return np.concatenate([mean, mean**2, np.ones((1, *hr_shape))]).astype(np.float32)


def _random_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Tanh()).eval()


def test_feature_targets_are_shared_unit_variance_components_of_the_encoder():
    pairs = [synthetic_pair(s) for s in (0, 1)]
    out, basis = feature_targets(pairs, [MeanColour()], n_components=16)
    assert all(p.features is None for p in pairs)  # the input pairs are left as they were
    # the constant channel carries nothing: at most the 6 informative components, not 16
    assert basis.n_components == 6
    assert basis.explained == pytest.approx(1.0, abs=1e-6)
    for p, q in zip(pairs, out):
        assert q.features.shape == (6, *p.shape)
        assert torch.equal(q.hr, p.hr) and q.name == p.name
    both = np.concatenate([q.features.numpy().reshape(6, -1) for q in out], axis=1)
    assert np.allclose(both.std(axis=1), 1.0, atol=0.1)
    # the same axes on both pairs: one linear map from the encoder's channels gives every pair's targets
    enc = np.concatenate(
        [MeanColour().features(p.image.numpy(), p.shape)[:6].reshape(6, -1) for p in pairs], axis=1
    )
    design = np.vstack([enc, np.ones(enc.shape[1])]).T
    coef, *_ = np.linalg.lstsq(design, both.T, rcond=None)
    assert np.allclose(design @ coef, both.T, atol=1e-3)


def test_batches_crop_and_turn_features_with_the_image():
    pair = feature_targets([synthetic_pair(0)], [MeanColour()], n_components=3)[0][0]
    cfg = TrainConfig(batch_size=6, tile_size=16, augment=True)
    batch = draw_batch([PreparedPair(pair)], cfg, 4, torch.Generator().manual_seed(0))
    assert batch["features"].shape == (6, 3, 16, 16)
    # the targets of every crop are the encoder's targets of the crop's (turned) image
    basis = feature_targets([synthetic_pair(0)], [MeanColour()], n_components=3)[1]
    for img, feats in zip(batch["image"], batch["features"]):
        expect = basis.project(MeanColour().features(img.numpy(), (16, 16)))
        assert np.allclose(feats.numpy(), expect, atol=1e-4)


def test_train_with_a_wrapped_module_learns_its_features_on_held_out_tissue():
    """A random-init module wrapped as the image encoder: its features reach training, and the trained light
    encoder predicts them on a slide it never saw (the untrained one does not)."""
    module = _random_module()
    pairs = [synthetic_pair(s, shape=(48, 48)) for s in (0, 1, 2)]
    kw = dict(steps=60, batch_size=4, tile_size=16, genes_per_batch=6, progress=False, seed=0)
    kw.update(learning_rate=2e-3, val_every=0)
    model = stsr.tl.train(pairs, image_features=module, feature_dim=4, model_config=tiny_config(), **kw)
    assert model.config.feature_targets == 4
    info = model.metadata["training"]["image_features"]
    assert info["components"] == 4 and info["encoders"] == "Sequential"
    losses = [e["features"] for e in model.metadata["training"]["history"]["loss"]]
    assert np.mean(losses[-2:]) < 0.7 * losses[0]

    _, basis = feature_targets(pairs, resolve_image_features(module), n_components=4, seed=0)
    held = synthetic_pair(7, shape=(48, 48))
    (encoder,) = resolve_image_features(module)
    target = basis.project(encoder.features(held.image.numpy(), held.shape))

    def agreement(m: STSRModel) -> float:
        """Mean correlation of the two leading components with the encoder's, on the held-out slide."""
        with torch.no_grad():
            den = m.denoiser.eval()
            pred = den.predict_features(den.encode_histology(held.image[None])).numpy()[0]
        return float(np.mean([np.corrcoef(pred[i].ravel(), target[i].ravel())[0, 1] for i in range(2)]))

    untrained = STSRModel(tiny_config(feature_targets=4))
    assert agreement(model) > 0.7
    assert agreement(model) > agreement(untrained) + 0.3


def test_init_gets_or_drops_the_feature_head_and_keeps_the_rest():
    pairs = [synthetic_pair(0)]
    kw = dict(steps=2, batch_size=2, tile_size=16, genes_per_batch=4, progress=False, val_every=0)
    base = stsr.tl.train(pairs, model_config=tiny_config(), **kw)
    assert base.config.feature_targets == 0 and base.denoiser.feature_head is None
    with_head = stsr.tl.train(pairs, init=base, image_features=MeanColour(), feature_dim=3, **kw)
    assert with_head.config.feature_targets == 3
    assert with_head.denoiser.feature_head.out_channels == 3
    assert base.config.feature_targets == 0  # init is left as it was
    again = stsr.tl.train(pairs, init=with_head, **kw)  # fine-tuning without features drops the head
    assert again.config.feature_targets == 0 and again.denoiser.feature_head is None


def test_feature_head_weights_save_and_load(tmp_path):
    model = STSRModel(tiny_config(feature_targets=5))
    stsr.models.save(model, tmp_path / "w")
    back = stsr.models.load(tmp_path / "w")
    assert back.config.feature_targets == 5
    assert torch.equal(back.denoiser.feature_head.weight, model.denoiser.feature_head.weight)


def test_pair_store_keeps_features(tmp_path):
    pair = feature_targets([synthetic_pair(0)], [MeanColour()], n_components=3)[0][0]
    save_pairs([pair], tmp_path / "store")
    (back,) = load_pairs(tmp_path / "store")
    assert torch.allclose(back.features, pair.features)


def test_bad_feature_inputs_are_refused_with_the_fix():
    pair = synthetic_pair(0)
    with pytest.raises(ValueError, match=r"features must be \(F, H, W\)"):
        TrainingPair(pair.image, pair.hr, pair.observation, pair.genes, features=np.zeros((3, 10, 10)))
    with pytest.raises(ValueError, match="features must be finite"):
        TrainingPair(
            pair.image, pair.hr, pair.observation, pair.genes, features=np.full((2, *pair.shape), np.nan)
        )
    cfg = TrainConfig(steps=1, batch_size=1, tile_size=32, progress=False)
    with pytest.raises(ValueError, match="feature_targets"):
        fit(STSRModel(tiny_config(feature_targets=2)), [pair], cfg)
    with pytest.raises(ValueError, match="non-negative integer"):
        ModelConfig(feature_targets=-1)
    with pytest.raises(ValueError, match="TrainingPair\\(..., features="):
        stsr.tl.train([pair], image_features="my_embeddings", steps=1, progress=False)

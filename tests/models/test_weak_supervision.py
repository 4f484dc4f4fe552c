"""Weak supervision by hidden spots: pairs whose HR truth is unknown and whose spots are known (real slides)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testing import synthetic_slide, tiny_config

import stsr
from stsr.models import GeneNormalizer, STSRModel, TrainConfig, TrainingPair, fit, load_pairs, save_pairs
from stsr.models.training import PreparedPair, draw_batch, spot_loss
from stsr.observation import ObservationModel

TILE = 32
PITCH = 8.0


def _lattice(shape: tuple[int, int], pitch: float = PITCH) -> np.ndarray:
    rows = np.arange(pitch / 2, shape[0], pitch)
    cols = np.arange(pitch / 2, shape[1], pitch)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def weak_pair(
    seed: int, shape=(64, 64), n_genes: int = 6, name: str | None = None
) -> tuple[TrainingPair, np.ndarray]:
    """A procedural slide seen as a real one: disks of radius 3 at pitch 8 (the hidden spots, their counts known),
    groups of 2 x 2 spots as the LR input, and as ``hr`` only the spots' interpolation. Returns the pair and the
    slide's true HR field (never given to training)."""
    image, truth, _ = synthetic_slide(seed, shape, 4, n_genes)
    spots = ObservationModel.disks(shape, _lattice(shape), 3.0)
    counts = spots.pool(truth.astype(np.float64))
    rc = np.floor(spots.centres / (2 * PITCH)).astype(int)
    groups = rc[:, 0] * 100 + rc[:, 1]
    _, groups = np.unique(groups, return_inverse=True)
    labels = spots.owner_map().copy()
    labels[labels == spots.n_obs] = -1
    lr = np.zeros((n_genes, groups.max() + 1))
    np.add.at(lr.T, groups, counts.T)
    pair = TrainingPair(
        image=image,
        hr=spots.interpolate(counts).astype(np.float32),
        observation=spots.grouped(groups),
        genes=[f"gene{i}" for i in range(n_genes)],
        lr=lr,
        name=name or f"weak{seed}",
        spots=labels,
        spot_counts=counts,
    )
    return pair, truth


def test_spot_loss_scores_the_pooled_prediction_only():
    norm = GeneNormalizer([0.5, 2.0])
    labels = torch.full((1, 4, 4), -1, dtype=torch.int64)
    labels[0, :2, :2] = 0
    labels[0, 2:, 2:] = 1
    counts = torch.tensor([[4.0, 8.0], [12.0, 0.0]])
    area = torch.tensor([4.0, 4.0])
    x = torch.zeros(1, 2, 4, 4)
    x[0, :, :2, :2] = (counts[:, 0] / 4)[:, None, None]
    x[0, :, 2:, 2:] = (counts[:, 1] / 4)[:, None, None]
    x[0, :, 0, 3] = 5.0  # outside the spots: not scored
    exact = spot_loss(norm.normalize(x), norm, labels, counts, area)
    assert float(exact) < 1e-10
    # moving counts within a spot keeps its sum: still exact
    y = x.clone()
    y[0, :, 0, 0] += 1.0
    y[0, :, 1, 1] -= 1.0
    assert float(spot_loss(norm.normalize(y), norm, labels, counts, area)) < 1e-10
    # a wrong sum is penalised, more so the further off
    off1, off2 = x.clone(), x.clone()
    off1[0, 0, :2, :2] *= 1.5
    off2[0, 0, :2, :2] *= 3.0
    l1 = float(spot_loss(norm.normalize(off1), norm, labels, counts, area))
    l2 = float(spot_loss(norm.normalize(off2), norm, labels, counts, area))
    assert 0 < l1 < l2
    # no spot in the batch: zero, and still differentiable
    z = norm.normalize(x).requires_grad_(True)
    none = spot_loss(z, norm, torch.full_like(labels, -1), counts[:, :0], area[:0])
    none.backward()
    assert float(none.detach()) == 0.0 and z.grad is not None


def test_weak_batches_hold_whole_spots_with_their_counts():
    pair, _ = weak_pair(0)
    prepared = PreparedPair(pair)
    cfg = TrainConfig(batch_size=4, tile_size=TILE, genes_per_batch=4, min_valid_fraction=0.0)
    gen = torch.Generator().manual_seed(3)
    seen = 0
    for _ in range(5):
        batch = draw_batch([prepared], cfg, 4, gen)
        labels, counts, area = batch["spot_labels"], batch["spot_counts"], batch["spot_area"]
        m = counts.shape[1]
        assert m > 0 and labels.max() == m - 1 and area.shape == (m,)
        # every scored spot lies whole in its crop: its pixels in the (augmented) crop are the spot's whole area
        assert torch.equal(torch.bincount(labels[labels >= 0], minlength=m).to(area.dtype), area)
        seen += m
    assert seen > 20


def test_weak_batch_counts_match_the_pooled_truth():
    """Pairs made weak from a known field: pooling the crop of the field over the batch's labels gives the counts."""
    pair, truth = weak_pair(1)
    # as hr use the truth here, so that the batch's crops of it are the truth's crops
    full = TrainingPair(
        image=pair.image,
        hr=truth,
        observation=pair.observation,
        genes=pair.genes,
        lr=pair.lr,
        spots=pair.spots,
        spot_counts=ObservationModel.disks(truth.shape[1:], _lattice(truth.shape[1:]), 3.0).pool(
            truth.astype(np.float64)
        ),
    )
    hard = np.zeros_like(full.spot_counts)
    lab = full.spots.numpy()
    for g in range(truth.shape[0]):
        np.add.at(hard[g], lab[lab >= 0], truth[g][lab >= 0])
    full.spot_counts = hard  # the counts of the hard footprints, to compare exactly
    prepared = PreparedPair(full)
    cfg = TrainConfig(batch_size=3, tile_size=TILE, genes_per_batch=6, min_valid_fraction=0.0)
    batch = draw_batch([prepared], cfg, 4, torch.Generator().manual_seed(0))
    hr, labels, counts = batch["hr"], batch["spot_labels"], batch["spot_counts"]
    pooled = torch.zeros_like(counts)
    flat = hr.permute(1, 0, 2, 3).reshape(hr.shape[1], -1)
    lab = labels.reshape(-1)
    pooled.index_add_(1, lab[lab >= 0], flat[:, lab >= 0])
    np.testing.assert_allclose(pooled.numpy(), counts.numpy(), rtol=1e-4)


def _heldout_spot_loss(model: STSRModel | None, pair: TrainingPair) -> float:
    """Spot loss of the model's denoised prediction on fixed crops, noise and times of a held-out weak pair
    (``model=None``: of the LR input itself, the groups' interpolation)."""
    from stsr.models.network import q_sample, to_x0_eps

    cfg = TrainConfig(batch_size=8, tile_size=TILE, genes_per_batch=6, min_valid_fraction=0.0, augment=False)
    batch = draw_batch([PreparedPair(pair)], cfg, 4, torch.Generator().manual_seed(11))
    norm = batch["normalizer"]
    x0, lr_z = norm.normalize(batch["hr"]), norm.normalize(batch["density"])
    if model is None:
        return float(spot_loss(lr_z, norm, batch["spot_labels"], batch["spot_counts"], batch["spot_area"]))
    gen = torch.Generator().manual_seed(5)
    den = model.denoiser.eval()
    losses = []
    with torch.no_grad():
        for t_val in (0.2, 0.5, 0.8):
            t = torch.full((x0.shape[0],), t_val)
            x_t = q_sample(model.schedule, x0, t, torch.randn(x0.shape, generator=gen))
            pred = den(x_t, lr_z, t, den.encode_histology(batch["image"]))
            z_hat = to_x0_eps(model.schedule, pred, x_t, t, model.config.prediction)[0]
            losses.append(
                float(spot_loss(z_hat, norm, batch["spot_labels"], batch["spot_counts"], batch["spot_area"]))
            )
    return float(np.mean(losses))


def test_weak_training_lowers_the_spot_loss_also_on_a_held_out_slide():
    """A tiny network trained only on weak pairs (no HR truth) learns to predict the spots hidden in the groups,
    on a slide it never saw too."""
    torch.manual_seed(0)
    init = STSRModel(tiny_config())
    cfg = TrainConfig(
        steps=100,
        batch_size=4,
        tile_size=TILE,
        genes_per_batch=6,
        learning_rate=2e-3,
        warmup_steps=20,
        ema_decay=0.95,
        val_every=0,
        log_every=10,
        progress=False,
        min_valid_fraction=0.0,
    )
    held = weak_pair(7)[0]
    before = _heldout_spot_loss(init, held)
    model = fit(init, [weak_pair(s)[0] for s in range(3)], cfg)
    hist = model.metadata["training"]["history"]["loss"]
    assert "spots" in hist[0] and "pseudo" in hist[0] and "diffusion" not in hist[0]
    assert np.mean([h["spots"] for h in hist[-3:]]) < 0.7 * np.mean([h["spots"] for h in hist[:2]])
    after = _heldout_spot_loss(model, held)
    assert after < 0.2 * before
    # and it predicts the hidden spots better than its input, the groups' interpolation, does
    assert after < 0.9 * _heldout_spot_loss(None, held)


def test_weak_pairs_round_trip_through_the_pair_store(tmp_path):
    pair, _ = weak_pair(2)
    save_pairs([pair], tmp_path / "pairs")
    (back,) = load_pairs(tmp_path / "pairs")
    assert back.weak and torch.equal(back.spots, pair.spots)
    np.testing.assert_array_equal(back.spot_counts, pair.spot_counts)
    np.testing.assert_allclose(
        back.observation.pool(np.ones(back.shape)), pair.observation.pool(np.ones(pair.shape))
    )


def test_weak_pair_inputs_are_checked():
    pair, _ = weak_pair(0)
    with pytest.raises(ValueError, match="together"):
        TrainingPair(pair.image, pair.hr, pair.observation, pair.genes, spots=pair.spots)
    with pytest.raises(ValueError, match="label map"):
        TrainingPair(
            pair.image,
            pair.hr,
            pair.observation,
            pair.genes,
            spots=pair.spots[:5],
            spot_counts=pair.spot_counts,
        )
    with pytest.raises(ValueError, match="spot_counts must be"):
        TrainingPair(
            pair.image,
            pair.hr,
            pair.observation,
            pair.genes,
            spots=pair.spots,
            spot_counts=pair.spot_counts[:, :3],
        )


def test_weak_pair_from_a_spatialdata_hides_the_spots_behind_groups():
    sdata = stsr.datasets.synthetic(size_um=(600, 600), n_genes=5, lattice="square", seed=3)
    table = sdata["table"]
    pair = stsr.tl.training_pair(sdata, "he", table_key="table", weak=True, factor=2, image_scale=2)
    assert pair.weak and pair.observation.kind == "groups"
    members = np.asarray(pair.observation.params["members"])
    # the LR input is the sum of each group's spots, and the hidden counts are the table's
    x = np.asarray(table.X.toarray() if hasattr(table.X, "toarray") else table.X, np.float64)
    order = [list(table.var_names).index(g) for g in pair.genes]
    np.testing.assert_allclose(np.sort(pair.spot_counts.sum(1)), np.sort(x[:, order].sum(0)))
    for j in range(pair.lr.shape[1]):
        np.testing.assert_allclose(pair.lr[:, j], pair.spot_counts[:, members == j].sum(1))
    sizes = np.bincount(members[members >= 0])
    assert (
        sizes.max() == 4 and sizes.min() >= 1
    )  # 2 x 2 cells; fewer at the tissue's edge (empty spots left out)
    assert (members < 0).sum() == (x[:, order].sum(1) == 0).sum()
    # each spot's label covers its disk
    lab = pair.spots.numpy()
    area = np.bincount(lab[lab >= 0], minlength=pair.spot_counts.shape[1])
    measured = pair.spot_counts.sum(0) > 0  # empty spots (off the tissue) are no measurement: no label
    assert np.all(area[~measured] == 0) and np.all(area[measured] > 0.8 * np.median(area[measured]))
    with pytest.raises(ValueError, match="weak=True"):
        stsr.tl.training_pair(sdata, "he", hr_key="hr_truth", weak=True)

"""The weights shipped inside the package load, verify, stay small and beat the interpolated LR input."""

from __future__ import annotations

import pytest
import torch

import stsr
from stsr.models._weights import SHIPPED_DIR, WEIGHTS_FILE
from stsr.models.training import PreparedPair, ValidationSet, evaluate_pairs

SHIPPED = stsr.models.available_weights()
VALIDATION_SEED = 99  # the training recipe's held-out synthetic slide (scripts/train_default.py)


@pytest.fixture(scope="module")
def heldout():
    """Validation tiles of the held-out synthetic slide, pooled over Visium-like spots as in training."""
    sdata = stsr.datasets.synthetic(size_um=(600, 600), n_genes=30, seed=VALIDATION_SEED)
    pair = stsr.tl.training_pair(sdata, "he", hr_key="hr_truth", spots_key="spots", image_scale=4)
    return ValidationSet(PreparedPair(pair), 48, 4, 12, 0.25, 4)


def test_default_is_shipped():
    assert "default" in SHIPPED
    assert stsr.models.load().name == "default"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_verify_and_fit_the_size_budget(name):
    model = stsr.models.load(name)
    assert model.name == name
    assert (SHIPPED_DIR / name / WEIGHTS_FILE).stat().st_size <= 30 * 2**20
    training = model.metadata["training"]
    assert "synthetic-42" not in training["train_pairs"]  # the accuracy benchmark's synthetic case
    assert not any(p.lower().startswith(("her2st", "vizgen")) for p in training["train_pairs"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_beat_the_interpolated_input_on_a_heldout_slide(name, heldout):
    torch.set_num_threads(2)
    model = stsr.models.load(name)
    res = evaluate_pairs(model, [heldout], steps=10)
    assert res["val_pearson"] > res["val_pearson_lr"] + 0.01, res
    assert res["val_rmse"] < res["val_rmse_lr"], res
    # reusing the deep features every other step (cache_interval=2) is an approximation that must keep the gain
    cached = evaluate_pairs(model, [heldout], steps=10, cache_interval=2)
    assert cached["val_pearson"] != res["val_pearson"]  # the cache was used
    assert cached["val_pearson"] > cached["val_pearson_lr"] + 0.01, cached
    assert cached["val_pearson"] > res["val_pearson"] - 0.01, (cached, res)
    assert cached["val_rmse"] < cached["val_rmse_lr"], cached


def test_fast_weights_are_a_narrower_student_of_the_default():
    if "fast" not in SHIPPED:
        pytest.skip("no fast weights shipped")
    fast, default = stsr.models.load("fast"), stsr.models.load()
    assert (
        fast.denoiser.module_parameters()["gene_stream_unet"]
        < 0.6 * default.denoiser.module_parameters()["gene_stream_unet"]
    )
    assert fast.metadata["training"]["teacher"]["weights_sha256"] == default.weights_hash

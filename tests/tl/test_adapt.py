"""Per-slide adaptation on a real slide's own spots."""

from __future__ import annotations

import torch

import stsr
from stsr.models import ModelConfig, STSRModel


def test_adapt_fine_tunes_a_copy_on_the_slides_spots(her2st_c2):
    torch.manual_seed(0)
    base = STSRModel(
        ModelConfig(
            width=8,
            hist_width=8,
            channel_mult=(1, 1, 1),
            time_dim=16,
            n_heads=2,
            shared_dim=8,
            distill_dim=8,
            align_dim=4,
            disc_width=8,
            groups=4,
        )
    )
    before = base.weights_hash
    adapted = stsr.tl.adapt(
        her2st_c2, "he", ["ERBB2", "CD74", "GAPDH", "MUC1"], model=base, steps=3, batch_size=2, progress=False
    )
    assert base.weights_hash == before  # the caller's model is untouched
    assert adapted.weights_hash != before
    history = adapted.metadata["training"]["history"]
    assert len(history["loss"]) >= 1

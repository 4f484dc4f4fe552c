"""Per-slide adaptation on a real slide's own spots."""

from __future__ import annotations

import stsr


def test_adapt_fine_tunes_a_copy_on_the_slides_spots(her2st_c2, tiny_model):
    before = tiny_model.weights_hash
    adapted = stsr.tl.adapt(
        her2st_c2,
        "he",
        ["ERBB2", "CD74", "GAPDH", "MUC1"],
        model=tiny_model,
        steps=3,
        batch_size=2,
        progress=False,
    )
    assert tiny_model.weights_hash == before  # the caller's model is untouched
    assert adapted.weights_hash != before
    assert len(adapted.metadata["training"]["history"]["loss"]) >= 1

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


def test_super_resolve_does_not_trust_its_check_on_the_slide_a_model_was_adapted_on(
    her2st_c2_crop, tiny_model, caplog
):
    """The self-check predicts the spots from groups of them: the task ``adapt`` trains on, so after adapting on a
    slide the check's score of the network there is in-sample and must not decide to keep the network."""
    from stsr.tl._adapt import adapted_on

    sdata = her2st_c2_crop(2000, 4200)
    genes = ["ERBB2", "CD74", "GAPDH", "MUC1"]
    adapted = stsr.tl.adapt(sdata, "he", genes, model=tiny_model, steps=2, batch_size=2, progress=False)
    table = sdata["table"]
    assert adapted.metadata["adapted_on"]["n_spots"] == table.n_obs
    assert adapted_on(adapted, table) and not adapted_on(tiny_model, table)
    assert not adapted_on(adapted, table[: table.n_obs - 1])  # other spots: another slide
    with caplog.at_level("WARNING", logger="stsr"):
        stsr.tl.super_resolve(sdata, "he", genes, model=adapted, steps=1, key_added="sr", progress=False)
    record = sdata.attrs["stsr"]["sr"]
    assert record["self_check_in_sample"] is True
    assert record["diffusion_residual"] == 0
    assert {c[1] for c in record["self_check"]["candidates"]} == {0.0}  # no residual was even tried
    assert any("in-sample" in r.getMessage() for r in caplog.records)

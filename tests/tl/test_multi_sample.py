"""Several samples in one SpatialData (``spatialdata.concatenate``): one table annotating the spots of every sample,
or one table per sample. The public calls take the image of one sample and use the spots placed with it; the map
equals that of the sample on its own."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.transformations import Identity, set_transformation

import stsr
from stsr.tl._inputs import prepare_inputs

FAST = {"steps": 1, "tile_size": 32, "overlap": 12, "progress": False, "semantic_prior": False}


SEEDS = {"a": ((450, 450), 3), "b": ((400, 500), 8)}


def _sample(name: str) -> sd.SpatialData:
    size, seed = SEEDS[name]
    return stsr.datasets.synthetic(size_um=size, n_genes=4, seed=seed)


def _concatenate(one_table: bool = True) -> sd.SpatialData:
    """Both samples in one SpatialData, keys and coordinate systems suffixed ``-a`` / ``-b`` (concatenate renames
    the coordinate systems of the elements it is given, so each call gets new samples)."""
    return sd.concatenate({n: _sample(n) for n in SEEDS}, concatenate_tables=one_table)


def _inputs(sdata: sd.SpatialData, image_key: str, **kw):
    return prepare_inputs(
        sdata,
        image_key,
        None,
        table_key=None,
        pixel_size=None,
        coordinate_system=None,
        image_channels=3,
        **kw,
    )


@pytest.mark.parametrize("one_table", [True, False])
def test_each_image_gets_the_spots_of_its_own_sample(one_table, caplog):
    both = _concatenate(one_table)
    assert len(both.tables) == (1 if one_table else 2)
    for name in SEEDS:
        with caplog.at_level(logging.INFO, logger="stsr"):
            got = _inputs(both, f"he-{name}")
        ref = _inputs(_sample(name), "he")
        assert got.spots_key == f"spots-{name}"
        assert got.table_key == ("table" if one_table else f"table-{name}")
        # the default genes are chosen on this sample's spots, the counts are this sample's
        assert got.genes == ref.genes
        np.testing.assert_array_equal(got.lr, ref.lr)
        np.testing.assert_array_equal(got.mask, ref.mask)
        assert got.grid.shape == ref.grid.shape
    if one_table:
        assert "using 'spots-b', the one that shares a coordinate system with image 'he-b'" in caplog.text


def test_super_resolve_of_one_sample_equals_the_sample_alone(tiny_model):
    both = _concatenate()
    genes = ["gene_000", "gene_002"]
    stsr.tl.super_resolve(both, "he-b", genes, model=tiny_model, **FAST)
    alone = _sample("b")
    stsr.tl.super_resolve(alone, "he", genes, model=tiny_model, **FAST)
    got, ref = (np.asarray(x["stsr"]["scale0"]["image"]) for x in (both, alone))
    assert ref.shape[0] == 2 and ref.max() > 0
    np.testing.assert_array_equal(got, ref)
    assert both["stsr"].attrs["stsr"]["coordinate_system"] == "global-b"
    assert set(sd.transformations.get_transformation(both["stsr"], get_all=True)) == {"global-b"}


def test_samples_placed_in_one_coordinate_system_are_refused_with_the_fix():
    both = _concatenate()
    for key in ("spots-a", "spots-b", "he-a"):  # every element in one coordinate system
        set_transformation(both[key], Identity(), to_coordinate_system="shared")
    with pytest.raises(ValueError, match=r"several spot elements placed with image 'he-a'.*sdata\.subset"):
        _inputs(both, "he-a")
    # a coordinate system only one sample's spots share with the image chooses it
    assert (
        prepare_inputs(
            both,
            "he-a",
            None,
            table_key=None,
            pixel_size=None,
            coordinate_system="global-a",
            image_channels=3,
        ).spots_key
        == "spots-a"
    )
    lone = _concatenate()
    set_transformation(lone["he-a"], {"elsewhere": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="none of its spots shares a coordinate system with image 'he-a'"):
        _inputs(lone, "he-a")

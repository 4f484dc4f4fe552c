"""The ``stsr`` command line: super-resolve a store (in place or into a copy), the prior map, and the demo."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd

import stsr
from stsr.cli import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_model):
    return tiny_model.save(tmp_path_factory.mktemp("w") / "tiny", name="tiny")


@pytest.fixture()
def store(tmp_path):
    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=4, seed=3)
    path = tmp_path / "slide.zarr"
    sdata.write(path)
    return path


def test_super_resolve_into_a_copy_leaves_the_input_untouched(store, tmp_path, weights):
    out = tmp_path / "out.zarr"
    argv = [
        "super-resolve", str(store), "--image-key", "he", "--genes", "gene_000", "gene_001",
        "--model", str(weights), "--steps", "2", "--tile-size", "32", "--overlap", "8", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    result = sd.read_zarr(out)
    assert list(result["stsr"]["scale0"]["image"].coords["c"].values) == ["gene_000", "gene_001"]
    assert result.attrs["stsr"]["stsr"]["model"] == "tiny"
    assert result.attrs["stsr"]["stsr"]["steps"] == 2
    assert result.attrs["stsr"]["stsr"]["cache_interval"] == 1
    hr = np.asarray(result["stsr"]["scale0"]["image"].values)
    assert np.isfinite(hr).all() and hr.min() >= 0 and hr.sum() > 0
    assert "stsr" not in sd.read_zarr(store).images  # the input store was copied, not modified
    # a second run into the same --out is refused, and so is a missing input
    assert main(argv) == 2
    assert main(["super-resolve", str(tmp_path / "missing.zarr"), "--image-key", "he"]) == 2


def test_super_resolve_in_place_refuses_to_overwrite(store, weights):
    argv = ["super-resolve", str(store), "--image-key", "he", "--genes", "gene_000", "--model", str(weights),
            "--steps", "1", "--tile-size", "32", "--overlap", "8"]  # fmt: skip
    assert main(argv) == 0
    assert "stsr" in sd.read_zarr(store).images
    with pytest.raises(ValueError, match="overwrite"):
        main(argv)
    assert main([*argv, "--overwrite"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr"]["semantic_prior"] is None
    assert main([*argv, "--overwrite", "--semantic-prior"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr"]["semantic_prior"] == 0.5
    assert main([*argv, "--overwrite", "--cache-interval", "2"]) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr"]["cache_interval"] == 2


def test_demo_writes_a_store_and_an_overlay(tmp_path, weights, capsys):
    assert (
        main(["demo", "--out", str(tmp_path), "--steps", "2", "--size-um", "400", "--model", str(weights)])
        == 0
    )
    assert (tmp_path / "overlay.png").stat().st_size > 10_000
    assert "stsr" in sd.read_zarr(tmp_path / "demo.zarr").images
    printed = capsys.readouterr().out
    assert "model 'tiny'" in printed and "Pearson r vs HR truth" in printed


def test_prior_map_into_a_copy_and_in_place(store, tmp_path):
    out = tmp_path / "mapped.zarr"
    argv = [
        "prior-map",
        str(store),
        "--image-key",
        "he",
        "--genes",
        "gene_000",
        "gene_001",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = sd.read_zarr(out)
    assert list(result["stsr_prior"]["scale0"]["image"].coords["c"].values) == ["gene_000", "gene_001"]
    assert result.attrs["stsr"]["stsr_prior"]["method"] == "prior_map"
    assert result.attrs["stsr"]["stsr_prior"]["strength"] == 0.25  # the default of stsr.tl.prior_map
    assert "stsr_prior" not in sd.read_zarr(store).images  # the input store was copied, not modified
    assert main(argv) == 2  # --out exists
    in_place = ["prior-map", str(store), "--image-key", "he", "--genes", "gene_000", "--strength", "0"]
    assert main(in_place) == 0
    assert sd.read_zarr(store).attrs["stsr"]["stsr_prior"]["strength"] == 0.0
    with pytest.raises(ValueError, match="overwrite"):
        main(in_place)

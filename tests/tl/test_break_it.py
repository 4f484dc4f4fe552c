"""Probes of a hostile but ordinary user: bad names, kills mid-write, edited inputs, odd arguments.

Each test reproduces a finding that once deleted, corrupted or silently falsified a user's data (see the "Data
safety" page of the docs). The kill tests SIGKILL a real subprocess at the dangerous moment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import spatialdata as sd

import stsr
from stsr.models import STSRModel

GENES = ["gene_000", "gene_001", "gene_002"]
# the diffusion core alone (the semantic prior and the self-check have their own tests)
FAST = {
    "steps": 1,
    "tile_size": 32,
    "overlap": 12,
    "batch_size": 8,
    "progress": False,
    "semantic_prior": False,
}


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(300, 300), n_genes=4, seed=5)


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _values(sdata: sd.SpatialData, key: str) -> np.ndarray:
    return np.asarray(sdata[key]["scale0"]["image"].values)


# ---------------------------------------------------------------- names never reach the file system
@pytest.mark.parametrize("key", ["..", ".", "", "bad/name", "/tmp", ".hidden", "a\\b", "__x"])
def test_bad_key_added_is_refused_before_any_path_or_work(slide, tiny_model, tmp_path, key, monkeypatch):
    store = tmp_path / "work" / "s.zarr"
    sd.deepcopy(slide).write(store)
    (tmp_path / "work" / "neighbour.txt").write_text("keep me")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mine.txt").write_text("keep me too")
    before = _listing(tmp_path)
    sdata = sd.read_zarr(store)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the name was checked")

    monkeypatch.setattr("stsr.tl._super_resolve.prepare_inputs", no_work)
    monkeypatch.setattr("stsr.tl._prior_map.prepare_inputs", no_work)
    for kw in ({}, {"cache_dir": cache}):
        with pytest.raises(ValueError, match="key_added"):
            stsr.tl.super_resolve(sdata, "he", GENES, model=tiny_model, key_added=key, **FAST, **kw)
        with pytest.raises(ValueError, match="key_added"):
            stsr.tl.prior_map(sdata, "he", GENES, key_added=key, progress=False, **kw)
    assert _listing(tmp_path) == before


def test_in_memory_run_with_dotdot_leaves_tmpdir_alone(slide, tiny_model, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "sentinel").write_text("x")
    with pytest.raises(ValueError, match="key_added"):
        stsr.tl.super_resolve(sd.deepcopy(slide), "he", GENES, model=tiny_model, key_added="..", **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel"]


def test_cache_folder_not_made_by_stsr_is_refused_not_emptied(slide, tiny_model, tmp_path):
    user = tmp_path / "cache" / "stsr"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not made by stsr"):
        stsr.tl.super_resolve(
            sd.deepcopy(slide), "he", GENES, model=tiny_model, cache_dir=tmp_path / "cache", **FAST
        )
    assert (user / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("key", ["table", "he", "spots", "regions", "hr_truth"])
def test_overwrite_never_replaces_an_input_or_another_kind(slide, tiny_model, key):
    """Inputs (image, table, spots) and elements of another kind (labels "regions") are refused; "hr_truth", an
    image that is not an input, may be replaced (as a map stsr wrote before)."""
    sdata = sd.deepcopy(slide)
    if key == "hr_truth":
        stsr.tl.super_resolve(sdata, "he", GENES, model=tiny_model, key_added=key, overwrite=True, **FAST)
        assert sdata[key].attrs["stsr"]["method"] == "super_resolve"
        return
    with pytest.raises(ValueError, match="key_added"):
        stsr.tl.super_resolve(sdata, "he", GENES, model=tiny_model, key_added=key, overwrite=True, **FAST)
    assert key in sdata and "stsr" not in sdata


# ---------------------------------------------------------------- odd arguments
@pytest.mark.parametrize("bad", [-1, 0, 1.5, True])
def test_bad_batch_size_fails_before_work(slide, tiny_model, bad):
    with pytest.raises(ValueError, match="batch_size"):
        stsr.tl.super_resolve(
            sd.deepcopy(slide), "he", GENES, model=tiny_model, **{**FAST, "batch_size": bad}
        )


def test_slide_smaller_than_one_tile_and_odd_tiles_work(tiny_model):
    small = stsr.datasets.synthetic(size_um=(250, 270), n_genes=4, seed=1)  # a grid of about 45 x 49 HR px
    sdata = sd.deepcopy(small)
    stsr.tl.super_resolve(sdata, "he", GENES, model=tiny_model, steps=1, progress=False)  # default tile 64
    out = _values(sdata, "stsr")
    assert out.shape[1] < 64 and np.isfinite(out).all() and out.sum() > 0
    assert sdata["stsr"].attrs["stsr"]["tile_size"] % 4 == 0
    for tile, overlap in ((50, 13), (37, 40)):
        odd = sd.deepcopy(small)
        stsr.tl.super_resolve(
            odd, "he", GENES, model=tiny_model, steps=1, tile_size=tile, overlap=overlap, progress=False
        )
        got = _values(odd, "stsr")
        assert got.shape == out.shape
        assert np.corrcoef(got.ravel(), out.ravel())[0, 1] > 0.9


def test_seed_results_invariant_to_batch_size_exactly(slide, tiny_model):
    """What the seed docstring promises: batch size (and workers, resume) do not change the result."""
    a, b = sd.deepcopy(slide), sd.deepcopy(slide)
    stsr.tl.super_resolve(a, "he", GENES, model=tiny_model, **{**FAST, "steps": 2, "batch_size": 1})
    stsr.tl.super_resolve(b, "he", GENES, model=tiny_model, **{**FAST, "steps": 2, "batch_size": 5})
    # equal up to float rounding (a batched convolution may sum in another order)
    np.testing.assert_allclose(_values(a, "stsr"), _values(b, "stsr"), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- resume only from the same inputs
def test_resume_refuses_tiles_of_other_counts(slide, tiny_model, tmp_path, monkeypatch, caplog):
    store = tmp_path / "s.zarr"
    sd.deepcopy(slide).write(store)
    calls = {"n": 0}
    original = STSRModel.sample

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(STSRModel, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        stsr.tl.super_resolve(sd.read_zarr(store), "he", GENES, model=tiny_model, **{**FAST, "batch_size": 2})
    monkeypatch.undo()
    # the user corrects a gene's counts and reruns: the finished tiles are from other data
    edited = sd.read_zarr(store)
    table = edited["table"]
    x = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    col = list(table.var_names).index("gene_001")
    x[:, col] = x[::-1, col]
    table.X = x.astype(np.float32)
    fresh = sd.deepcopy(edited)
    with caplog.at_level(logging.WARNING, logger="stsr"):
        stsr.tl.super_resolve(edited, "he", GENES, model=tiny_model, **{**FAST, "batch_size": 2})
    assert "starting afresh" in caplog.text and "inputs_sha256" in caplog.text
    stsr.tl.super_resolve(fresh, "he", GENES, model=tiny_model, **{**FAST, "batch_size": 2})
    np.testing.assert_allclose(_values(edited, "stsr"), _values(fresh, "stsr"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- kills at the dangerous moments
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, spatialdata as sd, torch
    import stsr
    from stsr.models import ModelConfig, STSRModel
    from stsr.tl import _write

    store, moment, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.manual_seed(0)
    model = STSRModel(ModelConfig(width=8, hist_width=8, channel_mult=(1, 1, 1), time_dim=16, n_heads=2,
                                  shared_dim=8, distill_dim=8, align_dim=4, disc_width=8, groups=4))

    def die_after(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    tag = _write._tag

    def tag_and_keep(staged, keys, record):  # keep the new values, to tell the old map from the new one
        tag(staged, keys, record)
        np.save(store + ".new.npy", sd.read_zarr(staged)["stsr"]["scale0"]["image"].values)

    _write._tag = tag_and_keep
    if moment != "none":
        setattr(_write, moment, die_after(getattr(_write, moment)))
    sdata = sd.read_zarr(store)
    t = sdata["table"]
    t.X = t.X * scale  # another map than the one in the store, to tell old from new
    stsr.tl.super_resolve(sdata, "he", ["gene_000", "gene_001"], model=model, steps=1, tile_size=32, overlap=12,
                          progress=False, overwrite=True)
    """
)


def _child(store: Path, moment: str, scale: float) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, str(store), moment, str(scale)], env=env).returncode


@pytest.mark.slow
def test_sigkill_during_overwrite_leaves_a_readable_store_with_old_or_new(slide, tmp_path):
    store = tmp_path / "s.zarr"
    sd.deepcopy(slide).write(store)
    assert _child(store, "none", 1.0) == 0
    old = _values(sd.read_zarr(store), "stsr")
    # killed right after the swap of the element folders (root metadata not yet rewritten), then right after
    # the new folder was moved into the store under its hidden name
    for moment, scale in (("_swap_in", 2.0), ("_tag", 3.0)):
        assert _child(store, moment, scale) == -9
        back = sd.read_zarr(store)  # opens
        got = _values(back, "stsr")
        new = np.load(str(store) + ".new.npy")
        assert not np.allclose(new, old)
        assert np.array_equal(got, old) or np.array_equal(got, new), moment
        old = got
        assert "he" in back.images and "table" in back.tables
    assert _child(store, "none", 5.0) == 0  # the next run succeeds
    np.testing.assert_array_equal(_values(sd.read_zarr(store), "stsr"), np.load(str(store) + ".new.npy"))
    assert not [p for p in (store / "images").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_during_the_first_write_then_rerun_succeeds(slide, tmp_path):
    store = tmp_path / "s.zarr"
    sd.deepcopy(slide).write(store)
    assert _child(store, "_swap_in", 1.0) == -9  # the folder is in place, the listing not yet updated
    assert "stsr" not in sd.read_zarr(store).images  # the store opens, as before the call
    assert _child(store, "none", 1.0) == 0
    back = sd.read_zarr(store)
    assert _values(back, "stsr").sum() > 0 and back.attrs["stsr"]["stsr"]["genes"] == ["gene_000", "gene_001"]


def test_prior_map_on_a_small_slide_with_coarse_pixels_works():
    """Once: ``tile (32) and halo (96) must be multiples of 16`` from the teacher; now the teacher's image scale
    follows the HR pixel (~0.75 µm per teacher pixel) and any grid size is read in one piece."""
    small = stsr.datasets.synthetic(size_um=(300, 300), n_genes=3, seed=0)
    for pixel_size in (20.0, 13.0):
        sdata = sd.deepcopy(small)
        stsr.tl.prior_map(sdata, "he", ["gene_000"], pixel_size=pixel_size, progress=False)  # warns: coarse
        out = _values(sdata, "stsr_prior")
        assert np.isfinite(out).all() and out.sum() > 0
        assert sdata.attrs["stsr"]["stsr_prior"]["image_scale"] == round(pixel_size / 0.75)
    with pytest.raises(ValueError, match="spot"):
        stsr.tl.prior_map(sd.deepcopy(small), "he", ["gene_000"], pixel_size=200.0, progress=False)


def test_prior_map_device_is_checked_before_work():
    import torch

    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=3, seed=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            stsr.tl.prior_map(sdata, "he", ["gene_000"], device="cuda", progress=False)
    stsr.tl.prior_map(sdata, "he", ["gene_000"], device="cpu", progress=False)
    assert _values(sdata, "stsr_prior").sum() > 0

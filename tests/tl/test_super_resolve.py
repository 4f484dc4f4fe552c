"""End-to-end ``stsr.tl.super_resolve`` on synthetic and real slides (a small untrained network keeps it fast:
these tests check the mechanics — alignment, consistency, invariances, storage — not accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch
from spatialdata.transformations import get_transformation

import stsr
from stsr.models import ModelConfig, STSRModel
from stsr.pp import spots_observation_model
from stsr.tl._inputs import expected_inputs, prepare_inputs, teacher_image_scale
from stsr.tl._tiling import plan_tiles

GENES = ["gene_000", "gene_001", "gene_002"]


@pytest.fixture(scope="module")
def model(tiny_model) -> STSRModel:
    return tiny_model


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(450, 450), n_genes=4, seed=3)


def _run(sdata, model, **kw) -> np.ndarray:
    sdata = sd.deepcopy(sdata) if kw.pop("copy", True) else sdata
    # the diffusion core alone unless a test asks for the prior (the self-check is tested on its own)
    kw = {
        "steps": 2,
        "tile_size": 32,
        "overlap": 12,
        "batch_size": 4,
        "progress": False,
        "semantic_prior": False,
        **kw,
    }
    stsr.tl.super_resolve(sdata, "he", kw.pop("genes", GENES), model=model, **kw)
    return sdata, np.asarray(sdata[kw.get("key_added", "stsr")]["scale0"]["image"].values)


def test_output_overlays_image_and_reproduces_spot_counts(slide, model):
    sdata, out = _run(slide, model)
    element = sdata["stsr"]
    assert list(element["scale0"]["image"].coords["c"].values) == GENES
    assert out.dtype == np.float32 and out.min() >= 0
    # the raster sits on the HR grid of the image: its transformation maps grid pixel (i, j) to i * 5.5 um
    t = get_transformation(element, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(t)[:2], 5.5, rtol=1e-6)
    # consistency: pooling the output over each spot gives its expected count (the counts as Poisson draws)
    grid = stsr.pp.hr_grid(sdata, "he", 5.5)
    op = spots_observation_model(sdata, "spots", grid, "he")
    table = sdata["table"]
    counts = table[:, GENES].X
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    pooled = op.pool(out.astype(np.float64))
    totals = np.asarray(table.X.sum(1)).ravel()  # every gene's counts: the spots' size factors
    want = op.expected_counts(counts.T, empty=totals == 0, depth=totals)  # spots without any count stay empty
    assert not np.allclose(want, counts.T)  # a low-count slide: the expected counts differ from the counts
    has = counts.T > 0
    np.testing.assert_allclose(pooled[has], want[has], rtol=1e-4)
    # with poisson=False every spot keeps its measured count
    measured, raw = _run(slide, model, poisson=False)
    np.testing.assert_allclose(op.pool(raw.astype(np.float64))[has], counts.T[has], rtol=1e-4)
    assert measured["stsr"].attrs["stsr"]["counts"] == "measured"
    assert (
        sdata["stsr"].attrs["stsr"]["counts"] == "expected (poisson; each spot's total count its size factor)"
    )
    # provenance
    prov = sdata["stsr"].attrs["stsr"]
    assert prov["genes"] == GENES and prov["steps"] == 2 and prov["stsr_version"] == stsr.__version__
    assert sdata.attrs["stsr"]["stsr"]["pixel_size"] == pytest.approx(5.5)


def test_same_result_for_batch_sizes_and_tilings(slide, model):
    _, ref = _run(slide, model, batch_size=4)
    _, batch1 = _run(slide, model, batch_size=1)
    np.testing.assert_allclose(batch1, ref, rtol=1e-4, atol=1e-5)
    _, other = _run(slide, model, tile_size=40, overlap=16)
    _, reseeded = _run(slide, model, seed=1)
    # different tiles give the network different context, so the outputs agree closely, not bitwise: the change
    # from re-tiling must be small next to the sampling spread (another seed), which is what a seam or a misplaced
    # tile would exceed (measured: 0.11 vs 0.87 with the untrained test network)
    rel_tiling = np.abs(other - ref).sum() / np.abs(ref).sum()
    rel_seed = np.abs(reseeded - ref).sum() / np.abs(ref).sum()
    assert rel_tiling < 0.25 * rel_seed, (rel_tiling, rel_seed)
    assert np.corrcoef(other.ravel(), ref.ravel())[0, 1] > 0.97


def test_cache_interval_is_recorded_checked_and_keeps_the_spot_sums(slide, model):
    sdata, exact = _run(slide, model, steps=4, cache_interval=1)
    cached_sdata, cached = _run(slide, model, steps=4, cache_interval=2)
    assert sdata["stsr"].attrs["stsr"]["cache_interval"] == 1
    assert cached_sdata["stsr"].attrs["stsr"]["cache_interval"] == 2
    assert np.abs(cached - exact).max() > 0  # the cached steps were used
    grid = stsr.pp.hr_grid(cached_sdata, "he", 5.5)
    op = spots_observation_model(cached_sdata, "spots", grid, "he")
    counts = np.asarray(cached_sdata["table"][:, GENES].X.todense()).T
    totals = np.asarray(cached_sdata["table"].X.sum(1)).ravel()  # the spots' size factors
    has = counts > 0
    np.testing.assert_allclose(
        op.pool(cached.astype(np.float64))[has],
        op.expected_counts(counts, empty=totals == 0, depth=totals)[has],
        rtol=1e-4,
    )
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="interval"):
            stsr.tl.super_resolve(sd.deepcopy(slide), "he", GENES, model=model, cache_interval=bad)


@pytest.mark.slow
def test_distributed_cluster_runs_the_tiles_on_the_workers_with_the_same_result(slide, model, tmp_path):
    """With an active client the diffusion core runs on the workers (the cluster's task log shows the tile
    batches) and the map equals the in-process one bit for bit (with the same torch thread count: one, as each
    worker of this cluster uses); a worker killed mid-run costs only a retry."""
    import torch
    from dask.distributed import Client, LocalCluster, get_task_stream

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a convolution's sums follow the thread count
    try:
        _, ref = _run(slide, model)
    finally:
        torch.set_num_threads(threads)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            with get_task_stream(client) as stream:
                _, dist = _run(slide, model)
            batches = [t for t in stream.data if "run_tile_batch" in str(t["key"])]
            on_workers = {t["worker"] for t in batches}
            assert len(batches) >= 2
            assert on_workers <= set(client.scheduler_info()["workers"]) and on_workers
            # a worker process dies in its first batch: the batch is rerun elsewhere, the map is unchanged
            marker = tmp_path / "died"
            client.run(_die_in_first_batch, str(marker))
            _, again = _run(slide, model)
            assert marker.exists()
    np.testing.assert_array_equal(dist, ref)
    np.testing.assert_array_equal(again, ref)


def _die_in_first_batch(marker: str) -> None:
    """On a worker: make the next tile batch of the first worker to get one kill its process (once)."""
    import os
    import signal

    from stsr.tl import _tile_job

    original = _tile_job.run_tile_batch

    def dying(job, index):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # only the first worker to get here dies
        except FileExistsError:
            return original(job, index)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    _tile_job.run_tile_batch = dying


def test_seed_changes_samples_and_n_samples_gives_std(slide, model):
    _, a = _run(slide, model, consistency=False)
    _, b = _run(slide, model, consistency=False, seed=1)
    assert np.abs(a - b).max() > 0
    sdata, _ = _run(slide, model, n_samples=2)
    std = np.asarray(sdata["stsr_std"]["scale0"]["image"].values)
    assert std.shape == (3, *sdata["stsr"]["scale0"]["image"].shape[1:]) and std.max() > 0


def test_backed_store_resume_and_untouched_neighbours(slide, model, tmp_path, monkeypatch):
    path = tmp_path / "slide.zarr"
    sd.deepcopy(slide).write(path)
    sdata = sd.read_zarr(path)
    he_before = sorted(str(p.relative_to(path)) for p in (path / "images" / "he").rglob("*"))
    calls = {"n": 0}
    original = STSRModel.sample

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(STSRModel, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(sdata, model, copy=False, batch_size=2)
    assert "stsr" not in sdata.images and not (path / "images" / "stsr").exists()
    calls["n"] = 10  # no more interruptions; count the batches of the resumed run
    sdata = sd.read_zarr(path)
    _, out = _run(sdata, model, copy=False, batch_size=2)
    inputs = prepare_inputs(
        sdata, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
    )
    n_tiles = plan_tiles(inputs.grid.shape, 32, 12, inputs.mask).n_tiles
    assert calls["n"] - 10 == -(
        -(n_tiles - 4) // 2
    )  # 2 batches of 2 tiles were finished before the interruption
    # the resumed result equals an uninterrupted run
    monkeypatch.undo()
    _, ref = _run(slide, model, batch_size=2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    back = sd.read_zarr(path)
    np.testing.assert_allclose(np.asarray(back["stsr"]["scale0"]["image"].values), ref, rtol=1e-4, atol=1e-5)
    assert sorted(str(p.relative_to(path)) for p in (path / "images" / "he").rglob("*")) == he_before
    assert back.attrs["stsr"]["stsr"]["genes"] == GENES
    assert not (tmp_path / "slide.zarr.stsr-cache").exists()
    with pytest.raises(ValueError, match="overwrite=True"):
        _run(back, model, copy=False)


def test_bad_inputs_raise_clear_errors_and_change_nothing(slide, model):
    sdata = sd.deepcopy(slide)
    keys = sorted(name for _, name, _ in sdata.gen_elements())
    with pytest.raises((KeyError, ValueError), match="he"):
        stsr.tl.super_resolve(sdata, "hee", GENES, model=model)
    with pytest.raises((KeyError, ValueError), match="gene_01"):
        stsr.tl.super_resolve(sdata, "he", ["gene_01x"], model=model)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            stsr.tl.super_resolve(sdata, "he", GENES, model=model, batch_size=bad)
    fluo = STSRModel(ModelConfig(image_channels=2, width=8, hist_width=8, groups=4))
    with pytest.raises(ValueError, match="channel"):
        stsr.tl.super_resolve(sdata, "he", GENES, model=fluo)
    table = sdata["table"]
    zero = table.copy()
    zero.X = zero.X * 0
    sdata.tables["table"] = zero
    with pytest.raises(ValueError, match="no counts"):
        stsr.tl.super_resolve(sdata, "he", GENES, model=model)
    sdata.tables["table"] = table
    assert sorted(name for _, name, _ in sdata.gen_elements()) == keys


def test_unrelated_coordinate_systems_are_refused(slide, model):
    from spatialdata.transformations import Identity, remove_transformation, set_transformation

    sdata = sd.deepcopy(slide)
    set_transformation(sdata["spots"], Identity(), "elsewhere")
    remove_transformation(sdata["spots"], "global")
    with pytest.raises(ValueError, match="share no coordinate system"):
        stsr.tl.super_resolve(sdata, "he", GENES, model=model)
    assert "stsr" not in sdata.images


def test_real_her2st_crop(her2st_c2_crop, model):
    """A real slide: the HR map overlays the H&E and reproduces the measured spots."""
    sdata = her2st_c2_crop(2500, 3700)
    genes = ["ERBB2", "CD74"]
    stsr.tl.super_resolve(sdata, "he", genes, model=model, steps=2, tile_size=32, overlap=12, progress=False)
    out = np.asarray(sdata["stsr"]["scale0"]["image"].values)
    assert out.shape[0] == 2 and out.max() > 0
    prov = sdata["stsr"].attrs["stsr"]
    assert prov["pixel_size"] == pytest.approx(10.0)  # a tenth of the 100 um spot diameter


@pytest.mark.parametrize("lattice", ["square", "hex"])
def test_output_mask_fills_the_gaps_between_spots_but_not_beyond(lattice):
    from stsr.observation import ObservationModel
    from stsr.tl._inputs import _between_spots

    pitch, radius = 10.0, 2.75  # grid pixels; the Visium ratio (55 µm disks at 100 µm pitch)
    if lattice == "square":
        centres = np.array([(20 + pitch * i, 20 + pitch * j) for i in range(4) for j in range(4)])
    else:
        centres = np.array(
            [
                (20 + pitch * np.sqrt(3) / 2 * i, 20 + pitch * (j + 0.5 * (i % 2)))
                for i in range(5)
                for j in range(4)
            ]
        )
    op = ObservationModel.disks((80, 80), centres, radius)
    mask = _between_spots(op)
    covered = op.coverage > 0
    assert (mask >= covered).all()
    # every pixel inside the lattice (between the outermost spot centres) is in the mask
    lo, hi = centres.min(0), centres.max(0)
    rr, cc = np.mgrid[0:80, 0:80] + 0.5
    inside = (rr >= lo[0]) & (rr <= hi[0]) & (cc >= lo[1]) & (cc <= hi[1])
    if lattice == "hex":
        inside &= (cc >= lo[1] + pitch / 2) & (cc <= hi[1] - pitch / 2)  # the staggered rows' ragged edge
    assert mask[inside].all()
    # nothing beyond the outermost spots' edges, and far corners stay empty
    outside = (rr < lo[0] - radius - 1) | (rr > hi[0] + radius + 1) | (cc < lo[1] - radius - 1)
    outside |= cc > hi[1] + radius + 1
    assert not mask[outside].any()
    assert mask.mean() < 0.6


def _whole_slide_prior(slide):
    """The slide's inputs and the array-level semantic prior from teacher features of the whole image (the
    reference that the window-by-window computation of ``super_resolve`` must reproduce)."""
    from stsr.models import semantic_prior, teacher_features
    from stsr.tl._image_tiles import ImageSource

    inputs = expected_inputs(
        prepare_inputs(
            slide, "he", GENES, table_key=None, pixel_size=None, coordinate_system=None, image_channels=3
        )
    )
    h, w = inputs.grid.shape
    image = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs)).region(0, 0, h, w)
    return inputs, semantic_prior(
        teacher_features(image, (h, w)), inputs.lr, inputs.observation, mask=inputs.mask
    )


def test_semantic_prior_reweights_the_mean_and_keeps_the_spot_sums(slide, model, monkeypatch):
    """``semantic_prior=True`` is the array-level prior (whole-image teacher features, read-out fitted on the spots)
    applied to the plain result, whatever the teacher's windows; the spot sums are kept."""
    from stsr.models import apply_prior
    from stsr.tl import _semantic_prior

    _, plain = _run(slide, model)
    monkeypatch.setattr(_semantic_prior, "PRIOR_WINDOW", 48)  # several windows with halos
    sdata, out = _run(slide, model, semantic_prior=True, self_check=False)
    inputs, prior = _whole_slide_prior(slide)
    op = inputs.observation
    expected = apply_prior(plain, prior, inputs.lr, op) * inputs.mask
    assert not np.allclose(out, plain, rtol=0.05)  # the prior changes the map ...
    np.testing.assert_allclose(out, expected, rtol=2e-3, atol=1e-4 * plain.max())  # ... exactly as specified
    has = inputs.lr > 0
    np.testing.assert_allclose(op.pool(out.astype(np.float64))[has], inputs.lr[has], rtol=1e-4)
    prov = sdata["stsr"].attrs["stsr"]
    assert prov["semantic_prior"] and prov["prior_strength"] == 0.5 and len(prov["teacher_sha256"]) == 64
    # on large slides the principal axes come from a subset of the windows: nearly the same map, same spot sums
    monkeypatch.setattr(_semantic_prior, "PRIOR_PCA_WINDOWS", 2)
    _, sub = _run(slide, model, semantic_prior=True, self_check=False)
    assert np.corrcoef(sub.ravel(), out.ravel())[0, 1] > 0.98
    np.testing.assert_allclose(op.pool(sub.astype(np.float64))[has], inputs.lr[has], rtol=1e-4)
    with pytest.raises(ValueError, match="prior_strength"):
        _run(slide, model, semantic_prior=True, prior_strength=-1.0)


def test_a_failed_semantic_prior_removes_its_scores_but_keeps_an_earlier_runs_tiles(
    slide, model, tmp_path, monkeypatch
):
    """The prior's scores live in the cache; when the prior fails they go, and the cache folder with them unless it
    still holds the tile store of an interrupted run (kept so that the next run resumes)."""
    from stsr.tl import _semantic_prior

    teacher = _semantic_prior.teacher_features

    def broken(*args, **kwargs):  # fails once the scores' store is created (the second pass over the windows)
        if any((tmp_path / "cache").rglob("prior_scores.zarr")):
            raise RuntimeError("teacher failed")
        return teacher(*args, **kwargs)

    monkeypatch.setattr(_semantic_prior, "PRIOR_FEATURE_CACHE_BYTES", 0)  # every window read again
    monkeypatch.setattr(_semantic_prior, "teacher_features", broken)
    with pytest.raises(RuntimeError, match="teacher failed"):
        _run(slide, model, semantic_prior=True, self_check=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    from stsr.tl._cache import MARKER

    earlier = tmp_path / "cache" / "stsr" / "tiles.zarr"
    earlier.mkdir(parents=True)
    (earlier.parent / MARKER).touch()  # an interrupted run's folder
    with pytest.raises(RuntimeError, match="teacher failed"):
        _run(slide, model, semantic_prior=True, self_check=False, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "stsr").iterdir()) == [MARKER, "tiles.zarr"]


def test_settings_left_to_the_device_follow_it_and_given_ones_are_kept(slide, model, monkeypatch):
    from stsr.tl import _super_resolve as S

    assert S.device_defaults(torch.device("cpu"))["model"] == "fast"
    assert S.device_defaults(torch.device("cuda"))["cache_interval"] == 1
    # on this CPU: what was left at None comes from DEVICE_DEFAULTS and is recorded, what was given is used
    monkeypatch.setitem(
        S.DEVICE_DEFAULTS, "cpu", {**S.DEVICE_DEFAULTS["cpu"], "tile_size": 40, "overlap": 12}
    )
    sdata = sd.deepcopy(slide)
    stsr.tl.super_resolve(
        sdata, "he", GENES, model=model, steps=1, semantic_prior=False, progress=False, batch_size=2
    )
    prov = sdata.attrs["stsr"]["stsr"]
    assert prov["device_defaults"] == {"cache_interval": 2, "tile_size": 40, "overlap": 12}
    assert (prov["model"], prov["cache_interval"], prov["overlap"]) == (model.name, 2, 12)
    # a tile side left to the device is fitted to the grid between half and all of it (the least work)
    assert 20 <= prov["tile_size"] <= 40 and prov["tile_size"] % 4 == 0
    # the model itself left to the device: the shipped 'fast' weights on a CPU
    sdata = sd.deepcopy(slide)
    stsr.tl.super_resolve(sdata, "he", GENES, steps=1, semantic_prior=False, progress=False, tile_size=32)
    prov = sdata.attrs["stsr"]["stsr"]
    assert prov["model"] == "fast" and prov["device_defaults"]["model"] == "fast"


def test_experimental_lr_inputs_are_refused_before_any_work(slide, model):
    """Models trained on another LR input (the prior-guided experiment, without shipped weights) are not run by
    super_resolve: a clear error before anything is prepared."""
    import copy

    guided = copy.deepcopy(model)
    guided.config = guided.config.replace(extra={"lr_input": "prior_guide", "prior_strength": 0.5})
    sdata = sd.deepcopy(slide)
    with pytest.raises(ValueError, match="shipped 'default' or 'fast'"):
        _run(sdata, guided, copy=False, semantic_prior=True, self_check=False)
    assert "stsr" not in sdata

"""Tile plans, blending, the resumable tile store, lazy image crops and safe writes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
import xarray as xr
from spatialdata.models import Image2DModel

from stsr.observation import Grid
from stsr.tl._image_tiles import ImageSource
from stsr.tl._store import TileStore
from stsr.tl._tiling import assemble, blend_weights, plan_tiles
from stsr.tl._write import add_elements


def test_plan_covers_grid_and_respects_mask():
    plan = plan_tiles((100, 130), 32, 8)
    covered = np.zeros((100, 130), bool)
    for r, c in plan.origins:
        assert r + 32 <= 100 and c + 32 <= 130
        covered[r : r + 32, c : c + 32] = True
    assert covered.all()
    mask = np.zeros((100, 130), bool)
    mask[5:20, 5:20] = True
    masked = plan_tiles((100, 130), 32, 8, mask)
    assert 0 < masked.n_tiles < plan.n_tiles
    assert all(r < 20 and c < 20 for r, c in masked.origins)


def test_plan_errors_name_the_fix():
    with pytest.raises(ValueError, match="smaller tile_size"):
        plan_tiles((20, 200), 32, 8)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles((100, 100), 32, 32)


def test_blend_is_seamless_and_exact_for_a_smooth_field():
    """Tiles cut from one field blend back to exactly that field, for any tile size and overlap."""
    rng = np.random.default_rng(0)
    field = rng.random((3, 90, 117)).astype(np.float32)
    for tile, overlap in [(32, 8), (40, 0), (48, 20)]:
        plan = plan_tiles(field.shape[1:], tile, overlap)
        tiles = np.stack([field[:, r : r + tile, c : c + tile] for r, c in plan.origins])
        out = assemble(tiles, plan, chunk=37).compute()
        np.testing.assert_allclose(out, field, rtol=1e-6)
    w = blend_weights(32, 8)
    assert w.min() > 0 and w[16, 16] == 1.0
    # a cross-fade: disagreeing neighbours give a smooth transition, no jump larger than the ramp step
    plan = plan_tiles((32, 56), 32, 8)
    tiles = np.stack([np.zeros((1, 32, 32)), np.ones((1, 32, 32))]).astype(np.float32)
    row = assemble(tiles, plan).compute()[0, 10]
    assert row[0] == 0 and row[-1] == 1
    assert np.all(np.diff(row) >= 0) and np.max(np.diff(row)) < 0.25


def test_tile_store_resumes_and_rebuilds_on_new_params(tmp_path):
    store = TileStore(tmp_path / "t.zarr", 4, 2, 8, {"seed": 0}, with_std=False)
    store.write(np.array([2]), np.full((1, 2, 8, 8), 3.0), None)
    again = TileStore(tmp_path / "t.zarr", 4, 2, 8, {"seed": 0}, with_std=False)
    np.testing.assert_array_equal(again.done(), [False, False, True, False])
    assert float(again.mean[2].mean()) == 3.0
    other = TileStore(tmp_path / "t.zarr", 4, 2, 8, {"seed": 1}, with_std=False)
    assert not other.done().any()


def test_image_source_reads_the_right_pixels():
    h, w = 300, 400
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h, np.zeros_like(xx)])
    level = xr.DataArray(da.from_array(img, chunks=(3, 64, 64)), dims=("c", "y", "x"))
    grid = Grid((30, 40), 10.0)  # HR pixel = 10 image px, model wants 4 model px per HR px = 2.5 image px
    source = ImageSource([level], grid, image_scale=4)
    tiles = source.tiles(np.array([[3, 5], [10, 20]]), 8)
    assert tiles.shape == (2, 3, 32, 32)
    j = np.arange(32)
    expected_x = (200 + (j + 0.5) * 2.5) / w  # tile 2 starts at image column 20 * 10
    np.testing.assert_allclose(tiles[1, 0, 7].numpy(), expected_x, atol=2e-3)
    expected_y = (100 + (j + 0.5) * 2.5) / h
    np.testing.assert_allclose(tiles[1, 1, :, 7].numpy(), expected_y, atol=2e-3)


def _raster(values: np.ndarray) -> xr.DataTree:
    return Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=["a", "b"], scale_factors=[2])


def test_add_elements_to_a_backed_store_touches_nothing_else(tmp_path):
    base = Image2DModel.parse(np.zeros((1, 16, 16), np.float32), dims=("c", "y", "x"))
    sdata = sd.SpatialData(images={"keep": base})
    sdata.write(tmp_path / "s.zarr")
    sdata = sd.read_zarr(tmp_path / "s.zarr")
    before = sorted(p.name for p in (tmp_path / "s.zarr" / "images" / "keep").rglob("*"))
    values = np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
    add_elements(sdata, {"new": _raster(values)}, {"model": "m"}, tmp_path / "staging", overwrite=False)
    after = sorted(p.name for p in (tmp_path / "s.zarr" / "images" / "keep").rglob("*"))
    assert before == after
    back = sd.read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back["new"]["scale0"]["image"].values, values)
    assert back.attrs["stsr"]["new"]["model"] == "m"
    assert sdata["new"].attrs["stsr"]["model"] == "m"
    with pytest.raises(ValueError, match="overwrite=True"):
        add_elements(sdata, {"new": _raster(values)}, {}, tmp_path / "staging", overwrite=False)


def test_failed_overwrite_restores_the_store(tmp_path, monkeypatch):
    values = np.ones((2, 16, 16), np.float32)
    sdata = sd.SpatialData(images={"new": _raster(values)})
    sdata.write(tmp_path / "s.zarr")
    sdata = sd.read_zarr(tmp_path / "s.zarr")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write_consolidated_metadata", boom)  # after the swap: rolled back
    with pytest.raises(OSError, match="disk full"):
        add_elements(sdata, {"new": _raster(values * 7)}, {}, tmp_path / "staging", overwrite=True)
    monkeypatch.undo()
    back = sd.read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(back["new"]["scale0"]["image"].values, values)
    np.testing.assert_array_equal(sdata["new"]["scale0"]["image"].values, values)


def test_tiles_fit_small_grids_with_the_least_work_and_given_sizes_stay_on_large_ones():
    from stsr.tl._tiling import fit_tiles, plan_tiles

    def work(shape, tile, overlap):
        return plan_tiles(shape, tile, overlap).n_tiles * tile**2

    # a grid smaller than the tile: 2 x 2 tiles of 100 over 182 px, not 2 x 2 of 180 (almost all overlap)
    assert fit_tiles((182, 182), 248, 12) == (100, 12)
    assert work((182, 182), 100, 12) < 0.35 * work((182, 182), 180, 12)
    # a grid that one tile covers exactly keeps it; the tile stays a multiple of 4
    assert fit_tiles((64, 64), 248, 12) == (64, 12)
    assert fit_tiles((61, 90), 248, 12)[0] % 4 == 0
    # a tile the user gave is kept where it fits; one left to the device is searched between half and all of it
    assert fit_tiles((330, 350), 248, 12) == (248, 12)
    tile, overlap = fit_tiles((330, 350), 248, 12, search=True)
    assert 124 <= tile < 248 and work((330, 350), tile, overlap) < 0.6 * work((330, 350), 248, 12)
    # on the capture area 248 is already the least work, and every tile of the plan stays inside the grid
    assert fit_tiles((1182, 1182), 248, 12, search=True) == (248, 12)
    plan = plan_tiles((330, 350), tile, overlap)
    assert (plan.origins >= 0).all() and (plan.origins + tile <= np.array([330, 350])).all()
    with pytest.raises(ValueError, match="too small"):
        fit_tiles((6, 100), 248, 12)

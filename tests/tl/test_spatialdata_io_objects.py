"""Objects made by spatialdata-io readers are super-resolved unchanged (Space Ranger Visium and Visium HD layouts
written from real HER2ST and DBiT-seq data, and a Visium layout of a synthetic slide on Visium's hexagonal
lattice)."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata_io as sdio
from spaceranger_writer import write_visium_folder, write_visium_hd_folder

import stsr
from stsr.tl._inputs import expected_inputs, prepare_inputs


def _pooled_matches_counts(sdata, image_key, table_key, genes, key="stsr"):
    out = np.asarray(sdata[key]["scale0"]["image"].values, dtype=np.float64)
    prov = sdata[key].attrs["stsr"]
    inputs = prepare_inputs(
        sdata,
        image_key,
        genes,
        table_key=table_key,
        pixel_size=prov["pixel_size"],
        coordinate_system=prov["coordinate_system"],
        image_channels=3,
    )
    pooled = inputs.observation.pool(out)
    want = expected_inputs(inputs).lr  # the counts as Poisson draws (poisson=True), empty spots kept empty
    has = want > 1e-6
    np.testing.assert_allclose(pooled[has], want[has], rtol=1e-4)


def test_visium_folder_read_by_spatialdata_io(tmp_path, data_dir, tiny_model):
    genes = ["ERBB2", "CD74"]
    kw = write_visium_folder("C2", tmp_path / "visium", genes=genes)
    sdata = sdio.visium(tmp_path / "visium", **kw)
    image_key = f"{kw['dataset_id']}_hires_image"
    stsr.tl.super_resolve(
        sdata,
        image_key,
        genes,
        model=tiny_model,
        steps=2,
        tile_size=128,  # the whole section: few tiles keep the test fast
        overlap=12,
        progress=False,
        semantic_prior=False,  # reading the object is tested here; the default path on C2 in test_whole_slide
    )
    prov = sdata["stsr"].attrs["stsr"]
    # the dataset's coordinate system is in full-resolution pixels: a tenth of the 145 px spot diameter
    assert prov["coordinate_system"] == kw["dataset_id"]
    assert prov["pixel_size"] == pytest.approx(14.5, rel=0.01)
    # the new raster lives in every coordinate system of the image
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(sdata["stsr"], get_all=True)) == set(
        get_transformation(sdata[image_key], get_all=True)
    )
    _pooled_matches_counts(sdata, image_key, None, genes)


def test_visium_hd_square_bins(tmp_path, data_dir, tiny_model):
    kw = write_visium_hd_folder(tmp_path / "hd", n_genes=40)
    sdata = sdio.visium_hd(tmp_path / "hd", **kw)
    image_key = [k for k in sdata.images if k.endswith("hires_image")][0]
    table_key = [k for k in sdata.tables if k.startswith("square_")][0]
    genes = [str(g) for g in sdata[table_key].var_names[:2]]
    # 16 px bins (50 um) at 4 HR pixels per bin side keep the test fast
    stsr.tl.super_resolve(
        sdata,
        image_key,
        genes,
        model=tiny_model,
        pixel_size=4.0,
        steps=2,
        tile_size=48,
        overlap=12,
        batch_size=16,
        progress=False,
    )
    prov = sdata["stsr"].attrs["stsr"]
    inputs = prepare_inputs(
        sdata,
        image_key,
        genes,
        table_key=table_key,
        pixel_size=prov["pixel_size"],
        coordinate_system=prov["coordinate_system"],
        image_channels=3,
    )
    assert inputs.observation.kind == "squares" and inputs.observation.is_disjoint
    # the reader's coordinates are the full-resolution image's pixels: 50 um bins of 16 px are 3.125 um per unit,
    # read off the bins' name (square_050um), so the image is read at its physical scale
    assert inputs.um_per_unit == pytest.approx(50 / 16) == pytest.approx(prov["um_per_unit"])
    assert "Visium HD (50 µm bins)" in prov["um_per_unit_from"]
    # bins start on pixel edges: each owns whole pixels (4 x 4 HR pixels per 16 px bin)
    np.testing.assert_allclose(inputs.observation.support_area[inputs.observation.support_area > 15], 16.0)
    _pooled_matches_counts(sdata, image_key, table_key, genes)


def test_visium_hexagonal_lattice_in_image_pixels(tmp_path):
    """A Visium slide as ``spatialdata_io.visium`` reads it: a hexagonal lattice in full-resolution pixels, circles
    of Space Ranger's 65 µm ``spot_diameter_fullres``, the hires image (half the full resolution) placed by its scale
    factor. The unit is read off the pitch: 0.5 µm per pixel, the slide's own (read off the 65 µm circles as 55 µm
    spots it was 0.42, and the image teacher read the H&E at another scale). ``prior_map`` with its defaults, on the
    same HR grid (5.5 µm = 11 pixels), gives the map it gives on the slide in micrometres, spread over the footprints
    the reader gives: each spot's count over a 65 µm disk, so the map's counts per pixel are (55 / 65)^2 of those
    over the 55 µm disks."""
    from spaceranger_writer import write_synthetic_visium_folder

    slide = stsr.datasets.synthetic(size_um=(800.0, 800.0), n_genes=4, um_per_px=0.5, seed=3)
    genes = [str(g) for g in slide["table"].var_names[:3]]
    kw = write_synthetic_visium_folder(slide, tmp_path / "visium", hires_size=800)
    sdata = sdio.visium(tmp_path / "visium", **kw)
    image_key = f"{kw['dataset_id']}_hires_image"
    stsr.tl.prior_map(sdata, image_key, genes, pixel_size=11.0, key_added="px", progress=False)
    stsr.tl.prior_map(slide, "he", genes, pixel_size=5.5, key_added="um", progress=False)
    px, um = sdata.attrs["stsr"]["px"], slide.attrs["stsr"]["um"]
    assert px["um_per_unit"] == pytest.approx(0.5, rel=1e-3)
    assert "visium" in px["um_per_unit_from"]
    assert px["image_scale"] == um["image_scale"] == 7
    a = np.asarray(sdata["px"]["scale0"]["image"].values, np.float64)
    b = np.asarray(slide["um"]["scale0"]["image"].values, np.float64)
    assert a.shape == b.shape
    for g in range(len(genes)):
        tissue = (a[g] > 0) & (b[g] > 0)
        assert tissue.mean() > 0.3
        assert np.corrcoef(a[g][tissue], b[g][tissue])[0, 1] > 0.95
        assert a[g].sum() / b[g].sum() == pytest.approx((55 / 65) ** 2, rel=0.05)

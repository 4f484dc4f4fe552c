"""Space Ranger layout export: HER2ST as Visium, DBiT-seq as Visium HD, read back with spatialdata-io.

These also pin the structure of what :func:`spatialdata_io.visium` / :func:`spatialdata_io.visium_hd` return
(element names, coordinate systems, transformations, table keys), which :func:`stsr.tl.super_resolve` must accept.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile

import numpy as np
import pandas as pd
import pytest
import spatialdata_io as sdio
from spaceranger_writer import write_visium_folder, write_visium_hd_folder
from spatialdata.models import get_table_keys
from spatialdata.transformations import (
    Identity,
    Scale,
    get_transformation,
    get_transformation_between_coordinate_systems,
)

SECTION = "C2"
N_GENES = 200


def _quiet(reader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(*args, **kwargs)


def _affine_xy(sdata, source, target, cs: str) -> np.ndarray:
    """3x3 (x, y) matrix from ``source``'s intrinsic space to ``target``'s, through coordinate system ``cs``."""
    t = get_transformation_between_coordinate_systems(
        sdata, source, target, intermediate_coordinate_systems=cs
    )
    return t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _window_mean(values: np.ndarray, colrow: np.ndarray, half: int) -> np.ndarray:
    out = []
    for c, r in np.floor(colrow).astype(int):
        out.append(values[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1].mean())
    return np.asarray(out)


def _is_tissue(rgb_chw: np.ndarray, colrow: np.ndarray, half: int = 2) -> np.ndarray:
    """The HER2ST README's tissue test on a small window: gray mean in (20, 215) and some colour saturation."""
    img = rgb_chw.astype(float)
    gray = _window_mean(img.mean(0), colrow, half)
    sat = _window_mean(img.max(0) - img.min(0), colrow, half)
    return (gray > 20) & (gray < 215) & (sat > 10)


# ---------------------------------------------------------------------------------------------------------------------
# Visium (HER2ST C2)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_dir(data_dir):
    return data_dir / "her2st"


@pytest.fixture(scope="module")
def visium(tmp_path_factory, her2st_dir):
    folder = tmp_path_factory.mktemp("visium") / "outs"
    kwargs = write_visium_folder(SECTION, folder, data_dir=her2st_dir, n_genes=N_GENES)
    return _quiet(sdio.visium, folder, **kwargs), kwargs, folder


@pytest.fixture(scope="module")
def her2st_tsv(her2st_dir):
    return pd.read_csv(her2st_dir / "counts" / f"{SECTION}.tsv.gz", sep="\t", index_col=0)


@pytest.fixture(scope="module")
def her2st_spots(her2st_dir):
    spots = pd.read_csv(her2st_dir / "spots" / f"{SECTION}_selection.tsv", sep="\t")
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    return spots


def test_visium_files(visium):
    _, kwargs, folder = visium
    assert kwargs == {"dataset_id": f"her2st_{SECTION}"}
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names == {
        "filtered_feature_bc_matrix.h5",
        "spatial/tissue_positions.csv",
        "spatial/scalefactors_json.json",
        "spatial/tissue_hires_image.png",
        "spatial/tissue_lowres_image.png",
    }
    header = (folder / "spatial" / "tissue_positions.csv").read_text().splitlines()[0]
    assert header == "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def test_visium_structure(visium):
    sdata, kwargs, _ = visium
    did = kwargs["dataset_id"]
    assert set(sdata.images) == {f"{did}_hires_image", f"{did}_lowres_image"}
    assert set(sdata.shapes) == {did}
    assert set(sdata.tables) == {"table"}
    assert set(sdata.coordinate_systems) == {did, f"{did}_downscaled_hires", f"{did}_downscaled_lowres"}
    # shapes are in full-resolution pixels: Identity to the dataset's coordinate system
    assert isinstance(get_transformation(sdata.shapes[did], to_coordinate_system=did), Identity)
    for res in ("hires", "lowres"):
        image = sdata.images[f"{did}_{res}_image"]
        assert image.dims == ("c", "y", "x") and image.shape[0] == 3 and image.dtype == np.uint8
        assert isinstance(get_transformation(image, to_coordinate_system=f"{did}_downscaled_{res}"), Identity)
    assert max(sdata.images[f"{did}_hires_image"].shape[1:]) == 2000
    assert max(sdata.images[f"{did}_lowres_image"].shape[1:]) == 600
    assert sdata.attrs["spatialdata_io_reader"] == "visium"


def test_visium_image_scales(visium):
    sdata, kwargs, folder = visium
    did = kwargs["dataset_id"]
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    full_h, full_w = 9911, 9274  # C2 full-resolution JPEG
    for res in ("hires", "lowres"):
        image = sdata.images[f"{did}_{res}_image"]
        t = get_transformation(image, to_coordinate_system=did)
        assert isinstance(t, Scale)
        np.testing.assert_allclose(t.scale, 1 / sf[f"tissue_{res}_scalef"], rtol=1e-12)
        # the image spans the full-resolution frame (to within one image pixel)
        np.testing.assert_allclose(np.asarray(image.shape[1:]) * t.scale, [full_h, full_w], atol=t.scale[0])


def test_visium_spots(visium, her2st_spots):
    sdata, kwargs, folder = visium
    did = kwargs["dataset_id"]
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    circles = sdata.shapes[did]
    table = sdata.tables["table"]
    assert circles.geometry.geom_type.eq("Point").all()
    np.testing.assert_allclose(circles["radius"], sf["spot_diameter_fullres"] / 2)
    # 100 µm spots at ~0.688 µm/px
    assert 100 / 0.70 / 2 < sf["spot_diameter_fullres"] / 2 < 100 / 0.675 / 2
    # table -> shapes link: every row annotates one circle, by instance id
    assert get_table_keys(table) == (did, "region", "spot_id")
    assert (table.obs["region"] == did).all()
    inst = table.obs["spot_id"].to_numpy()
    assert len(np.unique(inst)) == len(table) == len(circles)
    pos = circles.index.get_indexer(inst)
    assert (pos >= 0).all()
    # centres in full-resolution pixels (Space Ranger writes integers)
    ids = table.obs_names.str.removesuffix("-1")
    xy = np.c_[circles.geometry.x.to_numpy()[pos], circles.geometry.y.to_numpy()[pos]]
    expected = her2st_spots.loc[ids, ["pixel_x", "pixel_y"]].to_numpy()
    np.testing.assert_allclose(xy, expected, atol=0.5 + 1e-9)
    np.testing.assert_array_equal(table.obs["array_col"], her2st_spots.loc[ids, "x"])
    np.testing.assert_array_equal(table.obs["array_row"], her2st_spots.loc[ids, "y"])
    np.testing.assert_allclose(table.obsm["spatial"], xy)


def test_visium_counts(visium, her2st_tsv):
    sdata, _, _ = visium
    table = sdata.tables["table"]
    assert table.n_vars == N_GENES
    top = her2st_tsv.sum(axis=0).sort_values(ascending=False, kind="stable").index[:N_GENES]
    assert set(table.var_names) == set(top)
    assert (table.var["feature_types"] == "Gene Expression").all()
    ids = table.obs_names.str.removesuffix("-1")
    assert set(ids) == set(her2st_tsv.index)
    np.testing.assert_array_equal(table.X.toarray(), her2st_tsv.loc[ids, table.var_names].to_numpy())
    assert table.X.sum() > 0


def test_visium_spots_on_tissue(visium):
    sdata, kwargs, _ = visium
    did = kwargs["dataset_id"]
    circles, hires = sdata.shapes[did], sdata.images[f"{did}_hires_image"]
    m = _affine_xy(sdata, circles, hires, did)
    colrow = _apply(m, np.c_[circles.geometry.x, circles.geometry.y])
    rgb = hires.values
    inside = (colrow >= 2).all(1) & (colrow[:, 0] < rgb.shape[2] - 2) & (colrow[:, 1] < rgb.shape[1] - 2)
    assert inside.all()
    assert _is_tissue(rgb, colrow).mean() > 0.8
    rng = np.random.default_rng(0)
    random = rng.uniform([2, 2], [rgb.shape[2] - 3, rgb.shape[1] - 3], size=(1000, 2))
    assert _is_tissue(rgb, random).mean() < 0.4  # the criterion discriminates


def test_visium_options(tmp_path, her2st_dir):
    genes = ["ERBB2", "GRB7", "ACTB"]
    kwargs = write_visium_folder(
        SECTION,
        tmp_path / "o",
        data_dir=her2st_dir,
        genes=genes,
        dataset_id="lib1",
        barcodes="10x",
        prefix_files=True,
        fullres_image=True,
        hires_size=500,
        lowres_size=100,
    )
    assert kwargs == {"dataset_id": "lib1", "fullres_image_file": "tissue_image.jpg"}
    assert (tmp_path / "o" / "lib1_filtered_feature_bc_matrix.h5").is_file()
    # the reader infers the dataset id from the prefixed matrix file
    sdata = _quiet(sdio.visium, tmp_path / "o", fullres_image_file=kwargs["fullres_image_file"])
    table = sdata.tables["table"]
    assert list(table.var_names) == genes
    assert table.obs_names.str.fullmatch(r"[ACGT]{16}-1").all() and table.obs_names.is_unique
    assert set(sdata.images) == {"lib1_full_image", "lib1_hires_image", "lib1_lowres_image"}
    full = sdata.images["lib1_full_image"]["scale0"]["image"]
    assert full.shape == (3, 9911, 9274)
    assert isinstance(
        get_transformation(sdata.images["lib1_full_image"], to_coordinate_system="lib1"), Identity
    )
    assert max(sdata.images["lib1_hires_image"].shape[1:]) == 500


def test_visium_bad_input(tmp_path, her2st_dir):
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        write_visium_folder(SECTION, tmp_path / "a", data_dir=her2st_dir, genes=["ERBB2", "NOT_A_GENE"])
    with pytest.raises(ValueError, match="either"):
        write_visium_folder(SECTION, tmp_path / "b", data_dir=her2st_dir, genes=["ERBB2"], n_genes=3)
    with pytest.raises(ValueError, match="no full-resolution H&E"):
        write_visium_folder("A1", tmp_path / "c", data_dir=her2st_dir)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_visium_folder(SECTION, tmp_path / "d", data_dir=her2st_dir, n_genes=2)
    with pytest.raises(FileExistsError, match="refusing"):
        write_visium_folder(SECTION, tmp_path / "d", data_dir=her2st_dir, n_genes=2, overwrite=True)
    assert (tmp_path / "d" / "keep.txt").read_text() == "x"
    # a previous export is replaced
    small = {"data_dir": her2st_dir, "hires_size": 200, "lowres_size": 50}
    write_visium_folder(SECTION, tmp_path / "e", n_genes=2, **small)
    write_visium_folder(SECTION, tmp_path / "e", genes=["ERBB2"], overwrite=True, **small)
    assert _quiet(sdio.visium, tmp_path / "e", dataset_id="x").tables["table"].var_names.tolist() == ["ERBB2"]


# ---------------------------------------------------------------------------------------------------------------------
# Visium HD (DBiT-seq FFPE-2)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dbit_dir(data_dir):
    return data_dir / "dbit_mouse_embryo_ffpe2"


@pytest.fixture(scope="module")
def hd(tmp_path_factory, dbit_dir):
    folder = tmp_path_factory.mktemp("visium_hd") / "outs"
    kwargs = write_visium_hd_folder(folder, data_dir=dbit_dir, n_genes=N_GENES)
    filtered = _quiet(sdio.visium_hd, folder, **kwargs)
    raw = _quiet(sdio.visium_hd, folder, filtered_counts_file=False, **kwargs)
    return filtered, raw, kwargs, folder


@pytest.fixture(scope="module")
def dbit_head(dbit_dir):
    """The first 40 pixels of the source table (read independently of the writer)."""
    with zipfile.ZipFile(dbit_dir / "FFPE-2_exp_matrix.zip") as z, z.open("FFPE-2_exp_matrix.tsv") as f:
        return pd.read_csv(f, sep="\t", index_col=0, nrows=40)


def _barcode(pixel_id: str, bin_um: int = 50) -> str:
    x, y = (int(v) for v in pixel_id.split("x"))
    return f"s_{bin_um:03d}um_{y - 1:05d}_{x - 1:05d}-1"


def test_hd_files(hd):
    *_, kwargs, folder = hd
    assert kwargs == {"dataset_id": "dbit_ffpe2", "bin_size": 50, "load_segmentations_only": False}
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    b = "binned_outputs/square_050um"
    assert names == {
        "feature_slice.h5",
        "tissue_image.png",
        "spatial/tissue_hires_image.png",
        "spatial/tissue_lowres_image.png",
        "spatial/scalefactors_json.json",
        f"{b}/filtered_feature_bc_matrix.h5",
        f"{b}/raw_feature_bc_matrix.h5",
        f"{b}/spatial/tissue_positions.parquet",
        f"{b}/spatial/scalefactors_json.json",
    }
    sf = json.loads((folder / b / "spatial" / "scalefactors_json.json").read_text())
    assert sf["bin_size_um"] == 50 and sf["microns_per_pixel"] == 25 / 8 and sf["spot_diameter_fullres"] == 16


def test_hd_structure(hd):
    filtered, raw, kwargs, _ = hd
    did = kwargs["dataset_id"]
    shapes_name = f"{did}_square_050um"
    for sdata in (filtered, raw):
        assert set(sdata.images) == {f"{did}_full_image", f"{did}_hires_image", f"{did}_lowres_image"}
        assert set(sdata.shapes) == {shapes_name}
        assert set(sdata.tables) == {"square_050um"}
        assert set(sdata.coordinate_systems) == {did, f"{did}_downscaled_hires", f"{did}_downscaled_lowres"}
        assert isinstance(get_transformation(sdata.shapes[shapes_name], to_coordinate_system=did), Identity)
        assert isinstance(
            get_transformation(sdata.images[f"{did}_full_image"], to_coordinate_system=did), Identity
        )
        for res, scalef in (("hires", 1.0), ("lowres", 600 / 792)):
            t = get_transformation(sdata.images[f"{did}_{res}_image"], to_coordinate_system=did)
            assert isinstance(t, Scale)
            np.testing.assert_allclose(t.scale, 1 / scalef)
        table = sdata.tables["square_050um"]
        assert get_table_keys(table) == (shapes_name, "region", "location_id")
        assert list(table.obs.columns) == ["in_tissue", "array_row", "array_col", "location_id", "region"]
        pos = sdata.shapes[shapes_name].index.get_indexer(table.obs["location_id"])
        assert (pos >= 0).all() and len(set(pos)) == len(table) == len(sdata.shapes[shapes_name])
    assert (
        filtered.tables["square_050um"].n_obs == 2130
        and (filtered.tables["square_050um"].obs["in_tissue"] == 1).all()
    )
    assert (
        raw.tables["square_050um"].n_obs == 2500 and raw.tables["square_050um"].obs["in_tissue"].sum() == 2130
    )


def test_hd_bins_geometry(hd):
    _, raw, kwargs, _ = hd
    did = kwargs["dataset_id"]
    squares = raw.shapes[f"{did}_square_050um"]
    table = raw.tables["square_050um"]
    assert squares.geometry.geom_type.eq("Polygon").all()
    b = squares.geometry.bounds.loc[table.obs["location_id"]].to_numpy()
    np.testing.assert_allclose(b[:, 2] - b[:, 0], 16)  # 50 µm at 3.125 µm/px
    np.testing.assert_allclose(b[:, 3] - b[:, 1], 16)
    np.testing.assert_allclose(squares.geometry.area, 256)
    # centre of DBiT pixel (X, Y) = array (col + 1, row + 1): ((2 (X - 1) + 0.5) * 8, (2 (Y - 1) + 0.5) * 8)
    np.testing.assert_allclose((b[:, 0] + b[:, 2]) / 2, (2 * table.obs["array_col"] + 0.5) * 8)
    np.testing.assert_allclose((b[:, 1] + b[:, 3]) / 2, (2 * table.obs["array_row"] + 0.5) * 8)
    # bins tile the chip: neighbours share edges
    assert squares.geometry.union_all().area == pytest.approx(2500 * 256)


def test_hd_counts(hd, dbit_head):
    filtered, raw, _, _ = hd
    traw, tfil = raw.tables["square_050um"], filtered.tables["square_050um"]
    genes = list(traw.var_names)
    assert len(genes) == N_GENES and list(tfil.var_names) == genes
    rows = traw.obs_names.get_indexer([_barcode(i) for i in dbit_head.index])
    assert (rows >= 0).all()
    np.testing.assert_array_equal(traw.X[rows].toarray(), dbit_head[genes].to_numpy())
    # the filtered matrix is the raw one restricted to bins under tissue
    np.testing.assert_array_equal(tfil.X.toarray(), traw[tfil.obs_names].X.toarray())
    # the one grid position missing from the source, X=7, Y=2 (the README calls it "2x7"), is an all-zero bin
    assert traw[_barcode("7x2")].X.sum() == 0
    assert traw[_barcode("2x7")].X.sum() > 0
    assert (tfil.var["genome"] == "mm10").all()


def test_hd_umi_matches_image(hd):
    _, raw, kwargs, _ = hd
    did = kwargs["dataset_id"]
    squares, image = raw.shapes[f"{did}_square_050um"], raw.images[f"{did}_hires_image"]
    table = raw.tables["square_050um"]
    m = _affine_xy(raw, squares, image, did)
    b = squares.geometry.bounds.loc[table.obs["location_id"]].to_numpy()
    lo, hi = _apply(m, b[:, :2]), _apply(m, b[:, 2:])
    # the DBiT pixel (25 µm) is the central half of its 50 µm bin
    q = (hi - lo) / 4
    lo, hi = np.round(lo + q).astype(int), np.round(hi - q).astype(int)
    gray = image.values.astype(float).mean(0)
    dark = np.array([255 - gray[r0:r1, c0:c1].mean() for (c0, r0), (c1, r1) in zip(lo, hi)])
    log_umi = np.log1p(np.asarray(table.X.sum(axis=1)).ravel())
    assert np.corrcoef(log_umi, dark)[0, 1] > 0.5


def test_hd_footprint_bins(tmp_path, dbit_dir):
    kwargs = write_visium_hd_folder(
        tmp_path / "o", data_dir=dbit_dir, genes=["Hbb-y", "H19"], bin_size_um=25, prefix_files=True
    )
    assert kwargs["bin_size"] == 25
    del kwargs["dataset_id"]  # inferred from the prefixed feature_slice.h5
    sdata = _quiet(sdio.visium_hd, tmp_path / "o", **kwargs)
    squares = sdata.shapes["dbit_ffpe2_square_025um"]
    table = sdata.tables["square_025um"]
    assert list(table.var_names) == ["Hbb-y", "H19"]
    assert "dbit_ffpe2_full_image" in sdata.images
    b = squares.geometry.bounds.loc[table.obs["location_id"]].to_numpy()
    # 25 µm squares exactly on the DBiT pixels: columns [16 (X - 1), 16 (X - 1) + 8)
    np.testing.assert_allclose(b[:, 0], 16 * table.obs["array_col"])
    np.testing.assert_allclose(b[:, 2], 16 * table.obs["array_col"] + 8)
    assert re.fullmatch(r"s_025um_\d{5}_\d{5}-1", table.obs_names[0])


def test_hd_bad_input(tmp_path, dbit_dir):
    with pytest.raises(ValueError, match="bin_size_um"):
        write_visium_hd_folder(tmp_path / "a", data_dir=dbit_dir, bin_size_um=12.5)
    with pytest.raises(FileNotFoundError, match="dataset folder"):
        write_visium_hd_folder(tmp_path / "b", data_dir=tmp_path)

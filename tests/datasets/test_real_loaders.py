"""The real-data loaders: geometry checked against the tissue THROUGH the spatialdata transformations, counts
against the source files, links between tables and shapes, laziness, zarr round trips and the fetcher."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata as sd
from spatialdata.transformations import get_transformation

from stsr._constants import (
    CS_GLOBAL,
    IMAGE_BRIGHTFIELD,
    IMAGE_HE,
    IMAGE_MORPHOLOGY,
    INSTANCE_KEY,
    POINTS_TRANSCRIPTS,
    REGION_KEY,
    SHAPES_CELLS,
    SHAPES_SPOTS,
    TABLE,
)
from stsr.datasets import _fetch
from stsr.datasets._build import SPATIAL_META_KEY, fit_pitch_px, parse_dense_counts
from stsr.datasets._her2st import HER2ST_APP_SECTIONS, HER2ST_SECTIONS, her2st
from stsr.datasets._images import DECODE_COUNT

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------- helpers
def global_to_level_px(image, level: int, xy: np.ndarray) -> np.ndarray:
    """``(x, y)`` in "global" µm -> continuous ``(col, row)`` in pixels of pyramid ``level``, via spatialdata."""
    t = get_transformation(image[f"scale{level}"]["image"], to_coordinate_system=CS_GLOBAL)
    m = t.inverse().to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return xy @ m[:2, :2].T + m[:2, 2]


def centres_global(sdata, key: str) -> np.ndarray:
    """Centroids of a shapes element in "global" µm, via its own transformation."""
    shapes = sd.transform(sdata[key], to_coordinate_system=CS_GLOBAL)
    c = shapes.geometry.centroid
    return np.c_[c.x, c.y]


def affine_xy(element) -> np.ndarray:
    """The element's only transformation, to "global", as a 3 x 3 affine matrix over (x, y)."""
    transformations = get_transformation(element, get_all=True)
    assert list(transformations) == [CS_GLOBAL]
    return transformations[CS_GLOBAL].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def gray(image, level: int) -> np.ndarray:
    return image[f"scale{level}"]["image"].values.astype(np.float64).mean(0)


def tissue(g: np.ndarray, background_masked: bool) -> np.ndarray:
    """The READMEs' tissue test: gray mean in (20, 215), neither black mask nor white background. For slides
    whose background is darker than 215 (HER2ST B4: ~217) the upper bound is lowered to 10 below the background
    level (the 90th gray percentile)."""
    upper = 215.0 if background_masked else min(215.0, np.percentile(g, 90) - 10)
    return (g > 20) & (g < upper)


def sample(values: np.ndarray, colrow: np.ndarray, outside: float | None = None) -> np.ndarray:
    """Pixel values at continuous ``(col, row)`` positions; positions outside the image fail the test, unless
    ``outside`` gives their value."""
    idx = np.floor(colrow).astype(int)
    inside = (
        (idx[:, 0] >= 0) & (idx[:, 1] >= 0) & (idx[:, 0] < values.shape[1]) & (idx[:, 1] < values.shape[0])
    )
    if outside is None:
        assert inside.mean() > 0.99, "positions fall outside the image"
        idx = idx[inside]
        return values[idx[:, 1], idx[:, 0]]
    out = np.full(len(idx), outside, dtype=float)
    out[inside] = values[idx[inside, 1], idx[inside, 0]]
    return out


def random_pixels(shape: tuple[int, int], n: int = 5000) -> np.ndarray:
    return np.c_[RNG.uniform(0, shape[1], n), RNG.uniform(0, shape[0], n)]


def assert_lazy(image) -> None:
    for level in image:
        assert isinstance(image[level]["image"].data, da.Array)


# ------------------------------------------------------------------------------------------------------ HER2ST
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_her2st_section_loads_with_spots_on_tissue(section):
    sdata = her2st(section)
    image, spots, table = sdata[IMAGE_HE], sdata[SHAPES_SPOTS], sdata[TABLE]
    assert_lazy(image)
    assert image["scale0"]["image"].dtype == np.uint8
    assert list(image["scale0"]["image"].coords["c"].values) == ["r", "g", "b"]
    assert set(sd.transformations.get_transformation(spots, get_all=True)) == {CS_GLOBAL}
    assert len(spots) == table.n_obs > 150
    np.testing.assert_allclose(spots["radius"], 50.0)

    meta = table.uns[SPATIAL_META_KEY]
    expected = 3.2 if section in HER2ST_APP_SECTIONS else 0.688
    assert meta["um_per_px"] == pytest.approx(expected, rel=0.03)
    assert meta["pitch_fit_residual_px"] < 0.1  # the array is an exact grid in pixel space
    assert (meta["spot_diameter_um"], meta["spot_pitch_um"]) == (100.0, 200.0)

    # spot centres land on tissue, through the transformations, on a coarse pyramid level (~6-11 µm/px)
    masked = section in HER2ST_APP_SECTIONS
    level = 1 if masked else 4
    g = gray(image, level)
    is_tissue = tissue(g, background_masked=masked).astype(float)
    on_spots = sample(is_tissue, global_to_level_px(image, level, centres_global(sdata, SHAPES_SPOTS))).mean()
    on_random = sample(is_tissue, random_pixels(g.shape)).mean()
    assert on_spots > 0.8, f"{section}: only {on_spots:.0%} of spot centres on tissue"
    assert on_random < 0.5 and on_spots - on_random > 0.4, (section, on_spots, on_random)

    # array coordinates are a 200 µm grid in "global"
    xy = centres_global(sdata, SHAPES_SPOTS)
    pitch_x, pitch_y, _ = fit_pitch_px(table.obs[["array_col", "array_row"]].to_numpy(), xy)
    assert pitch_x == pytest.approx(200, rel=0.02) and pitch_y == pytest.approx(200, rel=0.02)


def test_her2st_unknown_section_lists_valid_ones():
    with pytest.raises(ValueError, match="C2") as err:
        her2st("D7")
    assert all(s in str(err.value) for s in HER2ST_SECTIONS)


def test_her2st_counts_match_tsv(her2st_c2, data_dir):
    table = her2st_c2[TABLE]
    ref = pd.read_csv(data_dir / "her2st" / "counts" / "C2.tsv.gz", sep="\t", index_col=0)
    assert sp.issparse(table.X) and table.X.format == "csr"
    assert table.var_names.is_unique and table.obs_names.is_unique
    X = table.X.toarray()
    np.testing.assert_array_equal(X, np.round(X))  # integers
    np.testing.assert_array_equal(X, ref.loc[table.obs_names].to_numpy())
    assert list(table.obs["spot_id"]) == list(ref.index)
    # spot ids are "<x>x<y>" of the array coordinates
    ids = table.obs["array_col"].astype(str) + "x" + table.obs["array_row"].astype(str)
    assert (ids == table.obs["spot_id"]).all()
    assert isinstance(table.obs["cluster"].dtype, pd.CategoricalDtype)
    labels = pd.read_csv(data_dir / "her2st" / "cluster_labels" / "C2-cluster-annotation.tsv.gz", sep="\t")
    first = labels.iloc[0]
    assert table.obs.loc[f"{first['x']}x{first['y']}", "cluster"] == str(first["label"])


def test_her2st_spot_positions_match_pixel_coordinates(her2st_c2, data_dir):
    sel = pd.read_csv(data_dir / "her2st" / "spots" / "C2_selection.tsv", sep="\t")
    sel.index = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    table = her2st_c2[TABLE]
    colrow = global_to_level_px(her2st_c2[IMAGE_HE], 0, centres_global(her2st_c2, SHAPES_SPOTS))
    expected = sel.loc[table.obs["spot_id"], ["pixel_x", "pixel_y"]].to_numpy()
    np.testing.assert_allclose(colrow, expected, atol=1e-6)


def test_table_is_linked_to_spots(her2st_c2):
    table = her2st_c2[TABLE]
    her2st_c2.validate_table_in_spatialdata(table)
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
        SHAPES_SPOTS,
        REGION_KEY,
        INSTANCE_KEY,
    )
    np.testing.assert_array_equal(
        table.obs[INSTANCE_KEY].to_numpy(), her2st_c2[SHAPES_SPOTS].index.to_numpy()
    )
    elements, joined = sd.join_spatialelement_table(
        sdata=her2st_c2, spatial_element_names=SHAPES_SPOTS, table_name=TABLE, how="inner"
    )
    assert len(elements[SHAPES_SPOTS]) == joined.n_obs == table.n_obs
    gene = table.var_names[np.argmax(np.asarray(table.X.sum(0)).ravel())]
    values = sd.get_values(gene, sdata=her2st_c2, element_name=SHAPES_SPOTS, table_name=TABLE)
    np.testing.assert_array_equal(values[gene].to_numpy(), table[:, gene].X.toarray().ravel())


def test_image_decoded_once_and_only_on_access(data_dir):
    path = str(data_dir / "her2st" / "images" / "C2_5714_HE_BT_C2.jpg")
    before = DECODE_COUNT[path]
    sdata = her2st("C2")
    image = sdata[IMAGE_HE]
    assert DECODE_COUNT[path] == before  # loading decodes nothing
    assert_lazy(image)
    block = image["scale0"]["image"][:, 2000:2100, 3000:3100].values
    low = image["scale4"]["image"].values
    image["scale2"]["image"].data.blocks[0, 1, 1].compute()
    assert DECODE_COUNT[path] == before + 1
    assert block.shape == (3, 100, 100) and low.dtype == np.uint8
    # level 4 is the 16x16 box mean of level 0 (up to rounding at each 2x step)
    full = image["scale0"]["image"][:, : 16 * 64, : 16 * 64].values.astype(float)
    box = full.reshape(3, 64, 16, 64, 16).mean((2, 4))
    assert np.abs(box - low[:, :64, :64]).max() <= 2.0


# ------------------------------------------------------------------------------------------------------ Vizgen
def test_vizgen_transcripts_on_bright_dapi(vizgen):
    image = vizgen[IMAGE_MORPHOLOGY]
    assert_lazy(image)
    assert list(image["scale0"]["image"].coords["c"].values) == ["DAPI", "polyT"]
    dapi = image["scale1"]["image"].sel(c="DAPI").values.astype(float)

    tx = vizgen[POINTS_TRANSCRIPTS].compute()
    assert not tx["gene"].astype(str).str.startswith("Blank-").any()
    assert isinstance(tx["gene"].dtype, pd.CategoricalDtype) and tx["gene"].cat.categories.size == 450
    assert set(tx["global_z"].unique()) == {0, 1}
    tx = tx[tx["global_z"] == 1]
    t = get_transformation(vizgen[POINTS_TRANSCRIPTS], CS_GLOBAL).to_affine_matrix(("x", "y"), ("x", "y"))
    xy = tx[["x", "y"]].to_numpy() @ t[:2, :2].T + t[:2, 2]
    on_tx = sample(dapi, global_to_level_px(image, 1, xy)).mean()
    on_random = sample(dapi, random_pixels(dapi.shape)).mean()
    on_flipped = sample(dapi[::-1], global_to_level_px(image, 1, xy)).mean()
    assert on_tx > 1.8 * on_random, (on_tx, on_random)  # README: 75.5 vs 33.6
    assert on_tx > 1.3 * on_flipped


def test_vizgen_cells_unnegated_and_on_nuclei(vizgen, data_dir):
    cells = vizgen[SHAPES_CELLS]
    assert len(cells) == 504 and set(cells.geom_type) <= {"Polygon", "MultiPolygon"}
    assert cells.geometry.is_valid.all()
    raw = pd.read_csv(data_dir / "vizgen_mouse_brain_mini" / "cell_boundaries" / "z1_polygons.csv.gz")
    minx, miny, maxx, maxy = cells.total_bounds
    assert miny == pytest.approx(-raw["y"].max()) and maxy == pytest.approx(-raw["y"].min())
    image = vizgen[IMAGE_MORPHOLOGY]
    dapi = image["scale2"]["image"].sel(c="DAPI").values.astype(float)
    inside = cells.geometry.representative_point()
    colrow = global_to_level_px(image, 2, np.c_[inside.x, inside.y])
    assert sample(dapi, colrow).mean() > 1.3 * dapi.mean()


def test_vizgen_bad_z():
    from stsr.datasets._vizgen import vizgen_mouse_brain_mini

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vizgen_mouse_brain_mini(z=3)


# -------------------------------------------------------------------------------------------------------- DBiT
def test_dbit_umi_follows_image_darkness(dbit):
    image, squares, table = dbit[IMAGE_BRIGHTFIELD], dbit[SHAPES_SPOTS], dbit[TABLE]
    assert_lazy(image)
    assert table.shape == (2499, 15880) and sp.issparse(table.X)
    assert table.X.sum() == 796129
    g = gray(image, 0)
    darkness = []
    for poly in squares.geometry:  # mean darkness over each 25 µm square, mapped into image pixels
        x0, y0, x1, y1 = poly.bounds
        (c0, r0), (c1, r1) = global_to_level_px(image, 0, np.array([[x0, y0], [x1, y1]]))
        darkness.append(255 - g[int(round(r0)) : int(round(r1)), int(round(c0)) : int(round(c1))].mean())
    log_umi = np.log1p(np.asarray(table.X.sum(1)).ravel())
    assert np.corrcoef(log_umi, darkness)[0, 1] > 0.5  # README: 0.74


def test_dbit_geometry_and_annotations(dbit):
    squares, table = dbit[SHAPES_SPOTS], dbit[TABLE]
    b = squares.geometry.bounds
    np.testing.assert_allclose(b["maxx"] - b["minx"], 25.0)
    np.testing.assert_allclose(b["maxy"] - b["miny"], 25.0)
    obs = table.obs.set_index(INSTANCE_KEY).loc[squares.index]
    np.testing.assert_allclose(b["minx"].to_numpy(), (obs["array_col"].to_numpy() - 1) * 50.0)
    np.testing.assert_allclose(b["miny"].to_numpy(), (obs["array_row"].to_numpy() - 1) * 50.0)
    assert table.obs["in_tissue"].sum() == 2130
    assert set(table.obs.loc[table.obs["defective_row"], "array_row"]) == {2, 39}
    umi = pd.Series(np.asarray(table.X.sum(1)).ravel(), index=table.obs_names)
    assert umi[table.obs["in_tissue"]].median() > 5 * umi[~table.obs["in_tissue"]].median()
    meta = table.uns[SPATIAL_META_KEY]
    assert (meta["pixel_size_um"], meta["pitch_um"]) == (25.0, 50.0)
    assert meta["um_per_px_x"] == pytest.approx(3.40, abs=0.01) and meta["um_per_px_y"] == pytest.approx(
        3.47, abs=0.01
    )
    # the image spans 99 channel widths = 2475 µm on both axes
    image = dbit[IMAGE_BRIGHTFIELD]["scale0"]["image"]
    (x_end, y_end) = global_to_level_px(dbit[IMAGE_BRIGHTFIELD], 0, np.array([[2475.0, 2475.0]]))[0]
    assert (x_end, y_end) == pytest.approx((image.sizes["x"], image.sizes["y"]))


# ------------------------------------------------------------------------------------------------------ Xenium
def test_xenium_cells_on_tissue_with_swapped_columns(xenium):
    image, cells, table = xenium[IMAGE_HE], xenium[SHAPES_CELLS], xenium[TABLE]
    assert_lazy(image)
    np.testing.assert_allclose(cells["radius"], 10.0)
    assert table.n_obs == 200 and table.X.sum() == 45623
    g = gray(image, 0)
    is_tissue = tissue(g, background_masked=False).astype(float)
    on_cells = sample(is_tissue, global_to_level_px(image, 0, centres_global(xenium, SHAPES_CELLS))).mean()
    literal = table.obs[["x_pixel", "y_pixel"]].to_numpy()  # the names taken literally: x = column
    on_literal = sample(is_tissue, literal, outside=0.0).mean()
    assert on_cells > 0.8 and on_cells > on_literal + 0.3, (on_cells, on_literal)


# --------------------------------------------------------------------------------------------- zarr round trip
@pytest.mark.parametrize("fixture", ["vizgen", "xenium"])
def test_write_read_zarr_round_trip(fixture, request, tmp_path):
    sdata = request.getfixturevalue(fixture)
    path = tmp_path / f"{fixture}.zarr"
    sdata.write(path)
    back = sd.read_zarr(path)
    assert set(back.images) == set(sdata.images) and set(back.shapes) == set(sdata.shapes)
    for key, image in sdata.images.items():
        assert list(back[key]) == list(image)
        for level in image:
            a, b = image[level]["image"], back[key][level]["image"]
            assert list(a.coords["c"].values) == list(b.coords["c"].values)
            np.testing.assert_allclose(affine_xy(a), affine_xy(b))
        last = list(image)[-1]
        np.testing.assert_array_equal(image[last]["image"].values, back[key][last]["image"].values)
        np.testing.assert_array_equal(
            image["scale0"]["image"][:, :300, :300].values, back[key]["scale0"]["image"][:, :300, :300].values
        )
    for key, shapes in sdata.shapes.items():
        np.testing.assert_allclose(affine_xy(shapes), affine_xy(back[key]))
        assert shapes.geometry.geom_equals_exact(back[key].geometry, tolerance=1e-9).all()
    for key, points in sdata.points.items():
        pd.testing.assert_frame_equal(points.compute(), back[key].compute(), check_categorical=False)
    for key, table in sdata.tables.items():
        np.testing.assert_array_equal(table.X.toarray(), back[key].X.toarray())
        assert back[key].uns[SPATIAL_META_KEY]["um_per_px"] == table.uns[SPATIAL_META_KEY]["um_per_px"]


# ------------------------------------------------------------------------------------------------------ fetcher
def test_registry_hashes_match_local_files(data_dir):
    n = 0
    for dataset, files in _fetch.REGISTRY.items():
        for name, entry in files.items():
            digest = hashlib.sha256((data_dir / dataset / name).read_bytes()).hexdigest()
            assert digest == entry.sha256, f"{dataset}/{name}"
            assert entry.url is None or entry.url.startswith("https://raw.githubusercontent.com/")
            n += 1
    listed = sum(1 for d in _fetch.REGISTRY for _ in (data_dir / d).rglob("*") if _.is_file())
    assert n == listed - 2 * len(_fetch.REGISTRY)  # every file except README.md and SHA256SUMS


def test_registry_urls_are_pinned():
    url = _fetch.REGISTRY["her2st"]["counts/C2.tsv.gz"].url
    assert url == (
        "https://raw.githubusercontent.com/almaan/her2st/85df7411b987a7dec3feff9718b869a7a82091ec/data/ST-cnts/C2.tsv.gz"
    )
    assert _fetch.REGISTRY["her2st"]["images/B4_BT10737_D2_HE.jpg"].url.endswith(
        "data/ST-imgs/B/B4/BT10737_D2_HE.jpg"
    )
    assert _fetch.REGISTRY["vizgen_mouse_brain_mini"]["cell_boundaries/z0_polygons.csv.gz"].url.endswith(
        "inst/Mini_datasets/Vizgen/Raw/cell_boundaries/z0_polygons.gz"
    )
    assert _fetch.REGISTRY["her2st_patientA_app"]["images/A1_HE_image_dark.png"].url.endswith(
        "app/www/imgs/A1_HE_image_dark.png"
    )


def test_data_path_prefers_local_copy(data_dir):
    assert _fetch.data_path("her2st", "counts/C2.tsv.gz") == data_dir / "her2st" / "counts" / "C2.tsv.gz"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("STSR_DATA_DIR", str(empty))
    monkeypatch.setenv(_fetch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path


def test_data_path_error_when_offline(offline, monkeypatch):
    def no_network(url, sha256, folder, fname):
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setattr(_fetch, "_download", no_network)
    with pytest.raises(_fetch.DataUnavailableError) as err:
        _fetch.data_path("her2st", "counts/C2.tsv.gz")
    message = str(err.value)
    assert "STSR_DATA_DIR" in message and "internet" in message
    assert _fetch.REGISTRY["her2st"]["counts/C2.tsv.gz"].url in message
    # the loaders surface the same error
    with pytest.raises(_fetch.DataUnavailableError):
        her2st("C2")
    # a derived file has no download: the error says so
    with pytest.raises(_fetch.DataUnavailableError, match="derived"):
        _fetch.data_path("her2st_patientA_app", "spots/app_spot_coords.csv")
    with pytest.raises(KeyError, match="known datasets"):
        _fetch.data_path("nope", "x")


def test_data_path_downloads_into_cache_with_hash(offline, monkeypatch, data_dir):
    calls = []

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        calls.append((url, known_hash))
        target = Path(path) / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((data_dir / "xenium_lung_he_ncbi858_tiny" / "NCBI858.json").read_bytes())
        return str(target)

    import pooch

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    got = _fetch.data_path("xenium_lung_he_ncbi858_tiny", "NCBI858.json")
    entry = _fetch.REGISTRY["xenium_lung_he_ncbi858_tiny"]["NCBI858.json"]
    assert calls == [(entry.url, f"sha256:{entry.sha256}")]
    assert got == offline / "cache" / "xenium_lung_he_ncbi858_tiny" / "NCBI858.json"
    assert os.environ["STSR_DATA_DIR"] != str(data_dir)


# ------------------------------------------------------------------------------------------------ count parser
def test_parse_dense_counts_values_and_errors():
    raw = b"\tA\tB\tC\r\n1x1\t0\t2.0\t0.0\r\n\n2x1\t3\t0\t11"  # CRLF, a blank line, no final newline
    X, obs, var = parse_dense_counts(io.BytesIO(raw), block_bytes=1)
    np.testing.assert_array_equal(X.toarray(), [[0, 2, 0], [3, 0, 11]])
    assert list(obs) == ["1x1", "2x1"] and list(var) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="fields"):
        parse_dense_counts(io.BytesIO(b"\tA\tB\n1x1\t1\n"))
    with pytest.raises(ValueError, match="non-integer"):
        parse_dense_counts(io.BytesIO(b"\tA\n1x1\t1.5\n"))

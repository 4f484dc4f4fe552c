"""stsr.tl.to_table: one observation per in-tissue HR pixel, ready for scanpy / squidpy."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy import sparse
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Scale, Sequence, Translation, get_transformation

from stsr.tl._to_table import to_table

YX = ("y", "x")
IMG_UM_PER_PX = 0.5  # image pixel -> global (µm)
HR_IMG_PX = 4.0  # one HR pixel = 4 image pixels
ORIGIN_IMG_PX = (6.0, 10.0)  # grid origin (y, x) in image pixels
HR_UM = HR_IMG_PX * IMG_UM_PER_PX  # 2 µm HR pixels


def _grid_tf() -> Sequence:
    return Sequence(
        [
            Scale([HR_IMG_PX, HR_IMG_PX], axes=YX),
            Translation(list(ORIGIN_IMG_PX), axes=YX),
            Scale([IMG_UM_PER_PX, IMG_UM_PER_PX], axes=YX),
        ]
    )


def _centre_um(row: float, col: float) -> tuple[float, float]:
    """(x, y) in µm of HR pixel (row, col)'s centre, computed by hand."""
    y = ((row + 0.5) * HR_IMG_PX + ORIGIN_IMG_PX[0]) * IMG_UM_PER_PX
    x = ((col + 0.5) * HR_IMG_PX + ORIGIN_IMG_PX[1]) * IMG_UM_PER_PX
    return x, y


def make_sdata(hr: np.ndarray, genes: list[str] | None = None, key: str = "stsr") -> sd.SpatialData:
    """An RGB image ('he', 0.5 µm/px) and an HR raster on a 2 µm grid that overlays it."""
    c, h, w = hr.shape
    genes = genes or [f"g{i}" for i in range(c)]
    rng = np.random.default_rng(0)
    ih, iw = int(h * HR_IMG_PX + ORIGIN_IMG_PX[0]), int(w * HR_IMG_PX + ORIGIN_IMG_PX[1])
    image = Image2DModel.parse(
        rng.integers(0, 255, (3, ih, iw), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Scale([IMG_UM_PER_PX, IMG_UM_PER_PX], axes=YX)},
        scale_factors=[2],
    )
    raster = Image2DModel.parse(
        hr.astype(np.float32),
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={"global": _grid_tf()},
        scale_factors=[2],
        chunks=(c, 16, 16),
    )
    return sd.SpatialData(images={"he": image, key: raster})


@pytest.fixture
def small():
    rng = np.random.default_rng(1)
    hr = rng.poisson(2.0, (4, 20, 24)).astype(np.float32)
    hr[:, :3, :] = 0  # out-of-tissue rows: no counts
    hr[:, :, -2:] = 0
    return hr, make_sdata(hr)


def test_obs_values_positions(small):
    hr, sdata = small
    adata = to_table(sdata, "stsr")
    totals = hr.sum(0)
    assert adata.n_obs == int((totals > 0).sum())
    assert list(adata.var_names) == ["g0", "g1", "g2", "g3"]
    assert adata.X.dtype == np.float32
    # every row equals the raster at its pixel, and the position is the pixel centre in µm
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    np.testing.assert_array_equal(x, hr[:, rows, cols].T)
    i = 17
    np.testing.assert_allclose(adata.obsm["spatial"][i], _centre_um(rows[i], cols[i]))
    assert adata.obs_names[i] == f"{rows[i]}_{cols[i]}"
    np.testing.assert_allclose(adata.obs["total_counts"], totals[rows, cols])
    # the table is added and annotates the labels element
    assert sdata.tables["stsr_table"] is adata
    attrs = adata.uns["spatialdata_attrs"]
    assert attrs["region"] == "stsr_labels" and attrs["region_key"] == "region"
    assert attrs["instance_key"] == "instance_id"
    assert adata.uns["stsr"]["pixel_size"] == pytest.approx(HR_UM)


def test_labels_map_back_to_pixels(small):
    hr, sdata = small
    adata = to_table(sdata, "stsr")
    labels = sdata.labels["stsr_labels"]
    lab = np.asarray(labels["scale0"]["image"].values)
    assert lab.shape == hr.shape[1:]
    rows, cols = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
    np.testing.assert_array_equal(lab[rows, cols], adata.obs["instance_id"].to_numpy())
    assert (lab > 0).sum() == adata.n_obs
    assert len(np.unique(lab[lab > 0])) == adata.n_obs
    # same transformation as the raster: the label of a point is the pixel the table says is there
    m_lab = get_transformation(labels, "global").to_affine_matrix(input_axes=YX, output_axes=YX)
    m_ras = get_transformation(sdata["stsr"], "global").to_affine_matrix(input_axes=YX, output_axes=YX)
    np.testing.assert_allclose(m_lab, m_ras)
    # spatialdata agrees: aggregating the table's source over its own labels gives back X
    from stsr.tl._aggregate import aggregate

    back = aggregate(sdata, "stsr", "stsr_labels")
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    xb = back.X.toarray() if sparse.issparse(back.X) else np.asarray(back.X)
    np.testing.assert_allclose(xb, x, atol=1e-5)
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"], atol=1e-9)


def test_min_counts_and_array_mask(small):
    hr, sdata = small
    totals = hr.sum(0)
    mask = np.zeros(totals.shape, bool)
    mask[5:15, 4:20] = True
    adata = to_table(sdata, "stsr", tissue_mask=mask, min_counts=6.0, inplace=False)
    assert adata.n_obs == int(((totals > 6.0) & mask).sum())
    assert adata.obs["total_counts"].min() > 6.0
    assert mask[adata.obs["row"], adata.obs["col"]].all()
    assert "stsr_table" not in sdata.tables and "stsr_labels" not in sdata.labels  # inplace=False


def test_labels_mask_on_another_grid(small):
    hr, sdata = small
    # tissue = a rectangle of image pixels, as a labels element at image resolution (4x finer than HR)
    ih, iw = sdata["he"]["scale0"]["image"].shape[1:]
    lab = np.zeros((ih, iw), np.uint8)
    lab[30:70, 30:90] = 1
    sdata.labels["tissue"] = Labels2DModel.parse(
        lab,
        dims=YX,
        transformations={"global": Scale([IMG_UM_PER_PX, IMG_UM_PER_PX], axes=YX)},
        scale_factors=[2, 2, 2],  # levels of 1, 2 and 4 µm: the 2 µm level is read for 2 µm HR pixels
    )
    adata = to_table(sdata, "stsr", tissue_mask="tissue", inplace=False)
    # HR pixel centre (image px) = origin + (idx + 0.5) * 4 must fall in the rectangle
    rr, cc = np.meshgrid(np.arange(hr.shape[1]), np.arange(hr.shape[2]), indexing="ij")
    cy = ORIGIN_IMG_PX[0] + (rr + 0.5) * HR_IMG_PX
    cx = ORIGIN_IMG_PX[1] + (cc + 0.5) * HR_IMG_PX
    expected = (cy >= 30) & (cy < 70) & (cx >= 30) & (cx < 90) & (hr.sum(0) > 0)
    assert adata.n_obs == int(expected.sum()) > 0
    assert expected[adata.obs["row"], adata.obs["col"]].all()


def test_sparse_when_mostly_zero_and_level():
    hr = np.zeros((5, 16, 16), np.float32)
    hr[0, 4:12, 4:12] = 3.0  # only one gene expressed
    sdata = make_sdata(hr)
    adata = to_table(sdata, "stsr")
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    assert adata.n_obs == 64
    np.testing.assert_allclose(adata.X.sum(), 3.0 * 64)
    # level 1: 2x coarser pixels; centre of level-1 pixel (r, c) = centre of the 2x2 HR block
    a1 = to_table(sdata, "stsr", level=1, table_key="t1", labels_key="l1")
    assert a1.n_obs == 16
    i = 0
    r, c = a1.obs["row"].iloc[i], a1.obs["col"].iloc[i]
    np.testing.assert_allclose(a1.obsm["spatial"][i], _centre_um(2 * r + 0.5, 2 * c + 0.5))
    assert sdata.labels["l1"]["scale0"]["image"].shape == (8, 8)
    m = get_transformation(sdata.labels["l1"], "global").to_affine_matrix(input_axes=YX, output_axes=YX)
    assert m[0, 0] == pytest.approx(2 * HR_UM)


def test_errors_and_no_overwrite(small):
    _, sdata = small
    with pytest.raises(KeyError, match="Did you mean 'stsr'"):
        to_table(sdata, "stssr")
    with pytest.raises(ValueError, match="coordinate system 'aligned'"):
        to_table(sdata, "stsr", coordinate_system="aligned")
    with pytest.raises(ValueError, match="tissue_mask has shape"):
        to_table(sdata, "stsr", tissue_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="No pixel"):
        to_table(sdata, "stsr", min_counts=1e9)
    to_table(sdata, "stsr")
    before = sdata.tables["stsr_table"]
    with pytest.raises(KeyError, match="already has"):
        to_table(sdata, "stsr", min_counts=5)
    assert sdata.tables["stsr_table"] is before
    after = to_table(sdata, "stsr", min_counts=5, overwrite=True)
    assert sdata.tables["stsr_table"] is after and after.n_obs < before.n_obs
    assert sdata.labels["stsr_labels"]["scale0"]["image"].values.max() == after.n_obs


def test_zarr_backed_roundtrip(small, tmp_path):
    hr, sdata = small
    sdata.write(tmp_path / "s.zarr")
    backed = sd.read_zarr(tmp_path / "s.zarr")
    adata = to_table(backed, "stsr")
    x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(x, hr[:, adata.obs["row"], adata.obs["col"]].T)
    backed.write_element(["stsr_labels", "stsr_table"])
    again = sd.read_zarr(tmp_path / "s.zarr")
    assert again.tables["stsr_table"].n_obs == adata.n_obs
    np.testing.assert_array_equal(
        again.labels["stsr_labels"]["scale0"]["image"].values,
        backed.labels["stsr_labels"]["scale0"]["image"].values,
    )


# ------------------------------------------------------------------------------------------ scverse analyses
def _two_domains(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """40 x 40 raster: a disc (domain 1) and the rest (domain 0) with different programmes; 2-pixel empty rim."""
    rng = np.random.default_rng(seed)
    h = w = 40
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    domain = ((rr - 20) ** 2 + (cc - 20) ** 2 < 12**2).astype(int)
    n_genes = 20
    mean = np.where(domain[None] == 1, 1.0, 0.2) * np.r_[np.full(10, 4.0), np.full(10, 0.5)][:, None, None]
    mean += np.where(domain[None] == 0, 1.0, 0.2) * np.r_[np.full(10, 0.5), np.full(10, 4.0)][:, None, None]
    hr = rng.poisson(mean * 3).astype(np.float32)
    hr[:, :2] = hr[:, -2:] = 0
    hr[:, :, :2] = hr[:, :, -2:] = 0
    assert hr.shape[0] == n_genes
    return hr, domain


def _cluster_ari(method: str) -> float:
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    hr, domain = _two_domains()
    adata = to_table(make_sdata(hr), "stsr", inplace=False)
    assert adata.n_obs == 36 * 36
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=15, method=method, transformer="sklearn")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=0.1, random_state=0)
    truth = domain[adata.obs["row"], adata.obs["col"]]
    return adjusted_rand_score(truth, adata.obs["leiden"].to_numpy())


def test_scanpy_chain_recovers_two_domains():
    # method="gauss" avoids umap's ~25 s numba compilation; the default is covered by the slow test below
    ari = _cluster_ari("gauss")
    assert ari > 0.8, ari


@pytest.mark.slow
def test_scanpy_chain_default_umap_connectivities():
    ari = _cluster_ari("umap")
    assert ari > 0.8, ari


def test_squidpy_moran():
    import squidpy as sq

    rng = np.random.default_rng(3)
    h = w = 32
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    smooth = 20 * (1.5 + np.sin(rr / 5.0) * np.cos(cc / 6.0))
    shuffled = rng.permutation(smooth.ravel()).reshape(h, w)
    hr = np.stack([smooth, shuffled, rng.poisson(5.0, (h, w))]).astype(np.float32)
    adata = to_table(make_sdata(hr, ["smooth", "shuffled", "noise"]), "stsr", inplace=False)
    assert adata.n_obs == h * w
    sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=4)
    # interior pixels of a square grid have exactly 4 neighbours, in the first ring
    deg = np.asarray(adata.obsp["spatial_connectivities"].sum(1)).ravel()
    assert np.median(deg) == 4
    d = adata.obsp["spatial_distances"]
    np.testing.assert_allclose(d.data, 1.0)  # squidpy grid mode: ring index
    sq.gr.spatial_autocorr(adata, mode="moran", n_perms=None, genes=["smooth", "shuffled", "noise"])
    moran = adata.uns["moranI"]["I"]
    assert moran["smooth"] > 0.5
    assert abs(moran["shuffled"]) < 0.1
    assert abs(moran["noise"]) < 0.1

"""Spots on the HR grid: spots_observation_model, rasterize_spots, get_observations."""

from __future__ import annotations

import numpy as np
import pytest
from observations import get_observations
from spatialdata.models import ShapesModel, get_channel_names
from spatialdata.transformations import Affine, Identity, get_transformation, set_transformation

import stsr.pp as pp
from stsr._constants import PROVENANCE_ATTR


def _expected_centres(geom, pixel_size_um: float) -> np.ndarray:
    img = (geom.centres - np.asarray(geom.origin)) / geom.um_per_px
    return img / (pixel_size_um / geom.um_per_px)


@pytest.mark.parametrize("pixel_size", [2.0, 3.0, 5.0])
def test_disks_geometry_and_area(tiny_sd, geom, pixel_size):
    grid = pp.hr_grid(tiny_sd, "img", pixel_size)
    op = pp.spots_observation_model(tiny_sd, "spots", grid, "img")
    assert op.kind == "disks" and op.n_obs == len(geom.centres)
    np.testing.assert_allclose(op.centres, _expected_centres(geom, pixel_size))
    r = geom.radius / pixel_size
    assert op.params["radius"] == pytest.approx(r)
    np.testing.assert_allclose(op.support_area, np.pi * r**2, rtol=0.02)
    assert op.support_area.sum() * pixel_size**2 == pytest.approx(5 * np.pi * geom.radius**2, rel=0.02)


def test_spots_through_other_transformations(tiny_sd, geom):
    """Spots stored in a rotated frame with their own transformation land at the same grid positions."""
    c, s = np.cos(0.7), np.sin(0.7)
    rot = np.array([[c, -s], [s, c]])  # (x, y) -> (x, y)
    xy_global = geom.centres[:, ::-1]
    xy_intrinsic = (np.linalg.inv(rot) @ xy_global.T).T / 2.0  # intrinsic unit = 2 µm, rotated
    affine = np.eye(3)
    affine[:2, :2] = rot * 2.0
    tiny_sd.shapes["spots2"] = ShapesModel.parse(
        xy_intrinsic,
        geometry=0,
        radius=np.full(len(xy_intrinsic), geom.radius / 2.0),
        transformations={"global": Affine(affine, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    grid = pp.hr_grid(tiny_sd, "img", 2.0)
    op = pp.spots_observation_model(tiny_sd, "spots2", grid, "img")
    np.testing.assert_allclose(op.centres, _expected_centres(geom, 2.0), atol=1e-9)
    assert op.params["radius"] == pytest.approx(geom.radius / 2.0)


def test_no_shared_coordinate_system(tiny_sd, unchanged):
    set_transformation(tiny_sd["spots"], {"slide": Identity()}, set_all=True)
    grid = pp.hr_grid(tiny_sd, "img", 2.0)
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(
        ValueError,
        match=r"Image 'img' .* and spots 'spots' .* share no coordinate system.*set_transformation",
    ):
        pp.spots_observation_model(tiny_sd, "spots", grid, "img")
    with pytest.raises(ValueError, match="share no coordinate system"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img")
    unchanged.check(tiny_sd, snap)


def test_spots_outside_image(tiny_sd, unchanged):
    tiny_sd.shapes["far"] = ShapesModel.parse(
        np.array([[60.0, 40.0], [900.0, 500.0]]),
        geometry=0,
        radius=np.full(2, 10.0),
        transformations={"global": Identity()},
    )
    grid = pp.hr_grid(tiny_sd, "img", 2.0)
    with pytest.raises(ValueError, match="1 of 2 spots of 'far' fall outside image 'img'"):
        pp.spots_observation_model(tiny_sd, "far", grid, "img")


def test_rasterize_spots_values(tiny_sd, geom):
    op = pp.rasterize_spots(tiny_sd, pixel_size=4.0, image_key="img", genes=["Krt8", "Actb"], key_added="lr")
    el = tiny_sd["lr"]
    assert list(get_channel_names(el)) == ["Krt8", "Actb"]
    arr = el["scale0"].image.values
    assert arr.dtype == np.float32 and arr.shape == (2, 30, 40)
    counts = tiny_sd["table"].X.toarray()[:, [4, 0]].T
    np.testing.assert_allclose(op.pool(np.ones(op.shape)), op.support_area)
    np.testing.assert_allclose(arr, op.interpolate(counts).astype(np.float32))
    # density (counts per HR pixel): near a spot centre it is about the spot's counts / its area
    r, c = np.floor(op.centres[0]).astype(int)
    assert arr[0, r, c] == pytest.approx(counts[0, 0] / op.support_area[0], rel=0.5)
    # overlays the image
    np.testing.assert_allclose(
        get_transformation(el, "global").to_affine_matrix(("y", "x"), ("y", "x")) @ [0, 0, 1],
        [geom.origin[0], geom.origin[1], 1.0],
    )
    rec = tiny_sd.attrs[PROVENANCE_ATTR]["lr"]
    assert rec["kind"] == "spots" and rec["genes"] == ["Krt8", "Actb"] and rec["spots_key"] == "spots"
    obs = get_observations(tiny_sd, "lr")
    np.testing.assert_allclose(obs.counts, counts)
    np.testing.assert_allclose(obs.model.matrix.toarray(), op.matrix.toarray())
    assert obs.grid == pp.hr_grid(tiny_sd, "img", 4.0) and obs.image_key == "img"
    assert obs.obs_names == [f"s{i}" for i in range(5)]


def test_rasterize_spots_table_order(tiny_sd, geom):
    """Table rows in another order than the shapes: observation i is table row i."""
    t = tiny_sd.tables["table"]
    tiny_sd.tables["table"] = t[::-1].copy()
    op = pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img")
    np.testing.assert_allclose(op.centres, _expected_centres(geom, 2.0)[::-1])


def test_rasterize_spots_bad_inputs(tiny_sd, unchanged):
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(KeyError, match="'Actn'.*did you mean 'Actb'"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img", genes=["Actn", "Krt8"])
    with pytest.raises(KeyError, match="Did you mean 'table'"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, table_key="tabel", image_key="img")
    with pytest.raises(KeyError, match="Did you mean 'img'"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="im")
    unchanged.check(tiny_sd, snap)
    # existing key: refused without overwrite
    pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img", key_added="lr")
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(KeyError, match="already has a image element 'lr'.*overwrite=True"):
        pp.rasterize_spots(tiny_sd, pixel_size=4.0, image_key="img", key_added="lr")
    unchanged.check(tiny_sd, snap)
    pp.rasterize_spots(tiny_sd, pixel_size=4.0, image_key="img", key_added="lr", overwrite=True)
    assert tiny_sd["lr"]["scale0"].image.shape == (5, 30, 40)


@pytest.mark.parametrize("value,what", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "NaN or infinite")])
def test_rasterize_spots_bad_counts(tiny_sd, unchanged, value, what):
    x = tiny_sd.tables["table"].X.toarray()
    x[3, 2] = value
    tiny_sd.tables["table"].X = x
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(ValueError, match=f"{what}.*gene 'mt-Co1' in observation 's3'"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img")
    unchanged.check(tiny_sd, snap)
    assert "lr" not in tiny_sd


def test_rasterize_spots_requires_gene_choice_for_large_tables(tiny_sd):
    import anndata as ad
    from spatialdata.models import TableModel

    t = tiny_sd.tables["table"]
    big = ad.AnnData(X=np.ones((t.n_obs, 600), np.float32), obs=t.obs.copy())
    big.var_names = [f"g{i}" for i in range(600)]
    tiny_sd.tables["table"] = TableModel.parse(
        big, region="spots", region_key="region", instance_key="instance_id"
    )
    with pytest.raises(ValueError, match="select_genes"):
        pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img")


def test_spot_counts_and_stale_record(tiny_sd, unchanged):
    from stsr.pp._spots import spot_counts

    grid = pp.hr_grid(tiny_sd, "img", 2.0)
    snap = unchanged.snap(tiny_sd)
    op, lr, genes = spot_counts(tiny_sd, "table", None, ["Gapdh", "Krt8"], grid, "img")
    unchanged.check(tiny_sd, snap)
    assert genes == ["Gapdh", "Krt8"] and lr.shape == (2, 5) and lr.dtype == np.float64
    np.testing.assert_array_equal(lr, tiny_sd["table"].X.toarray()[:, [1, 4]].T)
    np.testing.assert_allclose(
        op.matrix.toarray(), pp.spots_observation_model(tiny_sd, "spots", grid, "img").matrix.toarray()
    )
    with pytest.raises(KeyError, match="did you mean 'Krt8'"):
        spot_counts(tiny_sd, "table", None, ["Krt9"], grid, "img")
    pp.rasterize_spots(tiny_sd, pixel_size=2.0, image_key="img")
    tiny_sd.tables["table"] = tiny_sd.tables["table"][:3].copy()
    with pytest.raises(ValueError, match="changed since 'lr' was built"):
        get_observations(tiny_sd, "lr")


def test_a_bounding_box_crop_of_a_real_slide_keeps_its_edge_spots():
    """``spatialdata.bounding_box_query`` keeps the spots whose centres lie in the box and crops the image to whole
    pixels: on this crop of HER2ST C2 one edge spot's centre lies 0.2 image pixels outside the cropped image. It is
    on the slide (within :data:`EDGE_TOLERANCE_PX`); spots further out are still refused."""
    from spatialdata import bounding_box_query

    import stsr
    from stsr._elements import element_affine
    from stsr.pp._spots import EDGE_TOLERANCE_PX
    from stsr.pp._transforms import spatial_shape

    sdata = stsr.datasets.her2st("C2")
    centre = np.median(sdata["spots"].geometry.get_coordinates().to_numpy(), 0)
    sub = bounding_box_query(
        sdata,
        axes=("x", "y"),
        min_coordinate=centre - 400,
        max_coordinate=centre + 400,
        target_coordinate_system="global",
        filter_table=True,
    )
    spots, image = sub["spots"], sub["he"]
    h, w = spatial_shape(image)
    pts = spots.geometry
    yx = np.stack([pts.y.to_numpy(float), pts.x.to_numpy(float), np.ones(len(spots))])
    img = (element_affine(spots, "global", "spots", to=image, to_key="he") @ yx)[:2].T
    beyond = np.maximum.reduce([-img[:, 0], img[:, 0] - h, -img[:, 1], img[:, 1] - w])
    assert 0 < beyond.max() < EDGE_TOLERANCE_PX  # the crop's edge spot, a fraction of a pixel out
    grid = pp.hr_grid(sub, "he", 10.0)
    op = pp.spots_observation_model(sub, "spots", grid, "he")
    assert op.n_obs == len(spots) == 18
    assert (op.support_area > 0).all()  # every spot has pixels on the grid

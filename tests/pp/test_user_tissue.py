"""The user gives the tissue (a labels element, a shapes element or an array) instead of stsr's Otsu mask.

The slide's image has no contrast between tissue and background (Otsu's mask of it is noise, and the default mask is
the whole spot lattice), so only the given tissue can say where the tissue is: an annulus (a ring with a hole).
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import sparse
from shapely.geometry import Point, box
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

import stsr
from stsr.tl._inputs import expected_inputs, prepare_inputs

SIZE_UM = 300  # image of 300 x 300 µm at 1 µm per pixel
PIXEL_UM = 4.0  # default HR pixel: a tenth of the 40 µm spots
CENTRE, OUTER, INNER = (150.0, 150.0), 110.0, 40.0  # the tissue: an annulus, in µm
GENES = ["g0", "g1", "g2"]


def _in_annulus(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    d2 = (y - CENTRE[0]) ** 2 + (x - CENTRE[1]) ** 2
    return (d2 <= OUTER**2) & (d2 >= INNER**2)


def _truth_on_grid(n: int = 16) -> np.ndarray:
    """HR pixels (4 µm) at least half covered by the annulus, from n x n sub-samples per pixel."""
    side = int(SIZE_UM / PIXEL_UM)
    sub = (np.arange(side * n) + 0.5) * PIXEL_UM / n
    inside = _in_annulus(sub[:, None], sub[None, :])
    return inside.reshape(side, n, side, n).mean(axis=(1, 3)) >= 0.5


def _annulus_polygon(unit: float = 1.0):
    ring = Point(CENTRE[1] / unit, CENTRE[0] / unit).buffer(OUTER / unit, 256)
    return ring.difference(Point(CENTRE[1] / unit, CENTRE[0] / unit).buffer(INNER / unit, 256))


def _slide() -> SpatialData:
    rng = np.random.default_rng(0)
    # the same pale pink everywhere: tissue and background cannot be told apart in the image
    img = np.clip(np.array([225, 190, 215])[:, None, None] + rng.normal(0, 6, (3, SIZE_UM, SIZE_UM)), 0, 255)
    image = Image2DModel.parse(
        img.astype(np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={"global": Identity()},
    )
    # 36 spots of 40 µm on a square lattice of pitch 50 µm covering the image
    yy, xx = np.meshgrid(np.arange(25.0, SIZE_UM, 50), np.arange(25.0, SIZE_UM, 50), indexing="ij")
    centres_xy = np.stack([xx.ravel(), yy.ravel()], 1)
    spots = ShapesModel.parse(
        centres_xy, geometry=0, radius=np.full(len(centres_xy), 20.0), transformations={"global": Identity()}
    )
    counts = rng.poisson(30, (len(centres_xy), len(GENES))).astype(np.float32)
    table = TableModel.parse(
        ad.AnnData(
            X=sparse.csr_matrix(counts),
            obs=pd.DataFrame(
                {"region": pd.Categorical(["spots"] * len(counts)), "instance_id": np.arange(len(counts))},
                index=[f"s{i}" for i in range(len(counts))],
            ),
            var=pd.DataFrame(index=GENES),
        ),
        region="spots",
        region_key="region",
        instance_key="instance_id",
    )
    # labels at 2 µm per pixel over 30..270 µm (nonzero = tissue)
    centres = (np.arange(120) + 0.5) * 2 + 30
    labels = np.where(_in_annulus(centres[:, None], centres[None, :]), 3, 0).astype(np.uint8)
    to_um = Sequence([Scale([2.0, 2.0], axes=("y", "x")), Translation([30.0, 30.0], axes=("y", "x"))])
    # polygons in units of 10 µm: the annulus cut in two halves (one tissue, two rows)
    halves = [
        _annulus_polygon(10).intersection(box(0, 0, 15, 30)),
        _annulus_polygon(10).intersection(box(15, 0, 30, 30)),
    ]
    import geopandas as gpd

    roi = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=halves), transformations={"global": Scale([10.0, 10.0], axes=("y", "x"))}
    )
    return SpatialData(
        images={"he": image},
        labels={"tissue": Labels2DModel.parse(labels, dims=("y", "x"), transformations={"global": to_um})},
        shapes={"spots": spots, "region_of_interest": roi},
        tables={"table": table},
    )


@pytest.fixture(scope="module")
def slide() -> SpatialData:
    return _slide()


def _prepare(sdata, tissue=None, **kw):
    return prepare_inputs(
        sdata,
        "he",
        GENES,
        table_key=None,
        pixel_size=None,
        coordinate_system=None,
        image_channels=3,
        tissue=tissue,
        **kw,
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _full_res_array() -> np.ndarray:
    c = np.arange(SIZE_UM) + 0.5
    return _in_annulus(c[:, None], c[None, :])


def test_the_otsu_mask_of_a_low_contrast_image_misses_the_tissue(slide):
    truth = _truth_on_grid()
    assert _iou(_prepare(slide).mask, truth) < 0.7  # what the default gives here: the tissue must be given


@pytest.mark.parametrize(
    "given",
    ["tissue", "region_of_interest", "full-res array", "grid array", "DataArray"],
)
def test_given_tissue_is_the_mask(slide, given, caplog):
    truth = _truth_on_grid()
    tissue = {
        "tissue": "tissue",
        "region_of_interest": "region_of_interest",
        "full-res array": _full_res_array(),
        "grid array": truth,
        "DataArray": xr.DataArray(_full_res_array().astype(np.uint8), dims=("y", "x")),
    }[given]
    with caplog.at_level(logging.WARNING, logger="stsr"):
        inputs = _prepare(slide, tissue)
    assert inputs.grid.shape == truth.shape == (75, 75)
    if given == "grid array":
        np.testing.assert_array_equal(inputs.mask, truth)
    else:
        assert _iou(inputs.mask, truth) > 0.95
        assert (inputs.mask != truth).sum() <= 0.02 * truth.sum()
    # spots wholly outside the ring have no tissue pixel: their counts are left out, and the user is told
    covered = inputs.observation.tissue_area(inputs.mask) > 0
    c = inputs.observation.centres * PIXEL_UM  # (row, col) in µm
    gap = (
        np.hypot(c[:, 0] - CENTRE[0], c[:, 1] - CENTRE[1]) - 20 - OUTER
    )  # spot edge to the ring's outer edge
    assert not covered[gap > 2 * PIXEL_UM].any() and covered[gap < -2 * PIXEL_UM].all()
    assert 4 <= (~covered).sum() < 36
    message = f"{int((~covered).sum())} of 36 spots of 'spots' have no pixel in the tissue"
    assert any(message in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_tissue_mask_places_the_given_tissue_and_can_store_it(slide):
    sdata = SpatialData(
        images=dict(slide.images),
        labels=dict(slide.labels),
        shapes=dict(slide.shapes),
        tables=dict(slide.tables),
    )
    grid = stsr.pp.hr_grid(sdata, "he", PIXEL_UM)
    mask = stsr.pp.tissue_mask(sdata, "he", grid=grid, tissue="region_of_interest", key_added="roi_mask")
    assert _iou(mask, _truth_on_grid()) > 0.95
    np.testing.assert_array_equal(sdata["roi_mask"]["scale0"]["image"].values > 0, mask)
    assert sdata.attrs["stsr"]["roi_mask"]["tissue"] == "region_of_interest"
    # with the hole filled, the ring becomes a disk
    filled = stsr.pp.tissue_mask(sdata, "he", grid=grid, tissue="tissue", fill_holes=True)
    assert filled[int(CENTRE[0] / PIXEL_UM), int(CENTRE[1] / PIXEL_UM)] and filled.sum() > mask.sum()


def test_circles_and_collections_are_tissue_too(slide):
    import geopandas as gpd
    from shapely.geometry import GeometryCollection, LineString

    sdata = SpatialData(images=dict(slide.images), shapes=dict(slide.shapes), tables=dict(slide.tables))
    c = np.arange(75) * PIXEL_UM + PIXEL_UM / 2
    disk = np.hypot(c[:, None] - CENTRE[0], c[None, :] - CENTRE[1]) <= OUTER
    sdata.shapes["circle"] = ShapesModel.parse(
        np.array([[CENTRE[1], CENTRE[0]]]),
        geometry=0,
        radius=np.array([OUTER]),
        transformations={"global": Identity()},
    )
    # a collection as made by shapely.make_valid: the ring and a stray line (not tissue)
    mixed = GeometryCollection([_annulus_polygon(), LineString([(0, 0), (300, 300)])])
    sdata.shapes["mixed"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=[_annulus_polygon()]), transformations={"global": Identity()}
    )
    sdata.shapes["mixed"].geometry.iloc[0] = mixed
    grid = stsr.pp.hr_grid(sdata, "he", PIXEL_UM)
    assert _iou(stsr.pp.tissue_mask(sdata, "he", grid=grid, tissue="circle"), disk) > 0.97
    assert _iou(stsr.pp.tissue_mask(sdata, "he", grid=grid, tissue="mixed"), _truth_on_grid()) > 0.95


def test_bad_tissue_is_refused_with_the_fix(slide):
    with pytest.raises(KeyError, match=r"tissue='tisue'.*Did you mean 'tissue'"):
        _prepare(slide, "tisue")
    with pytest.raises(ValueError, match=r"'he' is a image element; pass a labels element"):
        _prepare(slide, "he")
    sdata = SpatialData(
        images=dict(slide.images),
        labels={
            "elsewhere": Labels2DModel.parse(
                np.ones((10, 10), np.uint8), dims=("y", "x"), transformations={"aligned": Identity()}
            )
        },
        shapes=dict(slide.shapes),
        tables=dict(slide.tables),
    )
    with pytest.raises(
        ValueError, match=r"no transformation to coordinate system 'global'.*set_transformation"
    ):
        _prepare(sdata, "elsewhere")
    with pytest.raises(ValueError, match=r"shape \(10, 10\).*\(300, 300\).*\(75, 75\)"):
        _prepare(slide, np.ones((10, 10), bool))
    with pytest.raises(TypeError, match="boolean"):
        _prepare(slide, np.full((300, 300), 0.3))
    far = np.zeros((300, 300), bool)  # tissue off every spot: between the four top-left spots
    far[48:52, 48:52] = True
    with pytest.raises(ValueError, match=r"covers none of the 36 spots of 'spots'"):
        _prepare(slide, far)


def test_prior_map_puts_the_counts_in_the_given_tissue_only(slide):
    sdata = SpatialData(
        images=dict(slide.images),
        labels=dict(slide.labels),
        shapes=dict(slide.shapes),
        tables=dict(slide.tables),
    )
    stsr.tl.prior_map(sdata, "he", GENES, tissue="region_of_interest", progress=False)
    out = np.asarray(sdata["stsr_prior"]["scale0"]["image"].values)
    inputs = expected_inputs(_prepare(slide, "region_of_interest"))  # the counts as Poisson draws
    assert out.shape == (len(GENES), *inputs.grid.shape)
    assert not out[:, ~inputs.mask].any()  # nothing off the given tissue
    assert (out.sum(0)[inputs.mask] > 0).mean() > 0.99  # and counts on it
    covered = inputs.observation.tissue_area(inputs.mask) > 0
    pooled = inputs.observation.pool(out.astype(np.float64))
    np.testing.assert_allclose(pooled[:, covered], inputs.lr[:, covered], rtol=1e-4)


def test_super_resolve_puts_the_counts_in_the_given_tissue_only(slide, tiny_model):
    sdata = SpatialData(
        images=dict(slide.images),
        labels=dict(slide.labels),
        shapes=dict(slide.shapes),
        tables=dict(slide.tables),
    )
    stsr.tl.super_resolve(
        sdata,
        "he",
        GENES,
        model=tiny_model,
        tissue="region_of_interest",
        steps=1,
        tile_size=32,
        progress=False,
    )
    out = np.asarray(sdata["stsr"]["scale0"]["image"].values)
    inputs = expected_inputs(_prepare(slide, "region_of_interest"))
    assert not out[:, ~inputs.mask].any() and out.sum() > 0
    assert sdata.attrs["stsr"]["stsr"]["tissue"] == "region_of_interest"
    covered = inputs.observation.tissue_area(inputs.mask) > 0
    has = inputs.lr > 0
    pooled = inputs.observation.pool(out.astype(np.float64))
    np.testing.assert_allclose(pooled[has & covered], inputs.lr[has & covered], rtol=1e-4)

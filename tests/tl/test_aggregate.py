"""stsr.tl.aggregate: area-weighted sums of an HR raster over cell polygons, circles and labels."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import spatialdata as sd
from scipy import sparse
from shapely.geometry import MultiPolygon, Polygon, box
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

from stsr.tl._aggregate import aggregate

YX = ("y", "x")
PX = 2.0  # µm per HR pixel
ORIGIN = (10.0, 20.0)  # (y, x) µm of the raster's top-left corner


def _raster(values: np.ndarray, genes: list[str]) -> object:
    return Image2DModel.parse(
        values.astype(np.float32),
        dims=("c", "y", "x"),
        c_coords=genes,
        transformations={
            "global": Sequence([Scale([PX, PX], axes=YX), Translation(list(ORIGIN), axes=YX)]),
        },
        scale_factors=[2],
        chunks=(len(genes), 16, 16),
    )


def _shapes(geoms: list, index: list | None = None, tf=None) -> gpd.GeoDataFrame:
    gdf = gpd.GeoDataFrame(geometry=geoms, index=index)
    return ShapesModel.parse(gdf, transformations={"global": tf or Identity()})


def _x(adata) -> np.ndarray:
    return adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)


def _to_um(row: float, col: float) -> tuple[float, float]:
    """(x, y) µm of continuous raster pixel coordinates."""
    return ORIGIN[1] + col * PX, ORIGIN[0] + row * PX


def test_constant_raster_gives_polygon_area():
    ones = np.ones((1, 40, 50))
    # squares and a rectangle with edges off the pixel grid, in µm
    geoms = [
        box(31.3, 17.7, 52.1, 38.5),  # 10.4 x 10.4 HR px
        box(60.05, 40.3, 81.55, 47.9),  # 10.75 x 3.8 HR px
        Polygon([(40, 50), (70, 50), (55, 80)]),  # triangle
    ]
    sdata = sd.SpatialData(
        images={"stsr": _raster(ones, ["one"])}, shapes={"cells": _shapes(geoms, ["a", "b", "c"])}
    )
    adata = aggregate(sdata, "stsr", "cells")
    expected = np.array([g.area for g in geoms]) / PX**2
    np.testing.assert_allclose(_x(adata)[:, 0], expected, rtol=0.02)
    np.testing.assert_allclose(adata.obs["area"], expected, rtol=0.02)
    assert list(adata.obs_names) == ["a", "b", "c"]
    assert list(adata.obs["instance_id"]) == ["a", "b", "c"]
    np.testing.assert_allclose(adata.obsm["spatial"], [[g.centroid.x, g.centroid.y] for g in geoms])
    assert adata.uns["spatialdata_attrs"]["region"] == "cells"


def test_two_cells_recover_their_expression():
    h, w = 30, 40
    hr = np.zeros((3, h, w))
    hr[0, :, :20] = 2.0  # left half: gene A
    hr[1, :, 20:] = 5.0  # right half: gene B
    hr[2] = 0.5  # everywhere
    # cells (µm) fully inside each half: left cell 10 x 8 px, right cell 6 x 6 px (a MultiPolygon of two squares)
    left = box(*_to_um(5, 4), *_to_um(13, 14))  # (x0, y0, x1, y1)
    right = MultiPolygon([box(*_to_um(2, 25), *_to_um(5, 31)), box(*_to_um(20, 25), *_to_um(23, 31))])
    # a hole: a square cell minus its centre -> area 36 - 4
    outer = box(*_to_um(20, 2), *_to_um(26, 8)).exterior.coords
    inner = box(*_to_um(22, 4), *_to_um(24, 6)).exterior.coords
    holed = Polygon(outer, [inner])
    sdata = sd.SpatialData(
        images={"stsr": _raster(hr, ["A", "B", "C"])},
        shapes={"cells": _shapes([left, right, holed], [7, 9, 11])},
    )
    adata = aggregate(sdata, "stsr", "cells", key_added="cells_expr")
    x = _x(adata)
    np.testing.assert_allclose(x[0], [2.0 * 80, 0.0, 0.5 * 80], rtol=1e-6)
    np.testing.assert_allclose(x[1], [0.0, 5.0 * 36, 0.5 * 36], rtol=1e-6)
    np.testing.assert_allclose(x[2], [2.0 * 32, 0.0, 0.5 * 32], rtol=1e-6)
    assert list(adata.obs_names) == ["7", "9", "11"]
    assert list(adata.var_names) == ["A", "B", "C"]
    assert sdata.tables["cells_expr"] is adata
    np.testing.assert_allclose(
        adata.obsm["spatial"][0], [(20 + 4 * 2 + 20 + 14 * 2) / 2, (10 + 5 * 2 + 10 + 13 * 2) / 2]
    )


def test_circles_in_another_frame():
    ones = np.ones((1, 40, 40))
    # circles stored in "mm", mapped to µm by Scale(1000): radius 0.006 mm = 6 µm = 3 HR px
    centres = np.array([[0.05, 0.04], [0.07, 0.06]])  # (x, y) in mm
    circles = ShapesModel.parse(
        centres,
        geometry=0,
        radius=np.array([0.006, 0.004]),
        transformations={"global": Scale([1000, 1000], axes=("x", "y"))},
    )
    sdata = sd.SpatialData(images={"stsr": _raster(ones, ["one"])}, shapes={"spots": circles})
    adata = aggregate(sdata, "stsr", "spots")
    np.testing.assert_allclose(_x(adata)[:, 0], np.pi * np.array([3.0, 2.0]) ** 2, rtol=0.02)
    np.testing.assert_allclose(adata.obsm["spatial"], centres * 1000, atol=1e-6)


def test_labels_at_finer_resolution():
    h, w = 20, 20
    rng = np.random.default_rng(0)
    hr = rng.poisson(3.0, (2, h, w)).astype(np.float32)
    # labels at 0.5 µm (4x finer than the 2 µm raster), same origin; cell 1 = HR pixels [2, 6) x [3, 9),
    # cell 5 covers half of HR pixel column 12 (label columns 48..49 of 4) over rows [10, 14)
    lab = np.zeros((h * 4, w * 4), np.int32)
    lab[8:24, 12:36] = 1
    lab[40:56, 48:50] = 5
    labels = Labels2DModel.parse(
        lab,
        dims=YX,
        transformations={
            "global": Sequence([Scale([0.5, 0.5], axes=YX), Translation(list(ORIGIN), axes=YX)])
        },
    )
    sdata = sd.SpatialData(images={"stsr": _raster(hr, ["A", "B"])}, labels={"cells": labels})
    adata = aggregate(sdata, "stsr", "cells")
    assert list(adata.obs["instance_id"]) == [1, 5]
    x = _x(adata)
    np.testing.assert_allclose(x[0], hr[:, 2:6, 3:9].sum((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(x[1], 0.5 * hr[:, 10:14, 12].sum(1), rtol=1e-6)
    np.testing.assert_allclose(adata.obs["area"], [24.0, 2.0])
    np.testing.assert_allclose(adata.obsm["spatial"][0], _to_um(4.0, 6.0), atol=1e-9)


def test_cells_outside_get_zero_and_errors():
    ones = np.ones((1, 10, 10))
    far = box(1000, 1000, 1010, 1010)
    sdata = sd.SpatialData(images={"stsr": _raster(ones, ["one"])}, shapes={"cells": _shapes([far])})
    adata = aggregate(sdata, "stsr", "cells")
    assert _x(adata)[0, 0] == 0 and adata.obs["area"].iloc[0] == 0
    with pytest.raises(KeyError, match="Did you mean 'cells'"):
        aggregate(sdata, "stsr", "cels")
    with pytest.raises(KeyError, match="Did you mean 'stsr'"):
        aggregate(sdata, "stsrr", "cells")
    with pytest.raises(ValueError, match="'aligned'"):
        aggregate(sdata, "stsr", "cells", coordinate_system="aligned")
    sdata.tables["t"] = adata
    with pytest.raises(KeyError, match="already has"):
        aggregate(sdata, "stsr", "cells", key_added="t")
    assert sdata.tables["t"] is adata

"""Synthetic SpatialData for the plotting tests: an RGB image, an HR raster (+ std) overlaying it, and LR spots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import spatialdata as sd
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Scale, Sequence, Translation

YX = ("y", "x")
IMG_UM = 0.5  # µm per image pixel
IMG_SHAPE = (96, 128)  # image (height, width) in pixels -> 48 x 64 µm
HR_IMG_PX = 4.0  # image pixels per HR pixel -> 2 µm HR pixels
HR_UM = HR_IMG_PX * IMG_UM
ORIGIN_IMG_PX = (8.0, 4.0)  # (y, x) of the grid's corner in image pixels
HR_SHAPE = (20, 30)  # covers image px y 8..88, x 4..124
GENES = ["ERBB2", "KRT19", "PTPRC"]
SPOT_CENTRES = np.array([[20.0, 15.0], [40.0, 30.0], [12.0, 35.0]])  # (x, y) µm
SPOT_RADIUS = 5.0
SPOT_COUNTS = np.array([[300.0, 10, 1], [150, 20, 2], [30, 5, 0]])


def grid_tf() -> Sequence:
    return Sequence(
        [
            Scale([HR_IMG_PX] * 2, axes=YX),
            Translation(list(ORIGIN_IMG_PX), axes=YX),
            Scale([IMG_UM] * 2, axes=YX),
        ]
    )


def make_sdata() -> sd.SpatialData:
    rng = np.random.default_rng(0)
    image = Image2DModel.parse(
        rng.integers(0, 255, (3, *IMG_SHAPE), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={"global": Scale([IMG_UM] * 2, axes=YX)},
        scale_factors=[2, 2],
    )
    rr, cc = np.meshgrid(np.arange(HR_SHAPE[0]), np.arange(HR_SHAPE[1]), indexing="ij")
    hr = np.stack([0.1 * cc + 0.05 * rr, np.full(HR_SHAPE, 0.5), rng.poisson(0.2, HR_SHAPE)]).astype(
        np.float32
    )
    kw = dict(dims=("c", "y", "x"), c_coords=GENES, transformations={"global": grid_tf()}, scale_factors=[2])
    raster = Image2DModel.parse(hr, **kw)
    std = Image2DModel.parse(0.1 * hr + 0.01, **kw)
    spots = ShapesModel.parse(
        SPOT_CENTRES,
        geometry=0,
        radius=np.full(len(SPOT_CENTRES), SPOT_RADIUS),
        transformations={"global": Scale([1, 1], axes=("x", "y"))},
    )
    table = ad.AnnData(
        X=SPOT_COUNTS.astype(np.float32),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * 3), "instance_id": np.arange(3)}, index=["s0", "s1", "s2"]
        ),
        var=pd.DataFrame(index=GENES),
    )
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    sdata = sd.SpatialData(
        images={"he": image, "stsr": raster, "stsr_std": std},
        shapes={"spots": spots},
        tables={"table": table},
    )
    prov = {"image_key": "he", "spots_key": "spots", "table_key": "table", "unit": "counts per HR pixel"}
    sdata["stsr"].attrs["stsr"] = dict(prov)
    sdata["stsr_std"].attrs["stsr"] = dict(prov)
    return sdata

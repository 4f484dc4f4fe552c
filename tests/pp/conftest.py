"""Tiny SpatialData fixtures for the stsr.pp tests."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

GENES = ["Actb", "Gapdh", "mt-Co1", "Rps3", "Krt8"]
#: image "img" has 2 µm pixels and its top-left corner at (y=10, x=20) µm in "global"
IMG_UM_PER_PX = 2.0
IMG_ORIGIN = (10.0, 20.0)
SPOT_CENTRES_YX = np.array([[40.0, 60.0], [40.0, 90.0], [80.0, 60.0], [80.0, 90.0], [100.0, 140.0]])
SPOT_RADIUS = 10.0


def make_tiny() -> SpatialData:
    """A 60 x 80 px RGB image (2 µm/px, offset), five 20 µm spots in µm and a 5-gene count table."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 60, 80), dtype=np.uint8)
    tf = Sequence(
        [
            Scale([IMG_UM_PER_PX, IMG_UM_PER_PX], axes=("y", "x")),
            Translation(list(IMG_ORIGIN), axes=("y", "x")),
        ]
    )
    image = Image2DModel.parse(
        img,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2],
        transformations={"global": tf, "aligned": Scale([0.5, 0.5], axes=("y", "x"))},
    )
    spots = ShapesModel.parse(
        SPOT_CENTRES_YX[:, ::-1].copy(),
        geometry=0,
        radius=np.full(len(SPOT_CENTRES_YX), SPOT_RADIUS),
        index=np.arange(len(SPOT_CENTRES_YX)),
        transformations={"global": Identity()},
    )
    counts = rng.poisson(20, (len(SPOT_CENTRES_YX), len(GENES))).astype(np.float32)
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * len(counts)), "instance_id": np.arange(len(counts))},
            index=[f"s{i}" for i in range(len(counts))],
        ),
        var=pd.DataFrame(index=GENES),
    )
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="instance_id")
    return SpatialData(images={"img": image}, shapes={"spots": spots}, tables={"table": table})


@pytest.fixture
def tiny_sd() -> SpatialData:
    return make_tiny()


@pytest.fixture
def geom() -> SimpleNamespace:
    """The geometry of :func:`make_tiny`."""
    return SimpleNamespace(
        genes=list(GENES),
        um_per_px=IMG_UM_PER_PX,
        origin=IMG_ORIGIN,
        centres=SPOT_CENTRES_YX.copy(),
        radius=SPOT_RADIUS,
    )


@pytest.fixture(scope="session")
def _syn_base() -> SpatialData:
    from stsr.datasets._synthetic import synthetic

    return synthetic(size_um=(400.0, 400.0), n_genes=8, transcripts=True, seed=1)


@pytest.fixture
def syn(_syn_base: SpatialData) -> SpatialData:
    """A fresh SpatialData sharing the (read-only) elements of a tiny synthetic slide."""
    s = SpatialData(
        images=dict(_syn_base.images),
        labels=dict(_syn_base.labels),
        points=dict(_syn_base.points),
        shapes=dict(_syn_base.shapes),
        tables={k: v.copy() for k, v in _syn_base.tables.items()},
    )
    s.attrs.update(copy.deepcopy(dict(_syn_base.attrs)))
    return s


def _snapshot(sdata: SpatialData) -> dict:
    """Keys, element identities, attrs and table values, to check that a failing call changed nothing."""
    out = {"attrs": copy.deepcopy(dict(sdata.attrs))}
    for kind in ("images", "labels", "points", "shapes", "tables"):
        elems = getattr(sdata, kind)
        out[kind] = {k: id(v) for k, v in elems.items()}
    out["tables_x"] = {
        k: (t.X.toarray() if sparse.issparse(t.X) else np.asarray(t.X)).copy()
        for k, t in sdata.tables.items()
    }
    out["tables_uns"] = {k: sorted(t.uns) for k, t in sdata.tables.items()}
    return out


def _assert_unchanged(sdata: SpatialData, before: dict) -> None:
    after = _snapshot(sdata)
    for key in ("attrs", "images", "labels", "points", "shapes", "tables", "tables_uns"):
        assert after[key] == before[key], key
    for k, x in before["tables_x"].items():
        np.testing.assert_array_equal(after["tables_x"][k], x)


@pytest.fixture
def unchanged():
    """``snap = unchanged.snap(sdata)`` before a failing call, ``unchanged.check(sdata, snap)`` after."""

    class _Checker:
        snap = staticmethod(_snapshot)
        check = staticmethod(_assert_unchanged)

    return _Checker

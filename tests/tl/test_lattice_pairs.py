"""Spot-lattice training pairs (``stsr.tl.training_pair(table_key=...)``) put each spot's counts on the image under
that spot, whether the lattice runs along the image's axes or is turned against them (a section registered into
another's frame, as HER2ST A2 into A1's)."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import spatialdata as sd
from spatialdata.models import Image2DModel, ShapesModel, TableModel

import stsr
from stsr.tl._pairs import LATTICE_ROTATION_TOL

PITCH, RADIUS, N = 40.0, 8.0, 12  # image pixels; a 12 x 12 lattice


def _slide(angle_deg: float, marked: np.ndarray | None = None, step_c: tuple[float, float] | None = None):
    """A white image with a red disk under each spot of ``marked`` (lattice positions, default: every spot), spots
    on an ``N x N`` lattice turned by ``angle_deg`` about the image's centre, and gene ``g``'s count of spot
    ``(i, j)`` = ``10 i + j + 1``."""
    t = np.radians(angle_deg)
    step_r = PITCH * np.array([np.cos(t), np.sin(t)])  # (dy, dx) per array_row
    step_c = np.asarray(step_c) if step_c is not None else PITCH * np.array([-np.sin(t), np.cos(t)])
    i, j = (a.ravel() for a in np.meshgrid(np.arange(N), np.arange(N), indexing="ij"))
    centre = np.array([350.0, 350.0])
    yx = centre + np.outer(i - (N - 1) / 2, step_r) + np.outer(j - (N - 1) / 2, step_c)
    img = np.full((3, 700, 700), 255, np.uint8)
    yy, xx = np.mgrid[:700, :700] + 0.5
    mark = np.ones(len(i), bool) if marked is None else marked[i, j]
    for (cy, cx), m in zip(yx, mark, strict=True):
        if m:
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2
            img[1][disk] = img[2][disk] = 0
    ids = [f"s{k}" for k in range(len(i))]
    spots = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": RADIUS}, geometry=shapely.points(yx[:, 1], yx[:, 0]), index=ids)
    )
    counts = (10 * i + j + 1).astype(np.float32)[:, None]
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(i)), "instance_id": ids, "array_row": i, "array_col": j},
        index=ids,
    )
    table = TableModel.parse(
        ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=["g"])),
        region="spots",
        region_key="region",
        instance_key="instance_id",
    )
    return sd.SpatialData(
        images={"he": Image2DModel.parse(img, dims=("c", "y", "x"))},
        shapes={"spots": spots},
        tables={"table": table},
    )


def _red_under_pixels(pair) -> np.ndarray:
    """Per HR pixel, whether the image crop of the pair is red at its centre (the pair pixel there averages 8 x 8
    image pixels: mostly red when the spot's disk covers most of them)."""
    img = pair.image.numpy().astype(float)
    k = img.shape[-1] // pair.shape[1]
    centre = img[:, k // 2 :: k, k // 2 :: k]
    return (centre[0] - centre[1] > 100) & (centre[0] - centre[2] > 100)


@pytest.mark.parametrize("angle", [0.0, 1.0, 8.0, -30.0, 180.0])
def test_each_spot_lies_on_its_own_image(angle):
    """The counts of spot (i, j) are HR pixel (i, j), and the image under that pixel is the image under the spot:
    red under the marked spots only (a checkerboard of them), at any rotation of the lattice (180 degrees: array_row
    runs up the image)."""
    marked = (np.add.outer(np.arange(N), np.arange(N)) % 2) == 0
    sdata = _slide(angle, marked)
    pair = stsr.tl.training_pair(sdata, "he", table_key="table", factor=2, image_scale=5)
    assert pair.shape == (N, N)
    np.testing.assert_array_equal(pair.hr[0].numpy(), np.add.outer(10 * np.arange(N), np.arange(N)) + 1)
    np.testing.assert_array_equal(_red_under_pixels(pair), marked)


def test_a_rotation_the_lattice_tolerates_keeps_the_image_frame():
    """Below the tolerance the pair is cut from the image's own pixel frame (as before rotations were read); the
    8 degree lattice is beyond it (an axis-aligned fit would put its corner spots more than a pitch off)."""
    assert np.sin(np.radians(1.0)) * N <= LATTICE_ROTATION_TOL < np.sin(np.radians(8.0)) * N
    small = stsr.tl.training_pair(_slide(1.0), "he", table_key="table", factor=2, image_scale=5)
    plain = stsr.tl.training_pair(_slide(0.0), "he", table_key="table", factor=2, image_scale=5)
    assert _red_under_pixels(small).all() and _red_under_pixels(plain).all()


def test_a_lattice_that_is_not_square_is_refused():
    sheared = _slide(0.0, step_c=(12.0, PITCH))  # array_col steps are not at right angles to array_row steps
    with pytest.raises(ValueError, match="do not form a square lattice"):
        stsr.tl.training_pair(sheared, "he", table_key="table", factor=2, image_scale=5)
    flipped = _slide(0.0, step_c=(0.0, -PITCH))  # array_col runs against x: a mirror image, not a rotation
    with pytest.raises(ValueError, match="do not form a square lattice"):
        stsr.tl.training_pair(flipped, "he", table_key="table", factor=2, image_scale=5)

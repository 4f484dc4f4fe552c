"""A user's crop of a real slide (``spatialdata.bounding_box_query``), down to a handful of spots."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata import bounding_box_query

import stsr


@pytest.fixture(scope="module")
def c2():
    return stsr.datasets.her2st("C2")


def _crop(sdata, half: float):
    centre = np.median(sdata["spots"].geometry.get_coordinates().to_numpy(), 0)
    return bounding_box_query(
        sdata,
        axes=("x", "y"),
        min_coordinate=centre - half,
        max_coordinate=centre + half,
        target_coordinate_system="global",
        filter_table=True,
    )


def _values(sdata, key: str) -> np.ndarray:
    el = sdata[key]
    el = el["scale0"]["image"] if hasattr(el, "children") else el
    return np.asarray(el.values, np.float64)


def test_a_crop_of_six_spots_gets_the_prior_map_and_a_spread(c2):
    """Six spots make two 2 x 2 groups, too few for the self-check's groups: super_resolve says so, predicts each
    spot from the others for its spread and self-estimate, and writes the prior map (the same values as prior_map)
    with its calibrated spread."""
    sub = _crop(c2, 220)
    assert len(sub["spots"]) == 6
    genes = ["ERBB2", "CD74"]
    stsr.tl.super_resolve(sub, "he", genes, progress=False)
    stsr.tl.prior_map(sub, "he", genes, progress=False)
    rec = sub.attrs["stsr"]["stsr"]
    check = rec["self_check"]
    assert check["spot_groups"] == 2 and check["diffusion_residual"] == 0.0 and rec["prior_strength"] == 0.25
    mapped = _values(sub, "stsr")
    np.testing.assert_allclose(mapped, _values(sub, "stsr_prior"), rtol=1e-5, atol=1e-6)
    phi = np.asarray(rec["dispersion"])
    assert np.all(np.isfinite(phi)) and np.all(phi > 0)
    np.testing.assert_allclose(
        _values(sub, "stsr_std"), np.sqrt(phi)[:, None, None] * mapped, rtol=1e-5, atol=1e-6
    )
    assert -1 <= check["self_estimated_r"] <= 1

"""``benchmarks/capture_dispersion.py``: the within-block dispersion of spot counts and its capture share."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import capture_dispersion as C  # noqa: E402


def _lattice(
    capture_sd: float, seed: int = 0, shape: tuple[int, int] = (40, 40)
) -> tuple[np.ndarray, np.ndarray]:
    """Genes whose rate is one share of each spot's capture (log-normal with ``capture_sd``): spots differ inside a
    block only by their capture and counting noise; the totals add 2000 counts of other genes per unit capture."""
    rng = np.random.default_rng(seed)
    capture = np.exp(capture_sd * rng.standard_normal(shape))
    shares = np.array([5.0, 10.0, 20.0, 40.0])
    counts = rng.poisson(shares[:, None, None] * capture[None]).astype(float)
    totals = counts.sum(0) + rng.poisson(2000.0 * capture)
    return counts, totals


def test_capture_explains_the_within_block_spread_it_makes():
    counts, totals = _lattice(capture_sd=0.5)
    d = C.within_block_dispersion(counts, totals)
    cv2 = np.exp(0.5**2) - 1  # the log-normal's squared CV
    assert d["blocks"] == 400
    assert d["phi"] == pytest.approx(cv2, rel=0.25)
    assert d["totals_cv2"] == pytest.approx(cv2, rel=0.25)
    assert abs(d["phi_after_capture"]) < 0.03  # counting noise is all that is left


def test_no_capture_variation_gives_no_extra_dispersion_and_empty_blocks_are_left_out():
    counts, totals = _lattice(capture_sd=0.0)
    totals[:2, :2] = 0  # one block off the tissue
    d = C.within_block_dispersion(counts, totals)
    assert d["blocks"] == 399
    assert abs(d["phi"]) < 0.02 and abs(d["totals_cv2"]) < 0.01
    with pytest.raises(ValueError, match="four spots"):
        C.within_block_dispersion(counts, np.zeros_like(totals))

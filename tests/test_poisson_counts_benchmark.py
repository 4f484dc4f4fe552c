"""``benchmarks/poisson_counts.py``: the count-split scoring of the expected counts on real slides."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import stsr
from stsr.tl._inputs import prepare_inputs, spot_totals

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import poisson_counts as P  # noqa: E402


def test_halves_split_every_spots_counts_into_two_independent_parts():
    sdata = stsr.datasets.synthetic(size_um=(400, 400), n_genes=6, depth=0.5, seed=3)
    genes = list(sdata["table"].var_names[:4])
    full = prepare_inputs(
        sdata, "he", genes, table_key="table", pixel_size=None, coordinate_system=None, image_channels=3
    )
    totals = spot_totals(sdata, "table", full.spots_key)
    op, a, totals_a, b, totals_b = P._halves(sdata, "he", genes, seed=0)
    assert op.n_obs == full.observation.n_obs
    # the halves add up to the spots' counts, gene by gene and in total, in the operator's order
    np.testing.assert_array_equal(a + b, full.lr)
    np.testing.assert_array_equal(totals_a + totals_b, totals)
    assert a.min() >= 0 and b.min() >= 0 and np.array_equal(a, np.rint(a))
    # binomial halves: about half each, not the same draw
    assert 0.4 < a.sum() / full.lr.sum() < 0.6 and not np.array_equal(a, b)
    # the slide's own table is left as it was
    np.testing.assert_array_equal(spot_totals(sdata, "table", full.spots_key), totals)


def test_deviance_is_zero_for_the_counts_themselves_and_grows_away_from_them():
    y = np.array([[0.0, 1.0, 4.0, 10.0]])
    assert P._deviance(y, y) < 0.01  # (means are floored at 0.01: a zero count costs 0.02)
    assert P._deviance(y + 2.0, y) > P._deviance(y + 1.0, y) > 0

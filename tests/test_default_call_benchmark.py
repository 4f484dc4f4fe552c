"""``benchmarks/default_call.py``: what the default ``super_resolve`` call gives, its self-estimate and coverage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import nbinom

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import accuracy as A  # noqa: E402
import default_call as D  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _by_ppf(mean: np.ndarray, phi: np.ndarray, y: np.ndarray, level: float) -> np.ndarray:
    """The hand computation: is each count within [ppf(a), ppf(1 - a)] of scipy's nbinom(1/phi, n/(n+m))?"""
    n = (1.0 / phi)[:, None, None]
    p = n / (n + mean)
    a = (1 - level) / 2
    return (y >= nbinom.ppf(a, n, p)) & (y <= nbinom.ppf(1 - a, n, p))


def test_nb_coverage_matches_the_intervals_and_is_nominal_when_the_model_is_right():
    rng = np.random.default_rng(0)
    phi = np.array([0.05, 0.3, 1.0])
    rates = rng.uniform(0.5, 30.0, (3, 40, 50))
    n = (1.0 / phi)[:, None, None]
    counts = rng.negative_binomial(n, n / (n + rates)).astype(float)  # numpy's (n, p): mean n (1-p)/p = rates
    mask = np.ones((40, 50), bool)
    mask[:5] = False
    cov = D.coverage(rates, phi, counts, mask)
    for level in D.LEVELS:
        hand = _by_ppf(rates, phi, counts, level)[:, mask]
        assert cov.pooled[level] == pytest.approx(hand.mean(), abs=1e-4)
        np.testing.assert_allclose(cov.per_gene[level], hand.mean(1), atol=1e-4)
        assert cov.gene_mean[level] == pytest.approx(hand.mean(1).mean(), abs=1e-4)
    # the exact probability mass of the intervals (at least the level, a discrete distribution) ...
    a = (1 - 0.9) / 2
    p = n / (n + rates)
    lo, hi = nbinom.ppf(a, n, p), nbinom.ppf(1 - a, n, p)
    mass = (nbinom.cdf(hi, n, p) - nbinom.cdf(lo - 1, n, p))[:, mask].mean()
    assert 0.9 <= mass < 0.94
    # ... is what the simulated counts show, within sampling error (3 sd of a binomial share)
    assert abs(cov.pooled[0.9] - mass) < 3 * np.sqrt(0.1 * 0.9 / cov.n_values)
    assert cov.n_values == 3 * 35 * 50
    # too small a dispersion: the intervals are too narrow and cover far less
    narrow = D.coverage(rates, np.full(3, 0.005), counts, mask)
    assert narrow.pooled[0.9] < 0.7
    # a mean of zero is the point mass at zero
    zero = D.coverage(np.zeros((1, 1, 2)), np.array([0.5]), np.array([[[0.0, 1.0]]]), np.ones((1, 2), bool))
    assert zero.per_gene[0.5].tolist() == [0.5]


def test_randomised_pit_coverage_is_nominal_at_low_counts_where_the_plain_interval_over_covers():
    rng = np.random.default_rng(3)
    phi = np.array([0.1, 0.5])
    rates = rng.uniform(0.05, 0.6, (2, 60, 60))  # mostly 0 or 1 counts
    n = (1.0 / phi)[:, None, None]
    counts = rng.negative_binomial(n, n / (n + rates)).astype(float)
    mask = np.ones((60, 60), bool)
    cov = D.coverage(rates, phi, counts, mask)
    sd = np.sqrt(0.1 * 0.9 / cov.n_values)
    assert cov.pooled[0.9] > 0.97  # the plain interval [0, 1 or 2] holds far more than 90 %
    for level in D.LEVELS:  # the randomised PIT is calibrated whatever the counts
        assert abs(cov.pit[level] - level) < 4 * sd + 0.005
    # a wrong model is seen: means 10 x too high or too low, or a dispersion far too large
    assert D.coverage(10 * rates, phi, counts, mask).pit[0.9] < 0.7
    assert D.coverage(rates / 10, phi, counts, mask).pit[0.9] < 0.75
    assert D.coverage(rates, np.full(2, 20.0), counts, mask).pit[0.5] < 0.45
    # by hand, one count: P(Y < y) = 0.02, P(Y <= y) = 0.12 -> a PIT uniform on [0.02, 0.12], 0.07 of it in [0.05, 0.95]
    assert D.pit_covered(np.array([0.12]), np.array([0.02]), 0.9)[0] == pytest.approx(0.7)


def stsr_bicubic(case: A.Case) -> np.ndarray:
    import baselines as B

    return B.bicubic_mass(case.lr, case.pair.observation)


def test_default_call_case_reports_the_calls_own_provenance(tiny_model, monkeypatch):
    import baselines as B

    pytest.importorskip("h5py")  # the image teacher's weights (extra "prior")
    case = A.synthetic_case(200.0, 3, 4, public=True)
    tesla = B.tesla_available()  # run.sh installs it; elsewhere its rows are left out
    res = D.evaluate_case(case, model=tiny_model, tesla=tesla, split=True)
    methods = ["bicubic + mass", *(["TESLA"] if tesla else []), D.PRIOR_LABEL, D.DEFAULT_LABEL]
    assert [r.method for r in res.rows] == methods
    # the count-split rows: the same calls on one half of the counts, scored against the other half
    assert [r.method for r in res.split_rows] == methods
    assert all(r.values is not None for r in res.split_rows) and res.split.name.endswith(", split")
    assert res.split_rows[0].values == A.score(res.split, stsr_bicubic(res.split))
    assert res.split_rows[-1].note.startswith("prior strength")
    assert all(r.values is not None for r in res.rows)
    call = res.default
    # the scored map is the element super_resolve wrote, which is gone from the slide afterwards
    assert res.row(D.DEFAULT_LABEL).values == A.score(case, call.map)
    assert res.truth_scores == (
        res.row(D.DEFAULT_LABEL).values["pearson"][0],
        res.row(D.DEFAULT_LABEL).values["within_block"][0],
    )
    rec = call.provenance
    assert rec["method"] == "super_resolve" and rec["self_check"]["self_estimated_r"] == res.self_estimate[0]
    assert res.self_estimate[1] == rec["self_check"]["self_estimated_within_r"]
    assert rec["prior_strength"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    np.testing.assert_allclose(res.phi, [rec["dispersion"][rec["genes"].index(g)] for g in case.pair.genes])
    # the _std layer is sqrt(phi) x map, and the coverage is that of the truth counts by its intervals
    assert res.std_deviation < 1e-5
    hand = _by_ppf(call.map, res.phi, case.pair.hr.double().numpy(), 0.9)[:, case.mask]
    assert res.coverage.pooled[0.9] == pytest.approx(hand.mean(), abs=1e-4)
    assert 0.5 < res.coverage.pooled[0.9] <= 1.0

    text = D.report([res], header=["# t", ""], figure=None, out=None)
    assert "## 4. Against an independent half of the counts" in text and res.split_rows[-1].note in text
    if tesla:
        lr, op = res.split.lr, res.split.pair.observation
        assert res.split_rows[1].values == A.score(res.split, B.tesla(lr, op, res.split.pair.image.numpy()))
        # the summary counts the real cases where the default call is at least TESLA on r and within-block r
        monkeypatch.setattr(D, "is_real", lambda r: True)

        def ahead(rows: list) -> int:
            a, b = rows[-1].values, rows[1].values
            return int(all(a[k][0] >= b[k][0] for k in ("pearson", "within_block")))

        line = (
            f"- Default call at least TESLA on both: {ahead(res.rows)} of 1 real cases; against an independent "
            f"half of the counts: {ahead(res.split_rows)} of 1."
        )
        assert line in D.report([res], header=[], figure=None, out=None).splitlines()
    est_r = res.self_estimate[0]
    assert f"{est_r:.3f}" in text and f"{res.coverage.pooled[0.9]:.3f}" in text


def test_count_split_gives_an_input_and_a_truth_with_independent_noise():
    """Binomial thinning: the input pools one half of the truth counts, the new truth is the other half; the two
    halves' counting noise is independent (a constant rate: nothing but noise varies between the blocks)."""
    from stsr.models import TrainingPair
    from stsr.observation import ObservationModel

    rng = np.random.default_rng(1)
    shape, factor = (60, 60), 2
    op = ObservationModel.blocks(shape, factor)
    hr = rng.poisson(6.0, (2, *shape)).astype(np.float32)
    pair = TrainingPair(
        image=torch.zeros(3, *shape), hr=torch.from_numpy(hr), observation=op, genes=["a", "b"]
    )
    case = A.Case("constant", pair, op.pool(hr.astype(np.float64)))
    split = D.count_split(case)
    truth = split.pair.hr.double().numpy()
    half = hr - truth
    assert split.name == "constant, split" and np.allclose(truth, np.rint(truth)) and truth.min() >= 0
    assert half.min() >= 0 and split.lr == pytest.approx(op.pool(half))  # the input pools the other half
    assert truth.mean() == pytest.approx(3.0, abs=0.1) and half.mean() == pytest.approx(3.0, abs=0.1)
    # the truth's block sums no longer carry the input's noise (they did before the split: r = 1)
    for g in range(2):
        assert np.corrcoef(case.lr[g], op.pool(hr.astype(np.float64))[g])[0, 1] == pytest.approx(1.0)
        assert abs(np.corrcoef(split.lr[g], op.pool(truth)[g])[0, 1]) < 0.1
    assert not np.array_equal(D.count_split(case, seed=2).lr, split.lr)
    with pytest.raises(ValueError, match="not counts"):
        D.count_split(A.Case("rates", A._with(pair, hr=torch.from_numpy(hr + 0.5)), case.lr))


def test_pit_factor_finds_the_dispersion_the_counts_were_drawn_with():
    rng = np.random.default_rng(5)
    phi = np.array([0.1, 0.3])
    rates = rng.uniform(5.0, 60.0, (2, 50, 50))
    n = (1.0 / phi)[:, None, None]
    counts = rng.negative_binomial(n, n / (n + rates)).astype(float)
    # the right phi needs no factor; a third of it needs about 3; twice it about a half
    assert D.pit_factor(rates, phi, counts) == pytest.approx(1.0, rel=0.2)
    assert D.pit_factor(rates, phi / 3, counts) == pytest.approx(3.0, rel=0.2)
    assert D.pit_factor(rates, 2 * phi, counts) == pytest.approx(0.5, rel=0.2)
    # at the factor found the coverage is nominal
    c = D.pit_factor(rates, phi / 3, counts)
    assert D.pit_covered(*D.nb_cdfs(rates, c * phi / 3, counts), 0.9).mean() == pytest.approx(0.9, abs=0.002)
    # it is part of the coverage the report prints
    cov = D.coverage(rates, phi / 3, counts, np.ones((50, 50), bool))
    assert cov.pit_factor == pytest.approx(D.pit_factor(rates, phi / 3, counts))

"""``super_resolve`` checks itself on the user's slide: the spots are hidden behind coarser groups of them and
predicted back, with no truth needed.

The spots are grouped (2 x 2 on a square lattice such as legacy ST, about 7 on a hexagonal one such as Visium) and
each candidate configuration maps the slide from the groups alone, exactly as ``super_resolve`` maps it from the
spots: the interpolated group densities reweighted by the semantic prior (its read-out refitted on the groups, on
the histology scores already computed), optionally blended with the diffusion core's map of a few tiles. Pooling
each candidate's map over the spots gives a prediction of every measured spot; the configuration whose prediction
correlates best with the measured spots (Pearson r across spots plus r within the groups, mean over genes) is used
for the real run. Its scores are against the spots' counts; the run's self-estimate carries them to the map's
pixels (:func:`pixel_factors`: a pixel's count holds ``k`` times less signal against the same Poisson noise as a
spot's, ``k`` pixels per spot). The same predictions calibrate the uncertainty: a Gamma-Poisson (negative binomial)
spread per gene whose central 90 % interval covers 90 % of the spots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import _corr_rows
from ..models.prior import PriorReweighting, SlidePrior, tissue_windows
from ..observation import ObservationModel

log = logging.getLogger("stsr")

#: Exponents of the prior tried by the self-check (0 = the interpolated spots alone).
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: The strength that predicts the spots best from groups of them is well above the one that maps the pixels best
#: from the spots: a slide's coarse structure (tissue regions) follows its histology more closely than its fine
#: structure does. Ratio of the two optima on HER2ST C2-C6, the sections it was read off: at native geometry (a
#: 10 µm map pooled over the spots, what a user's slide gives) 0.125-0.5, median 0.25; on the spot lattice 0.33-0.63
#: (``benchmarks/results/self_check_strength_native.md``, ``self_check_strength.md``). :func:`used_strength`
#: applies it.
SCALE_RATIO = 0.25
#: Shares of the diffusion core's residual tried (0 = the prior map alone, 1 = the core's map x the prior).
RESIDUALS = (0.0, 0.5, 1.0)
#: Tiles the diffusion core runs on for the self-check (spread over the tissue).
CHECK_TILES = 6
#: The diffusion residual is kept only when it raises r + within-group r of the checked spots by at least this much
#: over the prior map on the same spots (a few tiles' spots: smaller differences are within chance), raises the
#: within-group r (the structure the core is there to add) and does not lower r -- over the prior map used *and*
#: over the prior map of the check's optimum strength. Hiding spots behind groups favours more histology contrast
#: than maps a slide's pixels best from its spots (:data:`SCALE_RATIO`): a core whose map only adds such contrast
#: scores like the stronger prior at the group level and is no better than the prior map one level finer. At native
#: geometry (``python benchmarks/native_resolution.py --no-model --default-call``: bins of 2 x 2 HER2ST spots,
#: scored on the spots) residuals kept for beating the used prior map alone lost to ``prior_map`` on A2, C3, C4
#: and C6 (C3 0.796 / 0.288 against 0.841 / 0.464 r / within-block r); on C3, C4 and C6 they scored below the
#: optimum strength's prior map on the check: only a core that beats the best prior-only map the check found shows
#: skill of its own. On A2 the gain over both (+0.029, +0.023) was within chance (:data:`GAIN_QUANTILE`).
MIN_GAIN = 0.02
#: The core runs on every other check tile first (half of them, spread over the slide); when every residual share
#: scores (r + within-group r) this far below the prior map on their spots, the other half is not run: to gain
#: :data:`MIN_GAIN` over all the spots it would have to beat the prior map there by more than the deficit. On the
#: whole HER2ST C2 section a residual of 0.5 trails by 0.14 on 2 of its 3 check tiles, and the third is not run
#: (calls 2 and 4 of ``python benchmarks/repeat_call.py``); on the real cases of ``docs/benchmarks/default_call.md``
#: it trails the prior map by up to 0.4 (its candidates).
EARLY_STOP_DEFICIT = 0.1
#: A residual's gain must also stand out from chance: over resamples of the checked spot groups
#: (:func:`gain_lower_bound`, :data:`BOOTSTRAP` of them), its gain over each prior map must be positive in all but
#: this share. A legacy-ST section has 50-100 spots per 2 x 2 block of them and its check tiles hold a few dozen
#: groups, where a fixed margin such as :data:`MIN_GAIN` is within chance.
GAIN_QUANTILE = 0.05
BOOTSTRAP = 200
#: Central interval whose coverage the spread is calibrated to.
INTERVAL = 0.9
#: Spots hidden (at least, when the slide has them) to self-estimate the map between the spots, where the spots
#: leave gaps (:func:`between_spot_r`), and how far apart (pitches) the spots hidden at once lie.
GAP_SPOTS = 300
GAP_RADIUS = 1.9
#: Spot groups on tissue the check needs to refit the prior on them; with fewer (a small crop) each spot is predicted
#: from the other spots instead (:func:`_spots_from_spots`).
MIN_GROUPS = 3
#: Below this share of the lattice between the spots (:func:`gap_share`) the map between spots is not checked.
MIN_GAP_SHARE = 0.05


def used_strength(checked: float, strengths: tuple[float, ...] = STRENGTHS) -> float:
    """The prior strength a run uses when the self-check's optimum is ``checked``: :data:`SCALE_RATIO` of it,
    rounded down to the candidates ``strengths``, but never below the smallest non-zero candidate unless the check
    turned the prior off (``checked == 0``: the histology did not predict the hidden spots). A single candidate (a
    strength the user fixed) is used as given."""
    if len(strengths) == 1 or checked <= 0:
        return float(checked)
    nonzero = sorted(float(x) for x in strengths if x > 0)
    below = [x for x in nonzero if x <= SCALE_RATIO * checked + 1e-9]
    return max(below) if below else nonzero[0]


#: The groups' cells are laid along the spot lattice when its rotation against the grid moves a spot by more than
#: this many pitches over the slide: then cells along the grid's axes would cut across the lattice's rows (HER2ST A2,
#: registered into A1's frame, is turned by 5.6 degrees: about 2.4 pitches). Below it they stay along the grid's axes:
#: the nearest-neighbour estimate of the angle is off by about half a degree on the HER2ST lattices, whose steps along
#: rows and columns are not quite at right angles (0.22-0.29 pitches on the other sections).
TURNED_LATTICE = 0.5


def lattice_angle(centres: np.ndarray, tree: Any, order: int) -> float:
    """Rotation (radians, within ``+-pi / order``) of a lattice whose neighbours lie every ``2 pi / order`` (4:
    square, 6: hexagonal), from the vectors to each centre's nearest neighbour (their ``order``-fold circular mean).
    0 for a square lattice along the grid's axes and a hexagonal one with rows along x (Visium), and for centres
    whose neighbours show no common orientation (resultant of the mean under 0.5: not a lattice)."""
    _, idx = tree.query(centres, k=2)
    d = centres[idx[:, 1]] - centres
    theta = np.arctan2(d[:, 1], d[:, 0]) * order  # angle from the y axis, order-fold
    if order == 6:
        theta = theta - np.pi  # a hexagonal lattice's neighbour along x: 90 degrees, x 6 = pi
    s, c = float(np.sin(theta).mean()), float(np.cos(theta).mean())
    return float(np.arctan2(s, c) / order) if np.hypot(s, c) >= 0.5 else 0.0


def spot_groups(observation: ObservationModel, size: int = 2) -> np.ndarray:
    """``(n_obs,)`` group of each spot: square cells of ``size x size`` spots on a square lattice, cells of the area
    of a hexagon of ``3 size^2 - 3 size + 1`` spots (7 for ``size=2``, 19 for 3) on a hexagonal one, laid from the
    lattice's corner, along the lattice when it is turned against the grid (:data:`TURNED_LATTICE`)."""
    centres = observation.centres
    pitch = observation.pitch()
    if len(centres) < 2:
        return np.zeros(len(centres), np.int64)
    from scipy.spatial import cKDTree

    tree = cKDTree(centres)
    hexagonal = _hexagonal(centres, pitch)
    n_hex = 3 * size * size - 3 * size + 1
    cell = pitch * (np.sqrt(n_hex * np.sqrt(3) / 2) if hexagonal else float(size))
    angle = lattice_angle(centres, tree, 6 if hexagonal else 4)
    if abs(np.sin(angle)) * float(np.ptp(centres, 0).max()) / pitch > TURNED_LATTICE:
        # a lattice turned against the grid (a section registered into another's frame): cells along the lattice
        rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        centres = centres @ rot.T
    key = np.floor((centres - centres.min(0) + pitch / 2) / cell).astype(np.int64)
    _, groups = np.unique(key, axis=0, return_inverse=True)
    return groups.ravel().astype(np.int64)


def group_sums(lr: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``(G, n_groups)`` sums of ``lr`` ``(G, n_obs)`` over the groups (negative groups left out)."""
    ok = groups >= 0
    out = np.zeros((lr.shape[0], int(groups.max()) + 1 if ok.any() else 0))
    np.add.at(out.T, groups[ok], np.asarray(lr, np.float64)[:, ok].T)
    return out


def spot_scores(
    pred: np.ndarray,
    lr: np.ndarray,
    groups: np.ndarray,
    factors: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float]:
    """Mean over genes of Pearson r across spots, and of r within the groups (each group's mean removed from
    prediction and measurement), between predicted and measured spot counts ``(G, n)``; with ``factors`` (per
    gene, for r and for within r: :func:`pixel_factors`) each gene's r is multiplied by its factor first."""
    ok = groups >= 0
    p, y, g = np.asarray(pred, np.float64)[:, ok], np.asarray(lr, np.float64)[:, ok], groups[ok]
    r = _corr_rows(p, y)
    fr, fw = (1.0, 1.0) if factors is None else factors
    r = r * fr
    size = np.bincount(g)
    multi = size[g] > 1  # single-spot groups have no structure inside

    def centred(x: np.ndarray) -> np.ndarray:
        sums = np.zeros((x.shape[0], len(size)))
        np.add.at(sums.T, g, x.T)
        return (x - sums[:, g] / size[g])[:, multi]

    if not multi.any():
        return _nanmean(r), float("nan")
    within = _corr_rows(centred(p), centred(y), np.linalg.norm(p, axis=1), np.linalg.norm(y, axis=1)) * fw
    return _nanmean(r), _nanmean(within)


def gain_lower_bound(
    pred: np.ndarray,
    ref: np.ndarray,
    target: np.ndarray,
    groups: np.ndarray,
    quantile: float = GAIN_QUANTILE,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
) -> float:
    """The ``quantile`` of the gain in r + within-group r (:func:`spot_scores`) of the predicted spot counts
    ``pred`` over ``ref`` (``(G, n)``) against ``target``, over ``n_boot`` resamples of the spot groups with
    replacement (a group drawn twice counts as two): the gain with the chance of which groups were checked taken
    into account. Groups are the units, since a group's spots share its count."""
    ok = groups >= 0
    g = groups[ok]
    p, q, y = (np.asarray(x, np.float64)[:, ok] for x in (pred, ref, target))
    labels, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rng = np.random.default_rng(seed)

    def total(pair: tuple[float, float]) -> float:
        return Candidate(0.0, 0.0, *pair).score

    gains = np.empty(n_boot)
    for i in range(n_boot):
        draw = rng.integers(0, len(labels), len(labels))
        idx = np.concatenate([order[starts[j] : starts[j] + sizes[j]] for j in draw])
        new_groups = np.repeat(np.arange(len(draw)), sizes[draw])
        gains[i] = total(spot_scores(p[:, idx], y[:, idx], new_groups)) - total(
            spot_scores(q[:, idx], y[:, idx], new_groups)
        )
    gains = gains[np.isfinite(gains)]
    return float(np.quantile(gains, quantile)) if gains.size else float("nan")


def pixel_factors(
    lr: np.ndarray, groups: np.ndarray, pixels_per_spot: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene factors that carry a score against spot counts to one against the counts of pixels of
    ``1 / pixels_per_spot`` of a spot (the map's pixels, or the truth of a benchmark), for r and for within r.

    A measured count is the rate plus Poisson noise, so its correlation with any prediction is the correlation with
    the rate times ``sqrt(reliability)``, ``reliability = signal variance / (signal + noise variance)``. Across
    spots the signal variance of the counts ``y`` (``(G, n)``, measured) is ``V = var(y) - mean(y)``; within the
    groups, ``W`` = the within-group variance less its Poisson share. A pixel of ``1 / k`` of a spot, with the
    spot's relative variation, has signal ``V / k^2`` against noise ``mean / k``: its reliability is
    ``V / (V + k mean)``, against ``V / (V + mean)`` for the spot. The factor is the square root of their ratio
    (likewise with ``W``); 1 for ``k <= 1``. It assumes the map predicts the pixels' rates as well as it predicts
    the spots' (the self-check's premise, across one level of scale).
    """
    ok = groups >= 0
    y, g = np.asarray(lr, np.float64)[:, ok], groups[ok]
    k = max(float(pixels_per_spot), 1.0)
    m = y.mean(1)
    V = np.clip(y.var(1) - m, 1e-12, None)
    size = np.bincount(g)
    multi = size[g] > 1
    sums = np.zeros((y.shape[0], len(size)))
    np.add.at(sums.T, g, y.T)
    resid = (y - sums[:, g] / size[g])[:, multi]
    if resid.shape[1]:
        share = float(np.mean(1.0 - 1.0 / size[g][multi]))  # E (y - group mean)^2 = share (W + m)
        W = np.clip((resid**2).mean(1) / share - m, 1e-12, None)
    else:
        W = V
    return np.sqrt((V + m) / (V + k * m)), np.sqrt((W + m) / (W + k * m))


def _nanmean(x: np.ndarray) -> float:
    """Mean of the finite values (NaN, without a warning, when there are none: e.g. every gene constant)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def calibrate_dispersion(pred: np.ndarray, lr: np.ndarray, level: float = INTERVAL) -> np.ndarray:
    """Per-gene dispersion ``phi`` of a negative binomial (variance ``mu + phi mu^2``) around the predicted spot
    counts, by moments, then scaled by one factor so that the central ``level`` interval covers that share of the
    measured spots."""
    from scipy.stats import nbinom

    mu = np.clip(np.asarray(pred, np.float64), 1e-9, None)
    y = np.asarray(lr, np.float64)
    phi = np.clip(((y - mu) ** 2 - mu).sum(1) / (mu**2).sum(1), 1e-4, None)
    tail = (1 - level) / 2

    def coverage(c: float) -> float:
        n = 1.0 / (c * phi[:, None])
        prob = n / (n + mu)
        lo, hi = nbinom.ppf(tail, n, prob), nbinom.ppf(1 - tail, n, prob)
        return float(((y >= lo) & (y <= hi)).mean())

    lo_c, hi_c = 1.0 / 64, 64.0
    for _ in range(18):  # bisection on log c: coverage grows with c
        mid = np.sqrt(lo_c * hi_c)
        lo_c, hi_c = (mid, hi_c) if coverage(mid) < level else (lo_c, mid)
    return phi * np.sqrt(lo_c * hi_c)


def gap_share(observation: ObservationModel) -> float:
    """Share of the lattice's area that lies between the spots: ``1 - spot area / lattice cell area`` (the cell of a
    spot is ``pitch^2`` on a square lattice and ``pitch^2 sqrt(3) / 2`` on a hexagonal one). About 0.73 for Visium
    (55 µm spots every 100 µm), 0.80 for legacy ST (100 µm every 200 µm), 0 for bins that tile the slide."""
    area = observation.support_area
    if len(area) < 2 or not (area > 0).any():
        return 0.0
    pitch = observation.pitch()
    cell = pitch**2 * (np.sqrt(3) / 2 if _hexagonal(observation.centres, pitch) else 1.0)
    return float(np.clip(1.0 - np.median(area[area > 0]) / cell, 0.0, 1.0))


def _hexagonal(centres: np.ndarray, pitch: float) -> bool:
    """Whether the centres lie on a hexagonal lattice (six neighbours within 1.2 pitches; four on a square one)."""
    from scipy.spatial import cKDTree

    neighbours = cKDTree(centres).query_ball_point(centres, 1.2 * pitch, return_length=True) - 1
    return float(np.median(neighbours)) >= 5


def hidden_classes(observation: ObservationModel, radius: float = GAP_RADIUS) -> np.ndarray:
    """``(n_obs,)`` class of each spot such that no two spots of a class lie within ``radius`` pitches (a greedy
    colouring, row by row): hiding one class leaves every hidden spot's neighbours and next neighbours measured, as
    they are around the pixels between spots. 4 classes on a square or hexagonal lattice (a quarter of the spots,
    each two pitches from the next hidden one)."""
    from scipy.spatial import cKDTree

    centres = observation.centres
    tree = cKDTree(centres)
    near = tree.query_ball_point(centres, radius * observation.pitch())
    classes = np.full(len(centres), -1, np.int64)
    for i in np.lexsort((centres[:, 1], centres[:, 0])):
        used = {int(classes[j]) for j in near[i] if classes[j] >= 0}
        classes[i] = next(c for c in range(len(used) + 1) if c not in used)
    return classes


def hidden_spot_predictions(
    observation: ObservationModel,
    lr: np.ndarray,
    mask: np.ndarray,
    prior: SlidePrior,
    window: int,
    strength: float,
    n_hidden: int | None = GAP_SPOTS,
) -> tuple[np.ndarray, np.ndarray]:
    """``(G, m)`` predicted counts of ``m`` whole spots hidden from the map, and their indices ``(m,)``: a class of
    :func:`hidden_classes` at a time (until ``n_hidden`` spots, or all of them with None) is left out, the prior map
    of ``strength`` is made from the other spots, and pooled over each hidden spot's footprint -- there the map is the
    one between spots, interpolated from the spots around. Only spots on tissue are hidden, and only while at least 3
    others on tissue remain."""
    classes = hidden_classes(observation)
    on_tissue = observation.tissue_area(mask) > 0
    order = np.argsort(-np.bincount(classes[on_tissue], minlength=int(classes.max()) + 1), kind="stable")
    preds, hidden_all = [np.zeros((np.shape(lr)[0], 0))], [np.zeros(0, np.int64)]
    for c in order:
        hidden = (classes == c) & on_tissue
        if hidden.sum() == 0 or (~hidden & on_tissue).sum() < 3:
            continue
        groups = np.where(classes == c, -1, np.arange(observation.n_obs))
        slide = CoarseSlide(observation, lr, mask, prior, window, groups=groups)
        preds.append(slide.predicted_spots(slide.prior_map(strength))[:, hidden])
        hidden_all.append(np.flatnonzero(hidden))
        if n_hidden is not None and sum(len(h) for h in hidden_all) >= n_hidden:
            break
    return np.concatenate(preds, axis=1), np.concatenate(hidden_all)


def between_spot_r(
    observation: ObservationModel,
    lr: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    prior: SlidePrior,
    window: int,
    strength: float,
    factors: np.ndarray,
    n_hidden: int = GAP_SPOTS,
) -> float:
    """Self-estimated r of the map's pixels between the spots: whole spots hidden from the map
    (:func:`hidden_spot_predictions`) scored against their ``target`` counts (Pearson r across hidden spots per gene,
    times its pixel factor ``factors`` as for the spots: :func:`pixel_factors`; mean over genes). NaN with fewer
    than 3 hidden spots on tissue."""
    pred, idx = hidden_spot_predictions(observation, lr, mask, prior, window, strength, n_hidden)
    if len(idx) < 3:
        return float("nan")
    r = _corr_rows(pred, np.asarray(target, np.float64)[:, idx])
    return _nanmean(r * factors)


@dataclass
class Candidate:
    strength: float
    residual: float
    r: float
    within_r: float

    @property
    def score(self) -> float:
        return self.r + (0.0 if np.isnan(self.within_r) else self.within_r)


@dataclass
class SelfCheck:
    """The configuration chosen on the slide and what the check measured: ``r``, ``within_r`` against the hidden
    spots' counts; ``pixel_r``, ``pixel_within_r`` the same carried to the map's pixels (the self-estimate), all of
    the configuration used. ``checked_strength`` is the strength that predicted the spots best from the groups,
    ``strength`` the one used (:func:`used_strength`)."""

    strength: float
    residual: float
    r: float
    within_r: float
    dispersion: np.ndarray
    n_groups: int
    candidates: list[Candidate] = field(default_factory=list)
    pixel_r: float = float("nan")
    pixel_within_r: float = float("nan")
    pixels_per_spot: float = 1.0
    checked_strength: float = float("nan")
    tiles_checked: int = 0
    #: self-estimated r of the map's pixels between the spots (:func:`between_spot_r`), and the share of the
    #: lattice's area between the spots (:func:`gap_share`); NaN and 0 where the spots tile the slide
    between_r: float = float("nan")
    gap_share: float = 0.0

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record for the element's provenance."""

        def rounded(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 4)

        return {
            "prior_strength": self.strength,
            "checked_optimum": None if np.isnan(self.checked_strength) else self.checked_strength,
            "diffusion_residual": self.residual,
            "self_estimated_r": rounded(self.pixel_r),
            "self_estimated_within_r": rounded(self.pixel_within_r),
            "spot_level_r": rounded(self.r),
            "spot_level_within_r": rounded(self.within_r),
            "self_estimated_between_r": rounded(self.between_r),
            "gap_share": round(float(self.gap_share), 3),
            "pixels_per_spot": round(float(self.pixels_per_spot), 2),
            "spot_groups": self.n_groups,
            "diffusion_tiles_checked": self.tiles_checked,
            "candidates": [
                [
                    c.strength,
                    c.residual,
                    round(c.r, 4),
                    None if np.isnan(c.within_r) else round(c.within_r, 4),
                ]
                for c in self.candidates
            ],
        }


class CoarseSlide:
    """The slide seen through the spot groups: their operator, counts and prior, and the spot pixels' windows.

    ``groups`` (default :func:`spot_groups`) may leave spots out (a negative group): the slide is then seen through
    the other spots, and the hidden spots' predictions come from the map between them (:func:`between_spot_r`)."""

    def __init__(
        self,
        observation: ObservationModel,
        lr: np.ndarray,
        mask: np.ndarray,
        prior: SlidePrior,
        window: int,
        groups: np.ndarray | None = None,
    ) -> None:
        self.spots, self.lr, self.mask, self.window = observation, np.asarray(lr, np.float64), mask, window
        self.groups = spot_groups(observation) if groups is None else np.asarray(groups, np.int64)
        self.op = observation.grouped(self.groups)
        self.group_lr = group_sums(self.lr, self.groups)
        self.area = self.op.tissue_area(mask)
        self.prior = prior.refit(self.op, self.group_lr, mask, window)
        self.windows = tissue_windows(observation.coverage.reshape(mask.shape) > 0, window)

    def base(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        return self.op.interpolate(self.group_lr, window=(r0, c0, h, w), area=self.area)

    def prior_map(self, strength: float) -> PriorReweighting:
        """The prior map from the groups (fitted over the windows that hold spots)."""
        rw = PriorReweighting(
            self.op,
            self.group_lr,
            lambda r0, c0, h, w: self.prior.weights(r0, c0, h, w, strength),
            np.asarray(self.mask, np.float64),
        )
        sums = [np.zeros_like(self.group_lr) for _ in range(2)]
        for r0, c0, h, w in self.windows:
            for total, part in zip(sums, rw.pooled(self.base(r0, c0, h, w), r0, c0)):
                total += part
        rw.fit(*sums)
        return rw

    def predicted_spots(self, rw: PriorReweighting) -> np.ndarray:
        """``(G, n_spots)`` spot counts of the prior map ``rw``."""
        out = np.zeros_like(self.lr)
        for r0, c0, h, w in self.windows:
            out += self.spots.pool_window(rw.apply(self.base(r0, c0, h, w), r0, c0), r0, c0)
        return out


def run_self_check(
    observation: ObservationModel,
    lr: np.ndarray,
    mask: np.ndarray,
    prior: SlidePrior,
    *,
    window: int,
    coarse_tiles: Callable[[ObservationModel, np.ndarray, np.ndarray], np.ndarray] | None = None,
    tile_origins: np.ndarray | None = None,
    tile_size: int = 0,
    strengths: tuple[float, ...] = STRENGTHS,
    residuals: tuple[float, ...] = RESIDUALS,
    measured: np.ndarray | None = None,
) -> SelfCheck:
    """Choose the prior's strength (and, given ``coarse_tiles``, the share of the diffusion residual) on the slide.

    Parameters
    ----------
    observation, lr, mask
        The spots on the HR grid, their ``(G, n_obs)`` counts and the tissue mask.
    prior
        The slide's semantic prior (fitted on the spots; refitted here on the groups).
    window
        Side of the windows the maps are computed in.
    coarse_tiles
        ``coarse_tiles(group_operator, group_counts, origins) -> (n, G, t, t)``: the diffusion core's mean map of
        the tiles at ``origins`` given the groups in place of the spots; None checks the prior map alone.
    tile_origins, tile_size
        The tiles of the run's plan, of which up to :data:`CHECK_TILES` are checked.
    measured
        The measured counts, when ``lr`` are expected counts: the predictions are scored against them and the
        spread is calibrated to cover them.
    """
    groups = spot_groups(observation)
    # the groups' tissue areas (what the prior's refit on them counts), without building their operator twice
    ok = groups >= 0
    n_groups = int((np.bincount(groups[ok], weights=observation.tissue_area(mask)[ok]) > 0.5).sum())
    if n_groups < MIN_GROUPS:
        return _spots_from_spots(observation, lr, mask, prior, window, strengths, measured, groups, n_groups)
    slide = CoarseSlide(observation, lr, mask, prior, window, groups=groups)
    target = slide.lr if measured is None else np.asarray(measured, np.float64)
    candidates: list[Candidate] = []
    maps: dict[float, PriorReweighting] = {}
    preds: dict[tuple[float, float], np.ndarray] = {}
    for s in strengths:
        maps[s] = slide.prior_map(s)
        preds[(s, 0.0)] = slide.predicted_spots(maps[s])
        candidates.append(Candidate(s, 0.0, *spot_scores(preds[(s, 0.0)], target, groups)))
    checked = max(candidates, key=lambda c: c.score).strength
    best = next(c for c in candidates if c.strength == used_strength(checked, strengths))
    chosen_pred = preds[(best.strength, 0.0)]
    gain = (0.0, 0.0)  # of the chosen diffusion residual over the prior map, on the checked tiles' spots
    tiles_checked = 0
    if coarse_tiles is not None and tile_origins is not None and len(tile_origins) and any(residuals):
        tiles = _check_tiles(observation, slide.groups, tile_origins, tile_size)
        if len(tiles):
            s = best.strength
            seen = np.zeros(observation.n_obs, bool)
            spot_idx: list[np.ndarray] = []
            parts: list[tuple[np.ndarray, np.ndarray]] = []

            def run_tiles(origins: np.ndarray) -> None:
                """The core's map of these tiles from the groups, and the prior map's, pooled over their spots
                whose whole group is inside (each spot once)."""
                for (r, c), d in zip(origins, coarse_tiles(slide.op, slide.group_lr, origins)):
                    r, c = int(r), int(c)
                    sub, keep = observation.crop(r, c, tile_size, tile_size)
                    take = _whole_groups(slide.groups, keep) & ~seen[keep]
                    if not take.any():
                        continue
                    seen[keep[take]] = True
                    gsub, gkeep = slide.op.crop(r, c, tile_size, tile_size)
                    wts = slide.prior.weights(r, c, tile_size, tile_size, s) * _window_of(
                        mask, r, c, tile_size
                    )
                    dp = gsub.project(
                        np.clip(d, 0, None) * wts + 1e-12 * wts, slide.group_lr[:, gkeep], "multiplicative"
                    )
                    base = slide.base(r, c, tile_size, tile_size)
                    pm = maps[s].apply(base, r, c)
                    po = pm if checked == s else maps[checked].apply(base, r, c)
                    parts.append(tuple(sub.pool(x)[:, take] for x in (pm, dp, po)))
                    spot_idx.append(keep[take])

            def scored() -> tuple[Candidate, Candidate, list[Candidate], Callable[..., float]]:
                """On the spots checked so far: the prior map used (no residual), the prior map of the check's
                optimum strength, each residual share, and ``lower(a, bar)``: the lower bound of the gain of
                residual ``a`` over the prior map ``bar`` ("used" or "optimum") on these spots."""
                idx = np.concatenate(spot_idx)
                pm_spots, dp_spots, po_spots = (np.concatenate(x, axis=1) for x in zip(*parts))
                prior_spots = {"used": pm_spots, "optimum": po_spots}

                def blend(a: float) -> np.ndarray:
                    return (1 - a) * pm_spots + a * dp_spots

                def candidate(strength: float, a: float, pred: np.ndarray) -> Candidate:
                    return Candidate(strength, a, *spot_scores(pred, target[:, idx], slide.groups[idx]))

                def lower(a: float, bar: str) -> float:
                    return gain_lower_bound(blend(a), prior_spots[bar], target[:, idx], slide.groups[idx])

                trials = [candidate(s, a, blend(a)) for a in residuals if a > 0]
                return candidate(s, 0.0, pm_spots), candidate(checked, 0.0, po_spots), trials, lower

            origins = tile_origins[tiles]
            # every other tile first: the first half spreads over the slide
            first, rest = origins[::2], origins[1::2]
            run_tiles(first)
            tiles_checked = len(first)
            if spot_idx and len(rest):
                base_half, optimum_half, trial, _ = scored()
                bar = max(base_half.score, optimum_half.score)
                log.debug(
                    "self-check on %d of %d tiles: prior map %.3f (at the optimum strength %.3f), residuals %s "
                    "(r + within-group r)",
                    len(first),
                    len(origins),
                    base_half.score,
                    optimum_half.score,
                    ", ".join(f"{c.residual:g}: {c.score:.3f}" for c in trial),
                )
                # a residual this far below the prior maps on half the tiles would have to beat them by more than
                # that on the other half to gain MIN_GAIN over all: the other half is not run
                if not all(c.score < bar - EARLY_STOP_DEFICIT for c in trial):
                    run_tiles(rest)
                    tiles_checked = len(origins)
            elif len(rest):
                run_tiles(rest)
                tiles_checked = len(origins)
            if spot_idx:
                base_on_tiles, optimum_on_tiles, trial, lower = scored()
                candidates.extend(trial)
                # the residual is kept only where it beats, on the same spots, the prior map used and the prior
                # map of the check's optimum strength (MIN_GAIN), beyond chance (GAIN_QUANTILE)
                bars = {"used": base_on_tiles, "optimum": optimum_on_tiles}
                margins = {
                    c.residual: [lower(c.residual, bar) for bar in bars]
                    for c in trial
                    if all(
                        c.score >= b.score + MIN_GAIN and c.within_r > b.within_r and c.r >= b.r - 0.005
                        for b in bars.values()
                    )
                }
                gainers = [c for c in trial if c.residual in margins and min(margins[c.residual]) > 0]
                log.debug(
                    "self-check on %d tiles: prior map %.3f (at the optimum strength %.3f), residuals %s; lower "
                    "bounds of the gains over both %s; kept: %s",
                    tiles_checked,
                    base_on_tiles.score,
                    optimum_on_tiles.score,
                    ", ".join(f"{c.residual:g}: {c.score:.3f}" for c in trial),
                    margins,
                    ", ".join(f"{c.residual:g}" for c in gainers) or "none",
                )
                if gainers:
                    top = max(gainers, key=lambda c: c.score)
                    gain = (top.r - base_on_tiles.r, top.within_r - base_on_tiles.within_r)
                    # the whole-slide estimate of the prior map, moved by the gain measured on the tiles
                    best = Candidate(
                        s,
                        top.residual,
                        min(best.r + top.r - base_on_tiles.r, 1.0),
                        min(best.within_r + top.within_r - base_on_tiles.within_r, 1.0),
                    )
    dispersion = calibrate_dispersion(chosen_pred, target)
    # the self-estimate: the chosen configuration's scores carried from the spots to the map's pixels
    area = observation.support_area
    k = float(np.median(area[area > 0])) if (area > 0).any() else 1.0
    factors = pixel_factors(target, groups, k)
    px_r, px_w = spot_scores(chosen_pred, target, groups, factors)
    px_r = min(px_r + gain[0] * _nanmean(factors[0]), 1.0)
    px_w = min(px_w + gain[1] * _nanmean(factors[1]), 1.0)
    # where the spots leave gaps (Visium, legacy ST on a fine grid) most of the map's pixels lie between them, where
    # the map is interpolated from the spots around: r there is scored on whole hidden spots, and the self-estimated
    # r is the mean of the two, weighed by the share of the lattice each covers (r within the spots stays as it is;
    # the hidden spots are mapped by the prior map of the strength used, without a kept diffusion residual)
    between, share = float("nan"), gap_share(observation)
    if share >= MIN_GAP_SHARE:
        between = between_spot_r(
            observation, slide.lr, target, mask, prior, window, best.strength, factors[0]
        )
        if np.isfinite(between):
            px_r = (1.0 - share) * px_r + share * between
    check = SelfCheck(
        best.strength,
        best.residual,
        best.r,
        best.within_r,
        dispersion,
        int(groups.max()) + 1,
        candidates,
        px_r,
        px_w,
        k,
        checked,
        tiles_checked,
        between,
        share,
    )
    log.info(
        "super_resolve self-check (%d spot groups predicting %d spots): prior strength %g (optimum from the groups "
        "%g), diffusion residual %g; r %.3f, within-group r %.3f against the spots; self-estimated on the map's "
        "pixels (%.0f per spot): r %.3f, within-spot r %.3f%s",
        check.n_groups,
        observation.n_obs,
        check.strength,
        checked,
        check.residual,
        check.r,
        check.within_r,
        k,
        check.pixel_r,
        check.pixel_within_r,
        f" (r {between:.3f} between the spots, {share:.0%} of the lattice)" if np.isfinite(between) else "",
    )
    return check


def _spots_from_spots(
    observation: ObservationModel,
    lr: np.ndarray,
    mask: np.ndarray,
    prior: SlidePrior,
    window: int,
    strengths: tuple[float, ...],
    measured: np.ndarray | None,
    groups: np.ndarray,
    n_groups: int,
) -> SelfCheck:
    """The check of a slide with too few spot groups to refit the prior on (a small crop): every spot is predicted
    from the other spots (:func:`hidden_spot_predictions`), which calibrates the spread and gives the self-estimate;
    the prior's strength is ``prior_map``'s (or the one given) and no diffusion core is kept."""
    from ..models.prior import PRIOR_MAP_STRENGTH

    lr = np.asarray(lr, np.float64)
    target = lr if measured is None else np.asarray(measured, np.float64)
    strength = strengths[0] if len(strengths) == 1 else PRIOR_MAP_STRENGTH
    pred, idx = hidden_spot_predictions(observation, lr, mask, prior, window, strength, None)
    n_on = int((observation.tissue_area(mask) > 0).sum())
    if len(idx) < 3:
        raise ValueError(
            f"super_resolve's self-check predicts spots it hides from the other spots, and this slide has {n_on} "
            "spot(s) on tissue, too few (it needs at least 4): map a larger region of the slide, or pass "
            "self_check=False."
        )
    area = observation.support_area
    k = float(np.median(area[area > 0])) if (area > 0).any() else 1.0
    y = target[:, idx]
    r = _corr_rows(pred, y)
    factors = pixel_factors(target, groups, k)
    px_r = _nanmean(r * factors[0])
    log.warning(
        "super_resolve self-check: the slide's %d spots on tissue make %d group(s) of spots, too few to check the "
        "configurations on (at least %d): the prior map at strength %g is used without the diffusion core, and each "
        "spot predicted from the others calibrates the spread (r %.3f against the spots; self-estimated on the "
        "map's pixels: r %.3f). Map a larger region of the slide for the full check.",
        n_on,
        n_groups,
        MIN_GROUPS,
        strength,
        _nanmean(r),
        px_r,
    )
    return SelfCheck(
        strength,
        0.0,
        _nanmean(r),
        float("nan"),
        calibrate_dispersion(pred, y),
        n_groups,
        [],
        px_r,
        float("nan"),
        k,
        float("nan"),
        0,
        px_r,
        gap_share(observation),
    )


def _whole_groups(groups: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Of the spots ``keep`` (inside a tile), those whose whole group is inside too."""
    inside = np.zeros(int(groups.max()) + 1, np.int64)
    np.add.at(inside, groups[keep], 1)
    return inside[groups[keep]] == np.bincount(groups, minlength=len(inside))[groups[keep]]


def _window_of(mask: np.ndarray, r: int, c: int, size: int) -> np.ndarray:
    out = np.zeros((size, size))
    part = mask[max(r, 0) : r + size, max(c, 0) : c + size]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _check_tiles(
    observation: ObservationModel, groups: np.ndarray, origins: np.ndarray, size: int
) -> np.ndarray:
    """Up to :data:`CHECK_TILES` tiles of the plan holding the most whole spot groups, spread over the slide."""
    counts = np.array(
        [_whole_groups(groups, observation.crop(int(r), int(c), size, size)[1]).sum() for r, c in origins]
    )
    if counts.max(initial=0) == 0:
        return np.array([], np.int64)
    good = np.flatnonzero(counts >= 0.5 * counts.max())
    pick = np.unique(np.linspace(0, len(good) - 1, min(CHECK_TILES, len(good))).round().astype(int))
    return good[pick]

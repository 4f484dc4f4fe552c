"""Semantic expression prior: a per-slide read-out of pretrained histology features, fitted on the LR data alone.

The LR measurements are a linear pooling of the HR grid (:class:`~stsr.observation.ObservationModel`), so a
read-out from histology features to expression can be fitted at LR resolution on the user's own slide, with no HR
data: per observation, its mean count per pixel is regressed on the mean feature vector of its pixels. Applied to
every HR pixel, the read-out predicts how each observation's count divides among its pixels (the iStar principle,
with a closed-form ridge instead of a neural network). :func:`apply_prior` turns it into an LR-consistent map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..observation import ObservationModel

#: Default exponent of the prior in :func:`stsr.tl.prior_map` (tissue-aware interpolation x prior), chosen on the
#: HER2ST validation section C2 by within-block r and r (``benchmarks/prior_readout.py``; SSIM prefers 0.5).
PRIOR_MAP_STRENGTH = 0.25
#: Ridge penalties searched by generalised cross-validation (features are standardised principal components).
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))
#: Feature vectors (pixels) standardised or summed at once in float64 by :class:`FeatureMoments` and
#: :func:`pca_scores`: 8192 pixels of the teacher's 390 features are 25 MB, a small part of one window's features.
MOMENT_COLUMNS = 8192


class FeatureMoments:
    """Running first and second moments of feature vectors, for a PCA of features seen piece by piece.

    ``add`` every piece of the slide (pixels as columns), then :meth:`pca` gives the standardisation and the
    principal axes: the same as an SVD of all standardised features at once, without holding them.
    """

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.total = np.zeros(n_features)
        self.outer = np.zeros((n_features, n_features))

    def add(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add feature vectors: the columns of ``x`` ``(D, n)``, or with ``mask`` (boolean, of the shape of
        ``x.shape[1:]``) the pixels of ``x`` ``(D, ...)`` where it is True.

        Summed in float64, :data:`MOMENT_COLUMNS` vectors at a time (no float64 copy, or copy of the selected
        pixels, of the whole of ``x``).
        """
        x = np.asarray(x)
        if mask is None:
            x = x.reshape(x.shape[0], -1)
            n = x.shape[1]
        else:
            m = np.asarray(mask, bool)
            if m.shape != x.shape[1:]:
                raise ValueError(f"mask must have the shape {x.shape[1:]} of the pixels, got {m.shape}.")
            where = np.nonzero(m)
            n = where[0].size
        self.n += n
        for i in range(0, n, MOMENT_COLUMNS):
            j = i + MOMENT_COLUMNS
            part = x[:, i:j] if mask is None else x[(slice(None), *(w[i:j] for w in where))]
            part = np.asarray(part, np.float64)
            self.total += part.sum(axis=1)
            self.outer += part @ part.T

    def pca(
        self, n_components: int, blocks: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean (D,), scale (D,), axes (D, k))``: scores are ``axes.T @ ((x - mean) / scale)``.

        Constant features get scale 1 and no weight in the axes. Raises if every feature is constant. ``blocks``
        (the channels of each encoder of a list, in order, summing to ``D``) gives every block the same total
        variance: each standardised channel of a block of ``d`` channels is divided by ``sqrt(d)``, so 10 nuclear
        channels weigh as much as 1024 DenseNet channels.
        """
        if self.n < 2:
            raise ValueError(
                "the prior needs the features of at least two tissue pixels; check the tissue mask (or pass "
                "mask=None) and that the image covers the spots."
            )
        mean = self.total / self.n
        cov = self.outer / self.n - np.outer(mean, mean)
        var = np.clip(np.diag(cov), 0.0, None)
        keep = var > 1e-12 * max(float(var.max()), 1e-300)
        if not keep.any() or var.max() <= 0:
            raise ValueError(
                "the histology features are constant over the tissue, so the prior has nothing to read; check that "
                "the image element is the histology of these spots (not blank or a placeholder)."
            )
        scale = np.where(keep, np.sqrt(np.where(keep, var, 1.0)), 1.0)
        if blocks is not None and len(blocks) > 1:
            sizes = np.asarray(list(blocks), np.int64)
            if sizes.sum() != len(mean) or (sizes < 1).any():
                raise ValueError(
                    f"blocks {list(blocks)} must be positive and sum to the {len(mean)} features."
                )
            owner = np.repeat(np.arange(len(sizes)), sizes)
            used = np.bincount(owner, weights=keep, minlength=len(sizes))  # non-constant channels per block
            scale = scale * np.sqrt(np.maximum(used[owner], 1.0))
        corr = cov[np.ix_(keep, keep)] / np.outer(scale[keep], scale[keep])
        vals, vecs = np.linalg.eigh(corr)
        k = min(n_components, int(keep.sum()))
        axes = np.zeros((len(mean), k))
        axes[keep] = vecs[:, np.argsort(vals)[::-1][:k]]
        return mean, scale, axes


def pca_scores(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Principal-component scores ``(k, ...)`` of features ``x`` ``(D, ...)``.

    Computed in float64, :data:`MOMENT_COLUMNS` pixels at a time: besides the ``(k, ...)`` result, memory holds one
    block of standardised features, not a float64 copy of ``x``.
    """
    d = x.shape[0]
    flat = np.asarray(x).reshape(d, -1)
    out = np.empty((axes.shape[1], flat.shape[1]))
    for i in range(0, flat.shape[1], MOMENT_COLUMNS):
        part = np.asarray(flat[:, i : i + MOMENT_COLUMNS], np.float64)
        out[:, i : i + part.shape[1]] = axes.T @ ((part - mean[:, None]) / scale[:, None])
    return out.reshape(axes.shape[1], *x.shape[1:])


def tissue_components(features: np.ndarray, mask: np.ndarray, n_components: int) -> np.ndarray:
    """The first ``n_components`` principal-component scores ``(k, h, w)`` of features ``(D, h, w)``, the axes and
    standardisation fitted on the pixels of ``mask`` (tissue)."""
    moments = FeatureMoments(features.shape[0])
    moments.add(features, np.asarray(mask, bool))
    return pca_scores(features, *moments.pca(n_components))


def ridge_gcv(
    x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge of ``y`` ``(n, G)`` on ``x`` ``(n, p)`` with intercept; one penalty for all genes, by GCV.

    Returns ``(coef (p, G), intercept (G,), alpha)``.
    """
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc
    n = x.shape[0]
    best = (np.inf, alphas[0])
    for a in alphas:
        shrink = s**2 / (s**2 + a)
        resid = yc - u @ (shrink[:, None] * uty)
        dof = 1.0 + shrink.sum()  # + 1 for the intercept
        gcv = (resid**2).sum() / max(n - dof, 1e-3) ** 2
        if gcv < best[0]:
            best = (gcv, a)
    a = best[1]
    coef = vt.T @ ((s / (s**2 + a))[:, None] * uty)
    return coef, ym - xm @ coef, a


def semantic_prior(
    features: np.ndarray,
    lr: Any,
    observation: ObservationModel,
    *,
    mask: np.ndarray | None = None,
    n_components: int = 5,
    alphas: tuple[float, ...] = RIDGE_ALPHAS,
) -> np.ndarray:
    """Expected expression per HR pixel predicted from histology by a read-out fitted on the LR data.

    Parameters
    ----------
    features
        ``(D, h, w)`` histology features on the HR grid (e.g. :func:`~stsr.models.teacher_features`).
    lr
        ``(G, n_obs)`` LR measurements (counts) of ``observation``.
    observation
        The LR observation model on the ``(h, w)`` grid (blocks or spot disks).
    mask
        ``(h, w)`` pixels that hold tissue (default: all); the features of other pixels are not used for fitting,
        and their count is taken as zero when averaging an observation.
    n_components
        Principal components of the standardised features used by the read-out (few: an LR slide has only
        hundreds to thousands of observations); lowered on slides with fewer than ``n_components + 2``
        observations on tissue.
    alphas
        Ridge penalties to choose from by generalised cross-validation.

    Returns
    -------
    ``(G, h, w)`` non-negative expected counts per pixel (up to a factor per observation, which
    :func:`apply_prior` removes): ``expm1`` of the ridge prediction of ``log1p(count per tissue pixel)``.

    Notes
    -----
    For observation ``b`` with count ``S_b`` over ``n_b`` tissue pixels and mean feature scores ``z_b``, the ridge
    fits ``log1p(S_b / n_b) ~ a + z_b . beta`` per gene (one penalty for all genes), then evaluates it at every pixel.
    """
    feats = np.asarray(features)
    if feats.ndim != 3 or tuple(feats.shape[1:]) != tuple(observation.shape):
        raise ValueError(
            f"features must be (D, h, w) on the observation grid {observation.shape}, got {feats.shape}."
        )
    lr = np.asarray(lr, np.float64)
    if lr.ndim != 2 or lr.shape[1] != observation.n_obs:
        raise ValueError(f"lr must be (G, n_obs={observation.n_obs}), got shape {lr.shape}.")
    h, w = observation.shape
    m = np.ones((h, w), bool) if mask is None else np.asarray(mask, bool)
    if m.shape != (h, w):
        raise ValueError(f"mask must be {(h, w)}, got {m.shape}.")
    if n_components < 1:
        raise ValueError(f"n_components must be at least 1, got {n_components}.")
    # the whole slide as one window of the windowed fit
    fitted = fit_prior(
        lambda r0, c0, hh, ww: feats[:, r0 : r0 + hh, c0 : c0 + ww],
        observation,
        lr,
        m,
        window=max(h, w),
        n_components=n_components,
        alphas=alphas,
    )
    return readout(np.asarray(fitted.scores), fitted.coef, fitted.intercept)


@dataclass
class SlidePrior:
    """The read-out of one slide: principal-component scores of the histology features on the HR grid and the
    per-gene ridge coefficients fitted on the observations (:func:`fit_prior`).

    Attributes
    ----------
    scores
        ``(k, height, width)`` float32 scores (zero outside the windows that hold tissue): in memory, or an array
        on disk (e.g. zarr) read window by window.
    coef, intercept
        ``(k, G)`` and ``(G,)`` read-out of ``log1p(count per pixel)``.
    teacher_hash
        Fingerprint of the features (the image teacher's weights), for provenance.
    """

    scores: Any
    coef: np.ndarray
    intercept: np.ndarray
    teacher_hash: str = ""

    def weights(self, r0: int, c0: int, h: int, w: int, strength: float) -> np.ndarray:
        """``(G, h, w)`` prior weights ``(prior + 1e-3) ** strength`` of a window (1 where it leaves the grid)."""
        out = np.ones((self.coef.shape[1], h, w))
        height, width = self.scores.shape[1:]
        ra, ca = max(r0, 0), max(c0, 0)
        rb, cb = min(r0 + h, height), min(c0 + w, width)
        if rb > ra and cb > ca:
            prior = readout(self.scores[:, ra:rb, ca:cb], self.coef, self.intercept)
            out[:, ra - r0 : rb - r0, ca - c0 : cb - c0] = prior_weights(prior, strength)
        return out

    def refit(
        self, observation: ObservationModel, lr: np.ndarray, mask: np.ndarray, window: int
    ) -> SlidePrior:
        """The same scores read out by a ridge fitted on other observations of the same grid (e.g. coarser groups
        of the spots, for a self-check): no features are computed again."""
        n_pix = observation.tissue_area(mask)
        sums = np.zeros((self.scores.shape[0], observation.n_obs))
        height, width = mask.shape
        for r0 in range(0, height, window):
            for c0 in range(0, width, window):
                m = mask[r0 : r0 + window, c0 : c0 + window]
                if m.any():
                    z = np.asarray(self.scores[:, r0 : r0 + window, c0 : c0 + window], np.float64)
                    sums += observation.pool_window(z * m, r0, c0)
        k = usable_components(self.scores.shape[0], n_pix)
        coef, intercept = fit_readout(sums[:k] / np.where(n_pix > 0, n_pix, 1.0), n_pix, lr)
        coef = np.concatenate([coef, np.zeros((self.scores.shape[0] - k, coef.shape[1]))])
        return SlidePrior(self.scores, coef, intercept, self.teacher_hash)


def tissue_windows(mask: np.ndarray, size: int) -> list[tuple[int, int, int, int]]:
    """The ``size`` x ``size`` windows (row-major, cut at the edges) of a grid that hold tissue (``mask``)."""
    h, w = mask.shape
    return [
        (r, c, min(size, h - r), min(size, w - c))
        for r in range(0, h, size)
        for c in range(0, w, size)
        if mask[r : r + size, c : c + size].any()
    ]


def fit_prior(
    features: Callable[[int, int, int, int], np.ndarray],
    observation: ObservationModel,
    lr: np.ndarray,
    mask: np.ndarray,
    *,
    window: int,
    n_components: int = 5,
    pca_windows: int = 8,
    cache_bytes: int = 256 * 2**20,
    scores: Any = None,
    alphas: tuple[float, ...] = RIDGE_ALPHAS,
    progress: Any = None,
    fingerprint: str = "",
    blocks: Sequence[int] | None = None,
) -> SlidePrior:
    """Fit the semantic prior window by window (the one implementation; :func:`semantic_prior` is its one-window
    case, ``stsr.tl`` runs it over the image teacher's windows of a whole slide).

    A first pass over at most ``pca_windows`` windows spread over the tissue accumulates the feature moments of the
    tissue pixels for the principal axes; a second pass over every window stores the ``k`` scores per pixel and sums
    them per observation; the ridge is fitted on the observations. The features of the first pass are kept for the
    second up to ``cache_bytes``, so a slide of a few windows is read once.

    Parameters
    ----------
    features
        ``features(r0, c0, h, w)`` gives the ``(D, h, w)`` features of a window of the grid.
    observation, lr, mask
        The operator on the ``(height, width)`` grid, the ``(G, n_obs)`` counts and the tissue mask.
    window
        Side of the windows in grid pixels.
    scores
        A ``(k, height, width)`` float32 array to write the scores into (e.g. zarr, chunked by ``window``), or a
        function ``k -> array``; default: a new array in memory.
    progress
        A tqdm-like bar, updated once per window read.
    blocks
        Channels of each encoder when the features concatenate several (:meth:`FeatureMoments.pca`: each weighs
        the same in the principal axes); read when the axes are fitted, after the first pass, so a list that the
        ``features`` function fills on its first call serves.
    """
    height, width = mask.shape
    windows = tissue_windows(mask, window)
    if not windows:
        raise ValueError(
            "the slide has no tissue pixels to fit the semantic prior on; check the image and spots, or leave "
            "semantic_prior off."
        )
    chosen = [
        windows[i] for i in np.unique(np.linspace(0, len(windows) - 1, pca_windows).round().astype(int))
    ]
    kept: dict[tuple[int, int, int, int], np.ndarray] = {}
    room = cache_bytes
    moments: FeatureMoments | None = None
    for win in chosen:
        r0, c0, h, w = win
        f = features(*win)
        moments = FeatureMoments(f.shape[0]) if moments is None else moments
        moments.add(f, mask[r0 : r0 + h, c0 : c0 + w])
        if f.nbytes <= room:
            kept[win], room = f, room - f.nbytes
        del f  # not held while the next window is read
        if progress is not None:
            progress.update()
    n_pix = observation.tissue_area(mask)
    mean, scale, axes = moments.pca(usable_components(n_components, n_pix), blocks)
    shape = (axes.shape[1], height, width)
    if scores is None:
        scores = np.zeros(shape, np.float32)
    elif callable(scores):
        scores = scores(shape)
    obs_sums = np.zeros((axes.shape[1], observation.n_obs))
    for win in sorted(windows, key=lambda x: x not in kept):  # the kept ones first, to free them early
        r0, c0, h, w = win
        f = kept.pop(win) if win in kept else features(*win)
        z = pca_scores(f, mean, scale, axes)
        scores[:, r0 : r0 + h, c0 : c0 + w] = z.astype(np.float32)
        obs_sums += observation.pool_window(z * mask[r0 : r0 + h, c0 : c0 + w], r0, c0)
        del f, z
        if progress is not None:
            progress.update()
    coef, intercept = fit_readout(obs_sums / np.where(n_pix > 0, n_pix, 1.0), n_pix, lr, alphas)
    return SlidePrior(scores, coef, intercept, fingerprint)


def usable_components(n_components: int, n_pix: np.ndarray) -> int:
    """``n_components``, lowered so that the observations with tissue (``n_pix > 0``) outnumber the coefficients.

    Raises when fewer than 3 observations cover tissue (nothing to fit).
    """
    n_ok = int((np.asarray(n_pix) > 0.5).sum())
    if n_ok < 3:
        raise ValueError(
            f"only {n_ok} observation(s) cover tissue; the semantic prior needs at least 3 to fit its read-out: "
            "use a larger region of the slide, or leave the prior off."
        )
    return max(1, min(n_components, n_ok - 2))


def fit_readout(
    obs_scores: np.ndarray, n_pix: np.ndarray, lr: np.ndarray, alphas: tuple[float, ...] = RIDGE_ALPHAS
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge read-out ``log1p(count per tissue pixel) ~ a + scores . beta`` fitted on the observations.

    ``obs_scores`` ``(k, n_obs)`` are the mean scores of each observation's tissue pixels, ``n_pix`` ``(n_obs,)`` their
    number (observations without tissue are left out), ``lr`` ``(G, n_obs)`` the counts. Returns ``(coef (k, G),
    intercept (G,))``.
    """
    k = obs_scores.shape[0]
    if usable_components(k, n_pix) < k:
        raise ValueError(
            f"{k} components need at least {k + 2} observations on tissue; pass no more than "
            f"usable_components({k}, n_pix) components."
        )
    ok = n_pix > 0.5
    y = np.log1p(np.clip(np.asarray(lr, np.float64)[:, ok], 0, None) / n_pix[ok])
    coef, intercept, _ = ridge_gcv(obs_scores[:, ok].T, y.T, alphas)
    return coef, intercept


def readout(scores: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Expected counts per pixel ``(G, ...)`` of the read-out at scores ``(k, ...)``: ``expm1`` of the prediction."""
    k = scores.shape[0]
    pred = coef.T @ np.asarray(scores, np.float64).reshape(k, -1) + intercept[:, None]
    return np.expm1(np.clip(pred, 0.0, None)).reshape(coef.shape[1], *scores.shape[1:])


def check_strength(strength: float, name: str = "strength") -> None:
    """Raise unless the prior's exponent is in ``[0, 4]`` (0: no effect; 1: the full read-out)."""
    if not 0.0 <= strength <= 4.0:
        raise ValueError(
            f"{name} must be in [0, 4] (0 = no effect, 1 = the full read-out; 0.5 is the tested value), "
            f"got {strength}."
        )


def prior_weights(prior: np.ndarray, strength: float) -> np.ndarray:
    """Multiplicative weights ``(prior + 1e-3) ** strength`` (the offset keeps pixels the read-out zeroes alive)."""
    return (np.asarray(prior, np.float64) + 1e-3) ** strength


def tissue_weights(mask: Any | None, observation: ObservationModel) -> np.ndarray | None:
    """``(h, w)`` float 0/1 weights of the tissue ``mask`` on the observation grid (None stays None)."""
    return None if mask is None else observation.mask_weights(mask)


def apply_prior(
    base: Any,
    prior: np.ndarray,
    lr: Any,
    observation: ObservationModel,
    *,
    strength: float = 0.5,
    mask: Any | None = None,
) -> np.ndarray:
    """Reweight an HR prediction by a prior and restore the LR sums: ``project(base * prior**strength)``.

    Parameters
    ----------
    base
        ``(G, h, w)`` non-negative HR prediction (e.g. bicubic with mass, or stsr's mean).
    prior
        ``(G, h, w)`` output of :func:`semantic_prior`.
    lr, observation
        The LR measurements and their operator; the result pools back to ``lr`` exactly.
    strength
        Exponent of the prior: 0 keeps ``base`` (made consistent), 1 multiplies by the full prior. The read-out's predictions are
        noisy, and a partial weight (0.5, chosen on the HER2ST validation section C2) scores best.
    mask
        ``(h, w)`` tissue pixels (default: all). Pixels off the tissue get nothing, so each observation's count goes
        to its tissue pixels only (an observation without tissue keeps none of its count).

    Returns
    -------
    ``(G, h, w)`` float64 LR-consistent prediction (multiplicative projection). Pixels outside every observation
    (between spots) are reweighted too and rescaled by the interpolated factors of the observations around them
    (:meth:`~stsr.observation.ObservationModel.pixel_factors`), so that the weights' absolute scale cancels there as
    it does inside the spots: a constant prior has the effect of ``strength=0``, which only makes ``base``
    consistent.
    """
    check_strength(strength)
    base = np.clip(np.asarray(base, np.float64), 0.0, None)
    weights = prior_weights(prior, strength)
    if weights.shape != base.shape:
        raise ValueError(f"prior {weights.shape} and base {base.shape} must have the same shape.")
    h, w = observation.shape
    rw = PriorReweighting(
        observation,
        lr,
        lambda r0, c0, hh, ww: weights[:, r0 : r0 + hh, c0 : c0 + ww],
        tissue_weights(mask, observation),
    )
    rw.fit(*rw.pooled(base, 0, 0))  # the whole slide as one window
    return rw.apply(base, 0, 0)


@dataclass
class PriorReweighting:
    """Reweight an HR map by prior weights and restore the observations' counts: the one implementation, run on
    one window (:func:`apply_prior`, :func:`prior_guide`) or chunk by chunk over a slide (``stsr.tl``).

    Two passes: :meth:`pooled` of every chunk of the base map, summed, then :meth:`fit`; :meth:`apply` then gives
    any chunk. Inside an observation the reweighted map is rescaled by ``measured / pooled``
    (:meth:`~stsr.observation.ObservationModel.consistency_factors`); between observations by the factors of the
    observations around them (:meth:`~stsr.observation.ObservationModel.pixel_factors`), fitted on the base as it
    is, so that the weights' absolute scale cancels there too (a constant prior only makes the base consistent).
    The base is floored at ``1e-9`` inside observations, so an observation the base leaves at zero can still
    receive its count; off the tissue (``mask``) nothing is kept.
    """

    observation: ObservationModel
    lr: Any
    #: ``weights(r0, c0, h, w) -> (G, h, w)`` prior weights of a window (e.g. :meth:`SlidePrior.weights`)
    weights: Callable[[int, int, int, int], np.ndarray]
    #: ``(height, width)`` 0/1 tissue weights on the grid, or None for all
    mask: np.ndarray | None = None
    #: ``(G, n_obs)`` factors inside the observations and between them (set by :meth:`fit`)
    scale: np.ndarray | None = None
    gap_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.lr = np.asarray(self.lr, np.float64)

    def _reweighted(self, base: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = base.shape[-2:]
        wts = self.weights(r0, c0, h, w)
        if self.mask is not None:
            tissue = np.zeros((h, w))
            height, width = self.mask.shape
            ra, ca, rb, cb = max(r0, 0), max(c0, 0), min(r0 + h, height), min(c0 + w, width)
            if rb > ra and cb > ca:
                tissue[ra - r0 : rb - r0, ca - c0 : cb - c0] = self.mask[ra:rb, ca:cb]
            wts = wts * tissue
        raw = np.clip(np.asarray(base, np.float64), 0.0, None)
        return raw * wts, np.clip(raw, 1e-9, None) * wts

    def pooled(self, base: np.ndarray, r0: int, c0: int) -> tuple[np.ndarray, np.ndarray]:
        """``(G, n_obs)`` sums of a chunk of the base map, reweighted as it is and floored, over the observations."""
        raw, floored = self._reweighted(base, r0, c0)
        op = self.observation
        if base.shape[-2:] == tuple(op.shape) and r0 == 0 and c0 == 0:
            return op.pool(raw), op.pool(floored)
        return op.pool_window(raw, r0, c0), op.pool_window(floored, r0, c0)

    def fit(self, pooled_raw: np.ndarray, pooled_floored: np.ndarray) -> None:
        """Set the factors from the summed :meth:`pooled` of the whole map."""
        self.scale = self.observation.consistency_factors(pooled_floored, self.lr)
        self.gap_scale = self.observation.consistency_factors(pooled_raw, self.lr)

    def apply(self, base: np.ndarray, r0: int, c0: int) -> np.ndarray:
        """``(G, h, w)`` float64 reweighted, consistent chunk of the base map at ``(r0, c0)``."""
        if self.scale is None:
            raise RuntimeError("call fit() with the pooled sums of the whole map first.")
        _, floored = self._reweighted(base, r0, c0)
        h, w = base.shape[-2:]
        factors = self.observation.pixel_factors(self.scale, window=(r0, c0, h, w), gaps=self.gap_scale)
        return np.clip(floored * factors, 0.0, None)


def prior_guide(
    prior: np.ndarray,
    lr: Any,
    observation: ObservationModel,
    *,
    strength: float = 0.5,
    mask: Any | None = None,
) -> np.ndarray:
    """The prior map of arrays in memory: the interpolated LR reweighted by the semantic prior.

    ``apply_prior(observation.interpolate(lr), prior, lr, observation, strength=strength)``: a deterministic,
    LR-consistent HR estimate (:func:`stsr.tl.prior_map` computes the same window by window on a SpatialData). With
    a tissue ``mask``, the interpolated densities are counts per tissue pixel and the counts go to tissue pixels only
    (as :func:`stsr.tl.prior_map` does).

    Parameters
    ----------
    prior
        ``(G, h, w)`` output of :func:`semantic_prior`.
    lr
        ``(G, n_obs)`` LR measurements (counts) of ``observation``.
    observation
        The LR observation model on the ``(h, w)`` grid.
    strength
        Exponent of the prior (see :func:`apply_prior`).
    mask
        ``(h, w)`` tissue pixels (default: all pixels count as tissue).

    Returns
    -------
    ``(G, h, w)`` float32 non-negative counts per HR pixel, pooling back to ``lr`` (the observations with tissue,
    where ``mask`` is given).
    """
    area = None if mask is None else observation.tissue_area(mask)
    base = observation.interpolate(np.asarray(lr, np.float64), area=area)
    return apply_prior(base, prior, lr, observation, strength=strength, mask=mask).astype(np.float32)

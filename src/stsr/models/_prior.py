"""Semantic expression prior: a per-slide read-out of pretrained histology features, fitted on the LR data alone.

The LR measurements are a linear pooling of the HR grid (:class:`~stsr.observation.ObservationModel`), so a
read-out from histology features to expression can be fitted at LR resolution on the user's own slide, with no HR
data: per observation, its mean count per pixel is regressed on the mean feature vector of its pixels. Applied to
every HR pixel, the read-out predicts how each observation's count divides among its pixels (the iStar principle,
with a closed-form ridge instead of a neural network). :func:`apply_prior` turns it into an LR-consistent map.
"""

from __future__ import annotations

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

    def pca(self, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean (D,), scale (D,), axes (D, k))``: scores are ``axes.T @ ((x - mean) / scale)``.

        Constant features get scale 1 and no weight in the axes. Raises if every feature is constant.
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
    weight = m.astype(np.float64)
    n_pix = observation.pool(weight[None])[0]
    scores = tissue_components(feats, m, usable_components(n_components, n_pix))  # (k, h, w)
    obs_scores = observation.pool(scores * weight) / np.where(n_pix > 0, n_pix, 1.0)
    coef, intercept = fit_readout(obs_scores, n_pix, lr, alphas)
    return readout(scores, coef, intercept)


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
    tissue = tissue_weights(mask, observation)
    raw = np.clip(np.asarray(base, np.float64), 0.0, None)
    base = np.clip(raw, 1e-9, None)  # zero-predicted spots can still be scaled up to their counts
    weights = prior_weights(prior, strength)
    if weights.shape != base.shape:
        raise ValueError(f"prior {weights.shape} and base {base.shape} must have the same shape.")
    if tissue is not None:
        raw, weights = raw * tissue, weights * tissue
    lr = np.asarray(lr, np.float64)
    reweighted = base * weights
    out = np.asarray(observation.project(reweighted, lr, mode="multiplicative"), np.float64)
    gap = observation.coverage == 0
    if (
        gap.any()
    ):  # factors of the observations that the prediction covers (1 where it is zero: nothing to correct)
        pooled = observation.pool(raw * weights)
        ratio = np.where(pooled > 0, lr / np.where(pooled > 0, pooled, 1.0), 1.0)
        out = np.where(gap, reweighted * observation.pixel_factors(ratio), out)
    if tissue is not None:  # observations without tissue fell back to the additive correction: drop it
        out = out * tissue
    return np.clip(out, 0.0, None)


def prior_guide(
    prior: np.ndarray,
    lr: Any,
    observation: ObservationModel,
    *,
    strength: float = 0.5,
    mask: Any | None = None,
) -> np.ndarray:
    """The LR input of a prior-guided model: the interpolated LR reweighted by the semantic prior.

    ``apply_prior(observation.interpolate(lr), prior, lr, observation, strength=strength)``: a deterministic,
    LR-consistent HR estimate that a model trained on guided pairs (:class:`~stsr.models.TrainingPair` ``guide``,
    ``STSRModel.lr_input == "prior_guide"``) refines. With a tissue ``mask``, the interpolated densities are counts
    per tissue pixel and the counts go to tissue pixels only (:func:`stsr.tl.prior_map` does this).

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

"""Accuracy metrics of super-resolved gene maps, and the noise ceiling of a super-resolution case.

All functions compare a prediction with the truth, both ``(G, H, W)`` counts per HR pixel (numpy or torch; converted
to float64), gene by gene, over the pixels selected by an optional ``(H, W)`` boolean ``mask`` (default: all), and
return one value per gene (``(G,)`` float64 arrays, NaN where a value is undefined, e.g. a gene that is constant in
the truth). The LR geometry always comes from an :class:`~stsr.observation.ObservationModel` (pooling is never
re-implemented here).

Metrics
-------
- :func:`pearson`: signed Pearson r over the masked pixels.
- :func:`within_block_pearson`: Pearson r after subtracting from prediction and truth the mean of each LR
  observation's pixels. It scores only the structure *inside* the LR blocks, the part a super-resolution method
  must infer: every method that reproduces the LR sums gets the between-block variation for free. A uniform split
  (:meth:`ObservationModel.lift <stsr.observation.ObservationModel.lift>`) scores 0.
- :func:`rmse_normalized` and :func:`ssim_normalized`: RMSE and SSIM of per-gene min-max normalised maps (each map
  scaled to ``[0, 1]`` by its own minimum and maximum over the mask), the convention of iStar and Diff-ST.
- :func:`lr_relative_error`: ``||A pred - lr|| / ||lr||``, how well the prediction reproduces the LR input.
- :func:`noise_ceiling`: the best scores any method can expect given the counting noise of the truth.

:func:`gene_metrics` computes all of them; :func:`summarize` reduces per-gene values to mean and standard deviation;
:func:`headroom_closed` expresses a score as the fraction of the gap between a baseline and the ceiling.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .observation import ObservationModel

__all__ = [
    "pearson",
    "within_block_pearson",
    "block_means",
    "rmse_normalized",
    "ssim_normalized",
    "lr_relative_error",
    "oracle_split",
    "noise_ceiling",
    "gene_metrics",
    "summarize",
    "headroom_closed",
]

#: Relative size below which a centred map counts as constant (its correlation is then 0 by convention).
_CONSTANT_RTOL = 1e-9


# ---------------------------------------------------------------------------------------------------- helpers
def _as_maps(x: Any, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (G, H, W) gene maps, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_maps(pred, "prediction"), _as_maps(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} must have the same (G, H, W) shape.")
    return p, t


def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    if type(mask).__module__.startswith("torch"):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask, bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask must be (H, W) = {tuple(shape)}, got {m.shape}.")
    if not m.any():
        raise ValueError("mask selects no pixel.")
    return m


def _check_op(observation: ObservationModel, shape: tuple[int, int]) -> None:
    if not isinstance(observation, ObservationModel):
        raise TypeError(
            f"observation must be a stsr.observation.ObservationModel, got {type(observation).__name__}."
        )
    if observation.shape != tuple(shape):
        raise ValueError(
            f"The observation model is on a {observation.shape} grid but the maps are {tuple(shape)}."
        )


def _corr_rows(
    a: np.ndarray, b: np.ndarray, scale_a: np.ndarray | None = None, scale_b: np.ndarray | None = None
) -> np.ndarray:
    """Pearson r of each row of ``a`` with the same row of ``b`` (``(G, N)``).

    NaN where ``b`` is constant; 0 where ``a`` is constant. A row counts as constant when its centred norm is at most
    ``1e-9`` times its scale (default the norm of the row before centring; pass the norm of the map a residual was
    taken from), so rounding noise of a numerically constant map does not produce a spurious correlation.
    """
    scale_a = np.linalg.norm(a, axis=1) if scale_a is None else scale_a
    scale_b = np.linalg.norm(b, axis=1) if scale_b is None else scale_b
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    out = np.full(a.shape[0], np.nan)
    ok = (nb > _CONSTANT_RTOL * scale_b) & (nb > 0)
    good = ok & (na > _CONSTANT_RTOL * scale_a) & (na > 0)
    out[good] = (a[good] * b[good]).sum(1) / (na[good] * nb[good])
    out[ok & ~good] = 0.0
    return out


def _minmax(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-gene min-max normalisation over the masked pixels; pixels outside the mask become 0."""
    vals = x[:, m]
    lo, hi = vals.min(1), vals.max(1)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (x - lo[:, None, None]) / span[:, None, None]
    out[hi <= lo] = 0.0
    return np.where(m[None], np.clip(out, 0.0, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------- metrics
def pearson(prediction: Any, truth: Any, mask: Any | None = None) -> np.ndarray:
    """Signed Pearson correlation per gene over the masked pixels.

    Parameters
    ----------
    prediction, truth
        ``(G, H, W)`` maps (counts per HR pixel).
    mask
        ``(H, W)`` boolean; default all pixels.

    Returns
    -------
    ``(G,)`` correlations; NaN for genes constant in the truth, 0 for genes constant in the prediction.
    """
    p, t = _pair(prediction, truth)
    m = _mask(mask, p.shape[1:])
    return _corr_rows(p[:, m], t[:, m])


def block_means(maps: Any, observation: ObservationModel, mask: Any | None = None) -> np.ndarray:
    """Replace every pixel by the mean of the masked pixels of its LR observation.

    The mean of observation ``i`` is ``A (x * mask) / A mask`` (its pooling weights, :meth:`ObservationModel.pool`);
    a pixel gets the coverage-weighted average of the means of the observations that hold it (for disjoint
    observations: its observation's mean) and 0 when no observation holds it.

    Parameters
    ----------
    maps
        ``(G, H, W)`` maps.
    observation
        The LR observation model on the ``(H, W)`` grid.
    mask
        ``(H, W)`` boolean pixels to average over; default all.

    Returns
    -------
    ``(G, H, W)`` float64 block means.
    """
    x = _as_maps(maps, "maps")
    _check_op(observation, x.shape[1:])
    m = _mask(mask, x.shape[1:]).astype(np.float64)
    num = observation.pool(x * m)
    den = observation.pool(m)
    mean = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    cov = observation.coverage
    spread = observation.adjoint(mean)
    return np.where(cov > 0, spread / np.where(cov > 0, cov, 1.0), 0.0)


def _eval_pixels(observation: ObservationModel, m: np.ndarray) -> np.ndarray:
    return m & (observation.coverage > 0)


def within_block_pearson(
    prediction: Any, truth: Any, observation: ObservationModel, mask: Any | None = None
) -> np.ndarray:
    """Pearson r of prediction and truth after subtracting each LR observation's mean from both.

    Block means are taken over the masked pixels of each observation (:func:`block_means`), and the correlation over
    the masked pixels covered by an observation. This isolates the sub-block structure a method has to infer: a
    prediction that is constant inside every block (e.g. the uniform split ``observation.lift(lr)``) scores exactly 0.

    Parameters
    ----------
    prediction, truth
        ``(G, H, W)`` maps.
    observation
        The LR observation model (blocks or disks) on the ``(H, W)`` grid.
    mask
        ``(H, W)`` boolean; default all pixels.

    Returns
    -------
    ``(G,)`` correlations; NaN where the truth is constant inside every block, 0 where the prediction is.
    """
    p, t = _pair(prediction, truth)
    _check_op(observation, p.shape[1:])
    m = _mask(mask, p.shape[1:])
    e = _eval_pixels(observation, m)
    if not e.any():
        raise ValueError(
            "No masked pixel is covered by an observation; check the mask and the observation model."
        )
    rp = p - block_means(p, observation, e)
    rt = t - block_means(t, observation, e)
    return _corr_rows(rp[:, e], rt[:, e], np.linalg.norm(p[:, e], axis=1), np.linalg.norm(t[:, e], axis=1))


def rmse_normalized(prediction: Any, truth: Any, mask: Any | None = None) -> np.ndarray:
    """RMSE per gene between min-max normalised prediction and truth (each scaled to ``[0, 1]`` over the mask).

    This is the convention of iStar and Diff-ST; it ignores the overall scale of the prediction (a method that is
    off by a constant factor is not penalised).

    Returns
    -------
    ``(G,)`` RMSE values in ``[0, 1]``.
    """
    p, t = _pair(prediction, truth)
    m = _mask(mask, p.shape[1:])
    d = _minmax(p, m)[:, m] - _minmax(t, m)[:, m]
    return np.sqrt((d**2).mean(1))


def ssim_normalized(prediction: Any, truth: Any, mask: Any | None = None, win_size: int = 7) -> np.ndarray:
    """Structural similarity per gene of min-max normalised maps (``skimage.metrics.structural_similarity``).

    Both maps are scaled to ``[0, 1]`` over the mask (pixels outside the mask set to 0), compared with
    ``data_range=1`` and a uniform ``win_size`` window, and the SSIM map is averaged over the masked pixels.

    Parameters
    ----------
    prediction, truth
        ``(G, H, W)`` maps.
    mask
        ``(H, W)`` boolean; default all pixels.
    win_size
        Side of the (odd) SSIM window, reduced to fit grids smaller than it.

    Returns
    -------
    ``(G,)`` SSIM values in ``[-1, 1]``.
    """
    from skimage.metrics import structural_similarity

    p, t = _pair(prediction, truth)
    m = _mask(mask, p.shape[1:])
    win = min(int(win_size), *p.shape[1:])
    win = win if win % 2 else win - 1
    if win < 3:
        raise ValueError(f"SSIM needs a grid of at least 3 x 3 pixels, got {p.shape[1:]}.")
    pn, tn = _minmax(p, m), _minmax(t, m)
    out = np.empty(p.shape[0])
    for g in range(p.shape[0]):
        _, smap = structural_similarity(pn[g], tn[g], data_range=1.0, win_size=win, full=True)
        out[g] = smap[m].mean()
    return out


def lr_relative_error(prediction: Any, lr: Any, observation: ObservationModel) -> np.ndarray:
    """Relative L2 error of the pooled prediction against the LR input: ``||A pred - lr|| / ||lr||`` per gene.

    Parameters
    ----------
    prediction
        ``(G, H, W)`` maps.
    lr
        ``(G, n_obs)`` LR measurements.
    observation
        The LR observation model.

    Returns
    -------
    ``(G,)`` errors; NaN for genes with no LR counts.
    """
    p = _as_maps(prediction, "prediction")
    _check_op(observation, p.shape[1:])
    lr = np.asarray(lr, np.float64).reshape(p.shape[0], -1)
    if lr.shape[1] != observation.n_obs:
        raise ValueError(f"lr must be (G, n_obs) = ({p.shape[0]}, {observation.n_obs}), got {lr.shape}.")
    err = np.linalg.norm(observation.pool(p) - lr, axis=1)
    den = np.linalg.norm(lr, axis=1)
    return np.where(den > 0, err / np.where(den > 0, den, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------------- ceiling
def oracle_split(expected: Any, lr: Any, observation: ObservationModel) -> np.ndarray:
    """The ideal LR-consistent prediction: each observation's measured count split in proportion to ``expected``.

    ``Y_p = S_b * lambda_p / sum_{q in b} lambda_q`` for pixel ``p`` of observation ``b`` with measured sum ``S_b``
    (the multiplicative projection :meth:`ObservationModel.project`). For Poisson counts with means ``lambda`` this
    is ``E[X_p | S_b]``, the best any method can do that knows the noise-free expression exactly. It needs the
    noise-free field, so it exists only for simulations; :func:`noise_ceiling` estimates its scores from counts.
    """
    lam = _as_maps(expected, "expected")
    _check_op(observation, lam.shape[1:])
    return np.asarray(observation.project(lam, np.asarray(lr, np.float64), mode="multiplicative"))


def _check_counts_op(truth: np.ndarray, observation: ObservationModel) -> bool:
    if not (observation.is_disjoint and np.allclose(observation.matrix.data, 1.0)):
        raise ValueError(
            "noise_ceiling needs disjoint observations with 0/1 weights (ObservationModel.blocks); spot disks with "
            "fractional pixel weights have no count-splitting interpretation."
        )
    if np.any(truth < 0) or not np.allclose(truth, np.round(truth)):
        warnings.warn(
            "noise_ceiling needs integer counts as truth (e.g. UMIs or binned transcripts); the truth holds "
            "non-integer values (a noise-free field?), so the ceiling is returned as NaN.",
            stacklevel=3,
        )
        return False
    return True


def noise_ceiling(
    truth: Any, observation: ObservationModel, mask: Any | None = None
) -> dict[str, np.ndarray]:
    r"""Estimate, from the counts alone, the scores of the ideal prediction: the noise ceiling of a case.

    The truth ``X`` (integer counts) is modelled as independent Poisson draws around a noise-free expression
    ``lambda``. The best a method can do from the LR input is the *oracle split* (:func:`oracle_split`)
    ``Y_p = S_b lambda_p / Lambda_b`` of each block's measured sum ``S_b = sum_{p in b} X_p`` (``Lambda_b`` the sum of
    ``lambda`` over the block), because given ``S_b`` the block's counts are multinomial,
    ``X_b | S_b ~ Mult(S_b, pi_b)`` with ``pi_p = lambda_p / Lambda_b``, so ``Y_p = E[X_p | S_b]``. Its scores
    against the (noisy) truth are the ceiling; they are estimated without knowing ``lambda``:

    **Key estimator.** Multinomial factorial moments give ``E[X_p (X_p - 1) | S_b] = S_b (S_b - 1) pi_p^2``, hence
    for a block with ``S_b >= 2``

    .. math:: \widehat{\sum_{p \in b} Y_p^2} = \frac{S_b}{S_b - 1} \sum_{p \in b} X_p (X_p - 1)

    is unbiased for ``sum_p Y_p^2 = S_b^2 sum_p pi_p^2`` (i.e. ``sum_p X_p(X_p-1)/(S_b-1)`` estimates the shared
    part ``S_b sum_p pi_p^2`` per count). ``S_b = 0`` contributes 0. A block with ``S_b = 1`` has
    ``sum_p Y_p^2 = sum_p pi_p^2``, which one count cannot estimate without bias; it is set to ``kappa / n_b`` with
    the gene's concentration ``kappa = sum n_b sum X(X-1) / sum S_b (S_b - 1)`` over its blocks with ``S_b >= 2``
    (``kappa = 1``, a uniform split, when there are none). Because ``E[Y_p X_p | S] = Y_p^2``, the same quantity
    ``Q = sum_p Y_p^2`` also estimates the cross term ``sum_p Y_p X_p``. With ``N`` evaluated pixels, the mean
    ``Xbar`` (equal to the mean of ``Y``) and ``n_b`` pixels per block:

    - Pearson ceiling: ``r = sqrt((Q - N Xbar^2) / sum_p (X_p - Xbar)^2)``;
    - within-block ceiling (block means ``S_b / n_b`` removed from both):
      ``r_w = sqrt((Q - sum_b S_b^2 / n_b) / (sum_p X_p^2 - sum_b S_b^2 / n_b))``.

    **Reliability.** The same factorial moments give the split-half reliability of the truth in closed form: splitting
    every count into two halves by binomial thinning gives ``E[X^A_p X^B_p | X] = X_p (X_p - 1) / 4``, i.e. the
    thinning-averaged split-half covariance estimates ``var(lambda)`` as
    ``(1/N) sum X(X-1) - (Xbar^2 - Xbar / N)``. ``reliability = sqrt(var(lambda) / var(X))`` is the correlation of
    the noise-free expression itself with the truth (Spearman-Brown corrected, i.e. for the full depth), the ceiling
    of a method that knew ``lambda`` but not the LR counts. The oracle split, which also uses ``S_b``, scores higher.

    Counts are evaluated on the masked pixels covered by an observation; block sums ``S_b`` are taken over these
    pixels (for blocks partly outside the mask this is the ideal split of the in-mask part of the block). Extra-Poisson
    variation at the pixel level is counted as signal, so with over-dispersed counts the estimates are upper bounds.
    Ratios are clipped to ``[0, 1]``.

    Parameters
    ----------
    truth
        ``(G, H, W)`` integer counts per HR pixel.
    observation
        Disjoint observations with 0/1 weights (:meth:`ObservationModel.blocks`).
    mask
        ``(H, W)`` boolean; default all pixels.

    Returns
    -------
    ``{"pearson": (G,), "within_block": (G,), "reliability": (G,)}``; NaN for genes without variation (and for all
    genes, with a warning, when the truth is not integer counts).
    """
    x = _as_maps(truth, "truth")
    _check_op(observation, x.shape[1:])
    m = _eval_pixels(observation, _mask(mask, x.shape[1:]))
    g = x.shape[0]
    nan = {k: np.full(g, np.nan) for k in ("pearson", "within_block", "reliability")}
    if not _check_counts_op(x, observation):
        return nan
    x = np.round(x) * m
    mf = m.astype(np.float64)
    s = observation.pool(x)  # (G, n_obs) block sums over evaluated pixels
    n_b = observation.pool(mf)  # (n_obs,) evaluated pixels per block
    f2 = observation.pool(x * (x - 1.0))  # (G, n_obs) sum of X(X-1) per block
    big = s >= 2
    num_k = (np.where(big, f2, 0.0) * n_b).sum(1)
    den_k = np.where(big, s * (s - 1.0), 0.0).sum(1)
    kappa = np.where(den_k > 0, num_k / np.where(den_k > 0, den_k, 1.0), 1.0)
    safe_s1 = np.where(big, s - 1.0, 1.0)
    q_b = np.where(big, s / safe_s1 * f2, 0.0)
    one = (s == 1) & (n_b > 0)
    q_b = q_b + np.where(one, kappa[:, None] / np.where(n_b > 0, n_b, 1.0), 0.0)
    q = q_b.sum(1)

    vals = x[:, m]
    n = vals.shape[1]
    xbar = vals.mean(1)
    sxx = ((vals - xbar[:, None]) ** 2).sum(1)
    between = np.where(n_b > 0, s**2 / np.where(n_b > 0, n_b, 1.0), 0.0).sum(1)
    sxx_w = (vals**2).sum(1) - between

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.full(g, np.nan)
        ok = b > 1e-12 * np.maximum(np.abs(a), 1.0)
        out[ok] = np.sqrt(np.clip(a[ok] / b[ok], 0.0, 1.0))
        return out

    var_lam = (vals * (vals - 1.0)).sum(1) - n * (xbar**2 - xbar / n)
    return {
        "pearson": ratio(q - n * xbar**2, sxx),
        "within_block": ratio(q - between, sxx_w),
        "reliability": ratio(var_lam, sxx),
    }


# ---------------------------------------------------------------------------------------------------- all together
def gene_metrics(
    prediction: Any,
    truth: Any,
    observation: ObservationModel,
    *,
    lr: Any | None = None,
    mask: Any | None = None,
    ceiling: bool = False,
) -> dict[str, np.ndarray]:
    """All per-gene metrics of a prediction.

    Parameters
    ----------
    prediction, truth
        ``(G, H, W)`` maps (counts per HR pixel).
    observation
        The LR observation model.
    lr
        ``(G, n_obs)`` LR input; default ``observation.pool(truth)``.
    mask
        ``(H, W)`` boolean pixels to score; default all.
    ceiling
        Also return the noise ceiling of the truth (:func:`noise_ceiling`) as ``ceiling_pearson``,
        ``ceiling_within_block`` and ``reliability``.

    Returns
    -------
    ``{"pearson", "within_block", "rmse", "ssim", "lr_rel_error"[, "ceiling_pearson", "ceiling_within_block",
    "reliability"]}``, each ``(G,)``.
    """
    p, t = _pair(prediction, truth)
    _check_op(observation, p.shape[1:])
    lr = observation.pool(t) if lr is None else np.asarray(lr, np.float64)
    out = {
        "pearson": pearson(p, t, mask),
        "within_block": within_block_pearson(p, t, observation, mask),
        "rmse": rmse_normalized(p, t, mask),
        "ssim": ssim_normalized(p, t, mask),
        "lr_rel_error": lr_relative_error(p, lr, observation),
    }
    if ceiling:
        c = noise_ceiling(t, observation, mask)
        out["ceiling_pearson"] = c["pearson"]
        out["ceiling_within_block"] = c["within_block"]
        out["reliability"] = c["reliability"]
    return out


def summarize(values: Mapping[str, Any] | Any) -> dict[str, tuple[float, float, int]]:
    """Mean and standard deviation over genes of per-gene metrics, ignoring NaNs.

    Parameters
    ----------
    values
        A mapping ``name -> (G,)`` values (e.g. :func:`gene_metrics`) or a :class:`pandas.DataFrame` with one column
        per metric and one row per gene.

    Returns
    -------
    ``{name: (mean, sd, n)}`` with ``n`` the number of genes with a finite value (``sd`` with ``ddof=1``, NaN for
    fewer than two genes).
    """
    items = values.items() if isinstance(values, Mapping) else ((c, values[c]) for c in values.columns)
    out = {}
    for name, v in items:
        a = np.asarray(v, np.float64)
        a = a[np.isfinite(a)]
        mean = float(a.mean()) if a.size else float("nan")
        sd = float(a.std(ddof=1)) if a.size > 1 else float("nan")
        out[str(name)] = (mean, sd, int(a.size))
    return out


def headroom_closed(score: float, baseline: float, ceiling: float) -> float:
    """Fraction of the gap between a baseline and the ceiling that a method closes.

    ``(score - baseline) / (ceiling - baseline)``: 0 at the baseline, 1 at the ceiling, negative below the baseline.
    NaN when the ceiling does not exceed the baseline (no headroom to close).
    """
    score, baseline, ceiling = float(score), float(baseline), float(ceiling)
    gap = ceiling - baseline
    if not np.isfinite(gap) or gap <= 1e-12 or not np.isfinite(score):
        return float("nan")
    return (score - baseline) / gap

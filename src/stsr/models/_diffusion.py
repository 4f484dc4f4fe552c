"""Gaussian diffusion in continuous time ``t in [0, 1]``: schedule, forward noising, parameterisations, DDIM.

The forward process is ``x_t = alpha(t) x_0 + sigma(t) eps`` with ``alpha^2 + sigma^2 = 1`` (variance preserving).
``t = 0`` is clean data, ``t = 1`` is pure noise (the cosine schedule reaches ``alpha = 0`` exactly, so sampling
starts from zero signal-to-noise ratio). Training draws ``t`` on the grid ``i / n_timesteps``, ``i = 1..n_timesteps``.

The network may predict ``v = alpha eps - sigma x_0`` (default), ``eps`` or ``x_0``; :func:`to_x0_eps` converts any of
them to ``(x_0, eps)``. :func:`ddim_sample` runs the deterministic DDIM sampler (``eta = 0``) with any number of steps
and an optional hook applied to each predicted clean map (the consistency projection).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "NoiseSchedule",
    "q_sample",
    "training_target",
    "to_x0_eps",
    "diffusion_loss",
    "ddim_timesteps",
    "ddim_sample",
]

_PREDICTIONS = ("v", "eps", "x0")


class NoiseSchedule:
    """Noise schedule ``alpha_bar(t) = alpha(t)^2`` on ``t in [0, 1]``.

    Parameters
    ----------
    kind
        ``"cosine"`` (Nichol & Dhariwal, continuous time, offset ``s = 0.008``) or ``"linear"`` (continuous-time
        DDPM linear betas from ``1e-4`` to ``0.02`` at 1000 steps).
    n_timesteps
        Number of discrete training timesteps.
    """

    def __init__(self, kind: str = "cosine", n_timesteps: int = 1000) -> None:
        if kind not in ("cosine", "linear"):
            raise ValueError(f"Unknown noise schedule {kind!r}; use 'cosine' or 'linear'.")
        if int(n_timesteps) < 1:
            raise ValueError(f"n_timesteps must be positive, got {n_timesteps}.")
        self.kind = kind
        self.n_timesteps = int(n_timesteps)

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal fraction ``alpha_bar(t)``: 1 at ``t = 0``, decreasing to (about) 0 at ``t = 1``."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
        if self.kind == "cosine":
            s = 0.008
            f = torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2
            f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
            ab = torch.where(t >= 1.0, torch.zeros_like(f), f / f0)  # exactly 0 at t = 1 (cos(pi/2) rounding)
        else:
            b0, b1 = 0.1, 20.0  # 1e-4 * 1000, 0.02 * 1000
            ab = torch.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))
        return ab.clamp(0.0, 1.0)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t)) = (sqrt(alpha_bar), sqrt(1 - alpha_bar))`` in float64."""
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1.0 - ab).clamp_min(0.0).sqrt()

    def sample_t(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None):
        """Draw ``n`` training times uniformly from ``{1, ..., n_timesteps} / n_timesteps``."""
        i = torch.randint(1, self.n_timesteps + 1, (n,), generator=generator)
        return (i.to(torch.float32) / self.n_timesteps).to(device)

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, n_timesteps={self.n_timesteps})"


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v).to(device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising ``x_t = alpha(t) x_0 + sigma(t) noise``; ``t`` is a scalar or ``(B,)``."""
    a, s = schedule.alpha_sigma(t)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


def training_target(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: str = "v"
) -> torch.Tensor:
    """The regression target of the network for a parameterisation ``"v"``, ``"eps"`` or ``"x0"``."""
    if prediction == "v":
        a, s = schedule.alpha_sigma(t)
        return _bcast(a, x0) * noise - _bcast(s, x0) * x0
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction must be one of {_PREDICTIONS}, got {prediction!r}.")


def to_x0_eps(
    schedule: NoiseSchedule, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "v"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output to the implied clean map ``x_0`` and noise ``eps``.

    For ``"eps"`` at ``alpha = 0`` the clean map is undefined; ``alpha`` is floored at ``1e-4`` there. For ``"x0"`` at
    ``sigma = 0`` the noise is set to 0.
    """
    a, s = schedule.alpha_sigma(t)
    a, s = _bcast(a, x_t), _bcast(s, x_t)
    if prediction == "v":
        return a * x_t - s * pred, s * x_t + a * pred
    if prediction == "eps":
        return (x_t - s * pred) / a.clamp_min(1e-4), pred
    if prediction == "x0":
        return pred, (x_t - a * pred) / s.clamp_min(1e-4) * (s > 0)
    raise ValueError(f"prediction must be one of {_PREDICTIONS}, got {prediction!r}.")


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over all elements, or over the pixels selected by ``mask``.

    Parameters
    ----------
    pred, target
        ``(B, G, H, W)`` network output and target.
    mask
        Optional ``(B, H, W)`` (or broadcastable ``(B, 1, H, W)``) weights / boolean mask of valid pixels.
    """
    err = (pred - target) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    if m.ndim == err.ndim - 1:
        m = m.unsqueeze(1)
    m = m.expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


def spot_loss(
    z_hat: torch.Tensor,
    normalizer: Any,
    labels: torch.Tensor,
    counts: torch.Tensor,
    area: torch.Tensor,
) -> torch.Tensor:
    """Weak supervision by measured spots: the predicted map pooled over each spot against the spot's count.

    The normalised prediction is turned into counts, summed over each spot's pixels, and the spot's mean density
    (counts per pixel) is compared with the measured one in the normaliser's space (mean squared error over genes
    and spots), so that every gene weighs alike whatever its depth.

    Parameters
    ----------
    z_hat
        ``(B, G, H, W)`` predicted clean map, normalised.
    normalizer
        The :class:`~stsr.models.GeneNormalizer` of the ``G`` genes.
    labels
        ``(B, H, W)`` long: the spot (``0..M-1``) each pixel belongs to, ``-1`` for none.
    counts
        ``(G, M)`` measured counts of the spots.
    area
        ``(M,)`` pixels of each spot.
    """
    g = z_hat.shape[1]
    m = int(counts.shape[1])
    if m == 0:
        return z_hat.sum() * 0.0
    x = normalizer.denormalize(z_hat, axis=1)
    flat = x.permute(1, 0, 2, 3).reshape(g, -1)
    lab = labels.reshape(-1).to(flat.device)
    sel = lab >= 0
    pooled = torch.zeros(g, m, dtype=flat.dtype, device=flat.device).index_add_(1, lab[sel], flat[:, sel])
    a = area.to(flat.device, flat.dtype).clamp_min(1.0)
    z_pred = normalizer.normalize(pooled / a, axis=0)
    z_true = normalizer.normalize(counts.to(flat.device, flat.dtype) / a, axis=0)
    return ((z_pred - z_true) ** 2).mean()


def ddim_timesteps(steps: int, start: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` decreasing times ``start = t_0 > t_1 > ... > t_steps = 0`` of a DDIM run."""
    if int(steps) < 1:
        raise ValueError(f"The number of sampling steps must be at least 1, got {steps}.")
    check_start(start)
    return torch.linspace(float(start), 0.0, int(steps) + 1, dtype=torch.float64)


def check_start(start: float) -> None:
    """Raise unless the starting diffusion time is in ``(0, 1]``."""
    if not 0.0 < float(start) <= 1.0:
        raise ValueError(
            f"the starting diffusion time must be in (0, 1] (1 = from pure noise), got {start!r}."
        )


def noised(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """``x_t = alpha(t) x0 + sigma(t) noise`` at one time ``t`` (the start of a partial run, SDEdit)."""
    a, s = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(a) * x0 + float(s) * noise


@torch.no_grad()
def ddim_sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int = 20,
    prediction: str = "v",
    x0_hook: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    start: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM (``eta = 0``) from ``t = start`` to ``t = 0``.

    At each step the network output is converted to ``(x0_hat, eps_hat)``; ``x0_hook`` (e.g. clipping or the
    consistency projection) may replace ``x0_hat``, after which ``eps_hat`` is recomputed from ``x_t`` and the new
    ``x0_hat`` so that the trajectory continues from the corrected clean map. The last step returns ``x0_hat``.

    Parameters
    ----------
    model_fn
        ``model_fn(x_t, t)`` with ``t`` a ``(B,)`` float tensor, returning the network output of ``x_t``'s shape.
    x_T
        ``(B, ...)`` initial state at ``t = start``: pure noise for ``start = 1``, else a clean estimate noised to
        ``start`` (:func:`noised`; SDEdit, Meng et al., ICLR 2022).
    schedule
        The noise schedule the network was trained with.
    steps
        Number of denoising steps.
    prediction
        Parameterisation of the network output (``"v"``, ``"eps"`` or ``"x0"``).
    x0_hook
        Optional ``hook(x0_hat, step_index) -> x0_hat``.
    start
        Diffusion time of ``x_T``, in ``(0, 1]``.

    Returns
    -------
    The sampled clean map.
    """
    ts = ddim_timesteps(steps, start)
    x = x_T
    batch = x.shape[0]
    x0 = x
    for i in range(int(steps)):
        t, s = ts[i], ts[i + 1]
        tt = torch.full((batch,), float(t), dtype=x.dtype, device=x.device)
        pred = model_fn(x, tt)
        x0, eps = to_x0_eps(schedule, pred, x, tt, prediction)
        if x0_hook is not None:
            x0 = x0_hook(x0, i)
            a_t, s_t = schedule.alpha_sigma(t)
            if float(s_t) > 0:
                eps = (x - float(a_t) * x0) / float(s_t)
        if i == int(steps) - 1:
            break
        a_s, s_s = schedule.alpha_sigma(s)
        x = float(a_s) * x0 + float(s_s) * eps
    return x0

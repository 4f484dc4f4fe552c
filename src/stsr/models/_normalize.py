"""Per-gene, panel-agnostic normalisation of counts for the diffusion model.

For gene ``g`` with slide-level scale ``s_g`` (counts per HR pixel) the normalised value of ``c`` counts per HR pixel
is::

    z = 2 * log1p(c / s_g) / log1p(high) - 1

so ``c = 0`` maps to ``-1`` and ``c = high * s_g`` to ``+1``; typical values lie in ``[-1, 1]`` and larger counts
keep growing logarithmically. The inverse is::

    c = s_g * expm1((z + 1) * log1p(high) / 2)

clamped to ``c >= 0`` (a model may predict ``z < -1``, which would be a negative count). The round trip is exact up
to floating-point rounding for every ``c >= 0``.

The scale ``s_g`` is computed once per slide from the LR input (the mean LR density ``lr / area`` of the gene over
the slide's observations, :meth:`GeneNormalizer.from_observations`), never per tile, so the normalisation -- and
hence the model output -- does not depend on how the slide is tiled. Each gene is normalised on its own, so any gene panel can be used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["GeneNormalizer"]


class GeneNormalizer:
    """Invertible per-gene log normalisation ``counts <-> z``.

    Parameters
    ----------
    scale
        ``(G,)`` positive per-gene scales in counts per HR pixel (see :meth:`from_density`).
    high
        Multiple of the scale that maps to ``z = 1``.
    """

    def __init__(self, scale: Any, high: float = 15.0) -> None:
        scale = torch.as_tensor(np.asarray(scale, dtype=np.float64) if not torch.is_tensor(scale) else scale)
        scale = scale.detach().to(torch.float64).reshape(-1)
        if scale.numel() == 0:
            raise ValueError("GeneNormalizer needs at least one gene scale.")
        if not torch.all(torch.isfinite(scale)) or torch.any(scale <= 0):
            raise ValueError(
                "Gene scales must be finite and positive; use GeneNormalizer.from_density, which floors them."
            )
        if not math.isfinite(high) or high <= 0:
            raise ValueError(f"high must be a positive number, got {high}.")
        self.scale = scale
        self.high = float(high)
        self._k = 2.0 / math.log1p(self.high)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_density(
        cls,
        density: Any,
        mask: Any | None = None,
        floor: float = 1e-4,
        high: float = 15.0,
    ) -> GeneNormalizer:
        """Scales from a slide-level LR density map (e.g. ``ObservationModel.interpolate`` of the whole slide).

        Parameters
        ----------
        density
            ``(G, ...)`` LR density in counts per HR pixel (numpy or torch); NaNs are ignored.
        mask
            Optional boolean array of the trailing shape of ``density`` selecting the pixels to average over
            (e.g. ``ObservationModel.coverage > 0``); default all pixels.
        floor
            Smallest allowed scale (counts per HR pixel), used for genes that are (almost) never detected.
        high
            See :class:`GeneNormalizer`.

        Returns
        -------
        The normaliser, with ``scale_g = max(mean density of gene g over the mask, floor)``.
        """
        d = torch.as_tensor(np.asarray(density) if not torch.is_tensor(density) else density).to(
            torch.float64
        )
        if d.ndim < 1:
            raise ValueError("density must have a leading gene axis, shape (G, ...).")
        d = d.reshape(d.shape[0], -1)
        if mask is not None:
            m = (
                torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
                .to(torch.bool)
                .reshape(-1)
            )
            if m.numel() != d.shape[1]:
                raise ValueError(f"mask has {m.numel()} elements but density has {d.shape[1]} per gene.")
            if not bool(m.any()):
                raise ValueError(
                    "mask selects no pixel; pass the coverage of the observations (coverage > 0)."
                )
            d = d[:, m.to(d.device)]
        valid = torch.isfinite(d)
        mean = torch.where(valid, d, torch.zeros_like(d)).sum(1) / valid.sum(1).clamp_min(1)
        return cls(torch.clamp(mean, min=float(floor)), high=high)

    @classmethod
    def from_observations(
        cls, lr: Any, support_area: Any, floor: float = 1e-4, high: float = 15.0
    ) -> GeneNormalizer:
        """Scales from a slide's LR measurements: the mean over observations of ``lr / area`` (counts per HR pixel).

        This is what training and :func:`stsr.tl.super_resolve` use, so both see the same normalisation.

        Parameters
        ----------
        lr
            ``(G, n_obs)`` LR measurements of the whole slide.
        support_area
            ``(n_obs,)`` area of each observation in HR pixels (``ObservationModel.support_area``); observations
            with zero area are ignored.
        floor, high
            See :meth:`from_density`.
        """
        lr_t = torch.as_tensor(np.asarray(lr, dtype=np.float64) if not torch.is_tensor(lr) else lr).double()
        area = torch.as_tensor(np.asarray(support_area, dtype=np.float64)).reshape(-1)
        if lr_t.ndim != 2 or lr_t.shape[1] != area.numel():
            raise ValueError(f"lr must be (G, n_obs) with n_obs = {area.numel()}, got {tuple(lr_t.shape)}.")
        valid = area > 0
        if not bool(valid.any()):
            raise ValueError("No observation has a positive area; check the observation model.")
        return cls.from_density(lr_t[:, valid] / area[valid], floor=floor, high=high)

    # ------------------------------------------------------------------ transforms
    def _scale_for(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        axis = axis % x.ndim
        if x.shape[axis] != self.n_genes:
            raise ValueError(
                f"Array has {x.shape[axis]} genes along axis {axis}, the normaliser has {self.n_genes}."
            )
        shape = [1] * x.ndim
        shape[axis] = self.n_genes
        return self.scale.to(device=x.device, dtype=x.dtype).reshape(shape)

    def normalize(self, counts: Any, axis: int = -3) -> torch.Tensor:
        """Counts per HR pixel -> normalised values (negative counts are treated as 0).

        Parameters
        ----------
        counts
            Array with genes along ``axis`` (default ``-3``, i.e. ``(..., G, H, W)``).
        axis
            Gene axis.
        """
        x = torch.as_tensor(counts)
        if not x.is_floating_point():
            x = x.to(torch.float32)
        s = self._scale_for(x, axis)
        return torch.log1p(torch.clamp(x, min=0) / s) * self._k - 1.0

    def denormalize(self, z: Any, axis: int = -3) -> torch.Tensor:
        """Normalised values -> counts per HR pixel, clamped to be non-negative (exact inverse of :meth:`normalize`)."""
        x = torch.as_tensor(z)
        if not x.is_floating_point():
            x = x.to(torch.float32)
        s = self._scale_for(x, axis)
        return torch.clamp(torch.expm1((x + 1.0) / self._k) * s, min=0)

    # ------------------------------------------------------------------ utilities
    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.scale.numel())

    def subset(self, index: Sequence[int] | torch.Tensor) -> GeneNormalizer:
        """The normaliser of a subset of the genes."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return GeneNormalizer(self.scale[idx], high=self.high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {"scale": self.scale.tolist(), "high": self.high}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneNormalizer:
        """Inverse of :meth:`to_dict`."""
        return cls(d["scale"], high=d.get("high", 15.0))

    def __repr__(self) -> str:
        return f"GeneNormalizer(n_genes={self.n_genes}, high={self.high})"

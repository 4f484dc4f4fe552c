"""The training pair: one slide's histology, HR truth and observation model, and its preparation for cropping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..observation import ObservationModel
from ._noise import gene_ids_from_names
from ._normalize import GeneNormalizer

__all__ = ["TrainingPair", "PreparedPair"]


@dataclass
class TrainingPair:
    """One training slide: histology, HR truth and the observation model that produces its LR measurements.

    Parameters
    ----------
    image
        ``(C, k*H, k*W)`` histology image in ``[0, 1]`` (float) or ``0..255`` (uint8), ``k`` the model's
        ``image_scale``; numpy or torch.
    hr
        ``(G, H, W)`` HR truth in counts per HR pixel.
    observation
        Full-slide :class:`~stsr.observation.ObservationModel` on the ``(H, W)`` grid (blocks for synthetic
        downsampling, disks for real spot layouts; for real spot data, the measured spots form the HR truth and a
        coarser pooling of them the LR).
    genes
        The ``G`` gene names.
    mask
        Optional ``(H, W)`` boolean mask of pixels whose truth is valid (e.g. tissue); losses and metrics use only
        these pixels.
    lr
        Optional ``(G, n_obs)`` LR measurements; default ``observation.pool(hr)``.
    name
        Label used in messages and in the training summary.
    spots
        Optional ``(H, W)`` integer map of *hidden measurements* for weak supervision on real slides: the index of
        the measured spot covering each HR pixel, ``-1`` where none does (spots must not overlap). With
        ``spot_counts`` it makes the pair weakly supervised: the slide's HR truth is unknown, its spots are known,
        and the LR input is a coarser pooling of them (groups of spots). ``hr`` is then a stand-in (e.g. the spots'
        interpolation) that only sets the noisy input of the diffusion; :func:`~stsr.models.fit` scores the
        denoised prediction pooled over each spot against the spot's count (loss term ``"spots"``) and weighs the
        stand-in's term as ``"pseudo"`` instead of ``"diffusion"``.
    spot_counts
        ``(G, n_spots)`` measured counts of the hidden spots of ``spots``.
    features
        Optional ``(F, H, W)`` image features on the HR grid that the network's histology encoder learns to predict
        (feature distillation; :func:`stsr.tl.train` with ``image_features=`` computes them from an image encoder).
        They need no expression truth, so weakly supervised pairs carry them too.
    """

    image: Any
    hr: Any
    observation: ObservationModel
    genes: Sequence[str]
    mask: Any | None = None
    lr: Any | None = None
    name: str = "pair"
    spots: Any | None = None
    spot_counts: Any | None = None
    features: Any | None = None

    def __post_init__(self) -> None:
        img = torch.as_tensor(np.asarray(self.image) if not torch.is_tensor(self.image) else self.image)
        if img.dtype != torch.uint8:
            img = img.to(torch.float32)
        hr = torch.as_tensor(np.asarray(self.hr) if not torch.is_tensor(self.hr) else self.hr).to(
            torch.float32
        )
        if img.ndim != 3:
            raise ValueError(
                f"TrainingPair {self.name!r}: image must be (C, k*H, k*W), got shape {tuple(img.shape)}."
            )
        if hr.ndim != 3:
            raise ValueError(
                f"TrainingPair {self.name!r}: hr must be (G, H, W) counts, got shape {tuple(hr.shape)}."
            )
        if not isinstance(self.observation, ObservationModel):
            raise TypeError(f"TrainingPair {self.name!r}: observation must be an ObservationModel.")
        if self.observation.shape != tuple(hr.shape[-2:]):
            raise ValueError(
                f"TrainingPair {self.name!r}: the observation model is on a {self.observation.shape} grid but hr is "
                f"{tuple(hr.shape[-2:])}."
            )
        h, w = hr.shape[-2:]
        if img.shape[-2] % h or img.shape[-1] % w or img.shape[-2] // h != img.shape[-1] // w:
            raise ValueError(
                f"TrainingPair {self.name!r}: image {tuple(img.shape[-2:])} is not an integer multiple k*(H, W) of "
                f"the HR grid {(h, w)}; resample the image to image_scale pixels per HR pixel."
            )
        if not torch.all(torch.isfinite(hr)) or bool((hr < 0).any()):
            raise ValueError(f"TrainingPair {self.name!r}: hr must hold finite, non-negative counts.")
        genes = [str(g) for g in self.genes]
        if len(genes) != hr.shape[0]:
            raise ValueError(
                f"TrainingPair {self.name!r}: {len(genes)} gene names for {hr.shape[0]} HR channels."
            )
        if len(set(genes)) != len(genes):
            raise ValueError(f"TrainingPair {self.name!r}: gene names must be unique.")
        if self.mask is not None:
            m = torch.as_tensor(np.asarray(self.mask) if not torch.is_tensor(self.mask) else self.mask).to(
                torch.bool
            )
            if tuple(m.shape) != (h, w):
                raise ValueError(
                    f"TrainingPair {self.name!r}: mask must be (H, W) = {(h, w)}, got {tuple(m.shape)}."
                )
            if not bool(m.any()):
                raise ValueError(f"TrainingPair {self.name!r}: mask selects no pixel.")
            self.mask = m
        if self.lr is not None:
            lr = np.asarray(self.lr.detach().cpu() if torch.is_tensor(self.lr) else self.lr, dtype=np.float64)
            if lr.shape != (hr.shape[0], self.observation.n_obs):
                raise ValueError(
                    f"TrainingPair {self.name!r}: lr must be (G, n_obs) = {(hr.shape[0], self.observation.n_obs)}, "
                    f"got {lr.shape}."
                )
            self.lr = lr
        if (self.spots is None) != (self.spot_counts is None):
            raise ValueError(
                f"TrainingPair {self.name!r}: pass spots= and spot_counts= together (weak supervision)."
            )
        if self.spots is not None:
            labels = torch.as_tensor(
                np.asarray(self.spots) if not torch.is_tensor(self.spots) else self.spots
            ).to(torch.int64)
            if tuple(labels.shape) != (h, w):
                raise ValueError(
                    f"TrainingPair {self.name!r}: spots must be an (H, W) = {(h, w)} label map, got "
                    f"{tuple(labels.shape)}."
                )
            counts = np.asarray(
                self.spot_counts.detach().cpu() if torch.is_tensor(self.spot_counts) else self.spot_counts,
                dtype=np.float64,
            )
            n = int(labels.max()) + 1 if labels.numel() else 0
            if counts.ndim != 2 or counts.shape[0] != hr.shape[0] or counts.shape[1] < n:
                raise ValueError(
                    f"TrainingPair {self.name!r}: spot_counts must be (G, n_spots) = ({hr.shape[0]}, >= {n}), got "
                    f"{counts.shape}."
                )
            if not np.all(np.isfinite(counts)) or (counts < 0).any():
                raise ValueError(
                    f"TrainingPair {self.name!r}: spot_counts must be finite, non-negative counts."
                )
            self.spots, self.spot_counts = labels, counts
        if self.features is not None:
            feats = torch.as_tensor(
                np.asarray(self.features) if not torch.is_tensor(self.features) else self.features
            ).to(torch.float32)
            if feats.ndim != 3 or tuple(feats.shape[-2:]) != (h, w) or feats.shape[0] < 1:
                raise ValueError(
                    f"TrainingPair {self.name!r}: features must be (F, H, W) = (F, {h}, {w}) maps on the HR grid, "
                    f"got {tuple(feats.shape)}."
                )
            if not torch.all(torch.isfinite(feats)):
                raise ValueError(f"TrainingPair {self.name!r}: features must be finite.")
            self.features = feats
        self.image, self.hr, self.genes = img, hr, genes

    @property
    def weak(self) -> bool:
        """Whether the pair is weakly supervised (hidden spots instead of HR truth)."""
        return self.spots is not None

    def input_density(
        self, lr: np.ndarray, genes: Any, r0: int, c0: int, height: int, width: int
    ) -> torch.Tensor:
        """``(len(genes), height, width)`` network LR input of a window: the interpolation of the LR counts ``lr``
        ``(G, n_obs)`` of the genes ``genes`` (indices), as ``super_resolve`` computes it tile by tile.

        The one place a training pair decides its network's LR input: an experiment that gives the network another
        input subclasses the pair and overrides this (``benchmarks/_guided.py``).
        """
        lr = np.asarray(lr)[np.asarray(genes, dtype=np.int64)]
        dens = self.observation.interpolate(lr, window=(r0, c0, height, width))
        return torch.as_tensor(dens, dtype=torch.float32)

    @property
    def image_scale(self) -> int:
        """Image pixels per HR pixel."""
        return int(self.image.shape[-2] // self.hr.shape[-2])

    @property
    def shape(self) -> tuple[int, int]:
        """HR grid shape ``(H, W)``."""
        return (int(self.hr.shape[-2]), int(self.hr.shape[-1]))


class PreparedPair:
    """A pair with its slide-level LR, normaliser and valid mask, ready for cropping.

    The LR density of a crop is computed on demand with the windowed ``ObservationModel.interpolate`` (identical to
    cropping the slide-wide interpolation, as at inference), so no slide-sized density map is held in memory.

    Parameters
    ----------
    pair
        The training pair.

    Attributes
    ----------
    pair
        The training pair.
    lr
        ``(G, n_obs)`` float64 LR counts: ``pair.lr``, or the pooling of ``pair.hr`` when it has none.
    normalizer
        Slide-level :class:`~stsr.models.GeneNormalizer` of ``lr`` (:meth:`~stsr.models.GeneNormalizer.from_observations`).
    mask
        ``(H, W)`` bool valid pixels (all pixels when the pair has no mask).
    gene_ids
        Stable gene ids of the pair's genes (:func:`~stsr.models.gene_ids_from_names`).
    """

    def __init__(self, pair: TrainingPair) -> None:
        self.pair = pair
        op = pair.observation
        lr = pair.lr if pair.lr is not None else op.pool(pair.hr.double().numpy())
        self.lr = np.asarray(lr, dtype=np.float64)
        self.normalizer = GeneNormalizer.from_observations(self.lr, op.support_area)
        self.mask = pair.mask if pair.mask is not None else torch.ones(pair.shape, dtype=torch.bool)
        self.gene_ids = gene_ids_from_names(pair.genes)
        if pair.weak:
            labels = pair.spots.reshape(-1)
            inside = labels >= 0
            #: pixels of each hidden spot on the grid (a crop scores only the spots it holds whole)
            self.spot_area = torch.bincount(labels[inside], minlength=pair.spot_counts.shape[1])

    def density(self, genes: torch.Tensor, r0: int, c0: int, height: int, width: int) -> torch.Tensor:
        """``(len(genes), height, width)`` LR density (counts per HR pixel) of a window of the slide.

        This is the network's LR input, :meth:`TrainingPair.input_density` of the pair's LR.

        Parameters
        ----------
        genes
            Indices of the genes.
        r0, c0
            Top-left HR pixel of the window.
        height, width
            Size of the window in HR pixels.
        """
        return self.pair.input_density(self.lr, genes, r0, c0, height, width)

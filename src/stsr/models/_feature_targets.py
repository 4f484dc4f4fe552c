"""Feature-distillation targets: an image encoder's features on each training pair's HR grid, reduced to a few
principal components shared by all pairs.

The network's histology encoder is light (it must run on every tile of a slide); a heavier image encoder (the
ImageNet DenseNet teacher, nuclear morphology, a pathology foundation model the user wraps as a module) knows more
about the tissue. Training the light encoder to predict the heavy one's features (HaDM-ST's semantic distillation)
passes that knowledge on without running the heavy encoder at inference. :func:`feature_targets` computes the targets;
:func:`~stsr.models.fit` adds the loss term ``"features"`` for a model with ``ModelConfig.feature_targets``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._training_pair import TrainingPair

__all__ = ["FeatureBasis", "feature_targets"]


@dataclass(frozen=True)
class FeatureBasis:
    """The principal axes the targets are expressed in: ``target = ((features - mean) / scale) @ axes / sd``.

    Attributes
    ----------
    mean, scale
        ``(C,)`` per-channel mean and standard deviation of the encoder features over the sampled pixels.
    axes
        ``(C, n)`` principal axes of the standardised features.
    sd
        ``(n,)`` standard deviation of each component (the targets have unit variance).
    explained
        Fraction of the standardised features' variance the ``n`` components hold.
    """

    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray
    sd: np.ndarray
    explained: float

    @property
    def n_components(self) -> int:
        """Number of target channels."""
        return int(self.axes.shape[1])

    def project(self, features: np.ndarray) -> np.ndarray:
        """``(n, h, w)`` float32 targets of ``(C, h, w)`` encoder features."""
        c, h, w = features.shape
        flat = (features.reshape(c, -1).T.astype(np.float64) - self.mean) / self.scale
        out = (flat @ self.axes) / self.sd
        return out.T.reshape(-1, h, w).astype(np.float32)


def _rgb_float(image: torch.Tensor) -> np.ndarray:
    img = image.to(torch.float32) / 255.0 if image.dtype == torch.uint8 else image.to(torch.float32)
    return img.numpy()


def feature_targets(
    pairs: Sequence[TrainingPair],
    encoders: Sequence[Any],
    *,
    n_components: int = 16,
    samples_per_pair: int = 4096,
    seed: int = 0,
) -> tuple[list[TrainingPair], FeatureBasis]:
    """The pairs with ``features`` set to the encoders' features of their images, as shared principal components.

    Each encoder's :meth:`features` (``(C, h, w)`` area-averaged over the HR pixels) reads the pair's image as it is
    (``image_scale`` image pixels per HR pixel); the encoders' channels are concatenated, standardised and reduced to
    at most ``n_components`` principal components fitted on up to ``samples_per_pair`` valid pixels of every pair, so
    that one head predicts the same components on every slide. The components are scaled to unit variance.

    Parameters
    ----------
    pairs
        Training pairs (their existing ``features`` are replaced).
    encoders
        Image encoders (objects with ``features(image, hr_shape)``, e.g. from
        :func:`stsr.models.prior.resolve_image_features`; embedding element keys are read by ``stsr.tl``).
    n_components
        Most target channels (fewer when the encoders have fewer channels).
    samples_per_pair
        Valid pixels per pair used to fit the components.
    seed
        Seed of the pixel sample.

    Returns
    -------
    The new pairs (copies; the input pairs are unchanged) and the :class:`FeatureBasis`.
    """
    if not encoders:
        raise ValueError("feature_targets needs at least one image encoder.")
    if int(n_components) < 1:
        raise ValueError(f"n_components must be a positive integer, got {n_components!r}.")
    rng = np.random.default_rng(seed)
    maps, samples = [], []
    for p in pairs:
        image = _rgb_float(p.image)
        parts = []
        for enc in encoders:
            f = np.asarray(enc.features(image, p.shape), dtype=np.float32)
            if f.ndim != 3 or f.shape[1:] != p.shape:
                raise ValueError(
                    f"the image encoder {getattr(enc, 'name', type(enc).__name__)!r} returned features of shape "
                    f"{f.shape} for pair {p.name!r}; expected (channels, {p.shape[0]}, {p.shape[1]})."
                )
            parts.append(f)
        feats = np.concatenate(parts, axis=0)
        if not np.all(np.isfinite(feats)):
            raise ValueError(f"the image encoders returned non-finite features on pair {p.name!r}.")
        valid = np.flatnonzero(p.mask.numpy().reshape(-1)) if p.mask is not None else np.arange(feats[0].size)
        pick = rng.choice(valid, size=min(samples_per_pair, valid.size), replace=False)
        samples.append(feats.reshape(feats.shape[0], -1)[:, pick].T.astype(np.float64))
        maps.append(feats)  # held until the shared axes are known
    x = np.concatenate(samples, axis=0)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    n = int(min(n_components, vt.shape[0], int((sv > 1e-8 * max(sv[0], 1e-300)).sum())))
    if n < 1:
        raise ValueError(
            "the image encoders' features are constant over the training pairs; nothing to learn."
        )
    sd = sv[:n] / np.sqrt(max(len(z) - 1, 1))
    var = (sv**2).sum()
    basis = FeatureBasis(mean, scale, vt[:n].T, sd, float((sv[:n] ** 2).sum() / var) if var > 0 else 1.0)
    out = [dataclasses.replace(p, features=basis.project(m)) for p, m in zip(pairs, maps)]
    return out, basis

"""The prior-guided experiment (no shipped weights): a diffusion model whose LR input is the prior map.

A *prior-guided* model takes as its network's LR input not the interpolation of the LR data but the prior map of
:func:`stsr.models.prior_guide` (the interpolation reweighted by the semantic prior), so that it refines the best
deterministic estimate instead of competing with it. Measured in ``docs/benchmarks.md`` ("prior-guided model"), it
did not beat its input on real slides, so it lives here, outside the package:

- :class:`GuidedPair` is a :class:`stsr.models.TrainingPair` whose network input is its ``guide``
  (:meth:`~stsr.models.TrainingPair.input_density` is the one hook); :func:`with_guide` builds one;
- :func:`mark_guided` / :func:`lr_input` record and read the kind of input in the model's config (``super_resolve``
  refuses such a model with a clear error; :func:`baselines.stsr_predict` runs it given ``guide=``);
- :func:`save_guides` / :func:`load_guided` keep the guides beside a pair store written by
  :func:`stsr.models.save_pairs`.

``scripts/train_default.py --guide`` trains one; ``benchmarks/guided.py`` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import stsr

GUIDED = "prior_guide"


@dataclass
class GuidedPair(stsr.models.TrainingPair):
    """A training pair whose network LR input is ``guide`` ``(G, H, W)`` (counts per HR pixel, the shape of ``hr``)
    instead of the interpolation of its LR; a model trained on such pairs must be sampled with the same guide."""

    guide: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guide is None:
            raise ValueError(f"GuidedPair {self.name!r}: pass guide=, the (G, H, W) prior map of the pair.")
        guide = torch.as_tensor(np.asarray(self.guide) if not torch.is_tensor(self.guide) else self.guide)
        guide = guide.to(torch.float32)
        if tuple(guide.shape) != tuple(self.hr.shape):
            raise ValueError(
                f"GuidedPair {self.name!r}: guide must have the shape of hr {tuple(self.hr.shape)}, "
                f"got {tuple(guide.shape)}."
            )
        if not torch.all(torch.isfinite(guide)) or bool((guide < 0).any()):
            raise ValueError(f"GuidedPair {self.name!r}: guide must hold finite, non-negative values.")
        self.guide = guide

    def input_density(
        self, lr: np.ndarray, genes: Any, r0: int, c0: int, height: int, width: int
    ) -> torch.Tensor:
        return self.guide[
            torch.as_tensor(np.asarray(genes, np.int64)), r0 : r0 + height, c0 : c0 + width
        ].clone()


def with_guide(pair: stsr.models.TrainingPair, teacher_image: np.ndarray) -> GuidedPair:
    """The pair with its prior map (:func:`stsr.models.prior_guide` with the pair's tissue mask, the semantic prior
    read from ``teacher_image`` at the image teacher's resolution) as the network's LR input."""
    op = pair.observation
    lr = pair.lr if pair.lr is not None else op.pool(pair.hr.double().numpy())
    feats = stsr.models.teacher_features(teacher_image, pair.shape)
    mask = pair.mask.numpy() if pair.mask is not None else None
    guide = stsr.models.prior_guide(stsr.models.semantic_prior(feats, lr, op, mask=mask), lr, op, mask=mask)
    return GuidedPair(
        image=pair.image,
        hr=pair.hr,
        observation=op,
        genes=pair.genes,
        mask=pair.mask,
        lr=lr,
        name=pair.name,
        guide=guide,
    )


def mark_guided(model: stsr.models.STSRModel, strength: float = 0.5) -> None:
    """Record in the model's config that its LR input is the prior map at ``strength``."""
    model.config.extra = {**model.config.extra, "lr_input": GUIDED, "prior_strength": strength}


def lr_input(model: stsr.models.STSRModel) -> str:
    """What the model's network takes as its LR input: ``"interpolation"`` (every shipped model) or ``"prior_guide"``."""
    return str(model.config.extra.get("lr_input", "interpolation"))


def save_guides(pairs: list[stsr.models.TrainingPair], path: str | Path) -> None:
    """Write the guides of the guided ``pairs`` beside the pair store ``path`` (``guide_<name>.npy``, float16)."""
    for p in pairs:
        if isinstance(p, GuidedPair):
            np.save(Path(path) / f"guide_{p.name}.npy", p.guide.numpy().astype(np.float16))


def load_guided(path: str | Path) -> list[stsr.models.TrainingPair]:
    """The pairs of a store with their guides where :func:`save_guides` wrote one (as :class:`GuidedPair`)."""
    out = []
    for p in stsr.models.load_pairs(path):
        f = Path(path) / f"guide_{p.name}.npy"
        if f.exists():
            fields = {k: getattr(p, k) for k in ("image", "hr", "observation", "genes", "mask", "lr", "name")}
            p = GuidedPair(**fields, guide=np.load(f).astype(np.float32))
        out.append(p)
    return out

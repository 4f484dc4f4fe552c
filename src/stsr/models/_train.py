"""Training loop of the stsr diffusion model (pure torch over in-memory training pairs).

A :class:`TrainingPair` is one slide (or region) with its histology image, its HR truth in counts per HR pixel and
the :class:`~stsr.observation.ObservationModel` that produces its LR measurements. The model sees, exactly as at
inference, the slide-level normalised LR density ``ObservationModel.interpolate(lr)`` on the HR grid, with
``lr = observation.pool(hr)`` (or measured LR values when given) and the slide-level
:meth:`GeneNormalizer.from_observations <stsr.models.GeneNormalizer.from_observations>`.

Each step draws a batch of random square crops from one pair (chosen with probability proportional to its area),
a random subset of its genes (the network is panel-agnostic), applies the same random flip / 90-degree rotation to
image, HR truth, LR density and mask, jitters the stain of the image, and minimises the weighted sum of

- the diffusion loss (MSE of the network output against the ``v`` / ``eps`` / ``x0`` target, masked);
- the distillation loss (histology-only prediction ``aux_expression`` against the normalised truth) when
  ``use_distillation``;
- the auxiliary losses returned by ``forward_train`` (e.g. ``"disentangle"``) when their module is on;
- the generator's adversarial hinge loss on the predicted clean maps of low-noise samples when ``use_adversarial``
  (the channel discriminator is trained alongside with its own AdamW).

AdamW with warm-up and cosine decay, gradient clipping and an exponential moving average (EMA) of the weights, which
is what validation, checkpoints' sampling and the returned model use. Checkpoints (safetensors + JSON, no pickle)
hold weights, EMA, optimiser states, step, history and random-number-generator states, so a run resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..observation import ObservationModel
from ._allocator import reuse_freed_memory
from ._diffusion import diffusion_loss, q_sample, to_x0_eps, training_target
from ._model import STSRModel
from ._noise import gene_ids_from_names
from ._normalize import GeneNormalizer

__all__ = ["TrainingPair", "TrainConfig", "fit", "evaluate_pairs"]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


# ---------------------------------------------------------------------------------------------------- data
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
    guide
        Optional ``(G, H, W)`` HR estimate (counts per HR pixel) given to the network as its LR input instead of the
        interpolation of ``lr``, e.g. the interpolation reweighted by the semantic prior
        (:func:`~stsr.models.prior_guide`); a model trained on guided pairs must be sampled with the same guide.
    """

    image: Any
    hr: Any
    observation: ObservationModel
    genes: Sequence[str]
    mask: Any | None = None
    lr: Any | None = None
    name: str = "pair"
    guide: Any | None = None

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
        if self.guide is not None:
            guide = torch.as_tensor(
                np.asarray(self.guide) if not torch.is_tensor(self.guide) else self.guide
            ).to(torch.float32)
            if tuple(guide.shape) != tuple(hr.shape):
                raise ValueError(
                    f"TrainingPair {self.name!r}: guide must have the shape of hr {tuple(hr.shape)}, "
                    f"got {tuple(guide.shape)}."
                )
            if not torch.all(torch.isfinite(guide)) or bool((guide < 0).any()):
                raise ValueError(f"TrainingPair {self.name!r}: guide must hold finite, non-negative values.")
            self.guide = guide
        self.image, self.hr, self.genes = img, hr, genes

    @property
    def image_scale(self) -> int:
        """Image pixels per HR pixel."""
        return int(self.image.shape[-2] // self.hr.shape[-2])

    @property
    def shape(self) -> tuple[int, int]:
        """HR grid shape ``(H, W)``."""
        return (int(self.hr.shape[-2]), int(self.hr.shape[-1]))


class _Prepared:
    """A pair with its slide-level LR, normaliser and valid mask, ready for cropping.

    The LR density of a crop is computed on demand with the windowed ``ObservationModel.interpolate`` (identical to
    cropping the slide-wide interpolation, as at inference), so no slide-sized density map is held in memory.
    """

    def __init__(self, pair: TrainingPair) -> None:
        self.pair = pair
        op = pair.observation
        lr = pair.lr if pair.lr is not None else op.pool(pair.hr.double().numpy())
        self.lr = np.asarray(lr, dtype=np.float64)
        self.normalizer = GeneNormalizer.from_observations(self.lr, op.support_area)
        self.mask = pair.mask if pair.mask is not None else torch.ones(pair.shape, dtype=torch.bool)
        self.gene_ids = gene_ids_from_names(pair.genes)

    def density(self, genes: torch.Tensor, r0: int, c0: int, height: int, width: int) -> torch.Tensor:
        """``(len(genes), height, width)`` LR density (counts per HR pixel) of a window of the slide.

        This is the network's LR input: the pair's ``guide`` where it has one, else the interpolation of its LR.
        """
        if self.pair.guide is not None:
            return self.pair.guide[genes, r0 : r0 + height, c0 : c0 + width].clone()
        lr = self.lr[np.asarray(genes, dtype=np.int64)]
        dens = self.pair.observation.interpolate(lr, window=(r0, c0, height, width))
        return torch.as_tensor(dens, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Training hyper-parameters (all JSON-serialisable).

    Parameters
    ----------
    steps
        Total number of optimisation steps (a resumed run continues up to this step).
    batch_size
        Crops per step.
    tile_size
        Side of the square HR crops (multiple of 4).
    genes_per_batch
        Genes drawn at random (without replacement) for each step.
    learning_rate, weight_decay, betas
        AdamW settings of the denoiser.
    warmup_steps
        Linear learning-rate warm-up; afterwards cosine decay to ``min_lr_ratio * learning_rate`` at ``steps``.
    min_lr_ratio
        Final learning rate as a fraction of ``learning_rate``.
    grad_clip
        Maximum gradient norm.
    ema_decay
        Decay of the exponential moving average of the weights (warmed up as ``min(decay, (1+n)/(10+n))``).
    seed
        Seed of initialisation, crops, augmentation and training noise.
    augment
        Random flips and 90-degree rotations.
    stain_jitter
        Strength of the stain jitter (HED space for RGB, per-channel gain/bias otherwise); 0 disables it.
    min_valid_fraction
        Crops with fewer valid (masked-in) pixels are redrawn (up to 20 times).
    loss_weights
        Weights of the loss terms ``"diffusion"``, ``"distillation"``, ``"adversarial"`` and of the auxiliary losses
        returned by the network (e.g. ``"disentangle"``; unknown names weigh 1).
    adversarial_start
        Step from which the adversarial loss is used.
    adversarial_max_t
        Only samples with diffusion time ``t <= adversarial_max_t`` enter the adversarial loss.
    disc_learning_rate
        AdamW learning rate of the discriminator.
    log_every
        Steps between entries of the loss history.
    val_every
        Steps between validations (0: only at the end).
    val_steps
        DDIM steps of the validation sampler (with consistency).
    val_tiles
        Maximum number of validation tiles per validation pair.
    val_genes
        Maximum number of genes scored per validation pair.
    checkpoint_every
        Steps between checkpoints (when a checkpoint directory is given; a final one is always written).
    progress
        Show a tqdm progress bar.
    """

    steps: int = 2000
    batch_size: int = 8
    tile_size: int = 48
    genes_per_batch: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    augment: bool = True
    stain_jitter: float = 0.05
    min_valid_fraction: float = 0.25
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {
            "diffusion": 1.0,
            "distillation": 0.5,
            "disentangle": 0.1,
            "adversarial": 0.02,
        }
    )
    adversarial_start: int = 0
    adversarial_max_t: float = 0.5
    disc_learning_rate: float = 2e-4
    log_every: int = 10
    val_every: int = 250
    val_steps: int = 5
    val_tiles: int = 8
    val_genes: int = 64
    checkpoint_every: int = 500
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for name in (
            "steps",
            "batch_size",
            "tile_size",
            "genes_per_batch",
            "log_every",
            "val_steps",
            "val_tiles",
            "val_genes",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}.")
        if self.tile_size % 4:
            raise ValueError(f"TrainConfig.tile_size must be a multiple of 4, got {self.tile_size}.")
        if self.learning_rate <= 0 or self.disc_learning_rate <= 0:
            raise ValueError("Learning rates must be positive.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}.")
        self.loss_weights = {str(k): float(v) for k, v in self.loss_weights.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------- augmentation
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random stain augmentation of ``(B, C, h, w)`` images in ``[0, 1]``.

    RGB images are converted to haematoxylin/eosin/DAB optical densities (Ruifrok & Johnston), each stain is scaled by
    ``1 + strength * N(0, 1)`` and shifted by ``strength * N(0, 1) * 0.1`` per image, and converted back; other
    images get a per-channel gain ``1 + strength * N(0, 1)`` and bias ``0.5 * strength * N(0, 1)``.
    """
    if strength <= 0:
        return image
    b, c = image.shape[:2]
    gain = 1 + strength * torch.randn(b, c, generator=generator)
    bias = strength * torch.randn(b, c, generator=generator)
    gain, bias = gain.to(image.device), bias.to(image.device)
    if c == 3:
        od = -torch.log(image.clamp(1e-6, 1.0)).permute(0, 2, 3, 1)  # (B, h, w, 3)
        hed = od @ _HED_FROM_RGB.to(image.device)
        hed = hed * gain[:, None, None, :] + 0.1 * bias[:, None, None, :]
        out = torch.exp(-(hed @ _RGB_FROM_HED.to(image.device))).permute(0, 3, 1, 2)
    else:
        out = image * gain[:, :, None, None] + 0.5 * bias[:, :, None, None]
    return out.clamp(0.0, 1.0)


def _augment(tensors: list[torch.Tensor], rot: int, flip: bool) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        if rot:
            t = torch.rot90(t, rot, dims=(-2, -1))
        if flip:
            t = torch.flip(t, dims=(-1,))
        out.append(t)
    return out


def _image_float(img: torch.Tensor) -> torch.Tensor:
    return img.to(torch.float32) / 255.0 if img.dtype == torch.uint8 else img.to(torch.float32)


# ---------------------------------------------------------------------------------------------------- batches
def _draw_batch(
    prepared: list[_Prepared], cfg: TrainConfig, k: int, gen: torch.Generator
) -> dict[str, torch.Tensor | GeneNormalizer]:
    areas = torch.tensor([p.pair.shape[0] * p.pair.shape[1] for p in prepared], dtype=torch.float64)
    pi = int(torch.multinomial(areas / areas.sum(), 1, generator=gen)) if len(prepared) > 1 else 0
    p = prepared[pi]
    h, w = p.pair.shape
    t = cfg.tile_size
    n_genes = p.pair.hr.shape[0]
    genes = torch.randperm(n_genes, generator=gen)[: min(cfg.genes_per_batch, n_genes)].sort().values
    imgs, hrs, dens, masks = [], [], [], []
    for _ in range(cfg.batch_size):
        for _try in range(20):
            r0 = int(torch.randint(0, h - t + 1, (1,), generator=gen))
            c0 = int(torch.randint(0, w - t + 1, (1,), generator=gen))
            m = p.mask[r0 : r0 + t, c0 : c0 + t]
            if m.float().mean() >= cfg.min_valid_fraction:
                break
        img = _image_float(p.pair.image[:, k * r0 : k * (r0 + t), k * c0 : k * (c0 + t)])
        hr = p.pair.hr[genes, r0 : r0 + t, c0 : c0 + t]
        de = p.density(genes, r0, c0, t, t)
        if cfg.augment:
            rot = int(torch.randint(0, 4, (1,), generator=gen))
            flip = bool(torch.randint(0, 2, (1,), generator=gen))
            img, hr, de, m = _augment([img, hr, de, m], rot, flip)
        imgs.append(img)
        hrs.append(hr)
        dens.append(de)
        masks.append(m)
    return {
        "image": torch.stack(imgs),
        "hr": torch.stack(hrs),
        "density": torch.stack(dens),
        "mask": torch.stack(masks),
        "normalizer": p.normalizer.subset(genes),
    }


# ---------------------------------------------------------------------------------------------------- EMA and LR
@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    msd = model.state_dict()
    for k, v in ema.state_dict().items():
        src = msd[k]
        if v.dtype.is_floating_point:
            v.lerp_(src.to(v.dtype), 1.0 - decay)
        else:
            v.copy_(src)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    prog = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.learning_rate * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    )


# ---------------------------------------------------------------------------------------------------- validation
class _ValSet:
    """Fixed validation tiles of a pair, with the cropped observation operators for consistent sampling."""

    def __init__(
        self, prepared: _Prepared, tile: int, max_tiles: int, max_genes: int, min_valid: float, k: int
    ):
        pair = prepared.pair
        h, w = pair.shape
        if h < tile or w < tile:
            raise ValueError(f"Validation pair {pair.name!r} ({h}x{w}) is smaller than tile_size={tile}.")
        genes = torch.arange(min(max_genes, pair.hr.shape[0]))
        self.normalizer = prepared.normalizer.subset(genes)
        self.gene_ids = prepared.gene_ids[genes]
        rows = list(range(0, h - tile + 1, tile))
        cols = list(range(0, w - tile + 1, tile))
        self.tiles: list[dict[str, Any]] = []
        for r0 in rows:
            for c0 in cols:
                m = prepared.mask[r0 : r0 + tile, c0 : c0 + tile]
                if m.float().mean() < min_valid:
                    continue
                op, kept = pair.observation.crop(r0, c0, tile, tile)
                self.tiles.append(
                    {
                        "origin": (r0, c0),
                        "image": _image_float(
                            pair.image[:, k * r0 : k * (r0 + tile), k * c0 : k * (c0 + tile)]
                        ),
                        "density": prepared.density(genes, r0, c0, tile, tile),
                        "truth": pair.hr[genes, r0 : r0 + tile, c0 : c0 + tile],
                        "mask": m,
                        "obs": (op, prepared.lr[genes.numpy()][:, kept]),
                    }
                )
                if len(self.tiles) >= max_tiles:
                    break
            if len(self.tiles) >= max_tiles:
                break
        if not self.tiles:
            raise ValueError(
                f"Validation pair {pair.name!r} has no tile with enough valid (masked-in) pixels."
            )


def _metrics(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """RMSE over valid pixels and the mean over genes of the Pearson r over valid pixels (``(B, G, h, w)``)."""
    g = pred.shape[1]
    m = mask[:, None].expand_as(pred)
    p = pred.double().transpose(0, 1)[m.transpose(0, 1)].reshape(g, -1)
    t = truth.double().transpose(0, 1)[m.transpose(0, 1)].reshape(g, -1)
    rmse = float(((p - t) ** 2).mean().sqrt())
    pc, tc = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    den = (pc.norm(dim=1) * tc.norm(dim=1)).clamp_min(1e-12)
    ok = (pc.norm(dim=1) > 0) & (tc.norm(dim=1) > 0)
    r = (pc * tc).sum(1) / den
    return {"rmse": rmse, "pearson": float(r[ok].mean()) if bool(ok.any()) else float("nan")}


def evaluate_pairs(
    model: STSRModel,
    valsets: list[_ValSet],
    steps: int,
    seed: int = 0,
    device: torch.device | None = None,
    cache_interval: int = 1,
) -> dict[str, float]:
    """Sample the validation tiles (with consistency) and score them against the truth (averaged over pairs).

    ``cache_interval`` is passed to :meth:`~stsr.models.STSRModel.sample` (deep-feature reuse across steps).
    """
    out: dict[str, list[float]] = {"rmse": [], "pearson": [], "rmse_lr": [], "pearson_lr": []}
    for vs in valsets:
        tiles = vs.tiles
        mean, _ = model.sample(
            torch.stack([t["image"] for t in tiles]),
            torch.stack([t["density"] for t in tiles]),
            vs.normalizer,
            observations=[t["obs"] for t in tiles],
            origins=[t["origin"] for t in tiles],
            gene_ids=vs.gene_ids,
            seed=seed,
            steps=steps,
            cache_interval=cache_interval,
            consistency=True,
            device=device,
        )
        truth = torch.stack([t["truth"] for t in tiles])
        mask = torch.stack([t["mask"] for t in tiles])
        m = _metrics(mean, truth, mask)
        base = _metrics(torch.stack([t["density"] for t in tiles]), truth, mask)
        out["rmse"].append(m["rmse"])
        out["pearson"].append(m["pearson"])
        out["rmse_lr"].append(base["rmse"])
        out["pearson_lr"].append(base["pearson"])
    return {f"val_{k}": float(np.nanmean(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(
    prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    sd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            name = f"{prefix}.{pid}.{key}"
            if torch.is_tensor(val):
                tensors[name] = val.detach().cpu().clone().contiguous()
            else:
                scalars[name] = val
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    prefix: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        if not name.startswith(prefix + "."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _module_tensors(prefix: str, module: nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
    if module is None:
        return
    for k, v in module.state_dict().items():
        tensors[f"{prefix}.{k}"] = v.detach().cpu().clone().contiguous()


def _module_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint (``checkpoint.safetensors`` + ``checkpoint.json``) atomically."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors("denoiser", state["denoiser"], tensors)
    _module_tensors("ema", state["ema"], tensors)
    _module_tensors("discriminator", state["discriminator"], tensors)
    opt_meta = _flatten_optimizer("opt", state["opt"], tensors)
    dopt_meta = _flatten_optimizer("dopt", state["dopt"], tensors) if state["dopt"] is not None else None
    tensors["rng.generator"] = state["generator"].get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": "stsr-checkpoint",
        "step": int(state["step"]),
        "model_config": state["model_config"].to_dict(),
        "train_config": state["train_config"].to_dict(),
        "history": state["history"],
        "pairs": list(state.get("pairs", [])),
        "opt": opt_meta,
        "dopt": dopt_meta,
    }
    data = save(tensors)
    for name, payload in ((CHECKPOINT_TENSORS, data), (CHECKPOINT_JSON, json.dumps(meta).encode())):
        tmp = directory / f"{name}.tmp{os.getpid()}"
        tmp.write_bytes(payload)
        os.replace(tmp, directory / name)


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Read a checkpoint written by :func:`save_checkpoint`; ``None`` when the directory holds none."""
    from safetensors.torch import load

    jpath, tpath = directory / CHECKPOINT_JSON, directory / CHECKPOINT_TENSORS
    if not jpath.is_file():
        return None
    if not tpath.is_file():
        raise ValueError(
            f"Checkpoint {directory} has {CHECKPOINT_JSON} but no {CHECKPOINT_TENSORS}; remove it or "
            "pass resume=False."
        )
    try:
        meta = json.loads(jpath.read_text())
        tensors = load(tpath.read_bytes())
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"Checkpoint in {directory} is unreadable ({err}); remove it or pass resume=False."
        ) from err
    if meta.get("format") != "stsr-checkpoint":
        raise ValueError(f"{jpath} is not an stsr training checkpoint.")
    return meta, tensors


# ---------------------------------------------------------------------------------------------------- the loop
def fit(
    model: STSRModel,
    pairs: Sequence[TrainingPair],
    config: TrainConfig | None = None,
    *,
    validation: Sequence[TrainingPair] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    teacher: STSRModel | None = None,
) -> STSRModel:
    """Train ``model`` on ``pairs``; returns a model holding the EMA weights.

    Parameters
    ----------
    model
        The :class:`~stsr.models.STSRModel` to train (its denoiser is updated in place; a discriminator is created
        when ``use_adversarial`` is on and the model has none).
    pairs
        Training pairs.
    config
        Training hyper-parameters (default :class:`TrainConfig`).
    validation
        Held-out pairs scored every ``config.val_every`` steps and at the end (RMSE and Pearson r of consistent
        few-step samples).
    checkpoint_dir
        Directory for checkpoints every ``config.checkpoint_every`` steps (and at the end).
    resume
        Continue from the checkpoint in ``checkpoint_dir`` when there is one.
    device
        Device to train on (default CPU).
    teacher
        Optional trained model to distil (knowledge distillation, e.g. into a narrower network): for every noisy
        batch it adds the loss term ``"teacher"``, the masked MSE between the model's denoiser output and the
        teacher's on the same inputs (the teacher is frozen; it needs the same ``prediction``, image channels and
        ``image_scale``). Weigh it against the ground-truth ``"diffusion"`` term with ``config.loss_weights``.

    Returns
    -------
    A new :class:`~stsr.models.STSRModel` with the EMA weights (and the trained discriminator), in eval mode, with
    ``metadata["training"]`` summarising the run (steps, losses, validation history).
    """
    from tqdm.auto import tqdm

    from ._discriminator import ChannelDiscriminator, discriminator_loss, generator_adversarial_loss

    cfg = config or TrainConfig()
    mcfg = model.config
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not pairs:
        raise ValueError("No training pairs given.")
    for p in list(pairs) + list(validation or []):
        if not isinstance(p, TrainingPair):
            raise TypeError(f"Training data must be TrainingPair objects, got {type(p).__name__}.")
        if p.image.shape[0] != mcfg.image_channels:
            raise ValueError(
                f"Pair {p.name!r} has a {p.image.shape[0]}-channel image; the model expects "
                f"{mcfg.image_channels} (ModelConfig.image_channels)."
            )
        if p.image_scale != mcfg.image_scale:
            raise ValueError(
                f"Pair {p.name!r} has {p.image_scale} image pixels per HR pixel; the model expects "
                f"{mcfg.image_scale} (ModelConfig.image_scale): resample the image."
            )
        if min(p.shape) < cfg.tile_size:
            raise ValueError(
                f"Pair {p.name!r} ({p.shape[0]}x{p.shape[1]} HR px) is smaller than tile_size="
                f"{cfg.tile_size}; lower tile_size."
            )
    if teacher is not None:
        tcfg = teacher.config
        for attr in ("prediction", "image_channels", "image_scale", "schedule", "n_timesteps"):
            if getattr(tcfg, attr) != getattr(mcfg, attr):
                raise ValueError(
                    f"The teacher's {attr}={getattr(tcfg, attr)!r} differs from the model's "
                    f"{getattr(mcfg, attr)!r}; distillation needs the same diffusion and inputs: build the model's "
                    f"ModelConfig with {attr}={getattr(tcfg, attr)!r} (e.g. teacher.config.replace(width=...))."
                )
        teacher_den = copy.deepcopy(teacher.denoiser).to(dev).eval()
        for p in teacher_den.parameters():
            p.requires_grad_(False)
    k = mcfg.image_scale
    prepared = [_Prepared(p) for p in pairs]
    valsets = [
        _ValSet(_Prepared(p), cfg.tile_size, cfg.val_tiles, cfg.val_genes, cfg.min_valid_fraction, k)
        for p in (validation or [])
    ]

    den = model.denoiser.to(dev).train()
    use_adv = bool(mcfg.use_adversarial)
    disc = model.discriminator
    if use_adv and disc is None:
        disc = ChannelDiscriminator(mcfg)
    if disc is not None:
        disc = disc.to(dev).train()
    ema = copy.deepcopy(den).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        den.parameters(), lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    dopt = (
        torch.optim.AdamW(disc.parameters(), lr=cfg.disc_learning_rate, betas=(0.5, 0.99), weight_decay=0.0)
        if use_adv
        else None
    )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    step = 0
    history: dict[str, list[dict[str, float]]] = {"loss": [], "validation": []}
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    rng_cm = torch.random.fork_rng(devices=[])
    rng_cm.__enter__()
    memory_cm = reuse_freed_memory(dev.type == "cpu")
    memory_cm.__enter__()
    try:
        torch.manual_seed(int(cfg.seed) + 1)
        if ckdir is not None and resume:
            loaded = load_checkpoint(ckdir)
            if loaded is not None:
                meta, tensors = loaded
                if meta["model_config"] != mcfg.to_dict():
                    raise ValueError(
                        f"The checkpoint in {ckdir} was written for a different model configuration; use another "
                        "checkpoint_dir or resume=False."
                    )
                den.load_state_dict(_module_state("denoiser", tensors))
                ema.load_state_dict(_module_state("ema", tensors))
                opt.load_state_dict(_unflatten_optimizer("opt", meta["opt"], tensors))
                if disc is not None and any(k.startswith("discriminator.") for k in tensors):
                    disc.load_state_dict(_module_state("discriminator", tensors))
                if dopt is not None and meta.get("dopt") is not None:
                    dopt.load_state_dict(_unflatten_optimizer("dopt", meta["dopt"], tensors))
                gen.set_state(tensors["rng.generator"])
                torch.set_rng_state(tensors["rng.torch"])
                step = int(meta["step"])
                history = meta["history"]

        ema_model = STSRModel(mcfg, ema, None)

        def checkpoint() -> None:
            if ckdir is None:
                return
            save_checkpoint(
                ckdir,
                {
                    "denoiser": den,
                    "ema": ema,
                    "discriminator": disc,
                    "opt": opt,
                    "dopt": dopt,
                    "generator": gen,
                    "step": step,
                    "model_config": mcfg,
                    "train_config": cfg,
                    "history": history,
                    "pairs": [p.pair.name for p in prepared],
                },
            )

        def validate() -> None:
            if not valsets:
                return
            res = evaluate_pairs(ema_model, valsets, cfg.val_steps, seed=cfg.seed, device=dev)
            res["step"] = step
            history["validation"].append(res)

        w = cfg.loss_weights
        running: dict[str, list[float]] = {}
        bar = tqdm(
            total=cfg.steps, initial=step, disable=not cfg.progress, desc="stsr train", dynamic_ncols=True
        )
        t_start = time.time()
        while step < cfg.steps:
            batch = _draw_batch(prepared, cfg, k, gen)
            norm: GeneNormalizer = batch["normalizer"]  # type: ignore[assignment]
            img = stain_jitter(batch["image"], cfg.stain_jitter, gen).to(dev)
            x0 = norm.normalize(batch["hr"]).to(dev)
            lr_z = norm.normalize(batch["density"]).to(dev)
            mask = batch["mask"].to(dev)
            b = x0.shape[0]
            t = model.schedule.sample_t(b, gen).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)

            feats = den.encode_histology(img)
            cond = den.prepare(feats, lr_z)
            x_t = q_sample(model.schedule, x0, t, noise)
            pred, aux = den.forward_train(x_t, lr_z, t, cond)
            target = training_target(model.schedule, x0, t, noise, mcfg.prediction)
            terms: dict[str, torch.Tensor] = {"diffusion": diffusion_loss(pred, target, mask)}
            if teacher is not None:
                with torch.no_grad():
                    t_pred = teacher_den(x_t, lr_z, t, teacher_den.encode_histology(img))
                terms["teacher"] = diffusion_loss(pred, t_pred, mask)
            if mcfg.use_distillation:
                terms["distillation"] = diffusion_loss(cond.aux, x0, mask)
            for name, val in aux.items():
                terms[name] = val
            sel = (t <= cfg.adversarial_max_t).nonzero().flatten()
            adv_on = use_adv and step >= cfg.adversarial_start and sel.numel() > 0
            if adv_on:
                x0_hat = to_x0_eps(model.schedule, pred, x_t, t, mcfg.prediction)[0][sel]
                feats_sel = feats.select(sel)
                for p in disc.parameters():
                    p.requires_grad_(False)
                terms["adversarial"] = generator_adversarial_loss(disc(x0_hat, lr_z[sel], feats_sel))
                for p in disc.parameters():
                    p.requires_grad_(True)
            loss = sum(w.get(name, 1.0) * val for name, val in terms.items())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {float(loss)} at step {step}; lower learning_rate or check the data."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(den.parameters(), cfg.grad_clip)
            opt.step()
            if adv_on:
                fd = feats_sel.detach()
                d_loss = discriminator_loss(
                    disc(x0[sel], lr_z[sel], fd), disc(x0_hat.detach(), lr_z[sel], fd)
                )
                dopt.zero_grad(set_to_none=True)
                d_loss.backward()
                nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                dopt.step()
                terms["discriminator"] = d_loss
            _ema_update(ema, den, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1

            running.setdefault("loss", []).append(float(loss.detach()))
            for name, val in terms.items():
                running.setdefault(name, []).append(float(val.detach()))
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {name: float(np.mean(v)) for name, v in running.items()}
                entry["step"] = step
                entry["lr"] = _lr_at(step - 1, cfg)
                history["loss"].append(entry)
                running = {}
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            bar.update(1)
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
                validate()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
        bar.close()
        if valsets and (not history["validation"] or history["validation"][-1]["step"] != step):
            validate()
        checkpoint()
    finally:
        memory_cm.__exit__(None, None, None)
        rng_cm.__exit__(None, None, None)

    final = copy.deepcopy(ema).eval()
    for p in final.parameters():
        p.requires_grad_(True)
    summary = {
        "steps": step,
        "train_config": cfg.to_dict(),
        "pairs": [p.name for p in pairs],
        "n_genes": [int(p.hr.shape[0]) for p in pairs],
        "validation_pairs": [p.name for p in (validation or [])],
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "validation": history["validation"][-1] if history["validation"] else None,
        "history": history,
        "seconds": round(time.time() - t_start, 2),
    }
    out = STSRModel(
        mcfg,
        final,
        disc.eval() if disc is not None else None,
        name=model.name,
        metadata={**model.metadata, "training": summary},
    )
    return out

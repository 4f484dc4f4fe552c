"""Training hyper-parameters of :func:`~stsr.models.fit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]


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
        Weights of the loss terms ``"diffusion"``, ``"distillation"``, ``"adversarial"``, of the weak supervision by
        hidden spots (``"spots"``, and ``"pseudo"`` for the diffusion term on such pairs' stand-in target), of feature
        distillation (``"features"``, when the model has ``feature_targets``), and of the auxiliary losses
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
            "spots": 1.0,
            "pseudo": 0.1,
            "features": 0.5,
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

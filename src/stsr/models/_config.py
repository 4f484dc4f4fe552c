"""Configuration of the stsr denoiser network (JSON-serialisable, validated)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

_SCHEDULES = ("cosine", "linear")
_PREDICTIONS = ("v", "eps", "x0")


@dataclass
class ModelConfig:
    """Hyper-parameters of the network (:class:`~stsr.models.network.Denoiser`, and the
    :class:`~stsr.models.network.ChannelDiscriminator` of adversarial training).

    The network is panel-agnostic: no field depends on the number or the identity of the genes.

    Parameters
    ----------
    image_channels
        Channels of the histology image (3 for RGB H&E, 1-2 for fluorescence).
    image_scale
        Image pixels per HR pixel: an HR tile ``h x w`` comes with an image tile ``(k*h) x (k*w)``.
        Must be a power of two (1, 2, 4, 8, 16).
    width
        Base channel width of the per-gene stream (full HR resolution).
    channel_mult
        Width multipliers of the gene stream at resolutions 1, 1/2 and 1/4 of the HR grid (3 levels).
    hist_width
        Channel width of the histology features at HR resolution (the coarser levels use ``2 * hist_width``).
    time_dim
        Width of the diffusion-time embedding.
    n_heads
        Attention heads (cross-attention and co-expression attention).
    n_tokens
        Side of the grid of coarse tissue tokens (``n_tokens**2`` tokens per tile) for the cross-attention.
    shared_dim
        Width of the shared / specific projections of the disentangling module.
    distill_dim
        Width of the histology keys of the distillation head.
    align_radius
        Largest displacement (in HR pixels, integer) that the spatial alignment can apply.
    align_dim
        Width of the embeddings compared by the alignment correlation volume.
    coexpr_grid
        Largest side of the coarse grid on which the gene co-expression attention runs.
    disc_width
        Base width of the channel discriminator.
    groups
        Groups of the GroupNorm layers (must divide every width).
    n_timesteps, schedule, prediction
        Diffusion settings, used by the diffusion code (not by the network itself).
    use_distillation, use_cross_attention, use_disentangle, use_alignment, use_coexpression, use_adversarial
        Ablation switches; each one removes its module (parameters and compute) when ``False``.
    feature_targets
        Channels of image features the histology encoder learns to predict during training (feature distillation
        of an image encoder, ``stsr.tl.train(image_features=...)``); ``0`` (default) adds no head. The head is a
        ``1 x 1`` convolution on the fine histology features, used by training only.
    """

    image_channels: int = 3
    image_scale: int = 4
    width: int = 32
    channel_mult: tuple[int, int, int] = (1, 2, 3)
    hist_width: int = 32
    time_dim: int = 128
    n_heads: int = 4
    n_tokens: int = 8
    shared_dim: int = 32
    distill_dim: int = 32
    align_radius: int = 2
    align_dim: int = 8
    coexpr_grid: int = 8
    disc_width: int = 32
    groups: int = 8
    n_timesteps: int = 1000
    schedule: str = "cosine"
    prediction: str = "v"
    use_distillation: bool = True
    use_cross_attention: bool = True
    use_disentangle: bool = True
    use_alignment: bool = True
    use_coexpression: bool = True
    use_adversarial: bool = True
    feature_targets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first invalid field and how to fix it."""
        for name in (
            "image_channels",
            "image_scale",
            "width",
            "hist_width",
            "time_dim",
            "n_heads",
            "n_tokens",
            "shared_dim",
            "distill_dim",
            "align_dim",
            "coexpr_grid",
            "disc_width",
            "groups",
            "n_timesteps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        ft = self.feature_targets
        if isinstance(ft, bool) or not isinstance(ft, int) or ft < 0:
            raise ValueError(f"ModelConfig.feature_targets must be a non-negative integer, got {ft!r}.")
        k = self.image_scale
        if k & (k - 1) or k > 16:
            raise ValueError(
                f"ModelConfig.image_scale must be a power of two <= 16 (image pixels per HR pixel), got {k}; "
                "resample the image so that each HR pixel covers 1, 2, 4, 8 or 16 image pixels."
            )
        if len(self.channel_mult) != 3 or any(m < 1 for m in self.channel_mult):
            raise ValueError(
                f"ModelConfig.channel_mult must be 3 positive integers (resolutions 1, 1/2, 1/4), "
                f"got {self.channel_mult!r}."
            )
        if (
            isinstance(self.align_radius, bool)
            or not isinstance(self.align_radius, int)
            or self.align_radius < 1
        ):
            raise ValueError(
                f"ModelConfig.align_radius must be a positive integer, got {self.align_radius!r}."
            )
        widths = [self.width * m for m in self.channel_mult] + [self.hist_width, 2 * self.hist_width]
        for w in widths:
            if w % self.groups:
                raise ValueError(
                    f"ModelConfig.groups={self.groups} must divide every channel width {sorted(set(widths))}."
                )
        for w in (self.width * m for m in self.channel_mult[1:]):
            if w % self.n_heads:
                raise ValueError(f"ModelConfig.n_heads={self.n_heads} must divide the attention width {w}.")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"ModelConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}.")
        if self.prediction not in _PREDICTIONS:
            raise ValueError(
                f"ModelConfig.prediction must be one of {_PREDICTIONS}, got {self.prediction!r}."
            )
        for f in dataclasses.fields(self):
            if f.name.startswith("use_") and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"ModelConfig.{f.name} must be a bool, got {getattr(self, f.name)!r}.")
        if not isinstance(self.extra, dict):
            raise ValueError("ModelConfig.extra must be a dict of JSON-serialisable values.")

    # ------------------------------------------------------------------ (de)serialisation
    @property
    def widths(self) -> tuple[int, int, int]:
        """Gene-stream widths at resolutions 1, 1/2 and 1/4."""
        return tuple(self.width * m for m in self.channel_mult)  # type: ignore[return-value]

    @property
    def hist_widths(self) -> tuple[int, int, int]:
        """Histology feature widths at resolutions 1, 1/2 and 1/4 (and of the tissue tokens)."""
        return (self.hist_width, 2 * self.hist_width, 2 * self.hist_width)

    @property
    def switches(self) -> dict[str, bool]:
        """The ablation switches, ``{"use_distillation": True, ...}``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("use_")}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise a :class:`ValueError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**data)

    def to_json(self) -> str:
        """JSON string of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with some fields changed (validated), e.g. ``config.replace(use_alignment=False)``."""
        return dataclasses.replace(self, **changes)

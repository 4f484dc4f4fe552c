"""The stsr model object: a trained denoiser with its diffusion settings, sampling and weights I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..observation import ObservationModel
from ._allocator import reuse_freed_memory
from ._config import ModelConfig
from ._denoiser import FeatureCache
from ._diffusion import NoiseSchedule, ddim_sample
from ._noise import gaussian_field
from ._normalize import GeneNormalizer

__all__ = ["STSRModel"]

#: Upper clip of the predicted clean map in normalised units (about 255x the gene's slide-level scale).
_Z_MAX = 3.0


class STSRModel(nn.Module):
    """A histology-conditioned diffusion model for super-resolving spot-based spatial transcriptomics.

    Wraps the denoiser network (and, for training only, the channel discriminator) with the diffusion schedule of
    its :class:`~stsr.models.ModelConfig`.

    Parameters
    ----------
    config
        The model configuration.
    denoiser
        The denoiser network; default a freshly initialised :class:`~stsr.models.network.Denoiser` of ``config``.
    discriminator
        Optional :class:`~stsr.models.network.ChannelDiscriminator` (training only; never saved with the weights).
    name
        Name of the weights (e.g. the shipped name they were loaded from).
    metadata
        Free JSON-serialisable metadata (training summary, stsr version), saved with the weights.
    """

    def __init__(
        self,
        config: ModelConfig,
        denoiser: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a stsr.models.ModelConfig, got {type(config).__name__}.")
        if denoiser is None:
            from ._denoiser import Denoiser

            denoiser = Denoiser(config)
        self.config = config
        self.denoiser = denoiser
        self.discriminator = discriminator
        self.schedule = NoiseSchedule(config.schedule, config.n_timesteps)
        self.name = name
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ------------------------------------------------------------------ properties
    @property
    def tile_multiple(self) -> int:
        """HR tile sides must be multiples of this (the histology encoder's two stride-2 levels)."""
        return 4

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters."""
        for p in self.denoiser.parameters():
            return p.device
        return torch.device("cpu")

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        """The inference weights (the denoiser's state dict) as contiguous CPU tensors."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.denoiser.state_dict().items()}

    def weights_bytes(self) -> bytes:
        """The safetensors serialisation of :meth:`weights_state_dict` (what :meth:`save` writes)."""
        from safetensors.torch import save

        return save(self.weights_state_dict())

    @property
    def weights_hash(self) -> str:
        """SHA-256 (hex) of the serialised inference weights; equals the hash recorded by :meth:`save`."""
        return hashlib.sha256(self.weights_bytes()).hexdigest()

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.denoiser.parameters())
        on = [k for k, v in self.config.switches.items() if v]
        return f"STSRModel(name={self.name!r}, parameters={n}, switches={on})"

    # ------------------------------------------------------------------ weights I/O
    def save(
        self, path: str | Path, *, name: str | None = None, training: dict[str, Any] | None = None
    ) -> Path:
        """Save the inference weights (safetensors) and a JSON config with their SHA-256 to the directory ``path``.

        Parameters
        ----------
        path
            Directory to write ``model.safetensors`` and ``config.json`` into (created if needed).
        name
            Name recorded in the config (default :attr:`name`).
        training
            Training summary to record (default ``metadata["training"]`` when present).

        Returns
        -------
        The directory.
        """
        from ._weights import save

        return save(self, path, name=name, training=training)

    @classmethod
    def load(
        cls, name_or_path: str | Path | None = None, *, device: str | torch.device | None = None
    ) -> STSRModel:
        """Load weights by shipped name or path (see :func:`stsr.models.load`)."""
        from ._weights import load

        return load(name_or_path, device=device)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        image: torch.Tensor | np.ndarray,
        lr_density: torch.Tensor | np.ndarray,
        normalizer: GeneNormalizer,
        *,
        observations: Sequence[tuple[ObservationModel, Any]] | None = None,
        origins: Any,
        gene_ids: Any,
        seed: int = 0,
        steps: int = 20,
        n_samples: int = 1,
        sample_offset: int = 0,
        consistency: bool = True,
        cache_interval: int = 1,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Super-resolve a batch of tiles with deterministic DDIM.

        Parameters
        ----------
        image
            ``(B, C, k*h, k*w)`` histology tiles in ``[0, 1]`` (uint8 is divided by 255), ``k = config.image_scale``.
        lr_density
            ``(B, G, h, w)`` LR input on the HR grid in counts per HR pixel (``ObservationModel.interpolate`` of
            the slide, cropped to each tile).
        normalizer
            Slide-level :class:`~stsr.models.GeneNormalizer` of the ``G`` genes.
        observations
            ``None`` or one ``(ObservationModel, lr_values)`` per tile: the slide's operator cropped to the tile
            (``ObservationModel.crop``) and the ``(G, n_obs)`` LR measurements of its kept observations. Needed when
            ``consistency`` is on.
        origins
            ``(B, 2)`` global HR-grid ``(row, col)`` of each tile's top-left pixel; the initial noise is a crop of one
            slide-wide field (:func:`~stsr.models.network.gaussian_field`), so results do not depend on tiling or
            batching.
        gene_ids
            ``(G,)`` stable int64 gene identifiers (:func:`~stsr.models.gene_ids_from_names`).
        seed
            Seed of the noise field.
        steps
            Number of DDIM steps.
        n_samples
            Number of posterior samples (independent noise fields).
        sample_offset
            Index of the first sample: the samples use noise fields ``sample_offset, ..., sample_offset + n_samples -
            1``, so several calls can share out many samples and still draw distinct ones.
        consistency
            After every step, project the predicted clean map onto the LR measurements
            (``ObservationModel.project(..., mode="multiplicative")``, in counts) and continue from the projection;
            the final output is projected too, so pooling it reproduces the measurements.
        cache_interval
            Steps per full network evaluation (:class:`~stsr.models.network.FeatureCache`): with ``2`` every other
            step recomputes only the full-resolution level and reuses the deep features of the step before (speed
            and accuracy in ``docs/benchmarks/feature_cache.md``); ``1`` (default) evaluates the whole network at
            every step.
        device
            Device to run on (the model is moved there); default the model's device.

        Returns
        -------
        ``(mean, std)``: ``(B, G, h, w)`` mean over the samples in counts per HR pixel (non-negative, on CPU,
        float32), and the per-pixel standard deviation over the samples (``None`` when ``n_samples == 1``).
        """
        cfg = self.config
        dev = torch.device(device) if device is not None else self.device
        img = torch.as_tensor(image)
        img = img.to(torch.float32) / 255.0 if img.dtype == torch.uint8 else img.to(torch.float32)
        lr = torch.as_tensor(lr_density).to(torch.float32)
        if lr.ndim != 4:
            raise ValueError(f"lr_density must be (B, G, h, w), got shape {tuple(lr.shape)}.")
        b, g, h, w = lr.shape
        k = cfg.image_scale
        if img.ndim != 4 or img.shape[0] != b or img.shape[1] != cfg.image_channels:
            raise ValueError(
                f"image must be (B={b}, C={cfg.image_channels}, {k * h}, {k * w}), got {tuple(img.shape)}; the model "
                f"expects {cfg.image_channels} channel(s)."
            )
        if tuple(img.shape[-2:]) != (k * h, k * w):
            raise ValueError(
                f"image tiles are {tuple(img.shape[-2:])} pixels but HR tiles are {(h, w)}; the model expects "
                f"image_scale={k} image pixels per HR pixel, i.e. {(k * h, k * w)}."
            )
        if normalizer.n_genes != g:
            raise ValueError(f"normalizer has {normalizer.n_genes} genes but lr_density has {g}.")
        ids = torch.as_tensor(gene_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != g:
            raise ValueError(f"gene_ids has {ids.numel()} entries but lr_density has {g} genes.")
        org = np.asarray(torch.as_tensor(origins).cpu() if torch.is_tensor(origins) else origins)
        if org.shape != (b, 2):
            raise ValueError(
                f"origins must be (B={b}, 2) global HR (row, col) of the tiles, got shape {org.shape}."
            )
        org = org.astype(np.int64)
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        FeatureCache(cache_interval)  # validates the interval before any work
        obs = self._check_observations(observations, b, g, (h, w)) if observations is not None else None
        if consistency and obs is None:
            raise ValueError(
                "consistency=True needs the observations of each tile; pass observations=... or "
                "consistency=False."
            )

        was_training = self.training
        self.to(dev)
        self.eval()
        try:
            with torch.no_grad(), reuse_freed_memory(dev.type == "cpu"):
                img, lr = img.to(dev), lr.to(dev)
                lr_z = normalizer.normalize(lr)
                cond = self.denoiser.prepare(self.denoiser.encode_histology(img), lr_z)

                cache = FeatureCache(cache_interval)

                def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    return self.denoiser(x, lr_z, t, cond, cache if cache.interval > 1 else None)

                def hook(x0: torch.Tensor, _i: int) -> torch.Tensor:
                    x0 = x0.clamp(-1.0, _Z_MAX)
                    if not consistency:
                        return x0
                    counts = self._project(normalizer.denormalize(x0.double()), obs)
                    return normalizer.normalize(counts).to(x0.dtype)

                outs = []
                for s in range(int(sample_offset), int(sample_offset) + int(n_samples)):
                    cache.calls, cache.deep = 0, None  # each sample starts with a full evaluation
                    noise = torch.stack(
                        [
                            gaussian_field(seed, ids, int(r), int(c), h, w, sample=s, device=dev)
                            for r, c in org
                        ]
                    )
                    x0 = ddim_sample(model_fn, noise, self.schedule, steps, cfg.prediction, hook)
                    counts = normalizer.denormalize(x0.double())
                    if consistency:
                        counts = self._project(counts, obs)
                    outs.append(counts.clamp_min(0.0))
        finally:
            self.train(was_training)
        stack = torch.stack(outs)
        mean = stack.mean(0).to(torch.float32).cpu()
        std = stack.std(0, correction=1).to(torch.float32).cpu() if n_samples > 1 else None
        return mean, std

    @staticmethod
    def _check_observations(
        observations: Sequence[tuple[ObservationModel, Any]], b: int, g: int, shape: tuple[int, int]
    ) -> list[tuple[ObservationModel, torch.Tensor]]:
        if len(observations) != b:
            raise ValueError(
                f"observations must hold one (ObservationModel, lr_values) per tile: {b}, got "
                f"{len(observations)}."
            )
        out = []
        for i, item in enumerate(observations):
            op, vals = item
            if not isinstance(op, ObservationModel):
                raise TypeError(f"observations[{i}][0] must be an ObservationModel, got {type(op).__name__}.")
            if op.shape != shape:
                raise ValueError(
                    f"observations[{i}] is on a {op.shape} grid, the tile is {shape}; crop the slide's "
                    "operator with ObservationModel.crop(row0, col0, h, w)."
                )
            v = torch.as_tensor(np.asarray(vals) if not torch.is_tensor(vals) else vals).to(torch.float64)
            if tuple(v.shape) != (g, op.n_obs):
                raise ValueError(
                    f"observations[{i}] LR values have shape {tuple(v.shape)}, expected (G={g}, "
                    f"n_obs={op.n_obs}) (the measurements of the kept observations)."
                )
            out.append((op, v))
        return out

    @staticmethod
    def _project(counts: torch.Tensor, obs: list[tuple[ObservationModel, torch.Tensor]]) -> torch.Tensor:
        """Multiplicative consistency projection of ``(B, G, h, w)`` counts, tile by tile (float64)."""
        out = []
        for i, (op, vals) in enumerate(obs):
            c = counts[i]
            if op.n_obs:
                c = op.project(c, vals.to(c.device, c.dtype), mode="multiplicative")
            out.append(c)
        return torch.stack(out)

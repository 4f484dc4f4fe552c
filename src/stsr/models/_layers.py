"""Shared building blocks of the stsr networks (pure torch).

Conventions used by every module of the gene stream:

- a gene stream tensor has shape ``(B * G, C, H, W)`` (one batch item per gene of each tile, tiles major) and is
  kept in ``torch.channels_last`` memory format, which is ~3x faster for CPU convolutions;
- a per-tile tensor has shape ``(B, C, H, W)`` and is broadcast to the ``G`` genes of its tile with
  :func:`add_per_tile` / :func:`per_gene` without copying it ``G`` times in Python.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CL = torch.channels_last


def to_cl(x: Tensor) -> Tensor:
    """Return ``x`` (4-D) in channels-last memory format."""
    return x.contiguous(memory_format=CL)


def add_per_tile(x: Tensor, y: Tensor) -> Tensor:
    """Add a per-tile tensor ``y`` ``(B, C, H, W)`` to every gene of a gene-stream tensor ``x`` ``(B*G, C, H, W)``."""
    b = y.shape[0]
    g = x.shape[0] // b
    return (x.view(b, g, *x.shape[1:]) + y.unsqueeze(1)).view(x.shape)


def add_per_tile_(x: Tensor, y: Tensor) -> Tensor:
    """In-place :func:`add_per_tile` (``x`` must be a fresh tensor, e.g. a convolution output)."""
    b = y.shape[0]
    x.view(b, x.shape[0] // b, *x.shape[1:]).add_(y.unsqueeze(1))
    return x


def per_gene(v: Tensor, n_genes: int) -> Tensor:
    """Repeat a small per-tile tensor ``(B, ...)`` to ``(B*G, ...)`` (tiles major)."""
    return v.repeat_interleave(n_genes, dim=0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of a diffusion time ``t`` in ``[0, 1]`` (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """MLP on the sinusoidal embedding of the diffusion time: ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.mlp(timestep_embedding(t, self.dim))


def fourier_coords(h: int, w: int, n_freq: int, device: torch.device | None = None) -> Tensor:
    """Fourier features ``(h*w, 4*n_freq)`` of the pixel-centre coordinates of an ``h x w`` grid in ``[-1, 1]``.

    Grids of different sizes covering the same tile share the coordinate frame, so queries (fine grid) and
    tissue tokens (coarse grid) get comparable positional codes.
    """
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)  # (hw, 2)
    freqs = math.pi * (2.0 ** torch.arange(n_freq, device=device, dtype=torch.float32)) / 2
    ang = coords[:, :, None] * freqs  # (hw, 2, n_freq)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(h * w, 4 * n_freq)


def _inplace() -> bool:
    """In-place activations are safe (and save memory traffic) only when no graph is recorded."""
    return not torch.is_grad_enabled()


def norm_film(norm: nn.GroupNorm, x: Tensor, film: nn.Linear | None, temb: Tensor | None) -> Tensor:
    """``GroupNorm(x) * (1 + scale) + shift`` with ``(scale, shift) = film(temb)`` per tile.

    ``x`` is a gene-stream tensor ``(B*G, C, H, W)`` and ``temb`` is per tile ``(B, D)``. When every tile has the
    same time embedding (always during sampling), the FiLM is folded into the GroupNorm affine parameters, saving a
    full pass over the (large) activation.
    """
    if film is None or temb is None:
        return norm(x)
    scale, shift = film(temb).chunk(2, dim=1)  # (B, C)
    if temb.shape[0] == 1 or bool((temb == temb[:1]).all()):
        weight = norm.weight * (1 + scale[0])
        bias = norm.bias * (1 + scale[0]) + shift[0]
        return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
    g = x.shape[0] // temb.shape[0]
    scale = per_gene(scale, g)[:, :, None, None]
    shift = per_gene(shift, g)[:, :, None, None]
    return torch.addcmul(shift, norm(x), 1 + scale)


class ResBlock(nn.Module):
    """Pre-activation residual block ``GN-SiLU-conv3x3-GN-FiLM(t)-SiLU-conv3x3`` of a per-gene stream.

    The diffusion time modulates the second normalisation (scale/shift per channel); the time embedding is per
    tile and is shared by the genes of the tile.
    """

    def __init__(self, channels: int, time_dim: int | None, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * channels) if time_dim else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """``x`` ``(B*G, C, H, W)``; ``temb`` per tile ``(B, time_dim)`` or ``None``."""
        h = self.conv1(F.silu(self.norm1(x), inplace=_inplace()))
        h = norm_film(self.norm2, h, self.time, temb)
        h = self.conv2(F.silu(h, inplace=_inplace()))
        return h.add_(x)


class LightBlock(nn.Module):
    """Cheap residual block ``x + conv3x3(SiLU(FiLM_t(GN(x))))`` (one convolution), used at high resolution."""

    def __init__(self, channels: int, time_dim: int | None, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * channels) if time_dim else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """``x`` ``(B*G, C, H, W)``; ``temb`` per tile ``(B, time_dim)`` or ``None``."""
        h = norm_film(self.norm, x, self.time, temb)
        return self.conv(F.silu(h, inplace=_inplace())).add_(x)


class Down(nn.Module):
    """Strided 3x3 convolution halving the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.conv(x)


class Up(nn.Module):
    """2x2 stride-2 transposed convolution doubling the resolution (much faster on CPU than interpolate+conv)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.conv(x)


def count_parameters(module: nn.Module | None) -> int:
    """Number of parameters of ``module`` (0 for ``None``)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())

"""Histology encoder and semantic distillation head (component a).

Realises the *semantic distillation* idea of HaDM-ST (Liu et al., 2025): a light histology network extracts
features from the H&E / fluorescence tile, and an auxiliary head is trained (by the diffusion code, with a loss
against the HR truth) to predict expression from histology alone, which forces the histology features to carry
expression-predictive semantics.

The encoder itself is always present (it conditions the whole model); ``use_distillation=False`` removes the
:class:`DistillationHead` (its parameters, its prediction fed to the gene stream, and its training loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import ModelConfig
from ._layers import ResBlock, to_cl


@dataclass
class HistologyFeatures:
    """Multi-scale histology features of a batch of tiles, computed once per tile.

    Attributes
    ----------
    fine
        ``(B, D, h, w)`` features on the HR grid.
    mid
        ``(B, 2D, h/2, w/2)`` features.
    coarse
        ``(B, 2D, h/4, w/4)`` features.
    tokens
        ``(B, T, 2D)`` coarse tissue tokens (``T = n_tokens**2``, average-pooled from ``coarse``).
    """

    fine: Tensor
    mid: Tensor
    coarse: Tensor
    tokens: Tensor

    @property
    def batch_size(self) -> int:
        """Number of tiles ``B``."""
        return self.fine.shape[0]

    @property
    def hr_shape(self) -> tuple[int, int]:
        """HR tile size ``(h, w)``."""
        return tuple(self.fine.shape[-2:])  # type: ignore[return-value]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> HistologyFeatures:
        """New features with ``fn`` applied to every tensor (e.g. ``lambda t: t.to(device)``)."""
        return HistologyFeatures(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> HistologyFeatures:
        """Like :meth:`torch.Tensor.to` for every tensor."""
        return self.apply(lambda t: t.to(*args, **kwargs))

    def detach(self) -> HistologyFeatures:
        """Detached copy (no gradient to the encoder)."""
        return self.apply(lambda t: t.detach())

    def select(self, index: Tensor | slice | list[int]) -> HistologyFeatures:
        """Subset / reorder / repeat the tiles along the batch dimension."""
        return self.apply(lambda t: t[index])

    def repeat(self, n: int) -> HistologyFeatures:
        """Repeat each tile ``n`` times along the batch (tiles major), e.g. for several samples per tile."""
        return self.apply(lambda t: t.repeat_interleave(n, dim=0))


def _block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU()
    )


class HistologyEncoder(nn.Module):
    """Light multi-scale CNN: image tile ``(B, C, k*h, k*w)`` -> :class:`HistologyFeatures`.

    A stem at image resolution, ``log2(k)`` stride-2 blocks down to the HR grid (``fine``), then two more
    stride-2 stages (``mid``, ``coarse``) and adaptive average pooling to ``n_tokens x n_tokens`` tissue tokens.
    The image is expected in ``[0, 1]`` and is centred as ``(image - 0.5) / 0.25``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d0, d1, d2 = config.hist_widths
        g = config.groups
        n_down = int(math.log2(config.image_scale))
        stem_w = max(16, g)
        layers: list[nn.Module] = [_block(config.image_channels, stem_w, 1, g)]
        c = stem_w
        for i in range(n_down):
            c_out = d0 if i == n_down - 1 else max(stem_w, d0 // 2)
            layers.append(_block(c, c_out, 2, g))
            c = c_out
        if c != d0:
            layers.append(_block(c, d0, 1, g))
        self.to_hr = nn.Sequential(*layers)
        self.res_fine = ResBlock(d0, None, g)
        self.down_mid = _block(d0, d1, 2, g)
        self.res_mid = ResBlock(d1, None, g)
        self.down_coarse = _block(d1, d2, 2, g)
        self.res_coarse = ResBlock(d2, None, g)
        self.token_norm = nn.LayerNorm(d2)

    def forward(self, image: Tensor) -> HistologyFeatures:
        """Encode ``image`` ``(B, C, k*h, k*w)`` (float in ``[0, 1]``)."""
        cfg = self.config
        if image.ndim != 4 or image.shape[1] != cfg.image_channels:
            raise ValueError(
                f"image must have shape (B, {cfg.image_channels}, k*h, k*w), got {tuple(image.shape)}; "
                "set ModelConfig.image_channels to the number of image channels."
            )
        k = cfg.image_scale
        hh, ww = image.shape[-2:]
        if hh % (4 * k) or ww % (4 * k):
            raise ValueError(
                f"image tile {hh}x{ww} must be (k*h)x(k*w) with k=image_scale={k} and h, w multiples of 4; "
                "pad or crop the tile."
            )
        x = to_cl((image.float() - 0.5) / 0.25)
        fine = self.res_fine(self.to_hr(x))
        mid = self.res_mid(self.down_mid(fine))
        coarse = self.res_coarse(self.down_coarse(mid))
        n = cfg.n_tokens
        tokens = F.adaptive_avg_pool2d(coarse, (n, n)).flatten(2).transpose(1, 2)  # (B, T, D2)
        return HistologyFeatures(fine=fine, mid=mid, coarse=coarse, tokens=self.token_norm(tokens))


def _standardise(x: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """Standardise over the last two (spatial) dims; returns ``(z, mean, std)``."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = (x - mean).pow(2).mean(dim=(-2, -1), keepdim=True).add(eps).sqrt()
    return (x - mean) / std, mean, std


class DistillationHead(nn.Module):
    """Histology -> expression head of the semantic distillation (a small hypernetwork, no gene vocabulary).

    For each gene ``g`` of a tile:

    1. histology keys ``K = conv1x1(fine)`` ``(B, E, h, w)`` are standardised over the tile;
    2. the gene query is the tile-level correlation between the standardised LR map ``z_g`` and the keys,
       ``q_g = mean_x z_g(x) K(x)`` (i.e. keys pooled with weights given by the gene's own LR map), concatenated
       with the LR mean and log-std;
    3. an MLP turns ``q_g`` into per-gene read-out weights ``a_g`` (E) and offset ``b_g``;
    4. the prediction is ``mu_g + sigma_g * (b_g + <a_g, K(x)>)`` where ``mu_g, sigma_g`` are the LR map's mean and
       std over the tile.

    The spatial pattern therefore comes from histology only; the LR map only supplies the gene identity (which
    histology features go with this gene) and its scale.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e = config.distill_dim
        self.keys = nn.Sequential(nn.Conv2d(config.hist_width, e, 1), nn.SiLU(), nn.Conv2d(e, e, 1))
        self.hyper = nn.Sequential(nn.Linear(e + 2, 2 * e), nn.SiLU(), nn.Linear(2 * e, e + 1))

    def forward(self, fine: Tensor, lr: Tensor) -> Tensor:
        """``fine`` ``(B, D, h, w)``, ``lr`` ``(B, G, h, w)`` -> predicted expression ``(B, G, h, w)``."""
        keys, _, _ = _standardise(self.keys(fine))  # (B, E, h, w)
        z, mu, sigma = _standardise(lr)  # (B, G, h, w), (B, G, 1, 1)
        n = lr.shape[-2] * lr.shape[-1]
        q = torch.einsum("bghw,behw->bge", z, keys) / n  # correlation of each gene with each key
        stats = torch.cat([mu[..., 0], sigma[..., 0].log()], dim=-1)  # (B, G, 2)
        ab = self.hyper(torch.cat([q, stats], dim=-1))  # (B, G, E+1)
        a, b = ab[..., :-1], ab[..., -1:]
        pattern = torch.einsum("bge,behw->bghw", a, keys) + b[..., None]
        return mu + sigma * pattern

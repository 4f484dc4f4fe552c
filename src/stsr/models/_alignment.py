"""Spatial alignment of histology features onto the expression grid (component d).

Realises the *spatial alignment module* of HaDM-ST (Liu et al., 2025): the histology image and the spot
measurements are never perfectly registered, so a small displacement field is predicted from histology and LR
expression features and used to warp the histology features (``grid_sample``) onto the expression grid, giving
pixel-wise correspondence before they condition the gene stream.

How the field is predicted (a local correlation volume with soft-argmax, as in optical-flow networks):

1. histology embedding ``P(fine)`` (per tile) and LR embedding ``E(lr_g)`` (per gene, shared weights) are
   L2-normalised per pixel;
2. the gene embeddings are averaged over the genes of the tile, weighted by each gene's LR contrast (its std over
   the tile), so the displacement is one physical field per tile, estimated from the evidence of all genes;
3. for every integer offset ``o`` in ``[-R, R]^2`` (``R = align_radius`` HR pixels) the correlation
   ``<P(x + o), E(x)>`` is pooled over 8x8-pixel windows (evidence aggregation) at 1/4 resolution;
4. a softmax over offsets (learned temperature + a zero-initialised 3x3 conv refinement) gives the displacement as
   the expected offset, bounded to ``[-R, R]`` by construction (a convex combination of the offsets; this plays the
   role of a tanh bound), and it is upsampled bilinearly to the HR grid.

The warped features are ``aligned(x) = hist(x + flow(x))`` at every level (fine, mid, coarse); the 8x8 tissue
tokens are not warped (a shift of <= R HR pixels is far below their size). Because the field is per tile, genes
of a tile are coupled only through this shared displacement. ``use_alignment=False`` removes the module: the
histology features are used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import ModelConfig
from ._encoder import HistologyFeatures


def _base_grid(h: int, w: int, device: torch.device) -> Tensor:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # (h, w, 2) as (x, y) for grid_sample


def warp(features: Tensor, flow: Tensor, hr_shape: tuple[int, int]) -> Tensor:
    """Warp ``features`` ``(B, C, H, W)`` by ``flow`` ``(B, 2, h', w')`` given in HR pixels ``(dy, dx)``.

    Returns ``out(x) = features(x + flow(x))`` (bilinear, border padding); the flow is resampled to ``(H, W)``
    and converted with the HR tile size ``hr_shape = (h, w)``, so every level of a tile moves by the same
    physical displacement.
    """
    b, _, hh, ww = features.shape
    if flow.shape[-2:] != (hh, ww):
        flow = F.interpolate(flow, size=(hh, ww), mode="bilinear", align_corners=False)
    h, w = hr_shape
    disp = torch.stack([flow[:, 1] * (2.0 / w), flow[:, 0] * (2.0 / h)], dim=-1)  # (B, H, W, 2) as (x, y)
    grid = _base_grid(hh, ww, features.device)[None] + disp
    return F.grid_sample(
        features, grid.to(features.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


class SpatialAlignment(nn.Module):
    """Predict a per-tile displacement field and warp the histology features with it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, r = config.align_dim, config.align_radius
        self.radius = r
        self.hist_embed = nn.Sequential(
            nn.Conv2d(config.hist_width, e, 3, padding=1), nn.SiLU(), nn.Conv2d(e, e, 3, padding=1)
        )
        self.lr_embed = nn.Sequential(nn.Conv2d(1, e, 3, padding=1), nn.SiLU(), nn.Conv2d(e, e, 3, padding=1))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        n_off = (2 * r + 1) ** 2
        self.refine = nn.Conv2d(n_off, n_off, 3, padding=1)
        nn.init.zeros_(self.refine.weight)
        nn.init.zeros_(self.refine.bias)
        oy, ox = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
        self.register_buffer(
            "offsets", torch.stack([oy.reshape(-1), ox.reshape(-1)], dim=-1), persistent=False
        )

    def correlation(self, fine: Tensor, lr: Tensor) -> Tensor:
        """Gene-pooled correlation volume ``(B, (2R+1)^2, h, w)`` between histology and LR embeddings."""
        b, g, h, w = lr.shape
        r = self.radius
        hp = F.normalize(self.hist_embed(fine), dim=1)  # (B, E, h, w)
        le = F.normalize(self.lr_embed(lr.reshape(b * g, 1, h, w)), dim=1).reshape(b, g, -1, h, w)
        std = lr.flatten(2).std(dim=-1, unbiased=False)  # (B, G) LR contrast
        weight = std / std.sum(dim=1, keepdim=True).clamp_min(1e-6)
        le = torch.einsum("bg,bgehw->behw", weight, le)  # linear, so pooling before correlating is exact
        hp = F.pad(hp, (r, r, r, r), mode="replicate")
        corr = [
            (hp[:, :, r + int(dy) : r + int(dy) + h, r + int(dx) : r + int(dx) + w] * le).sum(dim=1)
            for dy, dx in self.offsets.tolist()
        ]
        return torch.stack(corr, dim=1)

    def flow(self, fine: Tensor, lr: Tensor) -> Tensor:
        """Displacement field ``(B, 2, h, w)`` in HR pixels ``(dy, dx)``, each in ``[-R, R]``."""
        h, w = lr.shape[-2:]
        corr = self.correlation(fine, lr)
        corr = F.avg_pool2d(corr, kernel_size=8, stride=4, padding=2, count_include_pad=False)
        logits = corr * self.log_temperature.exp() + self.refine(corr)
        prob = logits.softmax(dim=1)  # (B, n_off, h/4, w/4)
        flow = torch.einsum("bohw,oc->bchw", prob, self.offsets.to(prob.dtype))
        return F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, feats: HistologyFeatures, lr: Tensor) -> tuple[HistologyFeatures, Tensor]:
        """Return the aligned features and the flow ``(B, 2, h, w)``."""
        flow = self.flow(feats.fine, lr)
        hr = feats.hr_shape
        aligned = HistologyFeatures(
            fine=warp(feats.fine, flow, hr),
            mid=warp(feats.mid, flow, hr),
            coarse=warp(feats.coarse, flow, hr),
            tokens=feats.tokens,
        )
        return aligned, flow

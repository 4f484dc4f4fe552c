"""Gene co-expression module (component e).

Realises the *gene co-expression graph* idea of Diff-ST (Wang et al., MICCAI 2024) without a gene vocabulary:
the graph is the correlation matrix of the genes' LR maps over the tile, computed at run time, so it works for any
panel. Gene tokens (the gene stream pooled to a coarse grid of at most ``coexpr_grid x coexpr_grid`` cells) attend
to the other genes of the same tile and cell; the attention logits are biased by ``a_h * corr(g, g')`` (one learned
weight per head), so co-expressed genes exchange more information. The result is upsampled to the stream's
resolution and added as a residual. With ``G = 1`` a gene attends only to itself. ``use_coexpression=False``
removes the module: genes are then processed fully independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lr_correlation(lr: Tensor, eps: float = 1e-6) -> Tensor:
    """Pearson correlation ``(B, G, G)`` between the genes' LR maps ``(B, G, h, w)`` over each tile.

    A gene with a constant map has zero correlation with every gene (itself included).
    """
    z = lr.flatten(2)
    z = z - z.mean(dim=-1, keepdim=True)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(eps)
    return z @ z.transpose(1, 2)


class GeneCoexpression(nn.Module):
    """Attention across the ``G`` gene tokens of a tile, biased by the LR co-expression matrix.

    ``forward(x, corr)`` with ``x`` ``(B*G, C, H, W)`` and ``corr`` ``(B, G, G)`` returns the residual
    ``(B*G, C, H, W)``.
    """

    def __init__(self, dim: int, n_heads: int, grid: int, groups: int) -> None:
        super().__init__()
        self.n_heads, self.grid = n_heads, grid
        self.norm = nn.GroupNorm(groups, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.corr_weight = nn.Parameter(torch.full((n_heads,), 2.0))

    def forward(self, x: Tensor, corr: Tensor) -> Tensor:  # noqa: D102
        n, c, h, w = x.shape
        b, g = corr.shape[:2]
        gh, gw = min(self.grid, h), min(self.grid, w)
        pooled = F.adaptive_avg_pool2d(self.norm(x), (gh, gw))  # (B*G, C, gh, gw)
        tok = pooled.reshape(b, g, c, gh * gw).permute(0, 3, 1, 2)  # (B, L, G, C)
        nh, dh = self.n_heads, c // self.n_heads
        q, k, v = (
            self.qkv(tok).reshape(b, gh * gw, g, 3, nh, dh).permute(3, 0, 1, 4, 2, 5)
        )  # (B, L, nh, G, dh)
        bias = self.corr_weight[None, :, None, None] * corr[:, None]  # (B, nh, G, G)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None].to(q.dtype))  # (B, L, nh, G, dh)
        o = self.out(o.permute(0, 3, 1, 2, 4).reshape(b, g, gh * gw, c))  # (B, G, L, C)
        o = o.permute(0, 1, 3, 2).reshape(n, c, gh, gw)
        if (gh, gw) != (h, w):
            o = F.interpolate(o, size=(h, w), mode="bilinear", align_corners=False)
        return o

"""Cross-modal disentangling and adaptive modulation (component c).

Realises the *cross-modal disentangling + adaptive modulation* idea of Diff-ST (Wang et al., MICCAI 2024):
histology features and the gene stream's expression features are each projected into a *shared* part (information
common to both modalities) and a *specific* part. The expression stream is then modulated (FiLM: per-channel,
per-pixel scale and shift) by a function of the shared histology part and of the expression features, so that
histology steers expression only through what the two modalities share.

The disentangling loss (returned by :meth:`Denoiser.forward_train` as ``"disentangle"``) is

``(1 - cos(shared_expr, shared_hist)) + cos(shared_hist, specific_hist)**2 + cos(shared_expr, specific_expr)**2``

averaged over pixels and genes: the first term aligns the shared parts across modalities, the last two make the
shared and specific parts of each modality orthogonal. ``use_disentangle=False`` removes the module (no FiLM, no
projections, no loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import add_per_tile


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=1, eps=1e-6)


class DisentangledModulation(nn.Module):
    """FiLM of the gene stream ``(B*G, C, H, W)`` from shared histology ``(B, Dh, H, W)`` and expression parts.

    The FiLM parameters are ``W_h shared_hist + W_e [shared_expr, specific_expr]`` (a linear map of the
    concatenation, computed as a per-tile term broadcast to the genes plus a per-gene term), followed by SiLU and a
    1x1 conv to ``(scale, shift)``; output ``x * (1 + scale) + shift``.
    """

    def __init__(self, dim: int, hist_dim: int, shared_dim: int) -> None:
        super().__init__()
        s = shared_dim
        self.hist_proj = nn.Conv2d(hist_dim, 2 * s, 1)  # -> shared_hist, specific_hist
        self.expr_proj = nn.Conv2d(dim, 2 * s, 1)  # -> shared_expr, specific_expr
        self.film_h = nn.Conv2d(s, s, 1)
        self.film_e = nn.Conv2d(2 * s, s, 1, bias=False)
        self.film_out = nn.Conv2d(s, 2 * dim, 1)
        nn.init.normal_(self.film_out.weight, std=1e-2)
        nn.init.zeros_(self.film_out.bias)

    def forward(self, x: Tensor, hist: Tensor, return_loss: bool = False) -> tuple[Tensor, Tensor | None]:
        """Modulate ``x``; returns ``(x_mod, loss)`` with ``loss`` ``None`` unless ``return_loss``."""
        hs = self.hist_proj(hist)  # per tile
        es = self.expr_proj(x)  # per gene
        shared_h, specific_h = hs.chunk(2, dim=1)
        hidden = add_per_tile(self.film_e(es), self.film_h(shared_h))
        scale, shift = self.film_out(F.silu(hidden)).chunk(2, dim=1)
        out = torch.addcmul(shift, x, 1 + scale)
        if not return_loss:
            return out, None
        shared_e, specific_e = es.chunk(2, dim=1)
        b = hist.shape[0]
        g = x.shape[0] // b
        sh = shared_h.unsqueeze(1).expand(b, g, *shared_h.shape[1:]).reshape(shared_e.shape)
        align = (1 - _cos(shared_e, sh)).mean()
        ortho = _cos(shared_h, specific_h).pow(2).mean() + _cos(shared_e, specific_e).pow(2).mean()
        return out, align + ortho

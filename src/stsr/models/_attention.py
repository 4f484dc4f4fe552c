"""Dynamic cell-to-tissue cross-attention (component b).

Realises the *dynamic cell-to-tissue* conditioning of Diff-ST (Wang et al., MICCAI 2024): fine gene-stream
features ("cells") attend to a few coarse tissue tokens pooled from the histology features, so each location
gathers tissue context from the whole tile. The attention weights are *dynamic*: they depend on the gene-stream
query (the gene's current expression features at that location), not only on position.

Cheap by design: ``T = n_tokens**2`` (64) keys per tile, shared by all genes of the tile (keys/values are computed
per tile and broadcast, never per gene). ``use_cross_attention=False`` removes the module and its residual.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import fourier_coords

_N_FREQ = 4


class CellToTissueAttention(nn.Module):
    """Multi-head cross-attention of gene-stream features ``(B*G, C, H, W)`` to tissue tokens ``(B, T, Dt)``.

    Returns the residual ``(B*G, C, H, W)`` to add to the gene stream. Queries and keys both carry Fourier
    positional codes of their location in the tile (the token grid covers the same tile as the query grid).
    """

    def __init__(self, dim: int, token_dim: int, n_heads: int, n_tokens: int, groups: int) -> None:
        super().__init__()
        self.dim, self.n_heads, self.n_tokens = dim, n_heads, n_tokens
        self.norm = nn.GroupNorm(groups, dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(token_dim, 2 * dim)
        self.pos_q = nn.Linear(4 * _N_FREQ, dim)
        self.pos_k = nn.Linear(4 * _N_FREQ, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:  # noqa: D102
        n, c, h, w = x.shape
        b, t, _ = tokens.shape
        g = n // b
        nh, dh = self.n_heads, c // self.n_heads
        # queries: (B*G, H, W, C) -> (B, heads, G*H*W, dh); channels-last makes the permute free
        pos_q = self.pos_q(fourier_coords(h, w, _N_FREQ, x.device))  # (HW, C)
        q = self.q(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c) + pos_q)
        q = q.view(b, g * h * w, nh, dh).transpose(1, 2)
        # keys / values: per tile only
        pos_k = self.pos_k(fourier_coords(self.n_tokens, self.n_tokens, _N_FREQ, x.device))  # (T, C)
        k, v = self.kv(tokens).chunk(2, dim=-1)
        k = (k + pos_k).view(b, t, nh, dh).transpose(1, 2)
        v = v.view(b, t, nh, dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, G*H*W, dh)
        o = self.out(o.transpose(1, 2).reshape(n, h, w, c))
        return o.permute(0, 3, 1, 2)  # channels-last view of (B*G, C, H, W)

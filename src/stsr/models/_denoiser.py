"""The stsr denoiser: a panel-agnostic, histology-conditioned per-gene UNet.

Architecture (``G`` genes of ``B`` tiles, HR tile ``h x w``):

- :class:`~stsr.models._encoder.HistologyEncoder` turns the image tile ``(B, C, k*h, k*w)`` into multi-scale
  :class:`~stsr.models._encoder.HistologyFeatures`, **once per tile** (:meth:`Denoiser.encode_histology`);
- the gene stream is a small 3-level UNet (resolutions 1, 1/2, 1/4) applied to every gene map as a separate batch
  item ``(B*G, C, h, w)`` with shared weights: no gene vocabulary, the same weights run any ``G``. Its input per
  gene is ``[x_t, lr]`` plus the distillation head's histology-only prediction (a). Histology features are
  projected per tile and broadcast-added to all genes at each level; the diffusion time modulates every residual
  block (FiLM, per tile). For CPU speed the full- and half-resolution levels are narrow and use one-convolution
  blocks (the encoder side at 1/2 too), the heavier two-convolution blocks run at 1/2 (decoder) and 1/4; all
  gene-stream activations are ``channels_last``. Layout: stem+hist -> Light(1) -> down -> hist -> Light(1/2) ->
  down -> hist -> Res(1/4) -> [b] -> [c] -> [e] -> Res(1/4) -> up -> Res(1/2) -> up -> Light(1) -> GN-SiLU-linear.
- optional modules, each in its own file and removed by its switch: (a) distillation head, (b) cell-to-tissue
  cross-attention at 1/4 resolution, (c) disentangled FiLM modulation at 1/4 resolution, (d) spatial
  alignment of the histology features before use, (e) gene co-expression attention at the bottleneck.
  (f) the channel discriminator is a separate module (:mod:`~stsr.models._discriminator`).

A :class:`FeatureCache` lets the sampler reuse the output of the deep levels (1/2 and 1/4) between full evaluations
and recompute only the full-resolution level at the steps in between (DeepCache).

Genes interact only through (e) and through the per-tile displacement field of (d); with both switched off each
gene's output depends only on its own ``x_t``/``lr`` and the tile's histology.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._alignment import SpatialAlignment
from ._attention import CellToTissueAttention
from ._coexpression import GeneCoexpression, lr_correlation
from ._config import ModelConfig
from ._encoder import DistillationHead, HistologyEncoder, HistologyFeatures
from ._layers import CL, Down, LightBlock, ResBlock, TimeEmbedding, Up, add_per_tile_, count_parameters
from ._modulation import DisentangledModulation


@dataclass
class Conditioning:
    """Everything the denoiser derives from the histology and the LR maps alone, computed once per tile.

    None of it depends on the noisy maps or the diffusion time, so the sampler computes it once
    (:meth:`Denoiser.prepare`) and reuses it at every denoising step; the result is identical to recomputing it.

    Attributes
    ----------
    hist
        Histology features, aligned to the expression grid when alignment (d) is on.
    lr
        ``(B, G, h, w)`` normalised LR maps the conditioning was computed from.
    aux
        ``(B, G, h, w)`` histology-only prediction of the distillation head (a), or ``None``.
    injections
        The per-tile histology projections added to the gene stream at resolutions 1, 1/2 and 1/4.
    corr
        ``(B, G, G)`` LR co-expression matrix for (e), or ``None``.
    """

    hist: HistologyFeatures
    lr: Tensor
    aux: Tensor | None
    injections: tuple[Tensor, Tensor, Tensor]
    corr: Tensor | None


@dataclass
class FeatureCache:
    """Deep decoder features reused across denoising steps (DeepCache, Ma et al., CVPR 2024).

    Consecutive DDIM steps change the deep (1/2 and 1/4 resolution) features of the gene stream only slowly. With a
    cache, every ``interval``-th call of :meth:`Denoiser.forward` is a full evaluation that stores the decoder's
    output of the deep levels (upsampled to full resolution, before the skip connection); the calls in between
    recompute only the full-resolution level (stem, encoder block, decoder block, output) from the new ``x_t`` and
    time, and take the deep part from the cache. ``interval=1`` is an exact evaluation at every call.

    Parameters
    ----------
    interval
        Calls per full evaluation; the first call is always full.

    Attributes
    ----------
    calls
        Number of forward calls made with this cache.
    deep
        The cached ``(B*G, C0, h, w)`` deep features of the last full evaluation, or ``None``.
    """

    interval: int = 1
    calls: int = 0
    deep: Tensor | None = None

    def __post_init__(self) -> None:
        if int(self.interval) < 1 or int(self.interval) != self.interval:
            raise ValueError(
                f"the feature-reuse interval must be a positive integer (1 = no reuse), got {self.interval!r}."
            )
        self.interval = int(self.interval)

    def reuse(self, shape: tuple[int, ...]) -> bool:
        """Whether the next call may take its deep features from the cache (and count the call)."""
        use = self.deep is not None and self.calls % self.interval != 0 and tuple(self.deep.shape) == shape
        self.calls += 1
        return use


class Denoiser(nn.Module):
    """Histology-conditioned denoiser of normalised HR gene maps.

    Parameters
    ----------
    config
        Network configuration (:class:`~stsr.models.ModelConfig`).

    Notes
    -----
    Typical use: ``cond = model.prepare(model.encode_histology(image), lr)`` once per tile, then
    ``model(x_t, lr, t, cond)`` at every denoising step (passing the :class:`HistologyFeatures` instead of ``cond``
    recomputes the conditioning at each call, as training does). HR tiles must have ``h`` and ``w`` divisible by 4.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = ModelConfig() if config is None else config
        config.validate()
        self.config = config
        c0, c1, c2 = config.widths
        d0, d1, d2 = config.hist_widths
        g, td = config.groups, config.time_dim

        self.encoder = HistologyEncoder(config)
        self.distill = DistillationHead(config) if config.use_distillation else None
        self.align = SpatialAlignment(config) if config.use_alignment else None
        # feature distillation (training only): the fine histology features predict an image encoder's features
        self.feature_head = nn.Conv2d(d0, config.feature_targets, 1) if config.feature_targets else None
        self.time = TimeEmbedding(td)

        n_in = 3 if config.use_distillation else 2
        self.stem = nn.Conv2d(n_in, c0, 3, padding=1)
        self.inject0 = nn.Conv2d(d0, c0, 1)
        self.res0 = LightBlock(c0, td, g)
        self.down0 = Down(c0, c1)
        self.inject1 = nn.Conv2d(d1, c1, 1)
        self.res1 = LightBlock(c1, td, g)
        self.down1 = Down(c1, c2)
        self.inject2 = nn.Conv2d(d2, c2, 1)
        self.res2a = ResBlock(c2, td, g)
        self.res2b = ResBlock(c2, td, g)
        self.up1 = Up(c2, c1)
        self.res1d = ResBlock(c1, td, g)
        self.up0 = Up(c1, c0)
        self.res0d = LightBlock(c0, td, g)
        self.out_norm = nn.GroupNorm(g, c0)
        self.out = nn.Linear(c0, 1)

        self.cross_attn = (
            CellToTissueAttention(c2, d2, config.n_heads, config.n_tokens, g)
            if config.use_cross_attention
            else None
        )
        self.modulate = DisentangledModulation(c2, d2, config.shared_dim) if config.use_disentangle else None
        self.coexpr = (
            GeneCoexpression(c2, config.n_heads, config.coexpr_grid, g) if config.use_coexpression else None
        )
        self.to(memory_format=CL)

    # ------------------------------------------------------------------ histology
    def encode_histology(self, image: Tensor) -> HistologyFeatures:
        """Encode the image tiles ``(B, C, k*h, k*w)`` (float in ``[0, 1]``); run once per tile."""
        return self.encoder(image)

    def condition(self, feats: HistologyFeatures, lr: Tensor) -> tuple[HistologyFeatures, Tensor | None]:
        """Histology features aligned to the expression grid (d) and the flow ``(B, 2, h, w)`` (``None`` if off)."""
        if self.align is None:
            return feats, None
        return self.align(feats, lr)

    def aux_expression(self, feats: HistologyFeatures, lr: Tensor) -> Tensor:
        """Expression ``(B, G, h, w)`` predicted from histology alone by the distillation head (a).

        ``lr`` only supplies each gene's identity (its correlation with the histology features) and scale; the
        features are aligned first when alignment is on. Raises if ``use_distillation`` is off.
        """
        if self.distill is None:
            raise RuntimeError(
                "aux_expression needs ModelConfig.use_distillation=True (the head was removed)."
            )
        self._check(lr, lr, None, feats)
        aligned, _ = self.condition(feats, lr)
        return self.distill(aligned.fine, lr)

    def predict_features(self, feats: HistologyFeatures) -> Tensor:
        """``(B, feature_targets, h, w)`` image features predicted from the fine histology features (feature
        distillation, :func:`~stsr.models.fit` with pairs that carry ``features``). Raises if the config has no
        ``feature_targets``."""
        if self.feature_head is None:
            raise RuntimeError(
                "predict_features needs ModelConfig.feature_targets > 0 (train with stsr.tl.train(..., "
                "image_features=...) to add the head)."
            )
        return self.feature_head(feats.fine)

    # ------------------------------------------------------------------ denoising
    def prepare(self, feats: HistologyFeatures, lr: Tensor) -> Conditioning:
        """The step-invariant :class:`Conditioning` of tiles with features ``feats`` and normalised LR maps ``lr``."""
        self._check(lr, lr, None, feats)
        hist, _ = self.condition(feats, lr)
        return Conditioning(
            hist=hist,
            lr=lr,
            aux=self.distill(hist.fine, lr) if self.distill is not None else None,
            injections=(self.inject0(hist.fine), self.inject1(hist.mid), self.inject2(hist.coarse)),
            corr=lr_correlation(lr) if self.coexpr is not None else None,
        )

    def forward(
        self,
        x_t: Tensor,
        lr: Tensor,
        t: Tensor,
        feats: HistologyFeatures | Conditioning,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """Denoiser output ``(B, G, h, w)`` for noisy maps ``x_t``, LR maps ``lr`` (both ``(B, G, h, w)``), time ``t``.

        ``t`` is ``(B,)`` (or a scalar) float diffusion time in ``[0, 1]``; ``feats`` from :meth:`encode_histology`,
        or the :class:`Conditioning` of :meth:`prepare` for the same ``lr`` (faster when called at every step).
        ``cache``: a :class:`FeatureCache` shared by the steps of one sampling run, to reuse the deep features
        between full evaluations (an approximation; ``None`` evaluates the whole network).
        """
        if cache is not None and torch.is_grad_enabled():
            raise RuntimeError(
                "a FeatureCache is for sampling only: call the denoiser under torch.no_grad() or pass cache=None."
            )
        return self._run(x_t, lr, t, feats, return_loss=False, cache=cache)[0]

    def forward_train(
        self, x_t: Tensor, lr: Tensor, t: Tensor, feats: HistologyFeatures
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Like :meth:`forward` plus auxiliary losses: ``{"disentangle": ...}`` when ``use_disentangle``."""
        return self._run(x_t, lr, t, feats, return_loss=True)

    def _check(self, x_t: Tensor, lr: Tensor, t: Tensor | None, feats: HistologyFeatures) -> None:
        if x_t.ndim != 4 or lr.shape != x_t.shape:
            raise ValueError(
                f"x_t and lr must both have shape (B, G, h, w), got {tuple(x_t.shape)} and {tuple(lr.shape)}."
            )
        b, _, h, w = x_t.shape
        if h % 4 or w % 4:
            raise ValueError(f"HR tile size {h}x{w} must be divisible by 4; pad or crop the tile.")
        if feats.batch_size != b or feats.hr_shape != (h, w):
            raise ValueError(
                f"histology features are for {feats.batch_size} tile(s) of {feats.hr_shape}, but the maps are "
                f"{b} tile(s) of {(h, w)}; the image tile must be (image_scale*h) x (image_scale*w) "
                f"with image_scale={self.config.image_scale}."
            )
        if t is not None and t.numel() not in (1, b):
            raise ValueError(f"t must have shape (B,) = ({b},) or be a scalar, got {tuple(t.shape)}.")

    def _run(
        self,
        x_t: Tensor,
        lr: Tensor,
        t: Tensor,
        feats: HistologyFeatures | Conditioning,
        return_loss: bool,
        cache: FeatureCache | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if isinstance(feats, Conditioning):
            cond = feats
            if cond.lr is not lr and (cond.lr.shape != lr.shape or not torch.equal(cond.lr, lr)):
                raise ValueError(
                    "the Conditioning was prepared for other LR maps; call prepare(feats, lr) again."
                )
            self._check(x_t, lr, t, cond.hist)
        else:
            self._check(x_t, lr, t, feats)
            cond = self.prepare(feats, lr)
        b, g, h, w = x_t.shape
        t = t.reshape(-1).expand(b)
        losses: dict[str, Tensor] = {}
        inj0 = cond.injections[0]

        inputs = [x_t, lr]
        if cond.aux is not None:
            inputs.append(cond.aux)
        x = torch.stack(inputs, dim=-1).reshape(b * g, h, w, len(inputs)).permute(0, 3, 1, 2)  # channels-last
        temb = self.time(t)  # (B, time_dim), per tile

        # level 0 (HR resolution)
        x = add_per_tile_(self.stem(x), inj0)
        x = self.res0(x, temb)
        skip0 = x
        if cache is not None and cache.reuse((b * g, self.config.widths[0], h, w)):
            deep = cache.deep
        else:
            deep = self._deep(x, temb, cond, losses, return_loss)
            if cache is not None:
                cache.deep = deep
        # with a cache (sampling only, no autograd) the cached tensor must stay intact: add into the skip instead
        x = skip0.add_(deep) if cache is not None else deep.add_(skip0)
        x = self.res0d(x, temb)
        x = F.silu(self.out_norm(x), inplace=not torch.is_grad_enabled())
        out = self.out(x.permute(0, 2, 3, 1))  # channels-last: (B*G, h, w, C) is contiguous -> (B*G, h, w, 1)
        return out.reshape(b, g, h, w), losses

    def _deep(
        self, x: Tensor, temb: Tensor, cond: Conditioning, losses: dict[str, Tensor], return_loss: bool
    ) -> Tensor:
        """Levels 1/2 and 1/4 of the gene stream: full-resolution features in, upsampled decoder features out."""
        inj1, inj2 = cond.injections[1:]
        # level 1 (1/2)
        x = add_per_tile_(self.down0(x), inj1)
        x = self.res1(x, temb)
        skip1 = x
        # level 2 (1/4, bottleneck)
        x = add_per_tile_(self.down1(x), inj2)
        x = self.res2a(x, temb)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, cond.hist.tokens)
        if self.modulate is not None:
            x, loss = self.modulate(x, cond.hist.coarse, return_loss)
            if return_loss:
                losses["disentangle"] = loss
        if self.coexpr is not None:
            x = x + self.coexpr(x, cond.corr)
        x = self.res2b(x, temb)
        # decoder back to 1/2, then up to full resolution (the skip of level 0 is added by the caller)
        x = self.res1d(self.up1(x).add_(skip1), temb)
        return self.up0(x)

    # ------------------------------------------------------------------ introspection
    def module_parameters(self) -> dict[str, int]:
        """Parameter count per component (``0`` for a switched-off module)."""
        comps = {
            "histology_encoder": self.encoder,
            "distillation_head (a)": self.distill,
            "cross_attention (b)": self.cross_attn,
            "disentangle_modulation (c)": self.modulate,
            "alignment (d)": self.align,
            "coexpression (e)": self.coexpr,
            "feature_head": self.feature_head,
        }
        out = {k: count_parameters(v) for k, v in comps.items()}
        out["gene_stream_unet"] = count_parameters(self) - sum(out.values())
        out["total"] = count_parameters(self)
        return out

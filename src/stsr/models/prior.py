"""Building blocks of the semantic prior, for computing it piece by piece.

:func:`~stsr.models.semantic_prior`, :func:`~stsr.models.apply_prior` and :func:`~stsr.models.prior_guide` work on a
whole slide in memory. ``stsr.tl`` computes the same window by window with bounded memory from these pieces: running
feature moments and their principal axes, the ridge read-out fitted by generalised cross-validation, the prior's
weights and the check of its strength; the image teacher's trunk and the size of its features are here too.
"""

from __future__ import annotations

from ._prior import (
    PRIOR_MAP_STRENGTH,
    RIDGE_ALPHAS,
    FeatureMoments,
    check_strength,
    fit_readout,
    pca_scores,
    prior_weights,
    readout,
    ridge_gcv,
    tissue_components,
    usable_components,
)
from ._teacher import TEACHER_CHANNELS, DenseNetTrunk

__all__ = [
    "PRIOR_MAP_STRENGTH",
    "RIDGE_ALPHAS",
    "check_strength",
    "FeatureMoments",
    "pca_scores",
    "tissue_components",
    "usable_components",
    "ridge_gcv",
    "fit_readout",
    "readout",
    "prior_weights",
    "TEACHER_CHANNELS",
    "DenseNetTrunk",
]

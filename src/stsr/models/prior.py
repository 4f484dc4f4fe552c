"""Building blocks of the semantic prior, for computing it piece by piece.

:func:`~stsr.models.semantic_prior`, :func:`~stsr.models.apply_prior` and :func:`~stsr.models.prior_guide` work on a
whole slide in memory, as the one-window case of the windowed pieces here, which ``stsr.tl`` runs over a whole slide
with bounded memory: :func:`fit_prior` (running feature moments and their principal axes, the ridge read-out fitted
by generalised cross-validation) gives a :class:`SlidePrior`, and :class:`PriorReweighting` reweights a map by it and
restores the counts chunk by chunk; the prior's weights and the check of its strength, the image teacher's trunk and
the size of its features are here too.
"""

from __future__ import annotations

from ._features import NUCLEI_CHANNELS, DenseNetEncoder, ModuleEncoder, NucleiEncoder, resolve_image_features
from ._prior import (
    PRIOR_MAP_STRENGTH,
    RIDGE_ALPHAS,
    FeatureMoments,
    PriorReweighting,
    SlidePrior,
    check_strength,
    fit_prior,
    fit_readout,
    pca_scores,
    prior_weights,
    readout,
    ridge_gcv,
    tissue_components,
    tissue_windows,
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
    "fit_prior",
    "tissue_windows",
    "SlidePrior",
    "PriorReweighting",
    "resolve_image_features",
    "DenseNetEncoder",
    "NucleiEncoder",
    "NUCLEI_CHANNELS",
    "ModuleEncoder",
    "TEACHER_CHANNELS",
    "DenseNetTrunk",
]

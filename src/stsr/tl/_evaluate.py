"""Score a super-resolved prediction against an HR truth (per-gene accuracy table)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import metrics as _metrics
from ..models import TrainingPair
from ..observation import ObservationModel

__all__ = ["evaluate"]


def evaluate(
    prediction: Any,
    truth: TrainingPair | Any,
    observation: ObservationModel | None = None,
    *,
    lr: Any | None = None,
    mask: Any | None = None,
    genes: Sequence[str] | None = None,
    ceiling: bool = True,
) -> pd.DataFrame:
    """Per-gene accuracy of a super-resolved prediction (see :mod:`stsr.metrics`).

    Parameters
    ----------
    prediction
        ``(G, H, W)`` predicted counts per HR pixel (numpy or torch).
    truth
        A :class:`~stsr.models.TrainingPair` (its ``hr``, ``observation``, ``lr``, ``mask`` and ``genes`` are used
        unless given explicitly) or the ``(G, H, W)`` truth counts.
    observation
        The LR observation model on the ``(H, W)`` grid (required when ``truth`` is an array).
    lr
        ``(G, n_obs)`` LR input the prediction was made from; default the pair's ``lr``, else
        ``observation.pool(truth)``.
    mask
        ``(H, W)`` boolean pixels to score (default the pair's mask, else all pixels).
    genes
        Gene names (the table's index); default the pair's genes, else ``gene_0, gene_1, ...``.
    ceiling
        Add the noise ceiling of the truth (:func:`stsr.metrics.noise_ceiling`; needs integer counts and block
        observations, otherwise its columns are NaN).

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by gene with columns ``pearson``, ``within_block``, ``rmse``, ``ssim``,
    ``lr_rel_error`` and, with ``ceiling``, ``ceiling_pearson``, ``ceiling_within_block`` and ``reliability``.
    Summarise it with :func:`stsr.metrics.summarize`.

    Examples
    --------
    >>> pair = stsr.tl.training_pair(sdata, "he", table_key="table", factor=2)  # doctest: +SKIP
    >>> table = stsr.tl.evaluate(pair.observation.lift(pair.observation.pool(pair.hr.numpy())), pair)  # doctest: +SKIP
    """
    if isinstance(truth, TrainingPair):
        pair = truth
        truth_maps = pair.hr.double().numpy()
        observation = pair.observation if observation is None else observation
        lr = pair.lr if lr is None else lr
        if mask is None and pair.mask is not None:
            mask = pair.mask.numpy()
        genes = list(pair.genes) if genes is None else genes
    else:
        if observation is None:
            raise ValueError(
                "Pass observation= (the LR ObservationModel) when truth is an array, or a TrainingPair."
            )
        truth_maps = truth
    values = _metrics.gene_metrics(prediction, truth_maps, observation, lr=lr, mask=mask, ceiling=ceiling)
    n = len(next(iter(values.values())))
    if genes is None:
        genes = [f"gene_{i}" for i in range(n)]
    genes = [str(g) for g in genes]
    if len(genes) != n:
        raise ValueError(f"{len(genes)} gene names for {n} gene maps.")
    return pd.DataFrame({k: np.asarray(v) for k, v in values.items()}, index=pd.Index(genes, name="gene"))

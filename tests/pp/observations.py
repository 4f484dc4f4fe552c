"""Test helper (not shipped): rebuild the observation operator and LR measurements behind an LR raster made by :mod:`stsr.pp`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stsr._validate import check_element, check_genes
from stsr.observation import Grid, ObservationModel
from stsr.pp._provenance import get_record, grid_from_dict
from stsr.pp._spots import _spot_counts
from stsr.pp._transforms import scale0

__all__ = ["Observations", "get_observations"]


@dataclass
class Observations:
    """LR measurements and the operator that produced them from the HR grid.

    Attributes
    ----------
    model
        The :class:`~stsr.observation.ObservationModel` (``lr = model.pool(hr)``).
    counts
        ``(n_genes, n_obs)`` float64 LR counts.
    genes
        Gene names (rows of ``counts``).
    grid
        The HR grid in the intrinsic frame of ``image_key`` (``None`` if unknown).
    image_key
        The image the grid is aligned to (``None`` if unknown).
    obs_names
        Names of the observations (table rows for spots; ``"bi_bj"`` LR pixels for blocks).
    info
        The record stored in ``sdata.attrs["stsr"][lr_key]``.
    """

    model: ObservationModel
    counts: np.ndarray
    genes: list[str]
    grid: Grid | None
    image_key: str | None
    obs_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def get_observations(sdata: Any, lr_key: str, genes: Sequence[str] | None = None) -> Observations:
    """Rebuild the LR measurements behind a raster made by :func:`rasterize_spots` or :func:`downsample`.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object (not modified).
    lr_key
        Key of the LR raster element.
    genes
        Subset of genes (default: the raster's genes).

    Returns
    -------
    :class:`Observations`.
    """
    check_element(sdata, lr_key, "images")
    info = get_record(sdata, lr_key)
    if info is None or info.get("kind") not in ("spots", "blocks"):
        raise ValueError(
            f"Image {lr_key!r} was not made by stsr.pp.rasterize_spots or stsr.pp.downsample (no record in "
            f"sdata.attrs['stsr'][{lr_key!r}]); build it with one of them."
        )
    all_genes = list(info["genes"])
    genes = all_genes if genes is None else check_genes(genes, all_genes, where=f"LR raster {lr_key!r}")
    grid = grid_from_dict(info["grid"]) if info.get("grid") else None
    if info["kind"] == "spots":
        model, counts, genes, obs_names = _spot_counts(
            sdata,
            info["table_key"],
            info["spots_key"],
            genes,
            grid,
            info["image_key"],
            info.get("coordinate_system"),
            info.get("layer"),
        )
        if obs_names != list(info["obs_names"]):
            raise ValueError(
                f"The rows of table {info['table_key']!r} for {info['spots_key']!r} changed since {lr_key!r} was "
                "built; rebuild it with stsr.pp.rasterize_spots(..., overwrite=True)."
            )
    else:
        h, w = info["hr_shape"]
        model = ObservationModel.blocks((h, w), int(info["factor"]))
        lr = np.asarray(scale0(sdata.images[lr_key]).data, dtype=np.float64)
        gi = [all_genes.index(g) for g in genes]
        counts = lr[gi].reshape(len(gi), -1)
        lh, lw = model.params["lr_shape"]
        obs_names = [f"{i}_{j}" for i in range(lh) for j in range(lw)]
    return Observations(model, counts, list(genes), grid, info.get("image_key"), obs_names, info)

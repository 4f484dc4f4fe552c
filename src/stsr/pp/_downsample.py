"""Synthetic low-resolution (LR) measurements by pooling an HR raster into square blocks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import RASTER_LR
from .._validate import check_counts, check_element, check_new_key
from ..observation import ObservationModel
from ._provenance import get_record, grid_to_dict, record
from ._transforms import all_transformations, parse_raster, scale0

__all__ = ["downsample"]


def downsample(
    sdata: Any,
    hr_key: str,
    factor: int,
    key_added: str = RASTER_LR,
    scale_factors: list[int] | str | None = "auto",
    overwrite: bool = False,
) -> ObservationModel:
    """Pool an HR raster of counts into ``factor x factor`` blocks: a synthetic LR measurement.

    Uses :meth:`ObservationModel.blocks <stsr.observation.ObservationModel.blocks>`, so counts are summed and the
    total of every gene is preserved exactly (blocks at the bottom/right edges may be partial). The LR raster has
    ``factor`` times coarser pixels and transformations ``Sequence([Scale(factor), hr_transformation])`` to every
    coordinate system of the HR raster, so it overlays it.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object; only ``key_added`` (and its attrs record) is added.
    hr_key
        Raster image element ``(c, y, x)`` of counts per HR pixel (e.g. ``"hr_truth"``).
    factor
        Block side in HR pixels (positive integer).
    key_added
        Key of the new LR raster element.
    scale_factors
        Pyramid factors of the LR raster.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    The block :class:`~stsr.observation.ObservationModel` on the HR grid; observation ``bi * n_cols + bj`` is LR
    pixel ``(bi, bj)``.
    """
    from spatialdata.models import get_channel_names
    from spatialdata.transformations import Scale, Sequence

    element = check_element(sdata, hr_key, "images")
    if isinstance(factor, bool) or not float(factor).is_integer() or int(factor) < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}.")
    factor = int(factor)
    check_new_key(sdata, key_added, overwrite)
    genes = [str(g) for g in get_channel_names(element)]
    hr = np.asarray(scale0(element).data, dtype=np.float64)
    c, h, w = hr.shape
    check_counts(
        hr.reshape(c, -1).T,
        genes,
        lambda i: f"pixel (y={i // w}, x={i % w})",
        what=f"HR raster {hr_key!r}",
    )
    op = ObservationModel.blocks((h, w), factor)
    lh, lw = op.params["lr_shape"]
    lr = op.pool(hr).reshape(c, lh, lw).astype(np.float32)
    transformations = {
        cs: Sequence([Scale([float(factor), float(factor)], axes=("y", "x")), tf])
        for cs, tf in all_transformations(element).items()
    }
    lr_element = parse_raster(lr, genes, transformations, scale_factors)
    info: dict[str, Any] = {
        "kind": "blocks",
        "source": hr_key,
        "factor": factor,
        "hr_shape": [h, w],
        "genes": genes,
    }
    source = get_record(sdata, hr_key)
    if source is not None and "grid" in source:
        info["grid"] = source["grid"]
        info["image_key"] = source.get("image_key")
        info["lr_grid"] = grid_to_dict(lr_grid(source["grid"], factor, (lh, lw)))
    if key_added in sdata:
        del sdata[key_added]
    sdata.images[key_added] = lr_element
    record(sdata, key_added, info)
    return op


def lr_grid(grid_dict: dict[str, Any], factor: int, lr_shape: tuple[int, int]) -> Any:
    """The LR grid (``factor`` x coarser) of an HR grid given as a dict."""
    from ..observation import Grid

    return Grid(lr_shape, float(grid_dict["pixel_size"]) * factor, tuple(grid_dict["origin"]))

"""HR ground truth from single-molecule transcripts: counts per gene and HR pixel."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import GENE_COLUMN, RASTER_HR_TRUTH
from .._elements import element_affine, shared_coordinate_system
from .._validate import check_element, check_genes, check_new_key
from ..observation import Grid
from ._grid import frame_grid, image_frame, raster_element
from ._provenance import grid_to_dict, record
from ._transforms import parse_raster

__all__ = ["bin_transcripts"]


def _feature_key(points: Any, points_key: str, gene_key: str | None) -> str:
    columns = list(points.columns)
    if gene_key is None:
        gene_key = (points.attrs.get("spatialdata_attrs", {}) or {}).get("feature_key") or GENE_COLUMN
    if gene_key not in columns:
        raise KeyError(
            f"Points element {points_key!r} has no gene column {gene_key!r}; pass gene_key= naming one of {columns}."
        )
    return gene_key


def _all_genes(points: Any, gene_key: str) -> list[str]:
    col = points[gene_key]
    if isinstance(col.dtype, pd.CategoricalDtype) and col.cat.known:
        return [str(g) for g in col.cat.categories]
    return sorted(str(g) for g in col.unique().compute())


def _points_genes(
    points: Any, points_key: str, gene_key: str | None, genes: Sequence[str] | None
) -> tuple[str, list[str]]:
    """Check the ``x``/``y`` columns of a points element; its gene column and the checked genes (default all)."""
    for col in ("x", "y"):
        if col not in points.columns:
            raise KeyError(f"Points element {points_key!r} has no {col!r} column.")
    gene_key = _feature_key(points, points_key, gene_key)
    available = _all_genes(points, gene_key)
    return gene_key, check_genes(
        available if genes is None else genes, available, where=f"points {points_key!r}"
    )


def bin_transcripts(
    sdata: Any,
    points_key: str,
    pixel_size: float,
    genes: Sequence[str] | None = None,
    image_key: str | None = None,
    key_added: str = RASTER_HR_TRUTH,
    gene_key: str | None = None,
    coordinate_system: str | None = None,
    scale_factors: list[int] | str | None = "auto",
    overwrite: bool = False,
) -> Grid:
    """Count transcripts per gene and HR pixel: an HR ground-truth raster.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object; only ``key_added`` (and its attrs record) is added.
    points_key
        Points element of transcripts (``x``, ``y`` and a gene column).
    pixel_size
        HR pixel side in units of ``coordinate_system`` (µm in ``"global"``).
    genes
        Genes to count (default: all genes of the points element).
    image_key
        If given, the raster lies on :func:`hr_grid` of this image and overlays it (transformations to every
        coordinate system of the image); transcripts outside the grid are dropped (with a warning). Otherwise the grid
        covers the transcripts' extent in ``coordinate_system``.
    key_added
        Key of the new raster element (c = genes, float32 counts per pixel).
    gene_key
        Gene column (default: the points' ``feature_key``, else ``"gene"``).
    coordinate_system
        Coordinate system of ``pixel_size`` (default ``"global"`` when available).
    scale_factors
        Pyramid factors of the raster.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    The :class:`~stsr.observation.Grid` of the raster (in the image's intrinsic frame when ``image_key`` is given,
    else in ``coordinate_system``).
    """
    from spatialdata.transformations import Scale, Sequence, Translation

    points = check_element(sdata, points_key, "points")
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive number, got {pixel_size!r}.")
    check_new_key(sdata, key_added, overwrite)
    gene_key, genes = _points_genes(points, points_key, gene_key, genes)

    if image_key is not None:
        check_element(sdata, image_key, "images")
        cs = shared_coordinate_system(
            sdata, [image_key, points_key], coordinate_system, names=("image", "points")
        )
        frame = image_frame(sdata, image_key, cs)  # rotated or sheared images too
        grid = frame_grid(frame, pixel_size)
        m = np.linalg.inv(frame.to_cs) @ element_affine(points, cs, points_key)
        transformations = None
    else:
        cs = shared_coordinate_system(sdata, [points_key], coordinate_system, names="points")
        m = element_affine(points, cs, points_key)
        lo = points[["y", "x"]].min().compute().to_numpy(float)
        hi = points[["y", "x"]].max().compute().to_numpy(float)
        corners = np.array([[lo[0], lo[1], 1], [lo[0], hi[1], 1], [hi[0], lo[1], 1], [hi[0], hi[1], 1]]).T
        cy, cx = (m @ corners)[:2]
        ps = float(pixel_size)
        origin = (math.floor(cy.min() / ps) * ps, math.floor(cx.min() / ps) * ps)
        shape = (int((cy.max() - origin[0]) // ps) + 1, int((cx.max() - origin[1]) // ps) + 1)
        grid = Grid(shape, ps, origin)
        transformations = {
            cs: Sequence(
                [Scale([ps, ps], axes=("y", "x")), Translation([origin[0], origin[1]], axes=("y", "x"))]
            )
        }

    h, w = grid.shape
    n_pix = h * w
    counts = np.zeros(len(genes) * n_pix, dtype=np.int64)
    n_out = 0
    for part in points[["y", "x", gene_key]].to_delayed():
        df = part.compute()
        if len(df) == 0:
            continue
        code = pd.Categorical(df[gene_key].astype(str), categories=genes).codes.astype(np.int64)
        yx = np.stack([df["y"].to_numpy(float), df["x"].to_numpy(float), np.ones(len(df))])
        ty, tx = (m @ yx)[:2]
        r, c = grid.to_grid(ty, tx)
        r, c = np.floor(r), np.floor(c)
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        keep = inside & (code >= 0)
        n_out += int((~inside & (code >= 0)).sum())
        flat = code[keep] * n_pix + r[keep].astype(np.int64) * w + c[keep].astype(np.int64)
        uniq, cnt = np.unique(flat, return_counts=True)
        counts[uniq] += cnt
    if n_out:
        warnings.warn(
            f"{n_out} transcripts of the selected genes lie outside the HR grid of image {image_key!r} and were "
            "dropped.",
            stacklevel=2,
        )
    data = counts.reshape(len(genes), h, w).astype(np.float32)
    if image_key is not None:
        element = raster_element(
            data, genes, grid, sdata, image_key, scale_factors=scale_factors, coordinate_system=cs
        )
    else:
        element = parse_raster(data, genes, transformations, scale_factors)
    if key_added in sdata:
        del sdata[key_added]
    sdata.images[key_added] = element
    record(
        sdata,
        key_added,
        {
            "kind": "transcripts",
            "points_key": points_key,
            "image_key": image_key,
            "coordinate_system": cs,
            "pixel_size": float(pixel_size),
            "grid": grid_to_dict(grid),
            "genes": list(genes),
            "n_dropped": n_out,
        },
    )
    return grid

"""Sum an HR expression raster over cells (polygons, circles) or the segments of a labels element."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import INSTANCE_KEY, PROVENANCE_ATTR, REGION_KEY
from .._elements import (
    element_affine,
    get_raster,
    pixel_centres,
    provenance,
    raster_genes,
    scale0,
    shared_coordinate_system,
)
from .._validate import check_new_key, element_type
from ..observation import ObservationModel

__all__ = ["aggregate"]

#: Supersampling of each HR pixel side when rasterising polygons (reduced for very large polygons).
_SUPERSAMPLE = 16
#: Budget of sub-samples per polygon / per strip.
_SUBSAMPLE_BUDGET = 4_000_000
#: Budget (bytes) of one strip of the raster read into memory at a time.
_STRIP_BYTES = 128 * 2**20
_SPARSE_BELOW = 0.5


def aggregate(
    sdata: Any,
    key: str,
    by: str,
    *,
    coordinate_system: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Sum an HR expression raster over each cell of a shapes element (polygons or circles) or of a labels element.

    Each HR pixel contributes its counts times the fraction of its area inside the cell, so a cell receives the
    expected counts of the tissue it covers (a raster of constant 1 summed over a polygon gives the polygon's area
    in HR pixels). Fractions are computed by supersampling every HR pixel (up to 16 x 16 sub-samples for polygons;
    for labels as many as needed to resolve the labels' pixels, up to 8 x 8), and the sum is done with the
    :class:`~stsr.observation.ObservationModel` of those weights, strip by strip over the raster.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` holding the raster and ``by``.
    key
        Image element ``(c, y, x)`` of counts per HR pixel (e.g. from :func:`stsr.tl.super_resolve`).
    by
        Shapes element (``Polygon``/``MultiPolygon`` geometries, or ``Point`` geometries with a ``radius`` column) or
        labels element (label 0 is background).
    coordinate_system
        Coordinate system through which the raster and ``by`` are matched (both must have it). Default: ``"global"``
        if both have it, else their only shared one.
    key_added
        If given, also add the result to ``sdata.tables[key_added]``, annotating ``by``.
    overwrite
        Replace an existing element ``key_added``.

    Returns
    -------
    :class:`~anndata.AnnData` with one observation per cell (per shape, in the shapes' order, or per non-zero label,
    sorted), ``X`` the summed counts (``float32``; CSR when mostly zero), ``var_names`` the genes, ``obs`` with
    ``area`` (the cell's area inside the raster, in HR pixels), ``region`` (= ``by``) and ``instance_id`` (shape
    index or label id), obs names the shape index (or label ids) as strings, and ``obsm["spatial"]`` the cell
    centroids ``(x, y)`` in ``coordinate_system`` units. Cells outside the raster get zeros.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    element = get_raster(sdata, key)
    genes = raster_genes(element)
    kind = element_type(sdata, by)
    if kind not in ("shapes", "labels"):
        from .._validate import check_element

        if kind is None:
            check_element(sdata, by, "shapes")  # raises with close matches
        raise ValueError(
            f"by={by!r} is a {kind[:-1]} element; pass a shapes (polygons/circles) or labels element."
        )
    by_el = sdata[by]
    cs = shared_coordinate_system(sdata, [key, by], coordinate_system, names=("raster", kind[:-1]))
    if key_added is not None:
        check_new_key(sdata, key_added, overwrite, kind="tables")
        if key_added in (key, by):
            raise ValueError(f"key_added {key_added!r} names an input of aggregate; choose another key.")
    arr = scale0(element)
    shape = (int(arr.sizes["y"]), int(arr.sizes["x"]))
    raster_mat = element_affine(element, cs, key)

    if kind == "shapes":
        weights, index, centroids = _shape_weights(by_el, by, cs, raster_mat, shape)
    else:
        weights, index, centroids = _label_weights(by_el, by, cs, raster_mat, shape)

    area = np.asarray(weights.sum(axis=1)).ravel()
    grid_centres = _weighted_centres(weights, shape, area)
    op = ObservationModel(weights, shape, grid_centres, "cells", {"by": by})
    x = _pool_strips(arr.data, op, len(genes))

    obs = pd.DataFrame(
        {"area": area.astype(np.float64), REGION_KEY: pd.Categorical([by] * len(index)), INSTANCE_KEY: index},
        index=pd.Index([str(i) for i in index], dtype=str),
    )
    adata = ad.AnnData(X=_as_matrix(x), obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    adata.obsm["spatial"] = centroids
    adata.uns[PROVENANCE_ATTR] = {
        "source": key,
        "by": by,
        "coordinate_system": cs,
        "unit": provenance(sdata, key).get("unit", "counts per HR pixel"),
    }
    adata = TableModel.parse(adata, region=by, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    if key_added is not None:
        if element_type(sdata, key_added) is not None:
            del sdata[key_added]
        sdata.tables[key_added] = adata
    return adata


# --------------------------------------------------------------------------------------------------- helpers
def _shape_weights(
    shapes: Any, by: str, cs: str, raster_mat: np.ndarray, shape: tuple[int, int]
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Area fractions ``(n_shapes, H * W)`` of every HR pixel inside every shape, the index and CS centroids."""
    import shapely
    from shapely import affinity

    geoms = shapes.geometry
    if len(geoms) == 0:
        raise ValueError(f"Shapes element {by!r} is empty.")
    types = set(geoms.geom_type)
    if types <= {"Point"}:
        if "radius" not in shapes.columns:
            raise ValueError(
                f"Shapes element {by!r} holds points without a 'radius' column; circles need one."
            )
        radius = np.asarray(shapes["radius"], float)
        geoms = [g.buffer(r, quad_segs=32) for g, r in zip(geoms, radius)]
    elif types <= {"Polygon", "MultiPolygon"}:
        geoms = list(geoms)
    else:
        raise ValueError(
            f"Shapes element {by!r} has geometry types {sorted(types)}; aggregate needs polygons, multipolygons or "
            "circles (points with a 'radius')."
        )
    shapes_mat = element_affine(shapes, cs, by)
    m = np.linalg.inv(raster_mat) @ shapes_mat  # shapes (y, x) -> raster pixels (row, col)
    # shapely works on (x, y): x' = a x + b y + xoff, y' = d x + e y + yoff
    params = [m[1, 1], m[1, 0], m[0, 1], m[0, 0], m[1, 2], m[0, 2]]
    h, w = shape
    rows_i: list[np.ndarray] = []
    cols_i: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for i, geom in enumerate(geoms):
        if geom is None or geom.is_empty:
            continue
        g = affinity.affine_transform(geom, params)
        r, v = _polygon_fractions(g, h, w)
        rows_i.append(np.full(r.size, i, np.int64))
        cols_i.append(r)
        vals.append(v)
    n = len(geoms)
    if vals:
        weights = sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows_i), np.concatenate(cols_i))), shape=(n, h * w)
        )
    else:
        weights = sparse.csr_matrix((n, h * w))
    # centroids in the coordinate system: exact geometric centroids mapped through the shapes' transformation
    cen = shapely.centroid(np.asarray(geoms, dtype=object))
    cx, cy = shapely.get_x(cen), shapely.get_y(cen)
    ys = shapes_mat[0, 0] * cy + shapes_mat[0, 1] * cx + shapes_mat[0, 2]
    xs = shapes_mat[1, 0] * cy + shapes_mat[1, 1] * cx + shapes_mat[1, 2]
    return weights, np.asarray(shapes.index), np.stack([xs, ys], axis=1).astype(np.float64)


def _polygon_fractions(geom: Any, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices and area fractions of a (multi)polygon given in raster pixel coordinates ``(x=col, y=row)``."""
    from skimage.draw import polygon as draw_polygon

    xmin, ymin, xmax, ymax = geom.bounds
    r0, r1 = max(int(math.floor(ymin)), 0), min(int(math.ceil(ymax)), h)
    c0, c1 = max(int(math.floor(xmin)), 0), min(int(math.ceil(xmax)), w)
    if r1 <= r0 or c1 <= c0:
        return np.empty(0, np.int64), np.empty(0)
    bh, bw = r1 - r0, c1 - c0
    s = int(max(1, min(_SUPERSAMPLE, math.floor(math.sqrt(_SUBSAMPLE_BUDGET / (bh * bw))))))
    acc = np.zeros((bh * s, bw * s), np.int16)
    parts = geom.geoms if geom.geom_type == "MultiPolygon" else [geom]
    for part in parts:
        for ring, sign in [(part.exterior, 1)] + [(ring, -1) for ring in part.interiors]:
            xy = np.asarray(ring.coords)
            # sub-sample k along rows has its centre at r0 + (k + 0.5) / s; skimage tests integer points
            rr, cc = draw_polygon((xy[:, 1] - r0) * s - 0.5, (xy[:, 0] - c0) * s - 0.5, shape=acc.shape)
            acc[rr, cc] += sign
    frac = np.clip(acc, 0, 1).reshape(bh, s, bw, s).mean(axis=(1, 3))
    rr, cc = np.nonzero(frac)
    return (rr + r0) * w + (cc + c0), frac[rr, cc]


def _label_weights(
    labels: Any, by: str, cs: str, raster_mat: np.ndarray, shape: tuple[int, int]
) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Area fractions ``(n_labels, H * W)`` of every HR pixel in every label, the label ids and CS centroids."""
    lab = scale0(labels)
    if "c" in lab.dims:
        raise ValueError(f"by={by!r} must be a labels element (y, x), not an image.")
    lh, lw = int(lab.sizes["y"]), int(lab.sizes["x"])
    m = np.linalg.inv(element_affine(labels, cs, by)) @ raster_mat  # raster pixel -> label pixel
    # sub-samples per HR pixel side: enough to hit every label pixel
    side = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    s = int(min(8, max(1, math.ceil(side - 1e-6))))
    h, w = shape
    # raster window covering the labels
    inv = np.linalg.inv(m)
    corners = inv @ np.array([[0, 0, lh, lh], [0, lw, 0, lw], [1, 1, 1, 1]], float)
    r0, r1 = max(int(np.floor(corners[0].min())), 0), min(int(np.ceil(corners[0].max())), h)
    c0, c1 = max(int(np.floor(corners[1].min())), 0), min(int(np.ceil(corners[1].max())), w)
    label_parts: list[np.ndarray] = []
    pix_parts: list[np.ndarray] = []
    cnt_parts: list[np.ndarray] = []
    if r1 > r0 and c1 > c0:
        sub = (np.arange(s) + 0.5) / s
        strip = max(1, int(_SUBSAMPLE_BUDGET // max(1, (c1 - c0) * s * s)))
        for a in range(r0, r1, strip):
            b = min(r1, a + strip)
            rr = (np.arange(a, b)[:, None] + sub[None, :]).ravel()  # continuous row coords of sub-samples
            cc = (np.arange(c0, c1)[:, None] + sub[None, :]).ravel()
            R, C = np.meshgrid(rr, cc, indexing="ij")
            lr = np.floor(m[0, 0] * R + m[0, 1] * C + m[0, 2]).astype(np.int64)
            lc = np.floor(m[1, 0] * R + m[1, 1] * C + m[1, 2]).astype(np.int64)
            ok = (lr >= 0) & (lr < lh) & (lc >= 0) & (lc < lw)
            if not ok.any():
                continue
            lr0, lr1 = int(lr[ok].min()), int(lr[ok].max()) + 1
            lc0, lc1 = int(lc[ok].min()), int(lc[ok].max()) + 1
            block = np.asarray(lab.isel(y=slice(lr0, lr1), x=slice(lc0, lc1)).values)
            vals = np.zeros(R.shape, dtype=np.int64)
            vals[ok] = block[lr[ok] - lr0, lc[ok] - lc0]
            pix = (np.floor(R).astype(np.int64)) * w + np.floor(C).astype(np.int64)
            nz = vals != 0
            if not nz.any():
                continue
            pairs = np.stack([vals[nz], pix[nz]], axis=1)
            uniq, counts = np.unique(pairs, axis=0, return_counts=True)
            label_parts.append(uniq[:, 0])
            pix_parts.append(uniq[:, 1])
            cnt_parts.append(counts)
    if label_parts:
        lab_ids = np.concatenate(label_parts)
        ids, row = np.unique(lab_ids, return_inverse=True)
        weights = sparse.csr_matrix(
            (np.concatenate(cnt_parts) / (s * s), (row, np.concatenate(pix_parts))), shape=(len(ids), h * w)
        )
    else:
        ids = np.empty(0, np.int64)
        weights = sparse.csr_matrix((0, h * w))
    if len(ids) == 0:
        raise ValueError(
            f"Labels element {by!r} has no non-zero label over raster pixels; nothing to aggregate."
        )
    area = np.asarray(weights.sum(axis=1)).ravel()
    centres = _weighted_centres(weights, shape, area)
    yc, xc = pixel_centres(raster_mat, centres[:, 0] - 0.5, centres[:, 1] - 0.5)
    return weights, ids, np.stack([xc, yc], axis=1)


def _weighted_centres(weights: sparse.csr_matrix, shape: tuple[int, int], area: np.ndarray) -> np.ndarray:
    """Area-weighted centres ``(n, 2)`` in continuous grid coordinates ``(row, col)`` (NaN for empty rows)."""
    h, w = shape
    coo = weights.tocoo()
    r, c = np.divmod(coo.col, w)
    out = np.full((weights.shape[0], 2), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 0] = np.bincount(coo.row, coo.data * (r + 0.5), minlength=weights.shape[0]) / area
        out[:, 1] = np.bincount(coo.row, coo.data * (c + 0.5), minlength=weights.shape[0]) / area
    return np.where(np.isfinite(out), out, 0.0)


def _pool_strips(data: Any, op: ObservationModel, n_genes: int) -> np.ndarray:
    """``op.pool`` of the raster, reading only horizontal strips that some cell touches."""
    h, w = op.shape
    out = np.zeros((op.n_obs, n_genes), np.float64)
    touched = np.zeros(h, bool)
    coo = op.matrix.tocoo()
    touched[np.unique(coo.col // w)] = True
    strip = max(1, int(_STRIP_BYTES // max(1, n_genes * w * 4)))
    for r0 in range(0, h, strip):
        r1 = min(h, r0 + strip)
        if not touched[r0:r1].any():
            continue
        block = data[:, r0:r1, :]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        out += op.pool_window(block, r0, 0).T
    return out


def _as_matrix(x: np.ndarray) -> Any:
    x = np.asarray(x, dtype=np.float32)
    if x.size and np.count_nonzero(x) < _SPARSE_BELOW * x.size:
        return sparse.csr_matrix(x)
    return x

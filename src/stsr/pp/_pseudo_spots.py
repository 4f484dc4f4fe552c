"""Visium-like pseudo-spots from single-molecule transcripts: exact counts of the transcripts inside each disk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._constants import CS_GLOBAL, INSTANCE_KEY, PROVENANCE_ATTR, REGION_KEY
from .._elements import element_affine, shared_coordinate_system
from .._elements import transformations as element_transformations
from .._validate import check_element, check_new_key
from ._provenance import record
from ._transcripts import _points_genes
from ._transforms import spatial_shape

__all__ = ["pseudo_spots"]

#: Key of ``table.uns`` with the spot geometry (the same key as the dataset loaders, see ``stsr.datasets``).
_SPATIAL_META_KEY = "spatial_meta"


def _hex_lattice(
    lo: np.ndarray, hi: np.ndarray, pitch: float, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hexagonal lattice of disk centres ``(y, x)`` whose whole disks lie in the box ``[lo, hi]``, centred in it.

    Rows are ``pitch * sqrt(3) / 2`` apart along y; odd rows are shifted by ``pitch / 2`` along x (Visium layout).

    Returns
    -------
    ``(centres, row, col)``: ``(n, 2)`` centres and the Visium-style array coordinates of each spot (``row`` = lattice
    row, ``col`` = ``2 * j + row % 2``).
    """
    size = hi - lo
    dy = pitch * math.sqrt(3) / 2
    if size[0] < 2 * radius or size[1] < 2 * radius:
        return np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ny = int((size[0] - 2 * radius) // dy) + 1
    shift = pitch / 2 if ny > 1 else 0.0
    nx_even = int((size[1] - 2 * radius - shift) // pitch) + 1
    if nx_even < 1:  # only one row of the two fits along x: no shifted rows
        ny, shift, nx_even = 1, 0.0, int((size[1] - 2 * radius) // pitch) + 1
    span = np.array([(ny - 1) * dy, (nx_even - 1) * pitch + shift])
    y0, x0 = lo + (size - span) / 2
    i, j = np.meshgrid(np.arange(ny), np.arange(nx_even), indexing="ij")
    i, j = i.ravel(), j.ravel()
    centres = np.stack([y0 + i * dy, x0 + (i % 2) * shift + j * pitch], 1)
    return centres, i.astype(np.int64), (2 * j + i % 2).astype(np.int64)


def _check_free(sdata: Any, key: str, overwrite: bool, param: str) -> None:
    """Refuse an existing element ``key`` (ValueError naming it and the fix) or an invalid element name."""
    try:
        check_new_key(sdata, key, overwrite)
    except KeyError as err:
        raise ValueError(
            f"The SpatialData already has an element {key!r} ({param}={key!r}). Pass {param}= naming a new "
            "element, or overwrite=True to replace it."
        ) from err
    except ValueError as err:
        raise ValueError(str(err).replace("key_added", param, 1)) from err


def pseudo_spots(
    sdata: Any,
    points_key: str,
    image_key: str,
    *,
    diameter: float = 55.0,
    pitch: float = 100.0,
    genes: Sequence[str] | None = None,
    coordinate_system: str = CS_GLOBAL,
    key_added: str = "pseudo_spots",
    table_key_added: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Pool single-molecule transcripts into Visium-like circular pseudo-spots: an LR input with known HR truth.

    A **hexagonal** lattice (Visium layout: centres ``pitch`` apart along x, rows ``pitch * sqrt(3) / 2`` apart along
    y, every other row shifted by ``pitch / 2``) of disks of ``diameter`` is laid, centred, over the part of
    ``coordinate_system`` covered both by the transcripts' bounding box and by the image ``image_key``; only spots
    whose whole disk lies inside that box are kept. Each spot counts, per gene, the transcripts whose position is
    inside its disk (distance to the centre ``<= diameter / 2``, computed exactly from the points in
    ``coordinate_system``). Spots without any counted transcript are dropped.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object; only ``key_added``, ``table_key_added`` and their provenance
        records in ``sdata.attrs["stsr"]`` are added.
    points_key
        Points element of transcripts: ``x``, ``y`` and a gene column (its ``feature_key``, else ``"gene"``).
    image_key
        Image the spots must lie on (e.g. the morphology image later passed to :func:`stsr.tl.super_resolve`).
    diameter
        Spot diameter in units of ``coordinate_system`` (µm in ``"global"``; 55 for Visium).
    pitch
        Centre-to-centre distance of neighbouring spots, at least ``diameter`` (100 for Visium).
    genes
        Genes to count (the table's columns, in this order); default: every gene of the points element.
    coordinate_system
        Coordinate system shared by points and image in which ``diameter`` and ``pitch`` are given.
    key_added
        Key of the new shapes element of circles (``radius`` = ``diameter / 2`` in ``coordinate_system``). It has the
        same transformations as the points element (its coordinates are in the points' intrinsic frame) and is
        indexed by the spot ids.
    table_key_added
        Key of the new table of counts; default ``f"{key_added}_table"``.
    overwrite
        Replace existing elements ``key_added`` / ``table_key_added``.

    Returns
    -------
    The new :class:`~anndata.AnnData` table (also stored as ``sdata.tables[table_key_added]``): ``X`` is an ``int64``
    CSR matrix of counts (spots x genes), linked to the shapes with
    :class:`~spatialdata.models.TableModel` (``region`` = ``key_added``, ``region_key`` = ``"region"``,
    ``instance_key`` = ``"instance_id"``, as in the :mod:`stsr.datasets` loaders); ``obs`` has ``array_row``,
    ``array_col`` (Visium-style lattice coordinates) and ``n_counts``; ``obsm["spatial"]`` holds the centres
    ``(x, y)`` in ``coordinate_system``; ``uns["spatial_meta"]`` the geometry and ``uns["stsr"]`` the provenance
    (also recorded in ``sdata.attrs["stsr"]`` under both keys).

    Raises
    ------
    KeyError
        Unknown points or image element, points without ``x``/``y``/gene column, or unknown genes (with close
        matches).
    ValueError
        Existing ``key_added``/``table_key_added`` without ``overwrite=True``; non-positive ``diameter``, ``pitch``
        smaller than ``diameter``; points and image not sharing ``coordinate_system``; a points transformation that
        is not isotropic (disks would not stay circles); no spot fitting in the covered area or no transcript in any
        spot.
    """
    import anndata as ad
    from scipy import sparse
    from scipy.spatial import cKDTree
    from spatialdata.models import ShapesModel, TableModel

    points = check_element(sdata, points_key, "points")
    image = check_element(sdata, image_key, "images")
    for name, val in (("diameter", diameter), ("pitch", pitch)):
        if not isinstance(val, (int, float, np.number)) or not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be a positive number, got {val!r}.")
    diameter, pitch = float(diameter), float(pitch)
    if pitch < diameter:
        raise ValueError(
            f"pitch ({pitch:g}) is smaller than diameter ({diameter:g}): the spots would overlap. Pass pitch >= "
            "diameter (Visium: diameter=55, pitch=100)."
        )
    table_key_added = f"{key_added}_table" if table_key_added is None else table_key_added
    if table_key_added == key_added:
        raise ValueError(f"key_added and table_key_added must differ, both are {key_added!r}.")
    _check_free(sdata, key_added, overwrite, "key_added")
    _check_free(sdata, table_key_added, overwrite, "table_key_added")
    gene_key, genes = _points_genes(points, points_key, None, genes)
    cs = shared_coordinate_system(
        sdata, [image_key, points_key], coordinate_system, names=("image", "points")
    )

    # points intrinsic (y, x) -> cs; the disks are circles in the points' frame only for an isotropic map
    to_cs = element_affine(points, cs, points_key)
    sv = np.linalg.svd(to_cs[:2, :2], compute_uv=False)
    if sv.min() <= 0 or sv.max() / sv.min() > 1.001:
        raise ValueError(
            f"The transformation of points {points_key!r} to {cs!r} is singular or anisotropic (scales "
            f"{sv.tolist()}); circular spots in {cs!r} cannot be stored as circles in the points' frame."
        )
    radius = diameter / 2

    # the covered box: the transcripts' bounding box in cs, intersected with the image's
    lo_i = points[["y", "x"]].min().compute().to_numpy(float)
    hi_i = points[["y", "x"]].max().compute().to_numpy(float)
    if not (np.isfinite(lo_i).all() and np.isfinite(hi_i).all()):
        raise ValueError(f"Points element {points_key!r} holds no transcript with finite x and y.")
    corners = np.array(
        [[lo_i[0], lo_i[1], 1], [lo_i[0], hi_i[1], 1], [hi_i[0], lo_i[1], 1], [hi_i[0], hi_i[1], 1]]
    ).T
    pts_cs = (to_cs @ corners)[:2]
    img_to_cs = element_affine(image, cs, image_key)
    h, w = spatial_shape(image)
    img_cs = (img_to_cs @ np.array([[0, 0, 1], [0, w, 1], [h, 0, 1], [h, w, 1]], float).T)[:2]
    lo = np.maximum(pts_cs.min(1), img_cs.min(1))
    hi = np.minimum(pts_cs.max(1), img_cs.max(1))
    centres, array_row, array_col = _hex_lattice(lo, hi, pitch, radius)
    if len(centres):  # a rotated image: keep the spots whose centre lies on it
        back = np.linalg.inv(img_to_cs) @ np.c_[centres, np.ones(len(centres))].T
        on = (back[0] >= 0) & (back[0] <= h) & (back[1] >= 0) & (back[1] <= w)
        centres, array_row, array_col = centres[on], array_row[on], array_col[on]
    if len(centres) == 0:
        raise ValueError(
            f"No spot of diameter {diameter:g} fits in the area covered by both points {points_key!r} and image "
            f"{image_key!r} in {cs!r} (y {lo[0]:.4g}..{hi[0]:.4g}, x {lo[1]:.4g}..{hi[1]:.4g}); use a smaller "
            "diameter or a larger region."
        )

    # exact point-in-disk counting, partition by partition
    n_spots, n_genes = len(centres), len(genes)
    counts = np.zeros(n_spots * n_genes, dtype=np.int64)
    tree = cKDTree(centres)
    r2 = radius * radius
    n_total = 0
    for part in points[["y", "x", gene_key]].to_delayed():
        df = part.compute()
        if len(df) == 0:
            continue
        code = pd.Categorical(df[gene_key].astype(str), categories=genes).codes.astype(np.int64)
        keep = code >= 0
        if not keep.any():
            continue
        yx = np.stack(
            [df["y"].to_numpy(float)[keep], df["x"].to_numpy(float)[keep], np.ones(int(keep.sum()))]
        )
        p = (to_cs @ yx)[:2].T
        code = code[keep]
        # candidates: the nearest centre (spots do not overlap, so a point lies in at most one disk)
        dist, spot = tree.query(p, k=1, distance_upper_bound=radius * (1 + 1e-6) + 1e-9)
        cand = np.isfinite(dist)
        d = p[cand] - centres[spot[cand]]
        inside = (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) <= r2
        flat = spot[cand][inside].astype(np.int64) * n_genes + code[cand][inside]
        uniq, cnt = np.unique(flat, return_counts=True)
        counts[uniq] += cnt
        n_total += int(inside.sum())
    counts = counts.reshape(n_spots, n_genes)
    totals = counts.sum(1)
    kept = np.flatnonzero(totals > 0)
    if kept.size == 0:
        raise ValueError(
            f"No transcript of the {n_genes} selected gene(s) falls inside any of the {n_spots} pseudo-spots; check "
            "genes= and the coordinate system."
        )
    centres, counts = centres[kept], counts[kept]
    ids = kept.astype(np.int64)  # spot id = position on the full lattice (stable under dropping empty spots)

    # shapes in the points' intrinsic frame, with the points' transformations
    from_cs = np.linalg.inv(to_cs)
    intrinsic = (from_cs @ np.c_[centres, np.ones(len(centres))].T)[:2].T
    scale = float(np.sqrt(sv.prod()))
    transformations = dict(element_transformations(points))
    shapes = ShapesModel.parse(
        intrinsic[:, ::-1].copy(),  # (x, y)
        geometry=0,
        radius=np.full(len(centres), radius / scale),
        index=pd.Index(ids),
        transformations=transformations,
    )

    info = {
        "kind": "pseudo_spots",
        "points_key": points_key,
        "image_key": image_key,
        "spots_key": key_added,
        "table_key": table_key_added,
        "coordinate_system": cs,
        "lattice": "hex",
        "diameter": diameter,
        "pitch": pitch,
        "genes": list(genes),
        "gene_key": gene_key,
        "n_spots_lattice": int(n_spots),
        "n_spots": len(kept),
        "n_transcripts_counted": int(n_total),
        "box": {"y": [float(lo[0]), float(hi[0])], "x": [float(lo[1]), float(hi[1])]},
    }
    obs = pd.DataFrame(
        {
            REGION_KEY: pd.Categorical([key_added] * len(ids), categories=[key_added]),
            INSTANCE_KEY: ids,
            "array_row": array_row[kept],
            "array_col": array_col[kept],
            "n_counts": counts.sum(1),
        },
        index=pd.Index([f"spot_{i}" for i in ids], dtype=str),
    )
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
        obsm={"spatial": centres[:, ::-1].copy()},
    )
    adata.uns[_SPATIAL_META_KEY] = {
        "spot_diameter": diameter,
        "spot_pitch": pitch,
        "lattice": "hex",
        "coordinate_system": cs,
    }
    adata.uns[PROVENANCE_ATTR] = dict(info)
    table = TableModel.parse(adata, region=key_added, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    # all checks done: modify the SpatialData only now
    for key in (key_added, table_key_added):
        if key in sdata:
            del sdata[key]
    sdata.shapes[key_added] = shapes
    sdata.tables[table_key_added] = table
    record(sdata, key_added, info)
    record(sdata, table_key_added, info)
    return table

"""Turn an HR expression raster into an AnnData table (one observation per in-tissue HR pixel)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import INSTANCE_KEY, PROVENANCE_ATTR, REGION_KEY
from .._elements import (
    element_affine,
    get_level,
    get_raster,
    levels,
    pixel_area,
    pixel_centres,
    provenance,
    raster_genes,
    sample_nearest,
    shared_coordinate_system,
    transformations,
)
from .._validate import check_element, check_new_key, element_type

__all__ = ["to_table"]

#: Budget (bytes) for one strip of the raster read into memory at a time.
_STRIP_BYTES = 128 * 2**20
#: Below this fraction of non-zero entries the table's ``X`` is stored as a sparse CSR matrix.
_SPARSE_BELOW = 0.5


def to_table(
    sdata: Any,
    key: str,
    *,
    tissue_mask: None | str | np.ndarray = None,
    min_counts: float = 0.0,
    coordinate_system: str | None = None,
    labels_key: str | None = None,
    table_key: str | None = None,
    level: int = 0,
    inplace: bool = True,
    overwrite: bool = False,
) -> Any:
    """One observation per in-tissue HR pixel of an expression raster, as an :class:`~anndata.AnnData`.

    A pixel is kept when its total counts over all genes exceed ``min_counts`` and it lies in ``tissue_mask``. The
    raster is read strip by strip (lazily, through dask), so only the per-pixel totals and the kept values are held
    in memory.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` holding the raster (e.g. from :func:`stsr.tl.super_resolve`).
    key
        Image element ``(c, y, x)`` with one channel per gene, counts per HR pixel.
    tissue_mask
        Pixels to consider: ``None`` (all), a boolean array of the level's ``(height, width)``, or the key of a
        labels element (or single-channel image) in a coordinate system shared with the raster, whose non-zero
        pixels are tissue (sampled at the HR pixel centres, nearest neighbour), e.g. from
        ``stsr.pp.tissue_mask(..., key_added=...)``.
    min_counts
        Keep pixels whose total counts are strictly greater than this.
    coordinate_system
        Coordinate system of ``obsm["spatial"]``. Default: ``"global"`` if the raster has it, else its only one.
    labels_key
        Key of the labels element with one id per kept pixel (``1..n_obs`` in row-major order, 0 elsewhere).
        Default ``f"{key}_labels"``.
    table_key
        Key of the new table. Default ``f"{key}_table"``.
    level
        Pyramid level of the raster to tabulate (0 = full resolution; coarser levels average neighbouring pixels).
    inplace
        Add the labels element and the table to ``sdata``. With ``False`` only the table is returned (its
        ``region`` still names ``labels_key``) and ``sdata`` is not modified.
    overwrite
        Replace existing elements named ``labels_key`` / ``table_key``.

    Returns
    -------
    :class:`~anndata.AnnData` with

    - ``X``: ``float32`` counts (CSR when less than half the entries are non-zero, else dense), ``var_names`` the
      genes;
    - ``obs``: ``row``, ``col`` (pixel in the level), ``total_counts``, ``region`` (= ``labels_key``,
      categorical) and ``instance_id`` (the label id), indexed by ``"<row>_<col>"``;
    - ``obsm["spatial"]``: ``(x, y)`` pixel centres in ``coordinate_system`` units;
    - ``uns["stsr"]``: source key, level, coordinate system, pixel size and ``min_counts``.

    It is a SpatialData table annotating ``labels_key`` (``region_key="region"``, ``instance_key="instance_id"``) and
    is ready for scanpy (``normalize_total``, ``log1p``, ``pca``, ``neighbors``, ``leiden``) and squidpy
    (``gr.spatial_neighbors(coord_type="grid", n_neighs=4)``, ``gr.spatial_autocorr``). On tables of more than a
    few thousand pixels use ``sc.pp.neighbors(..., transformer="sklearn")`` or pynndescent < 0.7.

    The new elements are added in memory; for a SpatialData backed by a zarr store call
    ``sdata.write_element([labels_key, table_key])`` to persist them.
    """
    import anndata as ad
    from spatialdata.models import Labels2DModel, TableModel
    from spatialdata.transformations import Scale, Sequence

    element = get_raster(sdata, key)
    genes = raster_genes(element)
    arr = get_level(element, level, key)
    level = level % len(levels(element))
    cs = shared_coordinate_system(sdata, [key], coordinate_system, names="raster")
    labels_key = f"{key}_labels" if labels_key is None else labels_key
    table_key = f"{key}_table" if table_key is None else table_key
    if labels_key == table_key:
        raise ValueError(f"labels_key and table_key must differ, both are {labels_key!r}.")
    if inplace:
        check_new_key(sdata, labels_key, overwrite, kind="labels")
        check_new_key(sdata, table_key, overwrite, kind="tables")
        for k in (labels_key, table_key):
            if k == key or (tissue_mask is not None and isinstance(tissue_mask, str) and k == tissue_mask):
                raise ValueError(f"{k!r} is an input of to_table and cannot be overwritten by its output.")
    if not np.isfinite(min_counts):
        raise ValueError(f"min_counts must be a finite number, got {min_counts!r}.")
    h, w = int(arr.sizes["y"]), int(arr.sizes["x"])
    matrix = element_affine(element, cs, key, level)

    mask = _mask(sdata, tissue_mask, (h, w), matrix, cs, key)
    totals = np.asarray(arr.sum("c").values, dtype=np.float64)  # chunk by chunk when dask-backed
    keep = (totals > float(min_counts)) & np.isfinite(totals)
    if mask is not None:
        keep &= mask
    n = int(keep.sum())
    if n == 0:
        raise ValueError(
            f"No pixel of raster {key!r} (level {level}) has total counts > {min_counts}"
            + (" inside the tissue mask" if mask is not None else "")
            + "; lower min_counts or check the mask."
        )
    x = _read_kept(arr, keep, len(genes))
    rows, cols = np.nonzero(keep)
    yc, xc = pixel_centres(matrix, rows, cols)
    ids = np.arange(1, n + 1, dtype=np.int64)

    obs = pd.DataFrame(
        {
            "row": rows.astype(np.int64),
            "col": cols.astype(np.int64),
            "total_counts": totals[rows, cols].astype(np.float32),
            REGION_KEY: pd.Categorical([labels_key] * n),
            INSTANCE_KEY: ids,
        },
        index=pd.Index([f"{r}_{c}" for r, c in zip(rows, cols)], dtype=str),
    )
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.obsm["spatial"] = np.stack([xc, yc], axis=1)
    adata.uns[PROVENANCE_ATTR] = {
        "source": key,
        "level": int(level),
        "coordinate_system": cs,
        "pixel_size": float(np.sqrt(pixel_area(matrix))),
        "min_counts": float(min_counts),
        "tissue_mask": tissue_mask if isinstance(tissue_mask, str) else (None if mask is None else "array"),
        "unit": provenance(sdata, key).get("unit", "counts per HR pixel"),
    }
    adata = TableModel.parse(adata, region=labels_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    if not inplace:
        return adata

    label_img = np.zeros((h, w), dtype=np.uint32 if n < 2**32 - 1 else np.uint64)
    label_img[rows, cols] = ids
    tfs = transformations(element)
    if level:
        full = levels(element)[0]
        ratio = (full.sizes["y"] / h, full.sizes["x"] / w)
        tfs = {k: Sequence([Scale(list(ratio), axes=("y", "x")), t]) for k, t in tfs.items()}
    side = 1024
    labels = Labels2DModel.parse(
        label_img,
        dims=("y", "x"),
        transformations=tfs,
        scale_factors=[2] if min(h, w) >= 4 else None,
        chunks=(min(side, h), min(side, w)),
    )
    for k in (labels_key, table_key):
        if element_type(sdata, k) is not None:
            del sdata[k]
    sdata.labels[labels_key] = labels
    sdata.tables[table_key] = adata
    return adata


def _mask(
    sdata: Any, tissue_mask: Any, shape: tuple[int, int], matrix: np.ndarray, cs: str, key: str
) -> np.ndarray | None:
    """The tissue mask on the raster level's grid (boolean), or ``None``."""
    if tissue_mask is None:
        return None
    if isinstance(tissue_mask, str):
        kind = element_type(sdata, tissue_mask)
        if kind not in ("labels", "images"):
            check_element(sdata, tissue_mask, "labels")  # raises with close matches
            raise ValueError(
                f"tissue_mask {tissue_mask!r} is a {kind[:-1]} element; pass a labels element (or a single-channel "
                "image) key, or a boolean array."
            )
        mask_el = sdata[tissue_mask]
        shared_coordinate_system(sdata, [tissue_mask], cs, names="tissue mask")
        # the coarsest pyramid level of the mask that is still at least as fine as the raster
        level = 0
        for i in range(len(levels(mask_el)) - 1, 0, -1):
            if pixel_area(element_affine(mask_el, cs, tissue_mask, i)) <= pixel_area(matrix) * (1 + 1e-6):
                level = i
                break
        rr, cc = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        yc, xc = pixel_centres(matrix, rr, cc)
        return np.asarray(sample_nearest(mask_el, cs, yc, xc, tissue_mask, level=level)) != 0
    arr = np.asarray(tissue_mask)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"tissue_mask has shape {arr.shape} but the raster {key!r} level has (height, width) {tuple(shape)}; "
            "pass a mask on the raster's grid (e.g. stsr.pp.tissue_mask on the same grid) or a labels element key."
        )
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"tissue_mask must be boolean or numeric, got dtype {arr.dtype}.")
        arr = arr != 0
    return arr


def _read_kept(arr: Any, keep: np.ndarray, n_genes: int) -> Any:
    """Values of the kept pixels, ``(n_kept, n_genes)`` float32, read in horizontal strips of the raster."""
    data = arr.data
    h, w = keep.shape
    itemsize = 4
    row_bytes = max(1, n_genes * w * itemsize)
    strip = max(1, int(_STRIP_BYTES // row_bytes))
    row_chunk = int(data.chunks[1][0]) if hasattr(data, "chunks") else strip
    if strip >= row_chunk:
        strip = (strip // row_chunk) * row_chunk
    parts: list[Any] = []
    nnz = 0
    total = 0
    for r0 in range(0, h, strip):
        r1 = min(h, r0 + strip)
        k = keep[r0:r1]
        if not k.any():
            continue
        block = np.asarray(data[:, r0:r1, :].compute() if hasattr(data, "compute") else data[:, r0:r1, :])
        vals = block[:, k].T.astype(np.float32, copy=False)  # (n_kept_strip, genes), row-major pixel order
        nz = int(np.count_nonzero(vals))
        nnz += nz
        total += vals.size
        parts.append(
            sparse.csr_matrix(vals) if nz < _SPARSE_BELOW * vals.size else np.ascontiguousarray(vals)
        )
    if nnz < _SPARSE_BELOW * total:
        return sparse.vstack([sparse.csr_matrix(p) for p in parts], format="csr", dtype=np.float32)
    return np.vstack([p.toarray() if sparse.issparse(p) else p for p in parts]).astype(np.float32, copy=False)

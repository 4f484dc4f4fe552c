"""Shared builders of the real-data loaders: count tables, spot/cell shapes and count-file readers."""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from stsr._constants import CS_GLOBAL, INSTANCE_KEY, REGION_KEY

#: Key of ``table.uns`` holding the geometry facts of a dataset (spot size, pitch, µm per pixel, ...).
SPATIAL_META_KEY = "spatial_meta"


def _parse_block(
    block: bytes, n_fields: int, first_row: int
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise complete lines of a dense count table; return ids and the (row, col, value) of non-zeros."""
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero((buf == ord("\t")) | (buf == ord("\n")))
    n_rows = block.count(b"\n")
    where = f"Count table rows {first_row + 1}..{first_row + n_rows}"
    if len(ends) != n_rows * n_fields or np.any(buf[ends[n_fields - 1 :: n_fields]] != ord("\n")):
        raise ValueError(f"{where} do not all have {n_fields} fields.")
    starts = np.r_[0, ends[:-1] + 1].reshape(n_rows, n_fields)
    ends = ends.reshape(n_rows, n_fields)
    ids = [block[s:e].decode() for s, e in zip(starts[:, 0], ends[:, 0])]
    vs, ve = starts[:, 1:], ends[:, 1:]
    if np.any(ve <= vs):
        raise ValueError(f"{where} have empty fields.")
    rows, cols = np.nonzero(buf[vs] != ord("0"))  # integer counts other than 0 never start with "0"
    values = np.array([float(block[s:e]) for s, e in zip(vs[rows, cols], ve[rows, cols])], dtype=np.float64)
    return ids, rows + first_row, cols, values


def parse_dense_counts(
    stream: IO[bytes], block_bytes: int = 1 << 20
) -> tuple[sp.csr_matrix, pd.Index, pd.Index]:
    """Parse a dense tab-separated ``observations x genes`` table of counts into a sparse matrix.

    The table's first row holds the gene names (its first field is ignored) and its first column the
    observation ids. Counts may be written as integers (``3``) or integral floats (``3.0``). The stream is read in
    blocks of whole lines, each tokenised with numpy; only fields that do not start with ``"0"`` are converted, so
    the cost scales with the number of non-zeros and the memory with ``block_bytes``, never with the dense table.

    Parameters
    ----------
    stream
        Binary file object positioned at the header line.
    block_bytes
        Approximate size of the line blocks tokenised at once.

    Returns
    -------
    ``(counts, obs_names, var_names)`` with ``counts`` a ``float32`` CSR matrix of the integer counts.

    Raises
    ------
    ValueError
        If a row has the wrong number of fields, a field is empty, or a count is negative or not an integer.
    """
    header = stream.readline().rstrip(b"\r\n").decode().split("\t")
    n_fields = len(header)
    obs_names: list[str] = []
    rows, cols, vals = [], [], []
    while lines := stream.readlines(block_bytes):
        block = b"".join(line.rstrip(b"\r\n") + b"\n" for line in lines if line.strip())
        if not block:
            continue
        ids, r, c, v = _parse_block(block, n_fields, len(obs_names))
        obs_names += ids
        rows.append(r)
        cols.append(c)
        vals.append(v)
    values = np.concatenate(vals) if vals else np.zeros(0)
    if np.any(values < 0) or np.any(values != np.round(values)):
        raise ValueError("The count table holds negative or non-integer values; expected raw UMI counts.")
    counts = sp.csr_matrix(
        (values.astype(np.float32), (np.concatenate(rows or [[]]), np.concatenate(cols or [[]]))),
        shape=(len(obs_names), n_fields - 1),
    )
    counts.sum_duplicates()
    return counts, pd.Index(obs_names, dtype=str), pd.Index(header[1:], dtype=str)


def read_dense_counts(
    path: str | os.PathLike[str], member: str | None = None
) -> tuple[sp.csr_matrix, pd.Index, pd.Index]:
    """Read a dense count TSV (plain, ``.gz``, or one ``member`` of a ``.zip``) with :func:`parse_dense_counts`.

    Parameters
    ----------
    path
        The file.
    member
        For a zip archive: the name of the TSV inside it.

    Returns
    -------
    ``(counts, obs_names, var_names)``, see :func:`parse_dense_counts`.
    """
    path = Path(path)
    if member is not None:
        with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
            return parse_dense_counts(io.BufferedReader(stream, buffer_size=1 << 20))  # C-speed readline
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        return parse_dense_counts(stream)


def count_table(
    counts: Any,
    obs: pd.DataFrame,
    var_names: Iterable[str],
    region: str,
    instance_ids: Iterable[int],
    meta: Mapping[str, Any],
    var: pd.DataFrame | None = None,
) -> ad.AnnData:
    """A :class:`~spatialdata.models.TableModel` table of raw counts annotating one shapes element.

    Parameters
    ----------
    counts
        ``n_obs x n_vars`` raw integer counts (dense or sparse); stored as ``float32`` CSR in ``X``.
    obs
        Observation annotations; its index becomes ``obs_names``.
    var_names
        Gene symbols (made unique).
    region
        Key of the shapes element the rows annotate (stored in ``obs[REGION_KEY]``).
    instance_ids
        Index values of the matching shapes (stored in ``obs[INSTANCE_KEY]``).
    meta
        Dataset geometry facts, stored in ``uns[SPATIAL_META_KEY]``.
    var
        Optional gene annotations, aligned with ``var_names``.

    Returns
    -------
    The parsed table.
    """
    X = sp.csr_matrix(counts, dtype=np.float32)
    obs = obs.copy()
    obs[REGION_KEY] = pd.Categorical([region] * len(obs), categories=[region])
    obs[INSTANCE_KEY] = np.asarray(list(instance_ids), dtype=np.int64)
    names = pd.Index([str(v) for v in var_names], dtype=str)
    if len(names) != X.shape[1]:
        raise ValueError(f"{len(names)} gene names for {X.shape[1]} count columns.")
    var = pd.DataFrame(index=names) if var is None else var.set_axis(names, axis=0)
    table = ad.AnnData(X=X, obs=obs, var=var)
    table.obs_names = table.obs_names.astype(str)
    table.var_names_make_unique()
    table.uns[SPATIAL_META_KEY] = dict(meta)
    return TableModel.parse(table, region=region, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def circles(
    centres_xy_um: np.ndarray, radius_um: float | np.ndarray, index: Iterable[int]
) -> gpd.GeoDataFrame:
    """Circle shapes (points with a ``radius`` column) in the global micrometre frame.

    Parameters
    ----------
    centres_xy_um
        ``(n, 2)`` centres as ``(x, y)`` in µm.
    radius_um
        Radius in µm, scalar or per shape.
    index
        Shape index (the table's instance ids).

    Returns
    -------
    A validated :class:`~spatialdata.models.ShapesModel` element with an identity transformation to ``"global"``.
    """
    centres = np.asarray(centres_xy_um, dtype=np.float64)
    radius = np.broadcast_to(np.asarray(radius_um, dtype=np.float64), (len(centres),)).copy()
    return ShapesModel.parse(
        centres,
        geometry=0,
        radius=radius,
        index=pd.Index(list(index)),
        transformations={CS_GLOBAL: Identity()},
    )


def polygons(geometry: Iterable[shapely.Geometry], index: Iterable[Any]) -> gpd.GeoDataFrame:
    """Polygon shapes in the global micrometre frame (identity transformation to ``"global"``).

    Parameters
    ----------
    geometry
        Shapely polygons, coordinates in µm.
    index
        Shape index.

    Returns
    -------
    A validated :class:`~spatialdata.models.ShapesModel` element.
    """
    gdf = gpd.GeoDataFrame(geometry=list(geometry), index=pd.Index(list(index)))
    return ShapesModel.parse(gdf, transformations={CS_GLOBAL: Identity()})


def fit_pitch_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> tuple[float, float, float]:
    """Spot pitch in pixels per array unit, by a least-squares affine fit of pixel vs array coordinates.

    Parameters
    ----------
    array_xy
        ``(n, 2)`` array coordinates ``(x, y)`` of the spots.
    pixel_xy
        ``(n, 2)`` pixel positions ``(column, row)`` of the same spots.

    Returns
    -------
    ``(pitch_x, pitch_y, max_residual)``: the lengths, in pixels, of one array unit along array x and along
    array y (column norms of the fitted linear map; invariant to a rotation of the grid), and the largest fit
    residual in pixels.
    """
    array_xy = np.asarray(array_xy, dtype=np.float64)
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64)
    design = np.c_[array_xy, np.ones(len(array_xy))]
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)
    residual = np.abs(design @ coef - pixel_xy).max()
    pitch_x, pitch_y = np.linalg.norm(coef[:2], axis=1)
    return float(pitch_x), float(pitch_y), float(residual)

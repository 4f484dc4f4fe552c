"""Choosing the genes to super-resolve."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import sparse

from .._constants import TABLE
from .._validate import check_counts, check_element, check_genes

__all__ = ["select_genes"]

MT_PATTERN = re.compile(r"^mt[-.:_]", re.IGNORECASE)


def _is_ribo(name: str) -> bool:
    return bool(re.match(r"^(RPS|RPL|MRPS|MRPL)\d", name, re.IGNORECASE))


def _pearson_residual_variance(x: Any, theta: float = 100.0, chunk: int = 1000) -> np.ndarray:
    """Variance of analytic Pearson residuals per gene (Lause et al. 2021), gene chunk by gene chunk."""
    n, g = x.shape
    cell_tot = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    gene_tot = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    total = max(cell_tot.sum(), 1e-12)
    clip = np.sqrt(n)
    out = np.zeros(g)
    for s in range(0, g, chunk):
        sl = slice(s, min(s + chunk, g))
        xs = x[:, sl]
        xs = xs.toarray() if sparse.issparse(xs) else np.asarray(xs, dtype=np.float64)
        mu = np.outer(cell_tot, gene_tot[sl]) / total
        res = (xs - mu) / np.sqrt(mu + mu**2 / theta + 1e-12)
        out[sl] = np.clip(res, -clip, clip).var(axis=0)
    return out


def select_genes(
    data: Any,
    n_top: int = 50,
    flavor: Literal["highly_expressed", "highly_variable"] = "highly_expressed",
    exclude_mt: bool = True,
    exclude_ribo: bool = True,
    min_counts: float = 10,
    genes: Sequence[str] | None = None,
    table_key: str = TABLE,
    layer: str | None = None,
) -> list[str]:
    """Choose genes to super-resolve from a table of raw counts.

    Parameters
    ----------
    data
        An :class:`~anndata.AnnData` or a :class:`~spatialdata.SpatialData` (its table ``table_key``).
    n_top
        Number of genes to return (fewer if fewer pass the filters).
    flavor
        ``"highly_expressed"``: largest total counts. ``"highly_variable"``: largest variance of analytic Pearson
        residuals (a negative-binomial null, robust for spot data).
    exclude_mt
        Drop mitochondrial genes (names starting with ``MT-``/``mt-``).
    exclude_ribo
        Drop ribosomal protein genes (``RPS``/``RPL``/``MRPS``/``MRPL`` followed by a digit).
    min_counts
        Minimal total counts of a gene over all observations.
    genes
        Genes that must be included (placed first, validated even if they fail the filters); the rest are filled up
        to ``n_top``.
    table_key
        Table key when ``data`` is a SpatialData.
    layer
        Layer holding raw counts (default ``X``).

    Returns
    -------
    Gene names present in the table.
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        adata, where = data, "the AnnData"
    else:
        adata, where = check_element(data, table_key, "tables"), f"table {table_key!r}"
    if isinstance(n_top, bool) or int(n_top) < 1:
        raise ValueError(f"n_top must be a positive integer, got {n_top!r}.")
    if flavor not in ("highly_expressed", "highly_variable"):
        raise ValueError(f"flavor must be 'highly_expressed' or 'highly_variable', got {flavor!r}.")
    names = [str(g) for g in adata.var_names]
    forced = check_genes(genes, names, where=where) if genes is not None else []
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"{where} has no layer {layer!r}; layers: {list(adata.layers)}.")
    x = adata.layers[layer] if layer is not None else adata.X
    check_counts(x, names, list(map(str, adata.obs_names)), what=f"Counts of {where}")
    totals = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    keep = totals >= min_counts
    if exclude_mt:
        keep &= np.array([not MT_PATTERN.match(g) for g in names])
    if exclude_ribo:
        keep &= np.array([not _is_ribo(g) for g in names])
    if flavor == "highly_expressed":
        score = totals
    else:
        score = np.full(len(names), -np.inf)
        idx = np.flatnonzero(keep)
        if idx.size:
            score[idx] = _pearson_residual_variance(x[:, idx])
    order = [i for i in np.argsort(-score, kind="stable") if keep[i]]
    out = list(forced)
    chosen = set(out)
    for i in order:
        if len(out) >= n_top:
            break
        if names[i] not in chosen:
            out.append(names[i])
            chosen.add(names[i])
    return out

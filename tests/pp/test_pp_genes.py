"""Gene selection: select_genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stsr.pp as pp


def _adata(seed=0):
    rng = np.random.default_rng(seed)
    n = 200
    names = ["MT-CO1", "RPL13", "Rps3", "MRPL12", "KRT8", "EPCAM", "VIM", "CONST", "RARE", "PTPRC", "RPLP0x"]
    means = {"MT-CO1": 80, "RPL13": 60, "Rps3": 50, "MRPL12": 40, "KRT8": 30, "EPCAM": 20, "VIM": 15, "CONST": 25,
             "RARE": 0.01, "PTPRC": 10, "RPLP0x": 5}  # fmt: skip
    x = np.stack([rng.poisson(means[g], n) for g in names], 1).astype(np.float32)
    # PTPRC: highly variable (on in a few spots only); CONST: Poisson, not variable
    x[:, names.index("PTPRC")] = np.where(np.arange(n) < 20, rng.poisson(100, n), 0)
    return ad.AnnData(X=sparse.csr_matrix(x), var=pd.DataFrame(index=names))


def test_highly_expressed_with_exclusions():
    a = _adata()
    got = pp.select_genes(a, n_top=4)
    assert got == ["KRT8", "CONST", "EPCAM", "VIM"]  # expected totals 6000, 5000, 4000, 3000
    totals = np.asarray(a.X.sum(0)).ravel()
    assert all(g not in got for g in ["MT-CO1", "RPL13", "Rps3", "MRPL12"])
    assert [totals[list(a.var_names).index(g)] for g in got] == sorted(
        [totals[list(a.var_names).index(g)] for g in got], reverse=True
    )
    everything = pp.select_genes(a, n_top=50, exclude_mt=False, exclude_ribo=False, min_counts=0)
    assert set(everything) == set(a.var_names) and everything[0] == "MT-CO1"
    assert "RARE" not in pp.select_genes(a, n_top=50)  # min_counts=10
    assert "RPLP0x" in pp.select_genes(a, n_top=50)  # not a ribosomal protein gene pattern (letter after RPL)


def test_forced_genes_and_highly_variable():
    a = _adata()
    got = pp.select_genes(a, n_top=3, genes=["RARE", "VIM"])
    assert got[:2] == ["RARE", "VIM"] and len(got) == 3
    hv = pp.select_genes(a, n_top=1, flavor="highly_variable")
    assert hv == ["PTPRC"]
    assert pp.select_genes(a, n_top=20, flavor="highly_variable")[-1] in {
        "CONST",
        "KRT8",
        "EPCAM",
        "VIM",
        "RPLP0x",
    }


def test_select_genes_from_spatialdata(syn):
    got = pp.select_genes(syn, n_top=3)
    t = syn["table"]
    totals = np.asarray(t.X.sum(0)).ravel()
    assert got == list(t.var_names[np.argsort(-totals, kind="stable")[:3]])


def test_select_genes_errors(syn, unchanged):
    a = _adata()
    with pytest.raises(KeyError, match="'KRT18' \\(did you mean 'KRT8'"):
        pp.select_genes(a, genes=["KRT18"])
    with pytest.raises(ValueError, match="flavor"):
        pp.select_genes(a, flavor="seurat")
    with pytest.raises(ValueError, match="n_top"):
        pp.select_genes(a, n_top=0)
    x = a.X.toarray()
    x[5, 4] = -2
    a.X = x
    with pytest.raises(ValueError, match="negative.*gene 'KRT8' in observation '5'"):
        pp.select_genes(a)
    snap = unchanged.snap(syn)
    with pytest.raises(KeyError, match="Did you mean 'table'"):
        pp.select_genes(syn, table_key="tables")
    unchanged.check(syn, snap)

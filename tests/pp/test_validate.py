"""Shared input checks: stsr._validate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from spatialdata.transformations import Identity, set_transformation

from stsr import _validate as v


def test_check_element(tiny_sd):
    assert v.check_element(tiny_sd, "img", "images") is tiny_sd.images["img"]
    with pytest.raises(
        KeyError, match="No image element 'imag'.*Did you mean 'img'.*Available images: 'img'"
    ):
        v.check_element(tiny_sd, "imag", "images")
    with pytest.raises(KeyError, match="'spots' is a shape element.*image element is needed"):
        v.check_element(tiny_sd, "spots", "images")
    with pytest.raises(KeyError, match="Available points: none"):
        v.check_element(tiny_sd, "transcripts", "points")
    with pytest.raises(ValueError, match="kind"):
        v.check_element(tiny_sd, "img", "image")


def test_check_genes():
    avail = ["Actb", "Gapdh", "Krt8", "Krt18"]
    assert v.check_genes(["Krt8", "Actb", "Krt8"], avail) == ["Krt8", "Actb"]
    assert v.check_genes("Gapdh", avail) == ["Gapdh"]
    with pytest.raises(
        KeyError, match="2 gene\\(s\\) not found in the table: 'KRT8' \\(did you mean 'Krt8'.*'Foo'"
    ):
        v.check_genes(["KRT8", "Foo", "Actb"], avail)
    with pytest.raises(ValueError, match="empty"):
        v.check_genes([], avail)


def test_check_counts():
    genes, obs = ["a", "b", "c"], ["o1", "o2"]
    v.check_counts(np.ones((2, 3)), genes, obs)
    v.check_counts(sparse.csr_matrix(np.ones((2, 3))), genes, obs)
    x = np.ones((2, 3))
    x[1, 2] = -1
    with pytest.raises(ValueError, match="1 negative value.*gene 'c' in observation 'o2'"):
        v.check_counts(x, genes, obs)
    with pytest.raises(ValueError, match="gene 'c' in observation 'o2'"):
        v.check_counts(sparse.csr_matrix(x), genes, obs)
    x[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite.*gene 'b' in observation 'o1'"):
        v.check_counts(x, genes, obs)
    with pytest.raises(ValueError, match="gene 'column 1' in observation 'pixel 0'"):
        v.check_counts(x, None, lambda i: f"pixel {i}")


def test_check_new_key_and_shared_cs(tiny_sd):
    v.check_new_key(tiny_sd, "new")
    v.check_new_key(tiny_sd, "img", overwrite=True)
    with pytest.raises(KeyError, match="already has a image element 'img'"):
        v.check_new_key(tiny_sd, "img")
    with pytest.raises(ValueError, match="empty string"):
        v.check_new_key(tiny_sd, "")
    with pytest.raises(ValueError, match="'a/b' is not a valid element name"):
        v.check_new_key(tiny_sd, "a/b")
    # overwrite=True never replaces an element of another kind
    with pytest.raises(ValueError, match="same kind"):
        v.check_new_key(tiny_sd, "img", overwrite=True, kind="labels")
    # the one resolver
    from stsr._elements import shared_coordinate_system

    assert shared_coordinate_system(tiny_sd, ["img", "spots"]) == "global"
    set_transformation(tiny_sd["spots"], Identity(), to_coordinate_system="aligned")
    assert shared_coordinate_system(tiny_sd, ["img", "spots"], "aligned") == "aligned"
    with pytest.raises(
        ValueError, match="no transformation to coordinate system 'glob'.*Did you mean 'global'"
    ):
        shared_coordinate_system(tiny_sd, ["img", "spots"], "glob")

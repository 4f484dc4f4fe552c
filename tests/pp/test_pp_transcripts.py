"""HR ground truth from transcripts: bin_transcripts."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata.models import PointsModel, get_channel_names
from spatialdata.transformations import Identity, Scale, get_transformation

import stsr.pp as pp


def _affine(tf) -> np.ndarray:
    return np.asarray(tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def _points(n=600, seed=0, lo=(10.0, 20.0), hi=(130.0, 180.0), genes=("Actb", "Krt8", "Epcam")):
    rng = np.random.default_rng(seed)
    y = rng.uniform(lo[0], hi[0], n)
    x = rng.uniform(lo[1], hi[1], n)
    g = rng.choice(list(genes), n)
    df = pd.DataFrame({"x": x, "y": y, "gene": pd.Categorical(g, categories=list(genes))})
    return df


def _parse(df, transformations=None, npartitions=3):
    return PointsModel.parse(
        dd.from_pandas(df, npartitions=npartitions),
        feature_key="gene",
        transformations=transformations or {"global": Identity()},
    )


def test_bin_on_image_grid_exact(tiny_sd, geom):
    df = _points()
    tiny_sd.points["tx"] = _parse(df)
    grid = pp.bin_transcripts(tiny_sd, "tx", 4.0, image_key="img", key_added="truth")
    assert grid == pp.hr_grid(tiny_sd, "img", 4.0)
    el = tiny_sd["truth"]
    assert list(get_channel_names(el)) == ["Actb", "Krt8", "Epcam"]
    got = el["scale0"].image.values
    assert got.dtype == np.float32 and got.shape == (3, 30, 40)
    # expected: floor of the position relative to the image corner in 4 µm pixels
    exp = np.zeros((3, 30, 40))
    r = np.floor((df["y"] - geom.origin[0]) / 4.0).astype(int)
    c = np.floor((df["x"] - geom.origin[1]) / 4.0).astype(int)
    np.add.at(exp, (df["gene"].cat.codes.to_numpy(), r, c), 1)
    np.testing.assert_array_equal(got, exp)
    # the raster overlays the image: same transformations as a raster_element on the grid
    ref = pp.raster_element(exp.astype(np.float32), ["Actb", "Krt8", "Epcam"], grid, tiny_sd, "img")
    for cs, tf in get_transformation(ref, get_all=True).items():
        np.testing.assert_allclose(_affine(get_transformation(el, cs)), _affine(tf))


def test_bin_subset_genes_and_points_transform(tiny_sd, geom):
    df = _points(seed=3)
    # points stored in 0.5 µm units: intrinsic = 2 * µm
    df2 = df.assign(x=df["x"] * 2, y=df["y"] * 2)
    tiny_sd.points["tx"] = _parse(df2, {"global": Scale([0.5, 0.5], axes=("y", "x"))})
    pp.bin_transcripts(tiny_sd, "tx", 4.0, genes=["Epcam", "Actb"], image_key="img")
    got = tiny_sd["hr_truth"]["scale0"].image.values
    for k, gene in enumerate(["Epcam", "Actb"]):
        sel = df["gene"] == gene
        exp = np.zeros((30, 40))
        r = np.floor((df["y"][sel] - geom.origin[0]) / 4.0).astype(int)
        c = np.floor((df["x"][sel] - geom.origin[1]) / 4.0).astype(int)
        np.add.at(exp, (r, c), 1)
        np.testing.assert_array_equal(got[k], exp)


def test_bin_without_image(tiny_sd):
    df = _points(lo=(3.0, -7.0), hi=(50.0, 33.0), seed=5)
    tiny_sd.points["tx"] = _parse(df)
    grid = pp.bin_transcripts(tiny_sd, "tx", 5.0)
    assert grid.origin == (0.0, -10.0) and grid.pixel_size == 5.0
    got = tiny_sd["hr_truth"]["scale0"].image.values
    assert got.sum() == len(df)
    r = np.floor(df["y"] / 5.0).astype(int)
    c = np.floor((df["x"] + 10.0) / 5.0).astype(int)
    exp = np.zeros_like(got)
    np.add.at(exp, (df["gene"].cat.codes.to_numpy(), r, c), 1)
    np.testing.assert_array_equal(got, exp)
    m = _affine(get_transformation(tiny_sd["hr_truth"], "global"))
    np.testing.assert_allclose(m @ [0, 0, 1], [0.0, -10.0, 1.0])
    np.testing.assert_allclose(m @ [1, 1, 1], [5.0, -5.0, 1.0])


def test_bin_drops_outside_with_warning(tiny_sd):
    df = _points(n=50)
    df = pd.concat(
        [
            df,
            pd.DataFrame(
                {"x": [500.0], "y": [5.0], "gene": pd.Categorical(["Actb"], df["gene"].cat.categories)}
            ),
        ]
    )
    tiny_sd.points["tx"] = _parse(df.reset_index(drop=True), npartitions=2)
    with pytest.warns(UserWarning, match="1 transcripts"):
        pp.bin_transcripts(tiny_sd, "tx", 4.0, image_key="img")
    assert tiny_sd["hr_truth"]["scale0"].image.values.sum() == 50


def test_bin_bad_inputs(tiny_sd, unchanged):
    tiny_sd.points["tx"] = _parse(_points())
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(KeyError, match="'Krt18' \\(did you mean 'Krt8'"):
        pp.bin_transcripts(tiny_sd, "tx", 4.0, genes=["Krt18"], image_key="img")
    with pytest.raises(KeyError, match="Did you mean 'tx'"):
        pp.bin_transcripts(tiny_sd, "txx", 4.0)
    with pytest.raises(KeyError, match="no gene column 'feature_name'"):
        pp.bin_transcripts(tiny_sd, "tx", 4.0, gene_key="feature_name")
    with pytest.raises(ValueError, match="positive"):
        pp.bin_transcripts(tiny_sd, "tx", 0.0)
    unchanged.check(tiny_sd, snap)
    tiny_sd.points["tx2"] = _parse(_points(), {"slide": Identity()})
    snap = unchanged.snap(tiny_sd)
    with pytest.raises(
        ValueError,
        match=r"Image 'img' \(coordinate systems \['aligned', 'global'\]\) and points 'tx2' \(coordinate systems \['slide'\]\) share no coordinate system",
    ):
        pp.bin_transcripts(tiny_sd, "tx2", 4.0, image_key="img")
    unchanged.check(tiny_sd, snap)


def test_bin_synthetic_transcripts(syn):
    pts = syn["transcripts"].compute()
    pp.bin_transcripts(syn, "transcripts", 5.5, image_key="he", key_added="binned")
    binned = syn["binned"]["scale0"].image.values
    truth = syn["hr_truth"]["scale0"].image.values
    assert binned.shape == truth.shape
    genes = list(get_channel_names(syn["binned"]))
    assert genes == list(get_channel_names(syn["hr_truth"]))
    per_gene = pts["gene"].value_counts().reindex(genes).fillna(0).to_numpy()
    np.testing.assert_array_equal(binned.sum(axis=(1, 2)), per_gene)  # every transcript lands in one pixel
    # Poisson draws of the truth: totals match within a few standard deviations, no counts off-tissue
    assert abs(binned.sum() - truth.sum()) < 5 * np.sqrt(truth.sum())
    assert binned[:, truth.sum(0) == 0].sum() == 0

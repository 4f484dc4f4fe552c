"""Synthetic LR by block pooling: downsample."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from observations import get_observations
from spatialdata.models import get_channel_names
from spatialdata.transformations import get_transformation

import stsr.pp as pp
from stsr._constants import PROVENANCE_ATTR


def _affine(tf) -> np.ndarray:
    return np.asarray(tf.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), float)


def _add_integer_hr(sdata, key="hr_counts", seed=0):
    truth = sdata["hr_truth"]["scale0"].image.values
    counts = np.random.default_rng(seed).poisson(truth * 5).astype(np.float32)
    genes = list(get_channel_names(sdata["hr_truth"]))
    grid = pp.hr_grid(sdata, "he", 5.5)
    sdata.images[key] = pp.raster_element(counts, genes, grid, sdata, "he")
    return counts, genes


@pytest.mark.parametrize("factor", [1, 4, 7])
def test_downsample_preserves_counts_exactly(syn, factor):
    counts, genes = _add_integer_hr(syn)
    op = pp.downsample(syn, "hr_counts", factor, key_added="lr_blocks")
    lr = syn["lr_blocks"]["scale0"].image.values
    h, w = counts.shape[1:]
    assert lr.shape == (len(genes), -(-h // factor), -(-w // factor)) and lr.dtype == np.float32
    np.testing.assert_array_equal(lr.sum(axis=(1, 2)), counts.sum(axis=(1, 2)))  # exact, per gene
    # block (1, 2) holds the sum of its HR pixels
    np.testing.assert_array_equal(
        lr[:, 1, 2], counts[:, factor : 2 * factor, 2 * factor : 3 * factor].sum(axis=(1, 2))
    )
    assert list(get_channel_names(syn["lr_blocks"])) == genes
    np.testing.assert_allclose(op.pool(counts).reshape(lr.shape), lr)
    obs = get_observations(syn, "lr_blocks")
    np.testing.assert_allclose(obs.counts, lr.reshape(len(genes), -1))
    assert obs.model.kind == "blocks" and obs.model.params["factor"] == factor


def test_downsample_float_truth_totals(syn):
    pp.downsample(syn, "hr_truth", 5)
    hr = syn["hr_truth"]["scale0"].image.values.astype(np.float64)
    lr = syn["lr"]["scale0"].image.values.astype(np.float64)
    np.testing.assert_allclose(lr.sum(axis=(1, 2)), hr.sum(axis=(1, 2)), rtol=1e-6)
    rec = syn.attrs[PROVENANCE_ATTR]["lr"]
    assert rec["kind"] == "blocks" and rec["source"] == "hr_truth" and rec["image_key"] == "he"
    assert rec["lr_grid"]["pixel_size"] == pytest.approx(5 * rec["grid"]["pixel_size"])


def test_downsample_transformations_and_roundtrip(syn, tmp_path):
    pp.downsample(syn, "hr_truth", 4, key_added="lr4")
    hr_tf = get_transformation(syn["hr_truth"], get_all=True)
    lr_tf = get_transformation(syn["lr4"], get_all=True)
    assert set(lr_tf) == set(hr_tf)
    for cs in hr_tf:
        # LR pixel (bi, bj) spans HR pixels [4 bi, 4 bi + 4): same corners and centres in every coordinate system
        for bi, bj in [(0, 0), (3, 5), (18, 18)]:
            np.testing.assert_allclose(
                _affine(lr_tf[cs]) @ [bi + 0.5, bj + 0.5, 1], _affine(hr_tf[cs]) @ [4 * bi + 2, 4 * bj + 2, 1]
            )
    # 1 LR pixel = 4 * 5.5 µm
    np.testing.assert_allclose(np.diag(_affine(lr_tf["global"]))[:2], [22.0, 22.0])
    values = syn["lr4"]["scale0"].image.values
    syn.write(tmp_path / "ds.zarr")
    back = sd.read_zarr(tmp_path / "ds.zarr")
    for cs, tf in get_transformation(back["lr4"], get_all=True).items():
        np.testing.assert_allclose(_affine(tf), _affine(lr_tf[cs]))
    np.testing.assert_array_equal(back["lr4"]["scale0"].image.values, values)
    assert list(get_channel_names(back["lr4"])) == list(get_channel_names(syn["lr4"]))
    assert back.attrs[PROVENANCE_ATTR]["lr4"]["factor"] == 4
    assert get_observations(back, "lr4").model.params["lr_shape"] == (19, 19)


def test_downsample_bad_inputs(syn, unchanged):
    counts, genes = _add_integer_hr(syn)
    snap = unchanged.snap(syn)
    for factor in (0, 2.5, -3):
        with pytest.raises(ValueError, match="positive integer"):
            pp.downsample(syn, "hr_counts", factor)
    with pytest.raises(KeyError, match="Did you mean 'hr_counts'"):
        pp.downsample(syn, "hr_count", 2)
    with pytest.raises(KeyError, match="'spots' is a shape element"):
        pp.downsample(syn, "spots", 2)
    unchanged.check(syn, snap)
    bad = counts.copy()
    bad[2, 10, 11] = -1
    syn.images["bad"] = pp.raster_element(bad, genes, pp.hr_grid(syn, "he", 5.5), syn, "he")
    snap = unchanged.snap(syn)
    with pytest.raises(
        ValueError, match=f"negative.*gene '{genes[2]}' in observation 'pixel \\(y=10, x=11\\)'"
    ):
        pp.downsample(syn, "bad", 2)
    bad[2, 10, 11] = np.nan
    syn.images["bad"] = pp.raster_element(bad, genes, pp.hr_grid(syn, "he", 5.5), syn, "he")
    snap = unchanged.snap(syn)
    with pytest.raises(ValueError, match="NaN"):
        pp.downsample(syn, "bad", 2)
    unchanged.check(syn, snap)
    assert "lr" not in syn

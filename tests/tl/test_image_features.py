"""``image_features=`` of prior_map / super_resolve: embeddings in the SpatialData, wrapped modules, nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
import torch
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import stsr
from stsr.metrics import pearson

GENES = ["gene_000", "gene_001", "gene_002"]


@pytest.fixture(scope="module")
def slide():
    return stsr.datasets.synthetic(size_um=(800, 800), n_genes=3, seed=4)


def _map(sdata, key="stsr_prior"):
    return np.asarray(sdata[key]["scale0"]["image"].values, np.float64)


def _regions_embedding(slide) -> sd.SpatialData:
    """The slide with an element of 'embeddings' that encode its true regions (one-hot), at the regions' grid."""
    labels = np.asarray(slide["regions"]["scale0"]["image"].values)
    n = int(labels.max()) + 1
    onehot = (labels[None] == np.arange(n)[:, None, None]).astype(np.float32)
    emb = Image2DModel.parse(
        onehot,
        dims=("c", "y", "x"),
        c_coords=[f"f{i}" for i in range(n)],
        transformations={"global": get_transformation(slide["regions"]["scale0"]["image"], "global")},
    )
    out = sd.deepcopy(slide)
    out.images["regions_embedding"] = emb
    return out


def test_embeddings_that_encode_the_true_regions_beat_the_densenet(slide):
    sdata = _regions_embedding(slide)
    stsr.tl.prior_map(sdata, "he", GENES, prior_strength=1.0, progress=False)
    dense = _map(sdata)
    stsr.tl.prior_map(
        sdata,
        "he",
        GENES,
        prior_strength=1.0,
        image_features="regions_embedding",
        key_added="emb",
        progress=False,
    )
    emb = _map(sdata, "emb")
    assert sdata.attrs["stsr"]["emb"]["image_features"] == "regions_embedding"
    truth = np.asarray(slide["hr_truth"]["scale0"]["image"].values, np.float64)
    assert truth.shape == emb.shape
    mask = emb.sum(0) > 0
    r_emb, r_dense = pearson(emb, truth, mask).mean(), pearson(dense, truth, mask).mean()
    assert r_emb > r_dense + 0.02, (r_emb, r_dense)


def test_a_wrapped_module_runs_end_to_end_and_its_features_reach_the_read_out(slide):
    def conv(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5, stride=4, padding=2), torch.nn.Tanh())

    a, b = sd.deepcopy(slide), sd.deepcopy(slide)
    stsr.tl.prior_map(a, "he", GENES, prior_strength=1.0, image_features=conv(0), progress=False)
    stsr.tl.prior_map(b, "he", GENES, prior_strength=1.0, image_features=conv(1), progress=False)
    assert a.attrs["stsr"]["stsr_prior"]["image_features"] == "Sequential"
    ma, mb = _map(a), _map(b)
    assert np.isfinite(ma).all() and ma.sum() > 0
    assert not np.allclose(ma, mb, rtol=1e-3)  # other features, another map

    class Constant(torch.nn.Module):  # features that carry nothing: the prior says so
        def forward(self, x):
            return torch.ones(x.shape[0], 2, x.shape[2] // 8, x.shape[3] // 8)

    with pytest.raises(ValueError, match="constant"):
        stsr.tl.prior_map(sd.deepcopy(slide), "he", GENES, image_features=Constant(), progress=False)


def test_nuclei_and_lists_of_features_run_and_bad_embeddings_are_refused(slide):
    sdata = _regions_embedding(slide)
    stsr.tl.prior_map(sdata, "he", GENES, image_features=["nuclei", "regions_embedding"], progress=False)
    prov = sdata.attrs["stsr"]["stsr_prior"]
    assert prov["image_features"] == ["nuclei", "regions_embedding"] and len(prov["teacher_sha256"]) == 64
    with pytest.raises(ValueError, match="twice"):
        stsr.tl.prior_map(
            sdata, "he", GENES, image_features=["nuclei", "nuclei"], key_added="x", progress=False
        )
    with pytest.raises(KeyError, match="nowhere"):
        stsr.tl.prior_map(sdata, "he", GENES, image_features="nowhere", key_added="x", progress=False)
    with pytest.raises(TypeError, match="Accepted"):
        stsr.tl.prior_map(sdata, "he", GENES, image_features=3.0, key_added="x", progress=False)
    assert "x" not in sdata.images

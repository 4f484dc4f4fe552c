"""The prior-guided experiment lives in ``benchmarks/_guided.py``, outside the package: its pairs give the prior map
as the network's input, the guides survive a pair store, a guided model is marked in its config."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stsr
from stsr.models import TrainConfig, TrainingPair
from stsr.models.training import PreparedPair, draw_batch
from stsr.observation import ObservationModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _guided as G  # noqa: E402


def _pair(guide_factor: float = 3.0) -> G.GuidedPair:
    rng = np.random.default_rng(0)
    img = rng.random((3, 4 * 24, 4 * 24)).astype(np.float32)
    hr = rng.gamma(2.0, 1.0, size=(2, 24, 24)).astype(np.float32)
    return G.GuidedPair(
        img, hr, ObservationModel.blocks((24, 24), 4), ["a", "b"], name="g", guide=guide_factor * hr
    )


def test_a_guided_pair_gives_its_guide_as_the_network_input_cropped_like_the_truth():
    cfg = TrainConfig(batch_size=8, tile_size=16, genes_per_batch=2, progress=False)
    batch = draw_batch([PreparedPair(_pair())], cfg, 4, torch.Generator().manual_seed(0))
    assert torch.allclose(batch["density"], 3 * batch["hr"], atol=1e-5)
    # a plain pair of the same slide gets the interpolation of its LR instead
    p = _pair()
    plain = TrainingPair(p.image, p.hr, p.observation, p.genes)
    batch = draw_batch([PreparedPair(plain)], cfg, 4, torch.Generator().manual_seed(0))
    assert not torch.allclose(batch["density"], 3 * batch["hr"], atol=1e-2)


def test_guided_pair_validation():
    p = _pair()
    with pytest.raises(ValueError, match="pass guide="):
        G.GuidedPair(p.image, p.hr, p.observation, p.genes)
    with pytest.raises(ValueError, match="guide must have the shape"):
        G.GuidedPair(p.image, p.hr, p.observation, p.genes, guide=p.hr[:1])
    with pytest.raises(ValueError, match="guide must hold finite, non-negative"):
        G.GuidedPair(p.image, p.hr, p.observation, p.genes, guide=-p.hr)


def test_guides_survive_a_pair_store(tmp_path):
    p = _pair(2.0)
    q = TrainingPair(p.image, p.hr, p.observation, p.genes, name="plain")
    stsr.models.save_pairs([p, q], tmp_path / "store")
    G.save_guides([p, q], tmp_path / "store")
    back = G.load_guided(tmp_path / "store")
    assert isinstance(back[0], G.GuidedPair) and not isinstance(back[1], G.GuidedPair)
    np.testing.assert_allclose(back[0].guide.numpy(), p.guide.numpy(), rtol=1e-3)
    # the package's own loader knows nothing of guides
    assert not any(isinstance(x, G.GuidedPair) for x in stsr.models.load_pairs(tmp_path / "store"))


def test_a_guided_model_is_marked_in_its_config():
    # super_resolve refuses a model so marked (tests/tl/test_super_resolve.py)
    model = stsr.models.load("fast")
    assert G.lr_input(model) == "interpolation"
    G.mark_guided(model)
    assert G.lr_input(model) == "prior_guide" and model.config.extra["prior_strength"] == 0.5

"""The semantic prior's feature moments and scores are computed a block of pixels at a time (bounded float64
memory): the same values as on all pixels at once."""

from __future__ import annotations

import numpy as np
import pytest

from stsr.models import _prior
from stsr.models._prior import FeatureMoments, pca_scores


def test_moments_and_scores_in_blocks_equal_the_whole(monkeypatch):
    rng = np.random.default_rng(0)
    big = rng.normal(size=(7, 40, 50)).astype(np.float32) * np.arange(1, 8, dtype=np.float32)[:, None, None]
    x = big[:, 5:35, 3:43]  # a view, as a window's features with their halo cropped
    mask = rng.random((30, 40)) < 0.6
    monkeypatch.setattr(_prior, "MOMENT_COLUMNS", 50)  # many blocks, the last one partial
    blocks = FeatureMoments(7)
    blocks.add(x, mask)
    blocks.add(x[:, :4, :].reshape(7, -1))  # (D, n) columns, no mask
    pixels = np.concatenate([x[:, mask], x[:, :4, :].reshape(7, -1)], axis=1).astype(np.float64)
    assert blocks.n == pixels.shape[1] == mask.sum() + 160
    np.testing.assert_allclose(blocks.total, pixels.sum(1), rtol=1e-12)
    np.testing.assert_allclose(blocks.outer, pixels @ pixels.T, rtol=1e-12)
    mean, scale, axes = blocks.pca(3)
    np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-12)
    np.testing.assert_allclose(scale, pixels.std(1), rtol=1e-10)
    scores = pca_scores(x, mean, scale, axes)
    whole = axes.T @ ((x.reshape(7, -1).astype(np.float64) - mean[:, None]) / scale[:, None])
    assert scores.shape == (3, 30, 40) and scores.dtype == np.float64
    np.testing.assert_allclose(scores.reshape(3, -1), whole, rtol=1e-12, atol=1e-12)
    # the principal axes of the fitted pixels: their scores are uncorrelated, with variances in decreasing order
    fitted = np.cov(pca_scores(pixels, mean, scale, axes))
    np.testing.assert_allclose(fitted - np.diag(np.diag(fitted)), 0.0, atol=1e-9)
    assert fitted[0, 0] > fitted[1, 1] > fitted[2, 2] > 0
    with pytest.raises(ValueError, match="mask must have the shape"):
        blocks.add(x, mask[:, :-1])

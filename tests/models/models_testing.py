"""Helpers of the model tests: a tiny network configuration and procedural training pairs (not a test module)."""

from __future__ import annotations

import numpy as np

from stsr.models import ModelConfig, TrainingPair
from stsr.observation import ObservationModel

_COLOURS = np.array([[0.30, 0.15, 0.50], [0.85, 0.30, 0.45], [0.35, 0.70, 0.85]])
_BACKGROUND = np.array([0.95, 0.90, 0.92])


def tiny_config(**changes) -> ModelConfig:
    """A very small network (a few hundred thousand parameters) that trains on CPU in seconds."""
    base = dict(
        width=16,
        hist_width=16,
        time_dim=32,
        shared_dim=16,
        distill_dim=16,
        align_dim=8,
        disc_width=8,
        groups=4,
        n_heads=2,
        n_tokens=4,
        coexpr_grid=4,
    )
    base.update(changes)
    return ModelConfig(**base)


def synthetic_slide(seed: int, shape=(64, 64), k: int = 4, n_genes: int = 6):
    """Procedural 'tissue': coloured cells of 3 types; gene g is expressed in the cells of type ``g % 3``.

    Returns ``image (3, k*H, k*W)`` in [0, 1], ``hr (G, H, W)`` expected counts per HR pixel and the gene loadings.
    The fine structure of ``hr`` (cell positions and types) is visible only in the image.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    n_cells = h * w // 10
    centres = rng.uniform(0, [h, w], (n_cells, 2))
    radii = rng.uniform(0.8, 2.0, n_cells)
    types = rng.integers(0, 3, n_cells)
    occ = np.zeros((3, k * h, k * w))
    yy = (np.arange(k * h) + 0.5) / k
    xx = (np.arange(k * w) + 0.5) / k
    for (cy, cx), r, t in zip(centres, radii, types):
        r0, r1 = max(int((cy - r - 1) * k), 0), min(int((cy + r + 1) * k) + 1, k * h)
        c0, c1 = max(int((cx - r - 1) * k), 0), min(int((cx + r + 1) * k) + 1, k * w)
        d = np.sqrt((yy[r0:r1, None] - cy) ** 2 + (xx[None, c0:c1] - cx) ** 2)
        soft = 1 / (1 + np.exp(-(r - d) * 2 * k))
        occ[t, r0:r1, c0:c1] = np.maximum(occ[t, r0:r1, c0:c1], soft)
    occ = np.minimum(occ, 1.0)
    total = np.minimum(occ.sum(0), 1.0)
    scale = np.where(occ.sum(0) > 0, total / np.maximum(occ.sum(0), 1e-9), 0)
    occ = occ * scale
    image = _BACKGROUND[:, None, None] * (1 - total) + np.einsum("tc,thw->chw", _COLOURS, occ)
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
    frac = occ.reshape(3, h, k, w, k).mean(axis=(2, 4))  # area fraction of each type per HR pixel
    loadings = np.full((n_genes, 3), 0.1)
    for g in range(n_genes):
        loadings[g, g % 3] = 2.0 + 2.0 * (g // 3)
    hr = np.einsum("gt,thw->ghw", loadings, frac) + 0.05
    return image, hr.astype(np.float32), loadings


def synthetic_pair(seed: int, shape=(64, 64), factor: int = 4, k: int = 4, n_genes: int = 6) -> TrainingPair:
    """A :class:`TrainingPair` of :func:`synthetic_slide` with ``factor x factor`` block observations."""
    image, hr, _ = synthetic_slide(seed, shape, k, n_genes)
    op = ObservationModel.blocks(shape, factor)
    return TrainingPair(image, hr, op, [f"gene{i}" for i in range(n_genes)], name=f"synthetic{seed}")

"""The semantic prior of a whole slide, computed window by window with bounded memory (for ``super_resolve``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from tqdm.auto import tqdm

from ..models.prior import (
    FeatureMoments,
    fit_readout,
    pca_scores,
    prior_weights,
    readout,
    usable_components,
)
from ..observation import ObservationModel
from ._image_tiles import ImageSource
from ._inputs import SlideInputs

#: Image pixels per HR pixel that the teacher reads by default: 0.69 µm per pixel at the 5.5 µm HR pixel of Visium,
#: near :data:`stsr.models.TEACHER_UM_PER_PX`.
PRIOR_IMAGE_SCALE = 8
#: HR pixels per side of the windows the teacher reads, and the context read around each window (multiples of 16, so
#: that the teacher's stride-16 cells of every window line up with those of the whole image at any image scale).
PRIOR_WINDOW = 256
PRIOR_HALO = 32
#: The principal axes are fitted on at most this many windows, spread evenly over the tissue (all of them on small
#: slides); the read-out itself is fitted on every spot.
PRIOR_PCA_WINDOWS = 8
#: Features of the windows read for the principal axes are kept for the second pass up to this many bytes (all of
#: them on slides of a few windows, which then go through the teacher once; larger slides keep some and read the
#: rest again).
PRIOR_FEATURE_CACHE_BYTES = 256 * 2**20


@dataclass
class SlidePrior:
    """The read-out of one slide: principal-component scores of the teacher features on the HR grid and the
    per-gene ridge coefficients fitted on the spots.

    Attributes
    ----------
    scores
        ``(k, height, width)`` float32 scores (zero outside the windows that hold tissue): in memory, or a zarr array
        read window by window.
    coef, intercept
        ``(k, G)`` and ``(G,)`` read-out of ``log1p(count per pixel)``.
    teacher_hash
        SHA-256 of the teacher's weights file.
    """

    scores: np.ndarray | zarr.Array
    coef: np.ndarray
    intercept: np.ndarray
    teacher_hash: str

    def reweight(self, mean: da.Array, strength: float) -> da.Array:
        """``mean * (prior + 1e-3) ** strength``, chunk by chunk (the caller restores the spot sums)."""

        def block(b: np.ndarray, block_info=None) -> np.ndarray:
            (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
            prior = readout(self.scores[:, r0:r1, c0:c1], self.coef, self.intercept)
            return (b * prior_weights(prior, strength)).astype(b.dtype)

        return mean.map_blocks(block, dtype=mean.dtype)

    def weights(self, r0: int, c0: int, h: int, w: int, strength: float) -> np.ndarray:
        """``(G, h, w)`` prior weights ``(prior + 1e-3) ** strength`` of a window (1 where it leaves the grid)."""
        out = np.ones((self.coef.shape[1], h, w))
        height, width = self.scores.shape[1:]
        ra, ca = max(r0, 0), max(c0, 0)
        rb, cb = min(r0 + h, height), min(c0 + w, width)
        if rb > ra and cb > ca:
            prior = readout(self.scores[:, ra:rb, ca:cb], self.coef, self.intercept)
            out[:, ra - r0 : rb - r0, ca - c0 : cb - c0] = prior_weights(prior, strength)
        return out


@dataclass
class SlideGuide:
    """The LR input of a prior-guided model (:func:`stsr.models.prior_guide`), window by window.

    ``interpolate(lr) * weights`` on the tissue (``mask``; the densities are counts per tissue pixel), each
    observation's pixels rescaled so that they pool to its count and the pixels between observations by the
    interpolated scales around them (``ObservationModel.pixel_factors``): the scale of every observation is fitted
    once over the slide (:func:`slide_guide`), then any window is computed on demand.
    """

    #: the spots' operator on the HR grid, their ``(G, n_obs)`` counts and the ``(height, width)`` tissue mask (only
    #: these, not the slide's inputs, so that a window task sent to a dask cluster carries no image or SpatialData)
    observation: ObservationModel
    lr: np.ndarray
    mask: np.ndarray
    prior: SlidePrior
    strength: float
    #: ``(G, n_obs)``: per observation, ``lr / pooled(interpolation x weights)``
    scale: np.ndarray
    #: ``(n_obs,)`` tissue area of each observation (``ObservationModel.tissue_area``)
    area: np.ndarray

    def reweighted(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(G, h, w)`` interpolation x prior weights on the tissue of a window, before the spot scales."""
        op, mask = self.observation, self.mask
        base = np.clip(op.interpolate(self.lr, window=(r0, c0, h, w), area=self.area), 1e-9, None)
        tissue = np.zeros((h, w))
        ra, ca = max(r0, 0), max(c0, 0)
        rb, cb = min(r0 + h, mask.shape[0]), min(c0 + w, mask.shape[1])
        if rb > ra and cb > ca:
            tissue[ra - r0 : rb - r0, ca - c0 : cb - c0] = mask[ra:rb, ca:cb]
        return base * self.prior.weights(r0, c0, h, w, self.strength) * tissue

    def window(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(G, h, w)`` guide of a window (which may reach beyond the grid, like the tiles)."""
        factors = self.observation.pixel_factors(self.scale, window=(r0, c0, h, w))
        return (self.reweighted(r0, c0, h, w) * factors).astype(np.float32)


def slide_guide(inputs: SlideInputs, prior: SlidePrior, strength: float) -> SlideGuide:
    """Fit the per-observation scales of the guide in one pass over the grid, in windows of :data:`PRIOR_WINDOW`.

    Equal to :func:`stsr.models.prior_guide` of the whole slide with ``mask=inputs.mask`` for disjoint observations
    (spot disks, blocks); memory: one window of ``G`` maps plus ``G x n_obs`` sums.
    """
    op = inputs.observation
    height, width = op.shape
    lr = np.asarray(inputs.lr, np.float64)
    guide = SlideGuide(
        op,
        lr,
        inputs.mask,
        prior,
        strength,
        np.ones((len(inputs.genes), op.n_obs)),
        op.tissue_area(inputs.mask),
    )
    pooled = np.zeros((len(inputs.genes), op.n_obs))
    for r0 in range(0, height, PRIOR_WINDOW):
        for c0 in range(0, width, PRIOR_WINDOW):
            h, w = min(PRIOR_WINDOW, height - r0), min(PRIOR_WINDOW, width - c0)
            pooled += op.pool_window(guide.reweighted(r0, c0, h, w), r0, c0)
    ok = pooled > 0
    guide.scale = np.where(ok, lr / np.where(ok, pooled, 1.0), 1.0)
    return guide


def _windows(mask: np.ndarray, size: int) -> list[tuple[int, int, int, int]]:
    h, w = mask.shape
    return [
        (r, c, min(size, h - r), min(size, w - c))
        for r in range(0, h, size)
        for c in range(0, w, size)
        if mask[r : r + size, c : c + size].any()
    ]


def slide_prior(
    inputs: SlideInputs,
    source: ImageSource,
    *,
    n_components: int = 5,
    progress: bool = False,
    store: str | Path | None = None,
    device: Any = "cpu",
) -> SlidePrior:
    """Fit the semantic prior of a slide (:func:`stsr.models.semantic_prior`, window by window).

    The teacher reads the image through ``source`` (:data:`PRIOR_IMAGE_SCALE` image pixels per HR pixel in
    ``super_resolve`` and ``prior_map``) in windows of :data:`PRIOR_WINDOW` HR
    pixels with :data:`PRIOR_HALO` pixels of context. A first pass over at most :data:`PRIOR_PCA_WINDOWS` windows
    spread over the tissue (all of them on small slides) accumulates the feature moments of the tissue pixels
    (``inputs.mask``) for the principal axes; a second pass over every window stores the ``k`` scores per pixel and
    sums them per spot; the ridge is fitted on the spots. The features of the first pass are kept for the second up
    to :data:`PRIOR_FEATURE_CACHE_BYTES`, so a slide of a few windows goes through the teacher once. Memory: one
    window through the teacher (its activations grow with the window's image pixels: about 850 MB for 2240 x 2240,
    a full window at 7 image pixels per HR pixel), the kept features, the features of one window
    (``TEACHER_CHANNELS`` float32 per pixel, 100 MB) and its scores, a few bytes per HR pixel (the tissue areas of
    the spots are pooled from the mask) and, without ``store``, ``k`` floats per HR pixel
    (``benchmarks/prior_map_memory.py``).

    With ``store`` (a path for a new zarr array, replaced if it exists), the scores are written there window by
    window and read back window by window: nothing slide-sized stays in memory, and a task that reads the prior on a
    dask cluster carries a reference to the array, not the array (the workers must see the path, as they see the
    staging store the results are written to). The teacher runs on ``device`` (a torch device or its name).
    """
    from ..models import load_teacher, teacher_features

    teacher = load_teacher()
    if str(device) != "cpu":  # a copy: the cached teacher stays on the CPU
        import copy

        teacher = copy.deepcopy(teacher).to(device)
    op, mask = inputs.observation, inputs.mask
    height, width = mask.shape
    windows = _windows(mask, PRIOR_WINDOW)

    def features(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        ra, ca = max(r0 - PRIOR_HALO, 0), max(c0 - PRIOR_HALO, 0)
        rb, cb = min(r0 + h + PRIOR_HALO, height), min(c0 + w + PRIOR_HALO, width)
        image = source.region(ra, ca, rb - ra, cb - ca)
        whole = 16 * -(-max(image.shape[1:]) // 16)  # the window in one piece: no second halo inside
        f = teacher_features(image, (rb - ra, cb - ca), teacher=teacher, tile=whole)
        # a copy of the window alone: a view would keep the halo's features alive (about 1.6 x the window's)
        return np.ascontiguousarray(f[:, r0 - ra : r0 - ra + h, c0 - ca : c0 - ca + w])

    if not windows:
        raise ValueError(
            "the slide has no tissue pixels to fit the semantic prior on; check the image and spots, or leave "
            "semantic_prior off."
        )
    pca_windows = [
        windows[i] for i in np.unique(np.linspace(0, len(windows) - 1, PRIOR_PCA_WINDOWS).round().astype(int))
    ]
    kept: dict[tuple[int, int, int, int], np.ndarray] = {}
    room = PRIOR_FEATURE_CACHE_BYTES
    bar = tqdm(
        total=len(pca_windows) + len(windows), desc="semantic prior", unit="window", disable=not progress
    )
    moments: FeatureMoments | None = None
    for window in pca_windows:
        r0, c0, h, w = window
        f = features(*window)
        moments = FeatureMoments(f.shape[0]) if moments is None else moments
        moments.add(f, mask[r0 : r0 + h, c0 : c0 + w])
        if f.nbytes <= room:
            kept[window], room = f, room - f.nbytes
        del f  # not held while the teacher reads the next window
        bar.update()
    n_pix = op.tissue_area(mask)
    mean, scale, axes = moments.pca(usable_components(n_components, n_pix))
    shape = (axes.shape[1], height, width)
    if store is None:
        scores: np.ndarray | zarr.Array = np.zeros(shape, np.float32)
    else:  # one chunk per window: the windows start on multiples of PRIOR_WINDOW
        scores = zarr.create_array(
            store=str(store),
            shape=shape,
            chunks=(shape[0], PRIOR_WINDOW, PRIOR_WINDOW),
            dtype="float32",
            fill_value=0.0,
            overwrite=True,
        )
    obs_sums = np.zeros((axes.shape[1], op.n_obs))
    for window in sorted(windows, key=lambda win: win not in kept):  # the kept ones first, to free them early
        r0, c0, h, w = window
        f = kept.pop(window) if window in kept else features(*window)
        z = pca_scores(f, mean, scale, axes)
        scores[:, r0 : r0 + h, c0 : c0 + w] = z.astype(np.float32)
        obs_sums += op.pool_window(z * mask[r0 : r0 + h, c0 : c0 + w], r0, c0)
        del f, z
        bar.update()
    bar.close()
    coef, intercept = fit_readout(obs_sums / np.where(n_pix > 0, n_pix, 1.0), n_pix, inputs.lr)
    return SlidePrior(scores, coef, intercept, teacher.weights_hash)

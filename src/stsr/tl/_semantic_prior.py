"""The semantic prior of a whole slide, computed window by window with bounded memory (for ``super_resolve``)."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from dask.base import tokenize
from tqdm.auto import tqdm

from ..models import teacher_features
from ..models.prior import (
    DenseNetEncoder,
    NucleiEncoder,
    PriorReweighting,
    SlidePrior,
    fit_prior,
    resolve_image_features,
    tissue_windows,
    usable_components,
)
from ._embeddings import EmbeddingSource
from ._image_tiles import ImageSource
from ._inputs import SlideInputs

#: HR pixels per side of the windows the features are read in (a multiple of 16, so that the teacher's stride-16 cells
#: of every window line up with those of the whole image at any image scale), and the context the encoders other than
#: the teacher read around each window (the teacher reads its own, :func:`_teacher_halo`).
PRIOR_WINDOW = 256
PRIOR_HALO = 32
#: The principal axes are fitted on at most this many windows, spread evenly over the tissue (all of them on small
#: slides); the read-out itself is fitted on every spot.
PRIOR_PCA_WINDOWS = 8
#: Features of the windows read for the principal axes are kept for the second pass up to this many bytes (all of
#: them on slides of a few windows, which then go through the teacher once; larger slides keep some and read the
#: rest again).
PRIOR_FEATURE_CACHE_BYTES = 256 * 2**20
#: Pieces of image (pixels a side, plus the teacher's halo of ``DenseNetEncoder.halo_px`` on each side) the teacher
#: reads at once. Pieces without tissue are skipped, so smaller pieces skip more of the background, larger ones read
#: less halo; its memory is about 250 MB per piece at 1024.
TEACHER_TILE = 1024
#: The principal-component scores of the slides fitted last in this process are kept (up to this many bytes in all,
#: ``k`` float32 per HR pixel a slide: 9 MB for HER2ST C2 at 10 µm, 28 MB for a Visium capture area at 5.5 µm) for
#: the next call on the same slide: same image, HR grid, tissue and features. The scores depend on the histology
#: alone, the read-out on the genes, so a second call (other genes, ``prior_map`` then ``super_resolve``, another
#: ``key_added``) refits the read-out on its genes and reads no image (``benchmarks/repeat_call.py``).
PRIOR_SCORES_CACHE_BYTES = 256 * 2**20

log = logging.getLogger("stsr")


class _ScoresCache:
    """Least recently used slides' prior scores, bounded in bytes (:data:`PRIOR_SCORES_CACHE_BYTES`)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, scores: np.ndarray) -> None:
        self._items.pop(key, None)
        if scores.nbytes > PRIOR_SCORES_CACHE_BYTES:
            return
        while (
            self._items
            and sum(a.nbytes for a in self._items.values()) + scores.nbytes > PRIOR_SCORES_CACHE_BYTES
        ):
            self._items.popitem(last=False)
        scores = np.array(scores, np.float32)
        scores.flags.writeable = False  # shared by the calls that reuse it
        self._items[key] = scores

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_SCORES = _ScoresCache()


def clear_scores_cache() -> None:
    """Forget the prior scores kept for later calls (:data:`PRIOR_SCORES_CACHE_BYTES`)."""
    _SCORES.clear()


def _scores_key(
    inputs: SlideInputs, source: ImageSource, encoders: list[Any], n_components: int, device: Any
) -> str | None:
    """What the slide's prior scores depend on: the image's pixels (dask's token of each level: its graph name for a
    lazy image, a hash of the values for an in-memory one), its placement, the HR grid, the scale the image is read
    at, the tissue mask, the features (their fingerprints) and the settings of the fit. None (no reuse) when an
    encoder has no fingerprint of its weights (a plain callable)."""
    if any("unhashed" in str(getattr(e, "fingerprint", "unhashed")) for e in encoders):
        return None
    levels = inputs.image_levels
    mask = np.asarray(inputs.mask, bool)
    return tokenize(
        features_fingerprint(encoders),
        [getattr(level, "data", level) for level in levels],
        np.asarray(getattr(levels, "to_image", np.eye(3)), float),
        inputs.grid.shape,
        inputs.grid.pixel_size,
        inputs.grid.origin,
        source.image_scale,
        mask.shape,
        np.packbits(mask),
        n_components,
        PRIOR_WINDOW,
        PRIOR_HALO,
        PRIOR_PCA_WINDOWS,
        str(device),
    )


@dataclass
class SlideGuide:
    """The prior map of a slide, window by window: the spot densities interpolated onto the tissue
    (:meth:`ObservationModel.interpolate` with the tissue areas) and reweighted by the prior
    (:class:`stsr.models.prior.PriorReweighting`, whose factors :func:`slide_guide` fits in one pass over the grid).

    It holds only the operator, the counts, the mask and the prior, not the slide's inputs, so that a window task
    sent to a dask cluster carries no image or SpatialData.
    """

    reweighting: PriorReweighting
    #: ``(n_obs,)`` tissue area of each observation (``ObservationModel.tissue_area``)
    area: np.ndarray

    def base(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(G, h, w)`` interpolated densities (counts per tissue pixel) of a window, before the prior."""
        rw = self.reweighting
        return rw.observation.interpolate(rw.lr, window=(r0, c0, h, w), area=self.area)

    def window(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(G, h, w)`` map of a window (which may reach beyond the grid, like the tiles)."""
        return self.reweighting.apply(self.base(r0, c0, h, w), r0, c0).astype(np.float32)


def slide_guide(inputs: SlideInputs, prior: SlidePrior, strength: float) -> SlideGuide:
    """Fit the factors of the prior map in one pass over the grid, in windows of :data:`PRIOR_WINDOW`.

    Equal to :func:`stsr.models.prior_guide` of the whole slide with ``mask=inputs.mask``; memory: one window of
    ``G`` maps plus ``G x n_obs`` sums.
    """
    op = inputs.observation
    reweighting = PriorReweighting(
        op,
        inputs.lr,
        lambda r0, c0, h, w: prior.weights(r0, c0, h, w, strength),
        np.asarray(inputs.mask, np.float64),
    )
    guide = SlideGuide(reweighting, op.tissue_area(inputs.mask))
    height, width = op.shape
    sums = [np.zeros((len(inputs.genes), op.n_obs)) for _ in range(2)]
    for r0 in range(0, height, PRIOR_WINDOW):
        for c0 in range(0, width, PRIOR_WINDOW):
            h, w = min(PRIOR_WINDOW, height - r0), min(PRIOR_WINDOW, width - c0)
            for total, part in zip(sums, reweighting.pooled(guide.base(r0, c0, h, w), r0, c0)):
                total += part
    reweighting.fit(*sums)
    return guide


def image_encoders(inputs: SlideInputs, image_features: Any, device: Any = "cpu") -> list[Any]:
    """The feature extractors of ``image_features`` for a slide: ``"densenet121"`` (the ImageNet DenseNet teacher),
    ``"nuclei"`` (nuclear morphology, no weights), a torch module or callable (RGB tile -> feature map), the key of
    an image element of precomputed embeddings in ``inputs.sdata`` (read on the grid), or a list of these
    (:func:`stsr.models.prior.resolve_image_features`)."""
    out = []
    for enc in resolve_image_features(image_features, device=device):
        if isinstance(enc, str):
            enc = EmbeddingSource.from_sdata(
                inputs.sdata,
                enc,
                inputs.grid,
                inputs.coordinate_system,
                frame_to_cs=inputs.spots.frame.to_cs,
                mask=inputs.mask,
            )
        elif isinstance(enc, NucleiEncoder):  # areas in µm² at the resolution the window is read at
            k = max(1, int(round(inputs.um_per_px / enc.um_per_px)))
            enc = NucleiEncoder(inputs.um_per_px / k, threshold=enc.threshold)
        out.append(enc)
    return out


def features_fingerprint(encoders: list[Any]) -> str:
    """One SHA-256 for the features: the teacher's weights hash when it is the DenseNet alone."""
    if len(encoders) == 1 and isinstance(encoders[0], DenseNetEncoder):
        return encoders[0].fingerprint
    import hashlib

    return hashlib.sha256("|".join(e.fingerprint for e in encoders).encode()).hexdigest()


def describe_features(image_features: Any) -> Any:
    """``image_features`` for provenance: names and keys as they are, modules by their class."""
    items = image_features if isinstance(image_features, list | tuple) else [image_features]
    out = [x if isinstance(x, str) else type(x).__name__ for x in items]
    return out[0] if len(out) == 1 else out


def _teacher_halo(halo_px: int, image_scale: int) -> int:
    """HR pixels of context around a window for the image teacher: the fewest that hold ``halo_px`` image pixels and
    a multiple of 16 of them (the windows start at multiples of 16 HR pixels, so every window's image then starts on
    the teacher's cell grid of the whole image)."""
    step = 16 // math.gcd(int(image_scale), 16)
    pixels = -(-int(halo_px) // int(image_scale))  # HR pixels that hold halo_px image pixels
    return step * -(-pixels // step)


def teacher_window(
    encoder: DenseNetEncoder, source: ImageSource, mask: np.ndarray, window: tuple[int, int, int, int]
) -> np.ndarray:
    """``(TEACHER_CHANNELS, h, w)`` DenseNet features of the window ``(r0, c0, h, w)`` of the grid, as
    :func:`slide_prior` reads them: the window's image with its own halo of context (:func:`_teacher_halo`), in pieces
    of :data:`TEACHER_TILE` image pixels, only those that hold tissue of the window (``mask``, the grid's; the
    features elsewhere are 0)."""
    r0, c0, h, w = window
    height, width = mask.shape
    th = _teacher_halo(encoder.halo_px, source.image_scale)
    ta, tc = max(r0 - th, 0), max(c0 - th, 0)
    tb, td = min(r0 + h + th, height), min(c0 + w + th, width)
    needed = np.zeros((tb - ta, td - tc), bool)
    needed[r0 - ta : r0 - ta + h, c0 - tc : c0 - tc + w] = mask[r0 : r0 + h, c0 : c0 + w]
    f = teacher_features(
        source.region(ta, tc, tb - ta, td - tc),
        (tb - ta, td - tc),
        teacher=encoder.teacher,
        tile=TEACHER_TILE,
        halo=encoder.halo_px,
        needed=needed,
    )
    return np.ascontiguousarray(f[:, r0 - ta : r0 - ta + h, c0 - tc : c0 - tc + w])


def slide_prior(
    inputs: SlideInputs,
    source: ImageSource,
    *,
    n_components: int = 5,
    progress: bool = False,
    store: str | Path | None = None,
    device: Any = "cpu",
    image_features: Any = "densenet121",
) -> SlidePrior:
    """Fit the semantic prior of a slide (:func:`stsr.models.semantic_prior`, window by window).

    The teacher reads the image through ``source`` (at :func:`stsr.tl._inputs.teacher_image_scale` image pixels per
    HR pixel in ``super_resolve`` and ``prior_map``: about :data:`stsr.models.TEACHER_UM_PER_PX` µm each) in windows of
    :data:`PRIOR_WINDOW` HR pixels, each with its halo of context (``DenseNetEncoder.halo_px`` image pixels), in
    pieces of :data:`TEACHER_TILE` image pixels, and only the pieces that hold tissue (``inputs.mask``): the
    background is not read (:func:`teacher_window`). Other encoders read the window with :data:`PRIOR_HALO` HR
    pixels of context. A first pass over at most :data:`PRIOR_PCA_WINDOWS` windows spread over the tissue (all of
    them on small slides) accumulates the feature moments of the tissue pixels (``inputs.mask``) for the principal
    axes; a second pass over every window stores the ``k`` scores per pixel and sums them per spot; the ridge is
    fitted on the spots. The features of the first pass are kept for the second up to
    :data:`PRIOR_FEATURE_CACHE_BYTES`, so a slide of a few windows goes through the teacher once. Memory: one piece
    through the teacher (about 250 MB of activations at 1024 x 1024 image pixels), the kept features, the features of
    one window (``TEACHER_CHANNELS`` float32 per pixel, 100 MB) and its scores, a few bytes per HR pixel (the tissue
    areas of the spots are pooled from the mask) and, without ``store``, ``k`` floats per HR pixel
    (``benchmarks/prior_map_memory.py``).

    With ``store`` (a path for a new zarr array, replaced if it exists), the scores are written there window by
    window and read back window by window: nothing slide-sized stays in memory, and a task that reads the prior on a
    dask cluster carries a reference to the array, not the array (the workers must see the path, as they see the
    staging store the results are written to). The teacher runs on ``device`` (a torch device or its name).

    ``image_features`` chooses the features (:func:`image_encoders`): the DenseNet teacher reads the image through
    ``source``; other encoders read it at their own resolution; embedding elements are read on the grid.
    """
    encoders = image_encoders(inputs, image_features, device)
    op, mask = inputs.observation, inputs.mask
    height, width = mask.shape
    sources: dict[float, ImageSource] = {}
    for enc in encoders:
        um = getattr(enc, "um_per_px", None)
        if um is not None and not isinstance(enc, DenseNetEncoder) and um not in sources:
            sources[um] = ImageSource(
                inputs.image_levels, inputs.grid, max(1, int(round(inputs.um_per_px / um)))
            )

    blocks: list[
        int
    ] = []  # channels per encoder, filled by the first window: each weighs the same in the PCA

    def features(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        ra, ca = max(r0 - PRIOR_HALO, 0), max(c0 - PRIOR_HALO, 0)
        rb, cb = min(r0 + h + PRIOR_HALO, height), min(c0 + w + PRIOR_HALO, width)
        images: dict[Any, Any] = {}
        parts = []
        for enc in encoders:
            if isinstance(enc, DenseNetEncoder):  # reads its own context around the window
                parts.append(teacher_window(enc, source, mask, (r0, c0, h, w)))
                continue
            if isinstance(enc, EmbeddingSource):
                f = enc.window(ra, ca, rb - ra, cb - ca)
            else:
                um = enc.um_per_px
                image = images.setdefault(um, sources[um].region(ra, ca, rb - ra, cb - ca))
                f = enc.features(image, (rb - ra, cb - ca))
            # a copy of the window alone: a view would keep the halo's features alive (about 1.6 x the window's)
            parts.append(f[:, r0 - ra : r0 - ra + h, c0 - ca : c0 - ca + w])
        blocks[:] = [p.shape[0] for p in parts]
        return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def on_disk(shape: tuple[int, int, int]) -> zarr.Array:  # one chunk per window
        return zarr.create_array(
            store=str(store),
            shape=shape,
            chunks=(shape[0], PRIOR_WINDOW, PRIOR_WINDOW),
            dtype="float32",
            fill_value=0.0,
            overwrite=True,
        )

    key = _scores_key(inputs, source, encoders, n_components, device)
    cached = None if key is None else _SCORES.get(key)
    if cached is not None and cached.shape[0] == usable_components(n_components, op.tissue_area(mask)):
        log.info(
            "semantic prior: the image features of this slide were read by an earlier call in this session; "
            "their scores are reused and the read-out is fitted on these genes"
        )
        scores: Any = cached
        if store is not None:
            scores = on_disk(cached.shape)
            scores[:] = cached
        empty = SlidePrior(
            scores, np.zeros((cached.shape[0], 0)), np.zeros(0), features_fingerprint(encoders)
        )
        return empty.refit(op, np.asarray(inputs.lr, np.float64), mask, PRIOR_WINDOW)

    n_windows = len(tissue_windows(mask, PRIOR_WINDOW))
    bar = tqdm(
        total=min(PRIOR_PCA_WINDOWS, n_windows) + n_windows,
        desc="semantic prior",
        unit="window",
        disable=not progress,
    )
    try:
        prior = fit_prior(
            features,
            op,
            np.asarray(inputs.lr, np.float64),
            mask,
            window=PRIOR_WINDOW,
            n_components=n_components,
            pca_windows=PRIOR_PCA_WINDOWS,
            cache_bytes=PRIOR_FEATURE_CACHE_BYTES,
            scores=None if store is None else on_disk,
            progress=bar,
            fingerprint=features_fingerprint(encoders),
            blocks=blocks,
        )
    finally:
        bar.close()
    if key is not None and 4 * int(np.prod(prior.scores.shape)) <= PRIOR_SCORES_CACHE_BYTES:
        _SCORES.put(key, np.asarray(prior.scores))
    return prior

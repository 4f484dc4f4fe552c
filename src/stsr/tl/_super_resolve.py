"""``stsr.tl.super_resolve``: histology-guided super-resolution of a spot table, tile by tile."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import spatialdata as sd
import torch

from .. import __version__
from .._constants import KEY_SUPER_RESOLVE
from ..models import gene_ids_from_names
from ..models.network import FeatureCache
from ..observation import ObservationModel
from ._cache import RunCache
from ._image_tiles import ImageSource
from ._inputs import SlideInputs, prepare_inputs, teacher_image_scale
from ._store import TileStore, input_fingerprint
from ._tile_job import TileJob, compute_tiles
from ._tiling import TilePlan, assemble, fit_tiles, plan_tiles
from ._write import add_elements, check_new_keys

__all__ = ["super_resolve", "resolve_device"]

log = logging.getLogger("stsr")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is passed to :class:`torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'."
        )
    return dev


def _load_model(model: Any) -> Any:
    from .. import models

    if model is None or isinstance(model, (str, Path)):
        return models.load(model)
    return model


def super_resolve(
    sdata: sd.SpatialData,
    image_key: str,
    genes: list[str] | str | None = None,
    *,
    table_key: str | None = None,
    model: Any = None,
    pixel_size: float | None = None,
    coordinate_system: str | None = None,
    steps: int = 20,
    cache_interval: int = 1,
    n_samples: int = 1,
    consistency: bool = True,
    semantic_prior: bool = False,
    prior_strength: float = 0.5,
    tile_size: int = 64,
    overlap: int = 16,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    seed: int = 0,
    key_added: str = KEY_SUPER_RESOLVE,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    tissue: Any = None,
    integer_counts: bool = True,
    progress: bool = True,
) -> sd.SpatialData:
    """Super-resolve spot-level expression into an HR raster guided by the histology image.

    Parameters
    ----------
    sdata
        SpatialData with an image, spots (circles) and a table of spot counts annotating them.
    image_key
        The image element holding the histology (RGB H&E for the default model).
    genes
        Genes to super-resolve; default: 50 highly expressed genes of the table (no MT-/ribosomal genes).
    table_key
        Table holding the spot counts; found automatically when only one table annotates a shapes element.
    model
        A model object, a name of shipped weights, or a path to saved weights; default: the shipped default model.
    pixel_size
        HR pixel size in units of ``coordinate_system``; default: a tenth of the spot diameter.
    coordinate_system
        Coordinate system in which ``pixel_size`` is given; default: one shared by image and spots (``"global"``
        when present).
    steps
        DDIM denoising steps.
    cache_interval
        Steps per full network evaluation: with ``2``, every other step recomputes only the model's
        full-resolution level and reuses the deep features of the step before (:class:`stsr.models.network.FeatureCache`,
        after DeepCache): 20 steps run 1.55x faster, and on the benchmark cases r and within-block r stay within
        -0.002 to +0.007 of the exact run (``docs/benchmarks/feature_cache.md``). ``1`` (default) evaluates the
        whole network at every step.
    n_samples
        Number of samples; with more than one, the mean is returned and ``f"{key_added}_std"`` holds the per-pixel
        standard deviation.
    consistency
        Project every denoising step (and the output) so that pooling the HR map over each spot reproduces its
        measured counts.
    semantic_prior
        Reweight the result by a histology prior read from a pretrained image model: the features of an ImageNet
        DenseNet121 trunk (:func:`stsr.models.teacher_features`), read out by a ridge fitted
        on this slide's spots alone (:func:`stsr.models.semantic_prior`); the spot sums are restored afterwards.
        On the HER2ST benchmark it raises within-spot-block structure markedly (``docs/benchmarks/accuracy.md``,
        rows "× semantic prior"). The teacher reads every window of the tissue once (the up to 8 windows of
        the principal axes a second time where their features do not fit in 256 MiB): about 3 min for a full
        Visium capture area on 2 CPU cores, 1.0-1.3 GB of memory whatever the slide size
        (``benchmarks/semantic_prior_cost.py``). The ``_std`` layer stays that of the
        samples.
    prior_strength
        Exponent of the prior weights (0 = no effect, 1 = the full read-out); 0.5 was chosen on HER2ST C2.
    tile_size, overlap
        Tile side and overlap in HR pixels; overlaps are blended with smooth weights. Keep ``overlap`` at least a
        spot diameter (10 HR pixels at the default pixel size) so that every spot lies whole inside some tile.
        Larger tiles waste less work on overlaps: on a CPU, ``tile_size=248, overlap=12, batch_size=1`` runs a
        Visium capture area x 50 genes about 1.8x faster than the default, for a little more memory (about 2.8 GB
        with 50 genes) and r lower by about 0.005 (``docs/benchmarks/scaling.md``). With ``model="fast"`` and
        ``cache_interval=2`` too, a full capture area x 50 genes x 20 steps took 13.1 min on 2 CPU cores.
    batch_size
        Tiles per model batch.
    device
        ``"auto"`` (cuda when present, else cpu), ``"cpu"``, ``"cuda"``, ...
    seed
        Seed of the noise field; the noise at a pixel depends only on the seed, the gene and the pixel's position.
        For a given seed the result does not depend on ``batch_size``, on the workers of a dask cluster, or on
        whether the run was interrupted and resumed. It does depend (slightly) on ``tile_size`` and ``overlap``:
        each tile gives the network a different context, so maps from other tilings agree closely (r > 0.97 in
        the tests) but not exactly.
    key_added
        Key of the new raster element.
    overwrite
        Replace existing elements named ``key_added`` (and ``f"{key_added}_std"``).
    cache_dir
        Where finished tiles are kept so that an interrupted run resumes. Default: next to the zarr store when
        ``sdata`` is backed, else a temporary directory (no resume across sessions).
    tissue
        The tissue to predict, instead of the Otsu mask of the image: the key of a labels element (nonzero =
        tissue, e.g. sopa's or Space Ranger's tissue), the key of a shapes element (polygons, e.g. sopa's region of
        interest), or a boolean array on the image's full-resolution level or on the HR grid (see
        :func:`stsr.pp.tissue_mask`). Counts land only inside it; spots with no tissue pixel are left out (a
        warning says how many).
    integer_counts
        Require raw integer counts (default); ``False`` accepts non-integer counts (e.g. corrected for ambient
        RNA). Normalised or log-transformed values are refused either way.
    progress
        Show a progress bar over tiles.

    Returns
    -------
    ``sdata``, with ``sdata[key_added]``: an image element (c = genes, y, x; float32 counts per HR pixel; chunked;
    multiscale) overlaying the image in all its coordinate systems, provenance in its attrs (in memory) and in
    ``sdata.attrs["stsr"][key_added]`` (kept in the store: read it there after :func:`spatialdata.read_zarr`). When ``sdata`` is backed by a zarr store the new elements are written to it
    and nothing else in the store is touched.
    """
    out_keys = [key_added] + ([f"{key_added}_std"] if n_samples > 1 else [])
    check_new_keys(sdata, out_keys, overwrite, inputs=(image_key, table_key))  # before any path or work
    _check_int(n_samples, "n_samples", 1)
    _check_int(steps, "steps", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(tile_size, "tile_size", 8)
    _check_int(overlap, "overlap", 0)
    FeatureCache(cache_interval)  # a bad interval fails before any work
    if semantic_prior:
        from ..models.prior import check_strength

        check_strength(prior_strength, "prior_strength")
    net = _load_model(model)
    if getattr(net, "lr_input", "interpolation") != "interpolation":
        raise ValueError(
            f"model {getattr(net, 'name', None)!r} takes {net.lr_input!r} as its LR input, an experiment without "
            "shipped weights that super_resolve does not run (benchmarks/baselines.py stsr_predict does). Use a "
            "model trained on the interpolated spots, such as the shipped 'default' or 'fast'."
        )
    dev = resolve_device(device)
    inputs = prepare_inputs(
        sdata,
        image_key,
        genes,
        table_key=table_key,
        pixel_size=pixel_size,
        coordinate_system=coordinate_system,
        image_channels=net.config.image_channels,
        integer_counts=integer_counts,
        tissue=tissue,
    )
    check_new_keys(sdata, out_keys, overwrite, inputs=(image_key, inputs.table_key, inputs.spots_key))
    tile_size, overlap = fit_tiles(inputs.grid.shape, tile_size, overlap, getattr(net, "tile_multiple", 4))
    plan = plan_tiles(inputs.grid.shape, tile_size, overlap, inputs.mask)
    params = {
        "method": "super_resolve",
        "model": getattr(net, "name", None),
        "weights_sha256": getattr(net, "weights_hash", None),
        "image_key": image_key,
        "table_key": inputs.table_key,
        "spots_key": inputs.spots_key,
        "genes": inputs.genes,
        "pixel_size": inputs.pixel_size,
        "coordinate_system": inputs.coordinate_system,
        "steps": steps,
        "cache_interval": cache_interval,
        "n_samples": n_samples,
        "consistency": consistency,
        "semantic_prior": prior_strength if semantic_prior else None,
        "tile_size": tile_size,
        "overlap": overlap,
        "seed": seed,
        "tissue": _describe_tissue(tissue),
        "stsr_version": __version__,
    }
    fingerprint = {**params, "inputs_sha256": input_fingerprint(inputs)}
    est_mb = plan.n_tiles * len(inputs.genes) * tile_size**2 * 4 * (2 if n_samples > 1 else 1) / 2**20
    log.info(
        "super_resolve: %d tiles of %dx%d HR px (overlap %d) on a %dx%d grid of %.3g (units of %s) per px, %d genes, "
        "%d step(s), "
        "%d sample(s), device %s; tile store ~%.0f MB on disk, peak memory ~%.0f MB per batch of %d",
        plan.n_tiles,
        tile_size,
        tile_size,
        overlap,
        *inputs.grid.shape,
        inputs.pixel_size,
        inputs.coordinate_system,
        len(inputs.genes),
        steps,
        n_samples,
        dev,
        est_mb,
        _batch_memory_mb(net, len(inputs.genes), tile_size, batch_size),
        batch_size,
    )
    cache = RunCache(sdata, cache_dir, key_added)
    prior = _fit_prior(inputs, cache, progress, dev) if semantic_prior else None
    if prior is not None:
        params["teacher_sha256"] = prior.teacher_hash
    store = TileStore(
        cache / "tiles.zarr", plan.n_tiles, len(inputs.genes), tile_size, fingerprint, n_samples > 1
    )
    job = TileJob(
        model=net,
        source=ImageSource(inputs.image_levels, inputs.grid, net.config.image_scale),
        observation=inputs.observation,
        lr=inputs.lr,
        normalizer=_normalizer(inputs),
        gene_ids=gene_ids_from_names(inputs.genes),
        origins=plan.origins,
        tile_size=tile_size,
        store_path=str(store.path),
        device=str(dev),
        steps=steps,
        cache_interval=cache_interval,
        n_samples=n_samples,
        consistency=consistency,
        seed=seed,
    )
    compute_tiles(job, store, batch_size, progress)
    mean = _final_map(store, plan, inputs, prior, prior_strength, consistency)
    elements = {key_added: _raster(mean, inputs)}
    if n_samples > 1:
        elements[f"{key_added}_std"] = _raster(_restrict(assemble(store.std, plan), inputs.mask), inputs)
    provenance = {
        **params,
        "weights_sha256": params["weights_sha256"],
        "n_tiles": plan.n_tiles,
        "grid_shape": list(inputs.grid.shape),
        "grid_origin_image_px": list(inputs.grid.origin),
        "grid_pixel_size_image_px": inputs.grid.pixel_size,
        "unit": "counts per HR pixel",
    }
    add_elements(sdata, elements, provenance, cache / "staging", overwrite)
    cache.remove()
    return sdata


def _describe_tissue(tissue: Any) -> str | None:
    """How the tissue was given, for provenance: its key, ``"array"``, or ``None`` (the image's Otsu mask)."""
    return tissue if tissue is None or isinstance(tissue, str) else "array"


def _normalizer(inputs: SlideInputs) -> Any:
    """Slide-level gene scales, computed exactly as in training (so results do not depend on tiling)."""
    from ..models import GeneNormalizer

    return GeneNormalizer.from_observations(inputs.lr, inputs.observation.support_area)


def _batch_memory_mb(net: Any, n_genes: int, tile: int, batch: int) -> float:
    width = getattr(net.config, "width", 32)
    return batch * n_genes * tile * tile * width * 4 * 6 / 2**20


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")


def _fit_prior(inputs: SlideInputs, cache: RunCache, progress: bool, device: torch.device) -> Any:
    """The slide's semantic prior, its scores kept in the run folder (before the tiles: a missing teacher or a bad
    slide fails fast)."""
    from ._semantic_prior import slide_prior

    scores = cache / "prior_scores.zarr"  # read window by window, removed with the run folder
    source = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs))
    try:
        return slide_prior(inputs, source, progress=progress, store=scores, device=device)
    except BaseException:
        cache.remove(scores)  # a finished tile store of an interrupted run stays for the next one
        raise


def _final_map(
    store: TileStore,
    plan: TilePlan,
    inputs: SlideInputs,
    prior: Any,
    strength: float,
    consistency: bool,
) -> da.Array:
    """Blend the tiles into the slide's map (lazy), restore the spot sums and apply the prior's reweighting."""
    mean = _restrict(assemble(store.mean, plan), inputs.mask)
    if consistency or prior is not None:
        mean = _global_consistency(mean, inputs.observation, inputs.lr)
    if prior is not None:
        # reweight the consistent map and restore the spot sums; the gaps between spots follow their neighbours
        reweighted = prior.reweight(mean, strength)
        mean = _global_consistency(reweighted, inputs.observation, inputs.lr, between_spots=True)
    return mean


def _restrict(arr: da.Array, mask: np.ndarray) -> da.Array:
    """Zero the pixels outside the measured tissue (``mask``: tissue near spots, and every spot's footprint)."""

    def block(b: np.ndarray, block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
        return b * mask[None, r0:r1, c0:c1]

    return arr.map_blocks(block, dtype=arr.dtype)


def _global_consistency(
    mean: da.Array, op: ObservationModel, lr: np.ndarray, between_spots: bool = False
) -> da.Array:
    """Rescale each spot's pixels so that pooling the blended output reproduces the measured spot counts.

    Blending neighbouring tiles mixes predictions that were each consistent inside their own tile; this final,
    tile-independent pass restores exact consistency: one pass pools the output chunk by chunk, a second scales
    each spot's pixels by ``measured / pooled`` (:meth:`ObservationModel.project`, multiplicative, per chunk). With
    ``between_spots`` the pixels between spots are rescaled too, by the interpolated factors of the spots around
    them (:meth:`ObservationModel.pixel_factors`; used after the prior's reweighting, which changes every pixel).
    """

    def pooled_block(block: np.ndarray, block_info=None) -> np.ndarray:
        r0, c0 = block_info[0]["array-location"][1][0], block_info[0]["array-location"][2][0]
        return op.pool_window(block, r0, c0)[:, None, None, :]

    parts = mean.map_blocks(
        pooled_block, dtype=np.float64, chunks=(mean.shape[0], 1, 1, op.n_obs), new_axis=3
    )
    pooled = parts.sum(axis=(1, 2)).compute()
    ok = pooled > 0
    ratio = np.where(ok, lr / np.where(ok, pooled, 1.0), 1.0)
    if between_spots:

        def scale_block(block: np.ndarray, block_info=None) -> np.ndarray:
            (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
            factors = op.pixel_factors(ratio, window=(r0, c0, r1 - r0, c1 - c0))
            return (block * factors).astype(np.float32)

        return mean.map_blocks(scale_block, dtype=np.float32)
    ratio = np.concatenate([ratio, np.ones((ratio.shape[0], 1))], axis=1).astype(np.float32)
    owner = op.owner_map()

    def scale_block(block: np.ndarray, block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
        return block * ratio[:, owner[r0:r1, c0:c1]]

    return mean.map_blocks(scale_block, dtype=np.float32)


def _raster(data: da.Array, inputs: SlideInputs) -> Any:
    from ..pp import raster_element

    return raster_element(
        data,
        inputs.genes,
        inputs.grid,
        inputs.sdata,
        inputs.image_key,
        coordinate_system=inputs.coordinate_system,
    )

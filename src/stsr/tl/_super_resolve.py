"""``stsr.tl.super_resolve``: histology-guided super-resolution of a spot table, tile by tile."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import spatialdata as sd
import torch
from dask.base import tokenize

from .. import __version__
from .._constants import KEY_SUPER_RESOLVE
from ..models import gene_ids_from_names
from ..models.network import FeatureCache
from ..observation import ObservationModel
from . import _semantic_prior
from ._cache import RunCache
from ._image_tiles import ImageSource
from ._inputs import EXPECTED_COUNTS, SlideInputs, expected_inputs, prepare_inputs, teacher_image_scale
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


#: The settings of ``super_resolve`` left at ``None``, per kind of device. On a CPU: the ``fast`` weights (as
#: accurate as ``default`` on the benchmark cases, 2.5x faster: ``docs/benchmarks/accuracy_fast.md``), tiles of 248
#: pixels (the least work on overlaps) one at a time, and deep features reused every other step (``cache_interval=2``,
#: r within -0.002 to +0.007 of the exact run): the network over a full capture area in 13 min instead of 87
#: (``docs/benchmarks/scaling.md``). On a GPU: the ``default`` weights, tiles of 64 in batches of 8, every step exact.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"model": "fast", "cache_interval": 2, "tile_size": 248, "overlap": 12, "batch_size": 1},
    "gpu": {"model": "default", "cache_interval": 1, "tile_size": 64, "overlap": 16, "batch_size": 8},
}


def device_defaults(dev: torch.device) -> dict[str, Any]:
    """The settings :data:`DEVICE_DEFAULTS` gives a run on ``dev`` (``"cpu"``, or ``"gpu"`` for any other device)."""
    return dict(DEVICE_DEFAULTS["cpu" if dev.type == "cpu" else "gpu"])


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
    layer: str | None = None,
    um_per_unit: float | None = None,
    model: Any = None,
    pixel_size: float | None = None,
    coordinate_system: str | None = None,
    steps: int = 20,
    cache_interval: int | None = None,
    n_samples: int = 1,
    consistency: bool = True,
    semantic_prior: bool | None = None,
    prior_strength: float | None = None,
    self_check: bool = True,
    image_features: Any = "densenet121",
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    key_added: str = KEY_SUPER_RESOLVE,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    tissue: Any = None,
    integer_counts: bool = True,
    poisson: bool = True,
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
        Table holding the spot counts; found automatically when only one table annotates spots, or only one of
        them annotates spots placed with ``image_key`` (one table per sample). A table of several samples
        (:func:`spatialdata.concatenate`) gives the spots placed with ``image_key`` only.
    layer
        Layer of the table holding the raw counts (e.g. ``"counts"`` once ``X`` holds normalised or log values, as
        after ``sc.pp.normalize_total`` and ``sc.pp.log1p``); default: ``X``.
    model
        A model object, a name of shipped weights, or a path to saved weights; default: set by the device
        (:data:`DEVICE_DEFAULTS`: the shipped ``fast`` weights on a CPU, ``default`` on a GPU).
    pixel_size
        HR pixel size in units of ``coordinate_system``; default: a tenth of the spot diameter, no finer than 2 µm
        (a quarter of the diameter for spots under 8 µm).
    coordinate_system
        Coordinate system in which ``pixel_size`` is given; default: one shared by image and spots (``"global"``
        when present).
    um_per_unit
        Micrometres per unit of the coordinate system: sets the scale the image is read at (the image model reads
        cells at about 0.75 µm per pixel). Default: read off the spots -- a hexagonal lattice of disks is Visium
        (55 µm spots), a square lattice of disks legacy ST (100 µm), square bins named ``..._square_016um`` (as
        ``spatialdata_io.visium_hd`` names them) Visium HD bins of that size, anything else micrometres. Pass it
        when the spots are in other units (e.g. the image's µm per pixel for spots given in its pixels). Logged and
        recorded in the provenance (``um_per_unit``, ``um_per_unit_from``).
    steps
        DDIM denoising steps.
    cache_interval
        Steps per full network evaluation: with ``2``, every other step recomputes only the model's
        full-resolution level and reuses the deep features of the step before (:class:`stsr.models.network.FeatureCache`,
        after DeepCache; speed and accuracy in ``docs/benchmarks.md``). ``1`` evaluates the whole network at every
        step. Default: set by the device (2 on a CPU, 1 on a GPU).
    n_samples
        Number of samples; with more than one, the mean is returned and ``f"{key_added}_std"`` holds the per-pixel
        standard deviation.
    consistency
        Project every denoising step (and the output) so that pooling the HR map over each spot reproduces its
        measured counts.
    semantic_prior
        Default (``None``): on for RGB and greyscale images (H&E, bright field), off for others (fluorescence).
        Reweight the result by a histology prior read from a pretrained image model: the features of an ImageNet
        DenseNet121 trunk (:func:`stsr.models.teacher_features`), read out by a ridge fitted on this slide's spots
        alone (:func:`stsr.models.semantic_prior`); the spot sums are restored afterwards. The teacher reads every
        window of the tissue once (``benchmarks/semantic_prior_cost.py``). ``False`` returns the diffusion core's
        map alone (and skips the self-check).
    prior_strength
        Exponent of the prior weights (0 = no effect, 1 = the full read-out); default: chosen by the self-check.
    image_features
        What the prior reads from the image: ``"densenet121"`` (default: the ImageNet DenseNet121 teacher that ships
        offline), ``"nuclei"`` (nuclear density, size, shape and stain from the H&E by colour deconvolution and
        scikit-image, no weights), a ``torch.nn.Module`` or callable mapping an RGB tile ``(B, 3, H, W)`` in
        ``[0, 1]`` to a feature map ``(B, C, h, w)`` (e.g. a pathology foundation model you have; wrap it in
        :class:`stsr.models.prior.ModuleEncoder` to set its resolution and normalisation), the key of an image element
        of precomputed embeddings in ``sdata`` (``c`` = features, any resolution, placed by its transformation; sopa
        2 writes its patch embeddings as a table: ``docs/image_features.md`` turns it into one), or a list of these (concatenated). See ``docs/image_features.md``.
    self_check
        Before anything is written, measure the method on this slide (``stsr.tl._self_check``): the spots are hidden
        behind coarser groups of them (2 x 2 on a square lattice, about 7 on Visium's) and predicted back from the
        groups by each configuration: the prior's strength, and how much of the diffusion core's map to keep over the
        prior map (down to none, in which case the core is not run at all and the result is the prior map of
        :func:`prior_map`). The best configuration is used; its scores against the measured spots (Pearson r across
        spots, r within the groups) and the same carried to the map's pixels (the self-estimate of the result's
        accuracy, ``self_estimated_r`` and ``self_estimated_within_r``) are logged and kept in the provenance as
        ``self_check``. Where the spots leave gaps (Visium, legacy ST), whole spots are also hidden and mapped from
        the others, which scores the map between the spots (``self_estimated_between_r``); the self-estimated r
        weighs it by the share of the lattice between the spots (``gap_share``). The
        same predictions calibrate ``f"{key_added}_std"``: per gene, the standard deviation ``sqrt(phi) x map`` of a
        Gamma spread of the rate whose negative-binomial 90 % interval (variance ``m + phi m^2`` for a pixel
        count of mean ``m``) covers 90 % of the hidden spots; ``phi`` is in the provenance as ``dispersion``.
    tile_size, overlap
        Tile side and overlap in HR pixels; overlaps are blended with smooth weights. Keep ``overlap`` at least a
        spot diameter (10 HR pixels at the default pixel size) so that every spot lies whole inside some tile.
        Larger tiles waste less work on overlaps. Default: set by the device (248 / 12 on a CPU, the fastest there
        for a little more memory; 64 / 16 on a GPU; ``docs/benchmarks.md``, "Memory and scale").
    batch_size
        Tiles per model batch; default: set by the device (1 on a CPU, 8 on a GPU).
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
    poisson
        Treat the spot counts as Poisson draws of the underlying expression (default): the map pools over each spot
        to its expected count given its measurement and its neighbours
        (:meth:`stsr.observation.ObservationModel.expected_counts`), so that a zero-count spot inside expressing
        tissue or a lone high count on a low-count gene does not print the spot lattice into the map; where counts
        are high this is the measured count. ``False`` keeps every spot's measured count exactly.
    progress
        Show a progress bar over tiles.

    Returns
    -------
    ``sdata``, with ``sdata[key_added]``: an image element (c = genes, y, x; float32 counts per HR pixel; chunked;
    multiscale) overlaying the image in all its coordinate systems, provenance in its attrs (in memory) and in
    ``sdata.attrs["stsr"][key_added]`` (kept in the store: read it there after :func:`spatialdata.read_zarr`). When ``sdata`` is backed by a zarr store the new elements are written to it
    and nothing else in the store is touched.
    """
    if semantic_prior is None:  # on for the images the teacher reads
        from .._validate import check_element
        from ..pp._transforms import raster_levels

        semantic_prior = raster_levels(check_element(sdata, image_key, "images"))[0].shape[0] in (1, 3)
    if not semantic_prior and not (isinstance(image_features, str) and image_features == "densenet121"):
        raise ValueError(
            f"image_features={_semantic_prior.describe_features(image_features)!r} is what the semantic prior reads "
            "from the image, but the prior is off (semantic_prior=False, or an image the prior cannot read): turn "
            "the prior on or leave image_features at its default."
        )
    checked = semantic_prior and self_check
    out_keys = [key_added] + ([f"{key_added}_std"] if n_samples > 1 or checked else [])
    check_new_keys(sdata, out_keys, overwrite, inputs=(image_key, table_key))  # before any path or work
    _check_int(n_samples, "n_samples", 1)
    _check_int(steps, "steps", 1)
    dev = resolve_device(device)
    given = {"model": model, "cache_interval": cache_interval, "tile_size": tile_size, "overlap": overlap}
    given["batch_size"] = batch_size
    auto = {k: v for k, v in device_defaults(dev).items() if given[k] is None}  # what the device sets
    model, cache_interval, tile_size, overlap, batch_size = ({**given, **auto}[k] for k in given)
    _check_int(batch_size, "batch_size", 1)
    _check_int(tile_size, "tile_size", 8)
    _check_int(overlap, "overlap", 0)
    FeatureCache(cache_interval)  # a bad interval fails before any work
    if prior_strength is not None:
        from ..models.prior import check_strength

        check_strength(prior_strength, "prior_strength")
    net = _load_model(model)
    lr_input = net.config.extra.get("lr_input", "interpolation")
    if lr_input != "interpolation":
        raise ValueError(
            f"model {getattr(net, 'name', None)!r} takes {lr_input!r} as its LR input, an experiment without "
            "shipped weights that super_resolve does not run (benchmarks/_guided.py does). Use a model trained on "
            "the interpolated spots, such as the shipped 'default' or 'fast'."
        )
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
        layer=layer,
        um_per_unit=um_per_unit,
    )
    check_new_keys(sdata, out_keys, overwrite, inputs=(image_key, inputs.table_key, inputs.spots_key))
    measured = inputs.lr
    inputs = expected_inputs(inputs) if poisson else inputs
    tile_size, overlap = fit_tiles(
        inputs.grid.shape, tile_size, overlap, getattr(net, "tile_multiple", 4), search="tile_size" in auto
    )
    plan = plan_tiles(inputs.grid.shape, tile_size, overlap, inputs.mask)
    params = {
        "method": "super_resolve",
        "model": getattr(net, "name", None),
        "weights_sha256": getattr(net, "weights_hash", None),
        "image_key": image_key,
        "table_key": inputs.table_key,
        "layer": inputs.layer,
        "spots_key": inputs.spots_key,
        "genes": inputs.genes,
        "pixel_size": inputs.pixel_size,
        "coordinate_system": inputs.coordinate_system,
        "um_per_unit": inputs.um_per_unit,
        "um_per_unit_from": inputs.um_per_unit_from,
        "steps": steps,
        "cache_interval": cache_interval,
        "n_samples": n_samples,
        "consistency": consistency,
        "tile_size": tile_size,
        "overlap": overlap,
        "seed": seed,
        "tissue": _describe_tissue(tissue),
        "counts": EXPECTED_COUNTS if poisson else "measured",
        "stsr_version": __version__,
    }
    # the tiles do not depend on the prior or the self-check: a rerun with another prior resumes them
    fingerprint = {**params, "inputs_sha256": input_fingerprint(inputs)}
    params.update(semantic_prior=semantic_prior, self_check=checked, device_defaults=auto)
    cache = RunCache(sdata, cache_dir, key_added)
    prior = _fit_prior(inputs, cache, progress, dev, image_features) if semantic_prior else None
    if prior is not None:
        params["teacher_sha256"] = prior.teacher_hash
        params["image_features"] = _semantic_prior.describe_features(image_features)
    store = TileStore(
        cache / "tiles.zarr", plan.n_tiles, len(inputs.genes), tile_size, fingerprint, n_samples > 1
    )
    job = TileJob(
        model=net,
        source=ImageSource(inputs.image_levels, inputs.grid, net.config.image_scale),
        observation=inputs.observation,
        lr=inputs.lr,
        normalizer=_normalizer(inputs.lr, inputs.observation),
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
    check = None
    strength, residual = (0.5 if prior_strength is None else prior_strength), 1.0
    if checked:
        from ._adapt import adapted_on
        from ._self_check import RESIDUALS, STRENGTHS, run_self_check

        in_sample = adapted_on(net, inputs.sdata[inputs.table_key])
        if in_sample:
            log.warning(
                "super_resolve: the model was adapted (stsr.tl.adapt) on this slide's spots, so the self-check's "
                "score of its map is in-sample; the check does not keep the diffusion core here (the result is the "
                "prior map). Pass self_check=False to use the adapted network's map anyway."
            )
            params["self_check_in_sample"] = True
        check = run_self_check(
            inputs.observation,
            inputs.lr,
            inputs.mask,
            prior,
            window=_semantic_prior.PRIOR_WINDOW,
            coarse_tiles=lambda op, lr, origins: _coarse_tiles(job, cache, op, lr, origins, batch_size),
            tile_origins=plan.origins,
            tile_size=tile_size,
            strengths=STRENGTHS if prior_strength is None else (prior_strength,),
            measured=measured,
            residuals=(0.0,) if in_sample else RESIDUALS,
        )
        strength, residual = check.strength, check.residual
    if prior is not None:
        params["prior_strength"] = strength
        params["diffusion_residual"] = residual
    if residual > 0:
        est_mb = plan.n_tiles * len(inputs.genes) * tile_size**2 * 4 * (2 if n_samples > 1 else 1) / 2**20
        log.info(
            "super_resolve: %d tiles of %dx%d HR px (overlap %d) on a %dx%d grid of %.3g (units of %s) per px, "
            "%d genes, %d step(s), %d sample(s), device %s; tile store ~%.0f MB on disk, peak memory ~%.0f MB per "
            "batch of %d",
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
        compute_tiles(job, store, batch_size, progress)
        mean = _final_map(store, plan, inputs, prior, strength, consistency)
        if prior is not None and residual < 1:
            mean = (1 - residual) * _prior_map_array(inputs, prior, strength) + residual * mean
    else:
        log.info(
            "super_resolve: the self-check keeps none of the diffusion core's map; the result is the prior map"
        )
        mean = _prior_map_array(inputs, prior, strength)
    elements = {key_added: _raster(mean.astype(np.float32), inputs)}
    if check is not None:
        phi = da.from_array(np.sqrt(check.dispersion).astype(np.float32)[:, None, None])
        std = mean * phi
        if n_samples > 1 and residual > 0:
            sample_std = _restrict(assemble(store.std, plan), inputs.mask)
            std = da.sqrt(std**2 + (residual * sample_std) ** 2)
        elements[f"{key_added}_std"] = _raster(std.astype(np.float32), inputs)
        params["self_check"] = check.provenance()
        params["dispersion"] = [float(f"{v:.7g}") for v in check.dispersion]
    elif n_samples > 1:
        elements[f"{key_added}_std"] = _raster(_restrict(assemble(store.std, plan), inputs.mask), inputs)
    provenance = {
        **params,
        "n_tiles": plan.n_tiles if residual > 0 else 0,
        "grid_shape": list(inputs.grid.shape),
        "grid_origin_image_px": list(inputs.grid.origin),
        "grid_pixel_size_image_px": inputs.grid.pixel_size,
        "unit": "counts per HR pixel",
    }
    add_elements(sdata, elements, provenance, cache / "staging", overwrite)
    cache.remove()
    return sdata


def _coarse_tiles(
    job: TileJob, cache: RunCache, op: ObservationModel, lr: np.ndarray, origins: np.ndarray, batch_size: int
) -> np.ndarray:
    """The diffusion core's mean map of the tiles at ``origins`` with the spot groups ``op`` / ``lr`` as its input
    (the self-check's run; in the run folder, removed with it)."""
    from dataclasses import replace

    params = {"self_check": True, "origins": origins.tolist(), "lr": float(lr.sum()), "steps": job.steps}
    # one store per batch of tiles (the check runs the core on half of its tiles, then maybe on the rest)
    name = f"self_check_{tokenize(params)[:12]}.zarr"
    store = TileStore(cache / name, len(origins), lr.shape[0], job.tile_size, params, False)
    coarse = replace(
        job,
        observation=op,
        lr=lr,
        normalizer=_normalizer(lr, op),
        origins=np.asarray(origins),
        store_path=str(store.path),
        n_samples=1,
    )
    compute_tiles(coarse, store, batch_size, progress=False)
    return np.asarray(store.mean[:])


def _prior_map_array(inputs: SlideInputs, prior: Any, strength: float) -> da.Array:
    """The prior map of the slide (:func:`prior_map`'s result) as a lazy array, window by window."""
    guide = _semantic_prior.slide_guide(inputs, prior, strength)

    def block(b: np.ndarray, block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
        return guide.window(r0, c0, r1 - r0, c1 - c0)

    window = _semantic_prior.PRIOR_WINDOW
    template = da.zeros(
        (len(inputs.genes), *inputs.grid.shape), dtype=np.float32, chunks=(-1, window, window)
    )
    return _restrict(template.map_blocks(block, dtype=np.float32), inputs.mask)


def _describe_tissue(tissue: Any) -> str | None:
    """How the tissue was given, for provenance: its key, ``"array"``, or ``None`` (the image's Otsu mask)."""
    return tissue if tissue is None or isinstance(tissue, str) else "array"


def _normalizer(lr: np.ndarray, observation: ObservationModel) -> Any:
    """Slide-level gene scales, computed exactly as in training (so results do not depend on tiling)."""
    from ..models import GeneNormalizer

    return GeneNormalizer.from_observations(lr, observation.support_area)


def _batch_memory_mb(net: Any, n_genes: int, tile: int, batch: int) -> float:
    width = getattr(net.config, "width", 32)
    return batch * n_genes * tile * tile * width * 4 * 6 / 2**20


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}.")


def _fit_prior(
    inputs: SlideInputs,
    cache: RunCache,
    progress: bool,
    device: torch.device,
    image_features: Any = "densenet121",
) -> Any:
    """The slide's semantic prior, its scores kept in the run folder (before the tiles: a missing teacher or a bad
    slide fails fast)."""
    from ._semantic_prior import slide_prior

    scores = cache / "prior_scores.zarr"  # read window by window, removed with the run folder
    source = ImageSource(inputs.image_levels, inputs.grid, teacher_image_scale(inputs))
    try:
        return slide_prior(
            inputs, source, progress=progress, store=scores, device=device, image_features=image_features
        )
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
        mean = _consistent(mean, inputs.observation, inputs.lr)
    if prior is not None:
        # reweight the consistent map and restore the spot sums; the gaps between spots follow their neighbours
        from ..models.prior import PriorReweighting

        reweighting = PriorReweighting(
            inputs.observation,
            inputs.lr,
            lambda r0, c0, h, w: prior.weights(r0, c0, h, w, strength),
            np.asarray(inputs.mask, np.float64),
        )
        reweighting.fit(*_pooled(mean, reweighting.pooled, inputs.observation.n_obs, 2))
        mean = mean.map_blocks(
            lambda b, block_info=None: reweighting.apply(b, *_origin(block_info)).astype(np.float32),
            dtype=np.float32,
        )
    return mean


def _restrict(arr: da.Array, mask: np.ndarray) -> da.Array:
    """Zero the pixels outside the measured tissue (``mask``: tissue near spots, and every spot's footprint)."""

    def block(b: np.ndarray, block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
        return b * mask[None, r0:r1, c0:c1]

    return arr.map_blocks(block, dtype=arr.dtype)


def _origin(block_info: dict) -> tuple[int, int]:
    """``(row0, col0)`` of a ``(genes, y, x)`` chunk in ``map_blocks``."""
    return block_info[0]["array-location"][1][0], block_info[0]["array-location"][2][0]


def _pooled(arr: da.Array, pool: Any, n_obs: int, n_out: int = 1) -> list[np.ndarray]:
    """Sum ``pool(chunk, row0, col0)`` (``n_out`` arrays of ``(G, n_obs)``) over the chunks of ``arr``."""

    def block(b: np.ndarray, block_info=None) -> np.ndarray:
        parts = pool(b, *_origin(block_info))
        return np.stack(parts if n_out > 1 else [parts])[:, :, None, None, :]

    parts = arr.map_blocks(
        block, dtype=np.float64, chunks=(n_out, arr.shape[0], 1, 1, n_obs), new_axis=(0, 4)
    )
    return list(parts.sum(axis=(2, 3)).compute())


def _consistent(mean: da.Array, op: ObservationModel, lr: np.ndarray) -> da.Array:
    """Rescale each spot's pixels so that pooling the blended output reproduces the measured spot counts.

    Blending neighbouring tiles mixes predictions that were each consistent inside their own tile; this final,
    tile-independent pass restores exact consistency: one pass pools the output chunk by chunk
    (:meth:`ObservationModel.pool_window`), a second scales each spot's pixels by
    :meth:`ObservationModel.consistency_factors` (the factors of :meth:`ObservationModel.project`, spread by
    :meth:`ObservationModel.pixel_factors`; the pixels between spots are left as they are).
    """
    (pooled,) = _pooled(mean, op.pool_window, op.n_obs)
    ratio = op.consistency_factors(pooled, lr)

    def scale_block(block: np.ndarray, block_info=None) -> np.ndarray:
        r0, c0 = _origin(block_info)
        h, w = block.shape[-2:]
        return (block * op.pixel_factors(ratio, window=(r0, c0, h, w), gaps=False)).astype(np.float32)

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

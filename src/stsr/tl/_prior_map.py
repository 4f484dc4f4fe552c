"""The deterministic histology-guided map of a slide: the spot data interpolated and reweighted by the semantic prior."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import spatialdata as sd

from .. import __version__
from .._constants import KEY_PRIOR_MAP
from .._elements import alpha_fix
from .._validate import check_element
from ..models.prior import PRIOR_MAP_STRENGTH, check_strength
from ..pp._transforms import raster_levels
from ._cache import RunCache
from ._image_tiles import ImageSource
from ._inputs import EXPECTED_COUNTS, SlideInputs, expected_inputs, prepare_inputs, teacher_image_scale
from ._semantic_prior import SlidePrior, describe_features, slide_prior
from ._super_resolve import _describe_tissue, _prior_map_array, _raster, resolve_device
from ._write import add_elements, check_new_keys


def prior_map(
    sdata: sd.SpatialData,
    image_key: str,
    genes: list[str] | str | None = None,
    *,
    table_key: str | None = None,
    layer: str | None = None,
    um_per_unit: float | None = None,
    pixel_size: float | None = None,
    coordinate_system: str | None = None,
    prior_strength: float = PRIOR_MAP_STRENGTH,
    image_scale: int | None = None,
    key_added: str = KEY_PRIOR_MAP,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    tissue: Any = None,
    integer_counts: bool = True,
    poisson: bool = True,
    device: Any = "auto",
    image_features: Any = "densenet121",
    progress: bool = True,
) -> sd.SpatialData:
    """Histology-guided HR map without diffusion: the spot densities interpolated onto the tissue of the HR grid,
    reweighted by the semantic prior, and rescaled so that every spot keeps its measured counts.

    This is :func:`stsr.models.prior_guide` of the whole slide with the tissue mask, computed window by window: the
    densities are counts per tissue pixel and each spot's counts go to its tissue pixels only. On the benchmarks
    (``docs/benchmarks.md``) it beats bicubic + mass and TESLA on within-block r, r and SSIM on every real case, and
    it is the most accurate map stsr makes on HER2ST and DBiT-seq (on Vizgen, :func:`super_resolve` with
    ``semantic_prior=True`` and 4 samples scores higher). It is deterministic and
    gives no uncertainty; use :func:`super_resolve` for posterior samples.

    Parameters
    ----------
    sdata
        SpatialData with an image, spots (circles) and a table of spot counts annotating them.
    image_key
        The image element holding the histology: RGB (H&E) or one channel (bright field), read by the image teacher.
    genes
        Genes to map; default: 50 highly expressed genes of the table (as :func:`super_resolve`).
    table_key, layer, pixel_size, coordinate_system, um_per_unit
        As in :func:`super_resolve`: the counts are read from the table's ``layer`` (default ``X``), and the HR grid
        is the same, so the two results can be compared pixel by pixel.
    prior_strength
        Exponent of the prior (0 = the interpolation alone, 1 = the full read-out; 0.25 was chosen on HER2ST C2);
        the same setting as :func:`super_resolve`'s ``prior_strength``.
    image_scale
        Image pixels per HR pixel read by the image teacher; default: derived from the HR pixel size so that the
        teacher reads about :data:`stsr.models.TEACHER_UM_PER_PX` (0.75) µm per pixel, the resolution it was
        benchmarked at, whatever the grid (the unit of the coordinate system is read off the spot lattice:
        ``stsr.pp._units``). An image coarser than that is upsampled.
    key_added
        Key of the new raster element.
    overwrite
        Replace an existing element named ``key_added``.
    cache_dir
        Where the result is staged before it is added (default: next to the zarr store when ``sdata`` is backed).
    tissue, integer_counts, poisson
        As in :func:`super_resolve`: the tissue to map instead of the image's Otsu mask (a labels or shapes key, or
        a boolean array), whether raw integer counts are required, and whether the map pools to each spot's
        expected count given the Poisson noise of counts (default) or to its measured count.
    device
        Where the image teacher runs: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ...
    image_features
        What the prior reads from the image: ``"densenet121"`` (default: the ImageNet DenseNet121 teacher that ships
        offline), ``"nuclei"`` (nuclear density, size, shape and stain from the H&E by colour deconvolution and
        scikit-image, no weights), a ``torch.nn.Module`` or callable mapping an RGB tile ``(B, 3, H, W)`` in
        ``[0, 1]`` to a feature map ``(B, C, h, w)`` (e.g. a pathology foundation model you have; wrap it in
        :class:`stsr.models.prior.ModuleEncoder` to set its resolution and normalisation), the key of an image element
        of precomputed embeddings in ``sdata`` (``c`` = features, any resolution, placed by its transformation; sopa
        2 writes its patch embeddings as a table: ``docs/image_features.md`` turns it into one), or a list of these (concatenated). As in :func:`super_resolve`; see ``docs/image_features.md``.
    progress
        Show a progress bar over the teacher's windows.

    Returns
    -------
    ``sdata``, with ``sdata[key_added]``: an image element (c = genes, y, x; float32 counts per HR pixel) overlaying
    the image, provenance in its attrs (in memory) and in ``sdata.attrs["stsr"][key_added]`` (kept in
    the store: read it there after :func:`spatialdata.read_zarr`).
    """
    check_new_keys(sdata, [key_added], overwrite, inputs=(image_key, table_key))  # before any path or work
    check_strength(prior_strength, "prior_strength")
    dev = resolve_device(device)
    if image_scale is not None and (
        isinstance(image_scale, bool) or not isinstance(image_scale, int) or image_scale < 1
    ):
        raise ValueError(
            f"image_scale must be a positive integer (image pixels per HR pixel), got {image_scale!r}."
        )
    levels = raster_levels(check_element(sdata, image_key, "images"))
    n_channels = levels[0].shape[0]
    if n_channels not in (1, 3):
        raise ValueError(
            f"Image {image_key!r} has {n_channels} channels; the image teacher of the prior reads RGB (3) or "
            "greyscale (1) images: pass an H&E or bright-field image, or turn fluorescence into a virtual H&E first. "
            f"{alpha_fix(image_key, levels)}".rstrip()
        )
    inputs = prepare_inputs(
        sdata,
        image_key,
        genes,
        table_key=table_key,
        pixel_size=pixel_size,
        coordinate_system=coordinate_system,
        image_channels=n_channels,
        integer_counts=integer_counts,
        tissue=tissue,
        layer=layer,
        um_per_unit=um_per_unit,
    )
    inputs = expected_inputs(inputs) if poisson else inputs
    image_scale = teacher_image_scale(inputs) if image_scale is None else image_scale
    check_new_keys(sdata, [key_added], overwrite, inputs=(image_key, inputs.table_key, inputs.spots_key))
    source = ImageSource(inputs.image_levels, inputs.grid, image_scale)
    cache = RunCache(sdata, cache_dir, key_added)
    try:
        # the scores live in the cache, read window by window (no slide-sized array in memory or in the graph)
        prior = slide_prior(
            inputs,
            source,
            progress=progress,
            store=cache / "prior_scores.zarr",
            device=dev,
            image_features=image_features,
        )
        _write_map(
            sdata,
            inputs,
            prior,
            image_scale,
            prior_strength,
            image_key,
            key_added,
            overwrite,
            cache,
            _describe_tissue(tissue),
            poisson,
            image_features,
        )
    finally:
        cache.remove()
    return sdata


def _write_map(
    sdata: sd.SpatialData,
    inputs: SlideInputs,
    prior: SlidePrior,
    image_scale: int,
    strength: float,
    image_key: str,
    key_added: str,
    overwrite: bool,
    cache: RunCache,
    tissue: str | None = None,
    poisson: bool = True,
    image_features: Any = "densenet121",
) -> None:
    """Compute the map of ``prior`` window by window and add it to ``sdata`` (staged in ``cache``)."""
    mapped = _prior_map_array(inputs, prior, strength)
    height, width = inputs.grid.shape
    provenance = {
        "method": "prior_map",
        "image_key": image_key,
        "table_key": inputs.table_key,
        "layer": inputs.layer,
        "spots_key": inputs.spots_key,
        "genes": inputs.genes,
        "pixel_size": inputs.pixel_size,
        "coordinate_system": inputs.coordinate_system,
        "um_per_unit": inputs.um_per_unit,
        "um_per_unit_from": inputs.um_per_unit_from,
        "prior_strength": strength,
        "tissue": tissue,
        "counts": EXPECTED_COUNTS if poisson else "measured",
        "image_scale": image_scale,
        "teacher_sha256": prior.teacher_hash,
        "image_features": describe_features(image_features),
        "grid_shape": [height, width],
        "grid_origin_image_px": list(inputs.grid.origin),
        "grid_pixel_size_image_px": inputs.grid.pixel_size,
        "unit": "counts per HR pixel",
        "stsr_version": __version__,
    }
    add_elements(sdata, {key_added: _raster(mapped, inputs)}, provenance, cache / "staging", overwrite)

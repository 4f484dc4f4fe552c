"""A semi-synthetic slide: the real H&E and spots of a user's slide, with an expression field generated from the
slide's own histology, so that its truth is known at every HR pixel.

Real slides have no truth below the spots. Procedural slides (:func:`stsr.datasets.synthetic`) have it, but their
images are drawn: a model trained on them learns to read drawn tissue. Here the tissue is real: the nuclei of the
H&E (segmented by :class:`stsr.models.prior.NucleiEncoder`, no weights) and tissue classes clustered from them on
the HR grid that :func:`stsr.tl.super_resolve` uses are turned into an expected expression per HR pixel, pooled
over the slide's own spots, and drawn as Poisson counts at the slide's own depth. What a gene does is random (its
level per tissue class, how it follows nuclear density and nuclear area, and a smooth field the histology does not
show); where it does it follows the real histology.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._constants import RASTER_HR_TRUTH, TABLE

__all__ = ["semi_synthetic"]

log = logging.getLogger("stsr")

#: Key in ``sdata.attrs`` and ``table.uns`` holding the generating parameters.
ATTRS_KEY = "stsr_semi_synthetic"
#: Labels element with the tissue class of every HR pixel (0 = outside the tissue, ``k + 1`` = class ``k``).
LABELS_CLASSES = "tissue_classes"
#: Channels of :data:`stsr.models.prior.NUCLEI_CHANNELS` the tissue classes are clustered on.
CLASS_CHANNELS = (
    "nuclei_density_local",
    "nuclear_fraction_local",
    "nucleus_area_local",
    "nucleus_eccentricity_local",
    "nucleus_haematoxylin_local",
    "haematoxylin",
    "eosin",
)
#: HR pixels per side of the windows the nuclei are segmented in.
WINDOW = 256


def _standardise(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x`` (..., H, W) centred and scaled by its mean and standard deviation over ``mask``, clipped to +-3 (a few
    pixels of an odd nucleus must not outshine the slide), zero outside ``mask``."""
    v = x[..., mask]
    mu = v.mean(-1)
    sd = np.maximum(v.std(-1), 1e-9)
    out = np.clip((x - mu[..., None, None]) / sd[..., None, None], -3.0, 3.0)
    return np.where(mask, out, 0.0)


def _smooth_field(rng: np.random.Generator, n: int, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """``(n, H, W)`` Gaussian random fields of correlation length ``sigma`` pixels, unit variance."""
    from scipy.ndimage import gaussian_filter

    z = gaussian_filter(rng.standard_normal((n, *shape)), (0, sigma, sigma), mode="reflect")
    return (z - z.mean((1, 2), keepdims=True)) / np.maximum(z.std((1, 2), keepdims=True), 1e-12)


def nuclei_maps(inputs: Any, progress: bool = False) -> np.ndarray:
    """``(len(NUCLEI_CHANNELS), H, W)`` nuclear morphology of a slide on its HR grid, window by window over the
    tissue (zero in windows without tissue)."""
    from tqdm.auto import tqdm

    from ..models.prior import NucleiEncoder, tissue_windows
    from ..tl._image_tiles import ImageSource

    enc = NucleiEncoder()
    scale = max(1, int(round(inputs.um_per_px / enc.um_per_px)))
    source = ImageSource(inputs.image_levels, inputs.grid, scale)
    height, width = inputs.mask.shape
    halo = int(np.ceil(enc.halo_px / scale)) + 1
    out = np.zeros((enc.n_channels, height, width), np.float32)
    for r0, c0, h, w in tqdm(tissue_windows(inputs.mask, WINDOW), desc="nuclei", disable=not progress):
        ra, ca = max(r0 - halo, 0), max(c0 - halo, 0)
        rb, cb = min(r0 + h + halo, height), min(c0 + w + halo, width)
        f = enc.features(source.region(ra, ca, rb - ra, cb - ca), (rb - ra, cb - ca))
        out[:, r0 : r0 + h, c0 : c0 + w] = f[:, r0 - ra : r0 - ra + h, c0 - ca : c0 - ca + w]
    return out


def tissue_classes(
    maps: np.ndarray, mask: np.ndarray, n_classes: int, rng: np.random.Generator, smooth_px: float = 1.5
) -> np.ndarray:
    """``(H, W)`` class of each tissue pixel (0..n_classes-1; -1 outside ``mask``): k-means on the standardised
    :data:`CLASS_CHANNELS` of ``maps``, smoothed over ``smooth_px`` pixels (tissue classes are regions, not single
    pixels)."""
    from scipy.cluster.vq import kmeans2, vq
    from scipy.ndimage import gaussian_filter

    from ..models.prior import NUCLEI_CHANNELS

    names = [n for n, _ in NUCLEI_CHANNELS]
    x = np.stack([maps[names.index(c)] for c in CLASS_CHANNELS]).astype(np.float64)
    w = gaussian_filter(mask.astype(np.float64), smooth_px)
    x = gaussian_filter(x * mask, (0, smooth_px, smooth_px)) / np.maximum(w, 1e-9)
    z = _standardise(x, mask)[:, mask].T  # (n_tissue, channels)
    n_classes = int(min(n_classes, len(z)))
    sample = z if len(z) <= 50_000 else z[rng.choice(len(z), 50_000, replace=False)]
    centroids, _ = kmeans2(sample, n_classes, minit="++", seed=rng)
    out = np.full(mask.shape, -1, np.int64)
    out[mask] = vq(z, centroids, check_finite=False)[0]
    return out


def semi_synthetic(
    sdata: Any,
    image_key: str,
    *,
    table_key: str | None = None,
    n_genes: int = 30,
    n_classes: int = 5,
    pixel_size: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Any:
    """A slide with the real histology and spots of ``sdata`` and a generated expression field that follows them.

    The HR grid, tissue and spots are those :func:`stsr.tl.super_resolve` uses on ``sdata`` (same ``pixel_size``
    default, a tenth of the spot diameter, no finer than 2 µm). On it, the nuclei of the H&E are segmented
    (:class:`stsr.models.prior.NucleiEncoder`) and the tissue pixels clustered into ``n_classes`` classes by their
    nuclear morphology and stain (:data:`CLASS_CHANNELS`). The expected count of gene ``g`` in HR pixel ``p`` is::

        s_g * tissue(p) * softplus(b_g + L_g[class(p)] + d_g * density(p) + a_g * area(p) + f_g * fraction(p)
                                   + u_g * U_g(p))

    with ``density`` the local nuclear density, ``area`` the local nucleus area, ``fraction`` the share of the pixel
    inside nuclei (the finest structure), each standardised over the tissue (clipped to +-3), and ``U_g`` a smooth random field of
    the scale of a spot pitch that the histology does not show (what only the spots tell). Coefficients are random
    per gene; ``s_g`` sets each gene's mean count per spot to that of one of the slide's own genes (its depth).
    Spot counts are Poisson draws of the field pooled over the spots (the footprint ``super_resolve`` uses).

    Use it to train the diffusion core on real tissue with pixel-level truth
    (:func:`stsr.tl.training_pair` with ``hr_key="hr_truth", spots_key=<the spots>``) or to score a map at pixel
    level on real histology.

    Parameters
    ----------
    sdata
        A slide: an H&E image, spots and their table of raw counts (not modified).
    image_key
        The H&E image.
    table_key
        The spots' table (default: the one table that annotates shapes).
    n_genes
        Genes to generate.
    n_classes
        Tissue classes.
    pixel_size
        HR pixel side in units of the coordinate system (default as in ``super_resolve``).
    seed
        Random seed of the genes' coefficients, the unseen fields and the counts.
    progress
        Show a progress bar over the windows the nuclei are segmented in.

    Returns
    -------
    A new :class:`~spatialdata.SpatialData` with the image ``image_key`` and the spots of ``sdata`` (the same
    elements), images ``"hr_truth"`` (c = genes, float32 expected counts per HR pixel on the grid), labels
    ``"tissue_classes"`` (0 outside the tissue, ``k + 1`` class ``k``) and table ``"table"`` (Poisson counts of the
    spots; layer ``"expected"`` the pooled field; the spots' ``obs`` of the source table; the genes' coefficients in
    ``var``); the generating parameters in ``sdata.attrs["stsr_semi_synthetic"]``.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    from .._elements import check_element
    from ..pp._grid import grid_transformations, raster_element
    from ..pp._provenance import grid_to_dict, record
    from ..pp._spots import table_region
    from ..pp._transforms import parse_raster, raster_levels
    from ..tl._inputs import find_spot_table, prepare_inputs, spot_totals

    if int(n_genes) < 1 or int(n_classes) < 1:
        raise ValueError(f"n_genes and n_classes must be positive integers, got {n_genes!r}, {n_classes!r}.")
    if image_key in (RASTER_HR_TRUTH, LABELS_CLASSES):
        raise ValueError(
            f"The image is named {image_key!r}, the name of a generated element; rename it in sdata first."
        )
    channels = raster_levels(check_element(sdata, image_key, "images"))[0].shape[0]
    if channels != 3:
        raise ValueError(
            f"semi_synthetic segments nuclei in an RGB H&E image; {image_key!r} has {channels} channel(s). "
            "Pass the key of the slide's H&E (3 channels) as image_key."
        )
    table_key = find_spot_table(sdata, table_key, image_key)
    from ..pp import select_genes

    # the slide's own genes set the depth: its 50 most expressed, as super_resolve's default
    real_genes = select_genes(check_element(sdata, table_key, "tables"), n_top=50)
    inputs = prepare_inputs(
        sdata,
        image_key,
        real_genes,
        table_key=table_key,
        pixel_size=pixel_size,
        coordinate_system=None,
        image_channels=3,
    )
    op, mask, grid = inputs.observation, inputs.mask, inputs.grid
    rng = np.random.default_rng([int(seed), 7])
    maps = nuclei_maps(inputs, progress=progress).astype(np.float64)
    classes = tissue_classes(maps, mask, int(n_classes), rng)
    k = int(classes.max()) + 1

    from scipy.ndimage import gaussian_filter

    from ..models.prior import NUCLEI_CHANNELS

    names = [n for n, _ in NUCLEI_CHANNELS]
    onehot = np.stack([(classes == i).astype(np.float64) for i in range(k)])
    frac = gaussian_filter(onehot, (0, 1.0, 1.0))
    frac = frac / np.maximum(frac.sum(0, keepdims=True), 1e-12)
    density = _standardise(maps[names.index("nuclei_density_local")], mask)
    area = _standardise(maps[names.index("nucleus_area_local")], mask)
    fraction = _standardise(maps[names.index("nuclear_fraction")], mask)
    n_genes = int(n_genes)
    genes = [f"gene_{i:03d}" for i in range(n_genes)]
    base = rng.normal(-0.5, 0.5, n_genes)
    loadings = rng.normal(0.0, 1.2, (n_genes, k))
    dens_coef = rng.normal(0.0, 0.8, n_genes)
    area_coef = rng.normal(0.0, 0.4, n_genes)
    frac_coef = rng.normal(0.0, 0.5, n_genes)
    unseen_coef = np.abs(rng.normal(0.0, 0.4, n_genes))
    unseen = _smooth_field(rng, n_genes, mask.shape, max(op.pitch(), 1.0))
    eta = (
        base[:, None, None]
        + np.einsum("gk,kyx->gyx", loadings, frac)
        + dens_coef[:, None, None] * density[None]
        + area_coef[:, None, None] * area[None]
        + frac_coef[:, None, None] * fraction[None]
        + unseen_coef[:, None, None] * unseen
    )
    field = np.logaddexp(0.0, eta) * mask[None]
    # depth: each gene's mean count per measured spot is that of one of the slide's genes
    measured = spot_totals(sdata, table_key, inputs.spots_key) > 0
    real = np.asarray(inputs.lr, np.float64)[:, measured].mean(1)
    real = real[real > 0]
    if real.size == 0:
        raise ValueError(
            f"Table {table_key!r} has no counts on the spots; semi_synthetic takes its depth from them. Pass "
            "table_key= of the table that holds the spots' counts."
        )
    target = rng.choice(real, n_genes, replace=real.size < n_genes)
    pooled = op.pool(field)[:, measured].mean(1)
    truth = (field * (target / np.maximum(pooled, 1e-12))[:, None, None]).astype(np.float32)
    expected = op.pool(truth.astype(np.float64)).T  # (n_spots, n_genes)
    counts = rng.poisson(expected)

    source, spots_key, region_key, instance_key = table_region(sdata, table_key, inputs.spots_key)
    rows = np.flatnonzero((source.obs[region_key] == spots_key).to_numpy())
    obs = source.obs.iloc[rows].copy()
    var = pd.DataFrame(
        {
            "base": base,
            "density_coef": dens_coef,
            "area_coef": area_coef,
            "fraction_coef": frac_coef,
            "unseen_coef": unseen_coef,
        },
        index=pd.Index(genes),
    )
    for i in range(k):
        var[f"loading_class_{i}"] = loadings[:, i]
    params = {
        "source_image": image_key,
        "source_table": table_key,
        "spots_key": spots_key,
        "n_genes": n_genes,
        "n_classes": k,
        "pixel_size": float(grid.pixel_size),
        "seed": int(seed),
    }
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=var,
        layers={"expected": expected.astype(np.float32)},
        obsm={key: np.asarray(val)[rows] for key, val in source.obsm.items()},
    )
    adata.uns[ATTRS_KEY] = dict(params)
    table = TableModel.parse(adata, region=spots_key, region_key=region_key, instance_key=instance_key)
    out = SpatialData(
        images={
            image_key: sdata[image_key],
            RASTER_HR_TRUTH: raster_element(truth, genes, grid, sdata, image_key),
        },
        labels={
            LABELS_CLASSES: parse_raster(
                np.where(classes >= 0, classes + 1, 0).astype(np.uint8),
                None,
                grid_transformations(grid, sdata, image_key),
                "auto",
                labels=True,
            )
        },
        shapes={spots_key: sdata[spots_key]},
        tables={TABLE: table},
    )
    out.attrs[ATTRS_KEY] = dict(params)
    record(
        out,
        RASTER_HR_TRUTH,
        {
            "kind": "semi_synthetic_truth",
            "image_key": image_key,
            "coordinate_system": inputs.coordinate_system,
            "pixel_size": float(grid.pixel_size),
            "grid": grid_to_dict(grid),
            "genes": genes,
        },
    )
    log.info(
        "semi_synthetic: %d genes on %d x %d HR pixels of %r, %d tissue classes, %d spots",
        n_genes,
        *mask.shape,
        image_key,
        k,
        op.n_obs,
    )
    return out

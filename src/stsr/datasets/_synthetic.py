"""A procedurally generated slide: H&E-like image, HR expression truth that depends on it, and Visium-like spots.

Everything derives from a few smooth random fields (tissue outline, tissue regions, a texture) sampled on a coarse
field grid, and a point process of nuclei whose density depends on the region. The image is rendered lazily, chunk
by chunk, from these (so a full 6.5 mm capture area at sub-micrometre pixels never sits in memory); the HR truth is
computed from the same fields and nuclei, so histology predicts expression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._constants import (
    CS_GLOBAL,
    IMAGE_HE,
    INSTANCE_KEY,
    POINTS_TRANSCRIPTS,
    RASTER_HR_TRUTH,
    REGION_KEY,
    SHAPES_SPOTS,
    TABLE,
)

__all__ = ["synthetic"]

#: Labels element with the tissue region of every HR pixel (0 = background, ``k + 1`` = region ``k``).
LABELS_REGIONS = "regions"
#: Key in ``sdata.attrs`` and ``table.uns`` holding the generating parameters.
ATTRS_KEY = "stsr_synthetic"

#: Unit optical-density vectors of hematoxylin and eosin in RGB (Ruifrok & Johnston).
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.072, 0.990, 0.105])
_FIELD_UM = 10.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    z = rng.standard_normal(shape)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    z = gaussian_filter(z, sig, mode="reflect")
    axes = tuple(range(len(shape) - 2, len(shape)))
    return (z - z.mean(axis=axes, keepdims=True)) / np.maximum(z.std(axis=axes, keepdims=True), 1e-12)


@dataclass
class _Slide:
    """The generating fields of a slide; positions are in µm (y, x)."""

    size: tuple[float, float]
    regions: np.ndarray  # (K, fh, fw) smooth fields, region = argmax
    tissue: np.ndarray  # (fh, fw) tissue score, tissue = score > 0
    texture: np.ndarray  # (fh, fw) fine texture
    grad_dir: tuple[float, float]
    nuclei: np.ndarray  # (n, 2) nucleus centres (y, x) µm
    nuclei_region: np.ndarray  # (n,) region of each nucleus
    density: np.ndarray  # (K,) nuclei per µm² in each region
    nucleus_um: np.ndarray  # (K,) nucleus radius (µm) per region
    eosin: np.ndarray  # (K,) eosin optical density per region
    hema_bg: np.ndarray  # (K,) diffuse hematoxylin per region

    def _interp(self, field: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        coords = np.stack(
            [
                np.broadcast_to(y, np.broadcast_shapes(y.shape, x.shape)) / _FIELD_UM,
                np.broadcast_to(x, np.broadcast_shapes(y.shape, x.shape)) / _FIELD_UM,
            ]
        )
        return map_coordinates(field, coords.reshape(2, -1), order=1, mode="nearest").reshape(
            coords.shape[1:]
        )

    def sample(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Region index and tissue flag at positions ``y, x`` (broadcast)."""
        region = np.argmax(np.stack([self._interp(f, y, x) for f in self.regions]), axis=0)
        return region, self._interp(self.tissue, y, x) > 0

    def gradient(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """A linear gradient across the slide, from -1 to 1."""
        cy, cx = self.size[0] / 2, self.size[1] / 2
        half = max(self.size) / 2
        return ((y - cy) * self.grad_dir[0] + (x - cx) * self.grad_dir[1]) / half


def _make_slide(
    rng: np.random.Generator,
    size: tuple[float, float],
    n_regions: int,
    region_scale_um: float,
    nuclei_per_mm2: tuple[float, float],
) -> _Slide:
    fh, fw = math.ceil(size[0] / _FIELD_UM) + 2, math.ceil(size[1] / _FIELD_UM) + 2
    regions = _smooth_noise(rng, (n_regions, fh, fw), region_scale_um / _FIELD_UM)
    outline = _smooth_noise(rng, (fh, fw), max(size) / 8 / _FIELD_UM)
    yy, xx = np.meshgrid(np.arange(fh) * _FIELD_UM, np.arange(fw) * _FIELD_UM, indexing="ij")
    r2 = ((yy - size[0] / 2) / (0.42 * size[0])) ** 2 + ((xx - size[1] / 2) / (0.42 * size[1])) ** 2
    tissue = 1.0 - r2 + 0.35 * outline
    texture = _smooth_noise(rng, (fh, fw), 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    density = rng.permutation(np.linspace(nuclei_per_mm2[0], nuclei_per_mm2[1], n_regions)) * 1e-6
    nucleus_um = rng.uniform(2.5, 4.0, n_regions)
    eosin = rng.uniform(0.35, 0.9, n_regions)
    hema_bg = rng.uniform(0.02, 0.15, n_regions)
    slide = _Slide(
        size, regions, tissue, texture, (math.sin(angle), math.cos(angle)),
        np.zeros((0, 2)), np.zeros(0, int), density, nucleus_um, eosin, hema_bg,
    )  # fmt: skip
    # nuclei: a Poisson process at the largest density, thinned by the local region's density, inside tissue
    lam = density.max()
    n = rng.poisson(lam * size[0] * size[1])
    pos = rng.uniform(0, 1, (n, 2)) * np.asarray(size)
    region, inside = slide.sample(pos[:, 0], pos[:, 1])
    keep = inside & (rng.uniform(0, 1, n) < density[region] / lam)
    slide.nuclei, slide.nuclei_region = pos[keep], region[keep]
    return slide


def _render_chunk(slide: _Slide, um_per_px: float, seed: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """RGB uint8 ``(3, h, w)`` of image pixels ``[r0, r0 + h) x [c0, c0 + w)``."""
    from scipy.ndimage import gaussian_filter

    y = (r0 + np.arange(h) + 0.5)[:, None] * um_per_px
    x = (c0 + np.arange(w) + 0.5)[None, :] * um_per_px
    region, tissue = slide.sample(y, x)
    texture = slide._interp(slide.texture, y, x)
    eos = np.where(tissue, slide.eosin[region] * (1 + 0.12 * texture), 0.0)
    hema = np.where(tissue, slide.hema_bg[region], 0.0)
    # nuclei: deltas blurred into soft disks, one blur per region (its nucleus size), with a margin
    for k in range(len(slide.density)):
        sig_px = slide.nucleus_um[k] / 1.5 / um_per_px
        m = int(math.ceil(4 * sig_px)) + 1
        sel = slide.nuclei_region == k
        ny = slide.nuclei[sel, 0] / um_per_px - r0 + m
        nx = slide.nuclei[sel, 1] / um_per_px - c0 + m
        ok = (ny >= 0) & (ny < h + 2 * m) & (nx >= 0) & (nx < w + 2 * m)
        if not ok.any():
            continue
        canvas = np.zeros((h + 2 * m, w + 2 * m))
        np.add.at(canvas, (ny[ok].astype(int), nx[ok].astype(int)), 2 * np.pi * sig_px**2)
        blob = gaussian_filter(canvas, sig_px, mode="constant")[m : m + h, m : m + w]
        hema = hema + np.clip(2.0 * blob, 0.0, 1.0)
    hema = np.minimum(hema, 1.4)
    od = hema[None] * _H_VEC[:, None, None] + eos[None] * _E_VEC[:, None, None] + 0.03
    rng = np.random.default_rng([seed, 1, r0, c0])
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, 4.0, (3, h, w))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _hr_features(
    slide: _Slide, grid_um: float, shape: tuple[int, int], supersample: int = 4
) -> dict[str, Any]:
    """Per-HR-pixel region fractions, tissue fraction, nuclear density and gradient."""
    from scipy.ndimage import gaussian_filter

    hh, ww = shape
    k = len(slide.density)
    s = supersample
    sub = (np.arange(s) + 0.5) / s
    frac = np.zeros((k, hh, ww))
    tissue_frac = np.zeros((hh, ww))
    xs = ((np.arange(ww)[:, None] + sub[None, :]) * grid_um).ravel()  # (ww*s,)
    band = max(1, 4_000_000 // max(ww * s * s, 1))
    for i0 in range(0, hh, band):
        i1 = min(i0 + band, hh)
        ys = ((np.arange(i0, i1)[:, None] + sub[None, :]) * grid_um).ravel()
        region, tissue = slide.sample(ys[:, None], xs[None, :])
        shp = (i1 - i0, s, ww, s)
        tissue_frac[i0:i1] = tissue.reshape(shp).mean(axis=(1, 3))
        for r in range(k):
            frac[r, i0:i1] = ((region == r) & tissue).reshape(shp).mean(axis=(1, 3))
    counts = np.zeros((hh, ww))
    ri = np.floor(slide.nuclei[:, 0] / grid_um).astype(int)
    ci = np.floor(slide.nuclei[:, 1] / grid_um).astype(int)
    ok = (ri >= 0) & (ri < hh) & (ci >= 0) & (ci < ww)
    np.add.at(counts, (ri[ok], ci[ok]), 1.0)
    density = gaussian_filter(counts, 1.0, mode="constant") / (slide.density.max() * grid_um**2)
    cy, cx = np.meshgrid((np.arange(hh) + 0.5) * grid_um, (np.arange(ww) + 0.5) * grid_um, indexing="ij")
    return {
        "region_frac": frac,
        "tissue_frac": tissue_frac,
        "density": density,
        "gradient": slide.gradient(cy, cx),
        "nuclei_per_pixel": counts,
    }


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _lattice(size: tuple[float, float], pitch: float, radius: float, kind: str) -> np.ndarray:
    """Spot centres (y, x) in µm on a hex or square lattice, whole disks inside the slide, centred."""
    dy = pitch * math.sqrt(3) / 2 if kind == "hex" else pitch
    ny = int((size[0] - 2 * radius) // dy) + 1
    nx = int((size[1] - 2 * radius - (pitch / 2 if kind == "hex" else 0)) // pitch) + 1
    if ny < 1 or nx < 1 or size[0] < 2 * radius or size[1] < 2 * radius:
        return np.zeros((0, 2))
    span_y = (ny - 1) * dy
    span_x = (nx - 1) * pitch + (pitch / 2 if kind == "hex" and ny > 1 else 0)
    y0, x0 = (size[0] - span_y) / 2, (size[1] - span_x) / 2
    out = []
    for i in range(ny):
        off = pitch / 2 if kind == "hex" and i % 2 else 0.0
        for j in range(nx):
            out.append((y0 + i * dy, x0 + off + j * pitch))
    return np.asarray(out, dtype=float)


def synthetic(
    size_um: tuple[float, float] = (1000.0, 1000.0),
    n_genes: int = 20,
    um_per_px: float = 1.0,
    hr_pixel_um: float = 5.5,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
    lattice: Literal["hex", "square"] = "hex",
    n_regions: int = 4,
    region_scale_um: float = 150.0,
    nuclei_per_mm2: tuple[float, float] = (1500.0, 7000.0),
    depth: float = 1.0,
    transcripts: bool = False,
    chunk_px: int = 1024,
    seed: int = 0,
) -> Any:
    """A procedurally generated, fully known slide for tests, tutorials and scale benchmarks.

    The slide has tissue (a blob with an irregular outline on white background) split into ``n_regions`` smooth
    regions that differ in eosin tint, diffuse hematoxylin and nuclear density and size. Expected expression of gene
    ``g`` per HR pixel is::

        depth * tissue_fraction * softplus(b_g + sum_k L_gk * region_fraction_k + d_g * nuclear_density
                                           + a_g * gradient)

    so it depends on what the image shows (regions, local nuclear density) plus a weak slide-wide gradient. Spot counts
    are Poisson draws of this field pooled over 55 µm disks by :meth:`stsr.observation.ObservationModel.disks`.

    Parameters
    ----------
    size_um
        ``(height, width)`` of the slide in µm (e.g. ``(400, 400)`` for tests, ``(6500, 6500)`` for a full Visium
        capture area).
    n_genes
        Number of genes.
    um_per_px
        Image resolution (µm per pixel).
    hr_pixel_um
        HR grid pixel side (µm) of the truth raster.
    spot_diameter_um, spot_pitch_um
        Spot size and centre-to-centre distance.
    lattice
        ``"hex"`` (Visium) or ``"square"`` (legacy ST) spot lattice.
    n_regions
        Number of tissue regions.
    region_scale_um
        Length scale of the regions.
    nuclei_per_mm2
        Range of the regions' nuclear densities.
    depth
        Scale of the expected counts (about counts per HR pixel per gene).
    transcripts
        Also add a points element ``"transcripts"`` of single molecules: Poisson draws of the HR field placed
        uniformly inside their HR pixel (``bin_transcripts`` on the HR grid recovers them exactly).
    chunk_px
        Chunk side of the lazy image.
    seed
        Random seed; the slide is a deterministic function of all parameters.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with, in coordinate system ``"global"`` (µm):

    - images ``"he"`` (lazy multiscale RGB uint8) and ``"hr_truth"`` (c = genes, float32 expected counts per HR pixel
      on :func:`stsr.pp.hr_grid` of ``"he"``);
    - labels ``"regions"`` (region of each HR pixel, 0 = background);
    - shapes ``"spots"`` (circles) and table ``"table"`` (sparse Poisson counts; layer ``"expected"`` holds the pooled
      field; ``obs["tissue_fraction"]``, ``obs["in_tissue"]``; ``obsm["spatial"]`` in µm (x, y));
    - optionally points ``"transcripts"``;
    - the generating parameters in ``sdata.attrs["stsr_synthetic"]`` and ``table.uns["stsr_synthetic"]``.
    """
    import anndata as ad
    import dask.array as da
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from ..pp._grid import grid_transformations, hr_grid, raster_element
    from ..pp._provenance import grid_to_dict, record
    from ..pp._spots import spots_observation_model
    from ..pp._transforms import auto_scale_factors, parse_raster

    size = (float(size_um[0]), float(size_um[1]))
    if min(size) <= 0 or not all(np.isfinite(size)):
        raise ValueError(f"size_um must be two positive numbers, got {size_um!r}.")
    for name, val in (
        ("um_per_px", um_per_px),
        ("hr_pixel_um", hr_pixel_um),
        ("spot_diameter_um", spot_diameter_um),
        ("spot_pitch_um", spot_pitch_um),
        ("region_scale_um", region_scale_um),
        ("depth", depth),
    ):
        if not np.isfinite(val) or val <= 0:
            raise ValueError(f"{name} must be a positive number, got {val!r}.")
    if int(n_genes) < 1 or int(n_regions) < 1:
        raise ValueError("n_genes and n_regions must be positive integers.")
    if lattice not in ("hex", "square"):
        raise ValueError(f"lattice must be 'hex' or 'square', got {lattice!r}.")
    n_genes, n_regions, chunk_px = int(n_genes), int(n_regions), int(chunk_px)
    params = {
        "size_um": list(size),
        "n_genes": n_genes,
        "um_per_px": float(um_per_px),
        "hr_pixel_um": float(hr_pixel_um),
        "spot_diameter_um": float(spot_diameter_um),
        "spot_pitch_um": float(spot_pitch_um),
        "lattice": lattice,
        "n_regions": n_regions,
        "region_scale_um": float(region_scale_um),
        "nuclei_per_mm2": [float(v) for v in nuclei_per_mm2],
        "depth": float(depth),
        "seed": int(seed),
    }
    rng = np.random.default_rng([int(seed), 0])
    slide = _make_slide(rng, size, n_regions, float(region_scale_um), tuple(nuclei_per_mm2))

    # ---------------------------------------------------------------- image (lazy, chunk by chunk)
    h_px, w_px = max(1, round(size[0] / um_per_px)), max(1, round(size[1] / um_per_px))
    template = da.zeros((3, h_px, w_px), dtype=np.uint8, chunks=(3, chunk_px, chunk_px))

    def render(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        (_, _), (r0, r1), (c0, c1) = block_info[0]["array-location"]
        return _render_chunk(slide, float(um_per_px), int(seed), r0, c0, r1 - r0, c1 - c0)

    image = template.map_blocks(render, dtype=np.uint8)
    he = Image2DModel.parse(
        image,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={CS_GLOBAL: Scale([float(um_per_px), float(um_per_px)], axes=("y", "x"))},
        scale_factors=auto_scale_factors((h_px, w_px), min_size=256),
        chunks=(3, chunk_px, chunk_px),
    )
    sdata = SpatialData(images={IMAGE_HE: he})

    # ---------------------------------------------------------------- HR truth from the same fields and nuclei
    grid = hr_grid(sdata, IMAGE_HE, float(hr_pixel_um), CS_GLOBAL)
    grid_um = grid.pixel_size * float(um_per_px)
    feats = _hr_features(slide, grid_um, grid.shape)
    genes = [f"gene_{i:03d}" for i in range(n_genes)]
    grng = np.random.default_rng([int(seed), 2])
    base = grng.normal(-0.5, 0.5, n_genes)
    loadings = grng.normal(0.0, 1.2, (n_genes, n_regions))
    dens_coef = grng.normal(0.0, 1.5, n_genes)
    grad_coef = grng.normal(0.0, 0.3, n_genes)
    tf = feats["tissue_frac"]
    comp = feats["region_frac"] / np.maximum(tf, 1e-12)  # region composition of the tissue in each pixel
    dens_c = feats["density"] - 0.5
    eta = (
        base[:, None, None]
        + np.einsum("gk,kyx->gyx", loadings, comp)
        + dens_coef[:, None, None] * dens_c[None]
        + grad_coef[:, None, None] * feats["gradient"][None]
    )
    truth = (float(depth) * _softplus(eta) * tf[None]).astype(np.float32)
    truth_el = raster_element(truth, genes, grid, sdata, IMAGE_HE)
    region_map = np.where(tf > 0, np.argmax(feats["region_frac"], axis=0) + 1, 0).astype(np.uint8)
    regions_el = parse_raster(
        region_map, None, grid_transformations(grid, sdata, IMAGE_HE), "auto", labels=True
    )

    # ---------------------------------------------------------------- spots and their counts
    radius = float(spot_diameter_um) / 2
    centres = _lattice(size, float(spot_pitch_um), radius, lattice)
    if len(centres) == 0:
        raise ValueError(
            f"No spot of diameter {spot_diameter_um} µm fits in a slide of {size} µm; enlarge size_um."
        )
    spots = ShapesModel.parse(
        centres[:, ::-1].copy(),
        geometry=0,
        radius=np.full(len(centres), radius),
        index=np.arange(len(centres)),
        transformations={CS_GLOBAL: Identity()},
    )
    sdata.shapes[SHAPES_SPOTS] = spots
    op = spots_observation_model(sdata, SHAPES_SPOTS, grid, IMAGE_HE)
    expected = op.pool(truth.astype(np.float64)).T  # (n_spots, n_genes)
    crng = np.random.default_rng([int(seed), 3])
    counts = crng.poisson(expected)
    tissue_fraction = op.pool(tf) / np.maximum(op.support_area, 1e-12)
    obs = pd.DataFrame(
        {
            REGION_KEY: pd.Categorical([SHAPES_SPOTS] * len(centres)),
            INSTANCE_KEY: np.arange(len(centres)),
            "tissue_fraction": tissue_fraction,
            "in_tissue": tissue_fraction > 0.5,
        },
        index=[f"spot_{i:05d}" for i in range(len(centres))],
    )
    var = pd.DataFrame(
        {"base": base, "density_coef": dens_coef, "gradient_coef": grad_coef}, index=pd.Index(genes)
    )
    for r in range(n_regions):
        var[f"loading_region_{r}"] = loadings[:, r]
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=var,
        layers={"expected": expected.astype(np.float32)},
        obsm={"spatial": centres[:, ::-1].copy()},
    )
    adata.uns[ATTRS_KEY] = dict(params)
    table = TableModel.parse(adata, region=SHAPES_SPOTS, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    sdata.images[RASTER_HR_TRUTH] = truth_el
    sdata.labels[LABELS_REGIONS] = regions_el
    sdata.tables[TABLE] = table

    # ---------------------------------------------------------------- optional single transcripts
    if transcripts:
        trng = np.random.default_rng([int(seed), 4])
        n = trng.poisson(truth.astype(np.float64))  # (G, H, W)
        g, i, j = np.nonzero(n)
        rep = n[g, i, j]
        g, i, j = np.repeat(g, rep), np.repeat(i, rep), np.repeat(j, rep)
        y = (i + trng.uniform(0.02, 0.98, i.size)) * grid_um
        x = (j + trng.uniform(0.02, 0.98, j.size)) * grid_um
        df = pd.DataFrame({"x": x, "y": y, "gene": pd.Categorical.from_codes(g, categories=genes)})
        sdata.points[POINTS_TRANSCRIPTS] = PointsModel.parse(
            df, coordinates={"x": "x", "y": "y"}, feature_key="gene", transformations={CS_GLOBAL: Identity()}
        )

    sdata.attrs[ATTRS_KEY] = dict(params)
    record(
        sdata,
        RASTER_HR_TRUTH,
        {
            "kind": "synthetic_truth",
            "image_key": IMAGE_HE,
            "coordinate_system": CS_GLOBAL,
            "pixel_size": float(hr_pixel_um),
            "grid": grid_to_dict(grid),
            "genes": genes,
        },
    )
    return sdata

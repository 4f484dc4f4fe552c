"""Resolve what :func:`stsr.tl.super_resolve` needs from a SpatialData: keys, genes, HR grid, spots, mask."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import spatialdata as sd

from .._elements import alpha_fix
from .._validate import (
    available_memory,
    check_counts,
    check_element,
    check_genes,
    check_integer_counts,
    image_value_scale,
)
from ..observation import Grid, ObservationModel
from ..pp import select_genes, tissue_mask
from ..pp._grid import frame_grid
from ..pp._spots import (
    Spots,
    check_unique_instances,
    placed_with_image,
    read_spots,
    spot_counts,
    spot_footprint,
    table_region,
)
from ..pp._transforms import raster_levels
from ..pp._units import check_um_per_unit, microns_per_unit
from ._image_tiles import ImageLevels

__all__ = [
    "SlideInputs",
    "prepare_inputs",
    "find_spot_table",
    "estimate_memory",
    "teacher_image_scale",
]

log = logging.getLogger("stsr")

#: Default HR pixel size as a fraction of the spot diameter.
PIXELS_PER_SPOT_DIAMETER = 10
#: Finest default HR pixel, in micrometres: Visium HD's barcode pitch, the finest that any sequencing platform in
#: scope measures (a fifth of a cell). Finer pixels add time (the HR grid of a whole Visium HD slide of 8 µm bins
#: at a tenth of a bin is 66 M pixels; at 2 µm, 10.6 M), not measured detail. Spots under 4 x this get a quarter of
#: their diameter (:func:`default_pixel_size`).
MIN_DEFAULT_PIXEL_UM = 2.0
#: Largest HR grid accepted (pixels): past 32-bit pixel indices, and far beyond a whole slide at sub-micron pixels.
MAX_GRID_PIXELS = 2**31 - 1
#: Peak bytes per HR pixel while the inputs are prepared (distances to the spots, closing of the spot lattice, tissue
#: mask on the grid): about 55 measured (tracemalloc peak and RSS) on synthetic slides of 0.8 to 13 M HR pixels.
BYTES_PER_HR_PIXEL = 80
#: Peak bytes per HR pixel of a spot footprint while the spots' operator is built (rows, columns, weights, CSR copy).
BYTES_PER_FOOTPRINT_PIXEL = 64
#: Bytes needed whatever the grid: a band of the image level scored by the tissue mask, the table's genes.
BASE_BYTES = 64 * 2**20


@dataclass
class SlideInputs:
    """Everything the tile loop needs about one slide.

    Attributes
    ----------
    observation
        Disk operator of the spots on ``grid`` (observation ``i`` = ``lr[:, i]``).
    lr
        ``(n_genes, n_spots)`` measured counts.
    mask
        ``(height, width)`` area to predict: the tissue near spots plus every spot's footprint and the gaps of the
        spot lattice (Otsu tissue of the image), or, with a given ``tissue``, that tissue near spots only (counts of
        spots off it are left out).
    image_levels
        The image's pyramid levels, with the affine from the grid's frame to the image's pixels
        (:class:`~stsr.tl._image_tiles.ImageLevels`: the identity unless the image is rotated or sheared).
    spots
        The spots (:class:`~stsr.pp._spots.Spots`), read once.
    """

    sdata: sd.SpatialData
    image_key: str
    table_key: str
    spots_key: str
    genes: list[str]
    coordinate_system: str
    pixel_size: float
    grid: Grid
    observation: ObservationModel
    lr: np.ndarray
    mask: np.ndarray
    image_levels: ImageLevels
    um_per_unit: float = 1.0
    spots: Spots | None = None
    #: how :attr:`um_per_unit` was found (:func:`stsr.pp._units.microns_per_unit`)
    um_per_unit_from: str = ""
    layer: str | None = None  # the table's layer of counts (None: X)

    @property
    def um_per_px(self) -> float:
        """Micrometres per HR pixel (:func:`stsr.pp._units.microns_per_unit` of the coordinate system)."""
        return self.pixel_size * self.um_per_unit


#: The provenance's ``counts`` of a map made from :func:`expected_inputs` (``poisson=True``).
EXPECTED_COUNTS = "expected (poisson; each spot's total count its size factor)"


def expected_inputs(inputs: SlideInputs) -> SlideInputs:
    """``inputs`` with each spot's expected count in place of its measured count
    (:meth:`stsr.observation.ObservationModel.expected_counts`: counts as Poisson draws of the expression, each
    spot's total count of every gene of the table its size factor). Spots without a count of any gene of the table
    (all of its genes, not only those mapped) are empty: they keep their zeros."""
    from dataclasses import replace

    totals = spot_totals(inputs.sdata, inputs.table_key, inputs.spots_key, inputs.layer)
    return replace(inputs, lr=inputs.observation.expected_counts(inputs.lr, empty=totals <= 0, depth=totals))


def spot_totals(
    sdata: sd.SpatialData, table_key: str, spots_key: str, layer: str | None = None
) -> np.ndarray:
    """``(n_spots,)`` total count of every gene of the table (its ``layer``, default ``X``) per spot, in the order of
    the spots' operator (the table's rows annotating ``spots_key``): zero for an empty spot (off the tissue, or
    failed)."""
    table, spots_key, region_key, _ = table_region(sdata, table_key, spots_key)
    rows = np.flatnonzero((table.obs[region_key] == spots_key).to_numpy())
    x = table.layers[layer] if layer is not None else table.X
    return np.asarray(x[rows].sum(1), np.float64).ravel()


def teacher_image_scale(inputs: SlideInputs) -> int:
    """Image pixels per HR pixel at which the image teacher reads the slide: about
    :data:`stsr.models.TEACHER_UM_PER_PX` micrometres per teacher pixel, whatever the grid (at least 1)."""
    from ..models import TEACHER_UM_PER_PX

    return max(1, int(round(inputs.um_per_px / TEACHER_UM_PER_PX)))


def find_spot_table(
    sdata: sd.SpatialData,
    table_key: str | None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
) -> str:
    """The table of spot counts: ``table_key`` if given, else the only table annotating spots (circles or bins);
    of several (one per sample), the only one whose spots share a coordinate system with ``image_key`` (in
    ``coordinate_system`` when given)."""
    from spatialdata.models import get_table_keys

    if table_key is not None:
        check_element(sdata, table_key, "tables")
        return table_key
    candidates = []
    for key, table in sdata.tables.items():
        try:
            region = get_table_keys(table)[0]
        except (ValueError, KeyError, TypeError):
            continue
        regions = [region] if isinstance(region, str) else list(region)
        if any(r in sdata.shapes and _is_spots(sdata.shapes[r], r) for r in regions):
            candidates.append((key, regions))
    if len(candidates) > 1 and image_key is not None and image_key in sdata.images:
        placed = [c for c in candidates if placed_with_image(sdata, c[1], image_key, coordinate_system)]
        candidates = placed or candidates
    candidates = [key for key, _ in candidates]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            "No table annotates a shapes element of spots (circles or square bins). stsr needs spot counts in a table linked to "
            "the spots (TableModel.parse(..., region=<spots key>, region_key=..., instance_key=...)). "
            f"Tables present: {list(sdata.tables)}."
        )
    raise ValueError(f"Several tables annotate spots: {candidates}. Pass table_key= to choose one.")


def prepare_inputs(
    sdata: sd.SpatialData,
    image_key: str,
    genes: list[str] | str | None,
    *,
    table_key: str | None,
    pixel_size: float | None,
    coordinate_system: str | None,
    image_channels: int,
    n_default_genes: int = 50,
    integer_counts: bool = True,
    tissue: Any = None,
    layer: str | None = None,
    um_per_unit: float | None = None,
) -> SlideInputs:
    """Validate the inputs of :func:`stsr.tl.super_resolve` and build the grid, operator and LR counts.

    Everything is checked before any heavy work, with errors that say the fix: unknown keys or genes (with close
    matches), no shared coordinate system, images with the wrong number of channels or of unknown value scale
    (:func:`stsr._validate.image_value_scale`), tables with several rows for one spot, counts that are negative or
    not integers (normalised or log-transformed data), an HR pixel as large as a spot, an HR grid too large for the
    memory, spots outside the image, genes without counts, a given tissue that covers no spot.

    Parameters
    ----------
    sdata, image_key, genes, table_key, coordinate_system
        As in :func:`stsr.tl.super_resolve`.
    pixel_size
        HR pixel side in units of the coordinate system (default: a tenth of the spot diameter, no finer than
        :data:`MIN_DEFAULT_PIXEL_UM` µm; :func:`default_pixel_size`). A pixel at least
        as large as the spot diameter is refused (a spot would not cover a whole pixel: there is nothing to resolve
        within it); one larger than a quarter of the diameter gives a warning (fewer than 4 pixels across a spot:
        the map hardly resolves anything within a spot and the disk footprints are coarse). The grid is refused
        when it exceeds :data:`MAX_GRID_PIXELS` or when preparing it would need more memory than is available
        (:func:`estimate_memory`); the message suggests a pixel size that fits.
    image_channels
        Channels the model expects.
    n_default_genes
        Genes chosen when ``genes`` is None.
    integer_counts
        Require raw integer counts in the table's ``X`` (or ``layer``) for the genes used (default): normalised or log-transformed
        values are refused, with the fix (raw counts are often in ``layers["counts"]`` or ``.raw``). ``False``
        accepts non-integer values for tables that hold counts which are not integers by design (e.g. corrected for
        ambient RNA); they must still be counts (not log values), and negative values are always refused.
    tissue
        The tissue to predict, instead of the Otsu mask of the image: the key of a labels element (nonzero =
        tissue), the key of a shapes element (polygons or multipolygons), or a boolean array on the image's
        full-resolution level or on the HR grid; see the ``tissue`` parameter of :func:`stsr.pp.tissue_mask`, which
        places it on the HR grid (a pixel is tissue when at least half of it is covered). Pixels farther than 0.75
        spot pitch from every spot stay out, and spots with no tissue pixel are left out of the map (a warning
        gives how many and the share of the counts). ``None`` (default): the Otsu mask of the image.
    layer
        The layer of the table that holds the raw counts (e.g. ``"counts"`` after ``sc.pp.normalize_total`` and
        ``sc.pp.log1p`` replaced ``X``); ``None`` (default): ``X``. Gene choice, checks, counts and size factors all
        read it.
    um_per_unit
        Micrometres per unit of the coordinate system; ``None`` (default): read off the spots
        (:func:`stsr.pp._units.microns_per_unit`).
    """
    if um_per_unit is not None:
        check_um_per_unit(um_per_unit)
    image = check_element(sdata, image_key, "images")
    levels = raster_levels(image)
    channels = [str(c) for c in levels[0].coords["c"].values] if "c" in levels[0].coords else []
    if levels[0].shape[0] != image_channels:
        raise ValueError(
            f"Image {image_key!r} has {levels[0].shape[0]} channel(s) {channels}, but the model expects "
            f"{image_channels} ({'RGB H&E' if image_channels == 3 else 'image channels'}). Pass an RGB H&E image, "
            f"or train a model for this image type with stsr.tl.train (ModelConfig(image_channels="
            f"{levels[0].shape[0]})). {alpha_fix(image_key, levels)}".rstrip()
        )
    image_value_scale(levels, image_key)  # an image of unknown value scale fails here, not in the tile loop
    table_key = find_spot_table(sdata, table_key, image_key, coordinate_system)
    table = sdata.tables[table_key]
    if layer is not None and layer not in table.layers:
        raise KeyError(
            f"Table {table_key!r} has no layer {layer!r}; its layers: {list(table.layers)}. Pass the layer that "
            "holds the raw counts, or layer=None for X."
        )
    # the spots element of the table that lies on the image (a table of several samples annotates several)
    _, spots_key, region_key, _ = table_region(sdata, table_key, None, image_key, coordinate_system)
    # the spots, read once: footprint, shared coordinate system, the image's grid frame, centres, size (checked)
    spots = read_spots(sdata, spots_key, image_key, coordinate_system)
    cs = spots.coordinate_system
    if not spots.frame.is_image:
        log.info(
            "image %r is placed in %r by a rotation, shear or anisotropic scale: the HR grid is laid along the axes of "
            "%r and the image is read through its transformation",
            image_key,
            cs,
            cs,
        )
    if genes is None:
        rows = (table.obs[region_key] == spots_key).to_numpy()
        genes = select_genes(table if rows.all() else table[rows], n_top=n_default_genes, layer=layer)
        log.info("super_resolve: %d highly expressed genes chosen (pass genes= to choose)", len(genes))
    elif isinstance(genes, str):
        genes = [genes]
    genes, n_spots = _check_table(sdata, table_key, spots_key, genes, integer_counts, layer)
    diameter = spots.diameter
    um_per_unit, why = microns_per_unit(spots, um_per_unit)
    log.info("%.4g µm per unit of %r (%s)", um_per_unit, cs, why)
    if pixel_size is None:
        pixel_size = default_pixel_size(diameter, um_per_unit)
    else:
        _check_pixel_size(pixel_size, diameter, cs, um_per_unit)
    grid = frame_grid(spots.frame, pixel_size)
    _check_grid(grid, float(pixel_size), diameter, n_spots, spots.footprint, cs, um_per_unit)
    if spots.footprint == "squares":
        grid = _align_to_bins(spots, grid)
    given = None
    if tissue is not None:  # a bad key, array or coordinate system fails before the spots' operator is built
        given = tissue_mask(sdata, image_key, grid=grid, coordinate_system=cs, tissue=tissue)
    op, lr, genes = spot_counts(sdata, table_key, spots_key, genes, grid, image_key, cs, layer, spots=spots)
    empty = [g for g, total in zip(genes, lr.sum(1)) if total <= 0]
    if empty:
        raise ValueError(
            f"Gene(s) {empty} have no counts in any spot of table {table_key!r}; there is nothing to super-resolve. "
            "Remove them from genes=."
        )
    pitch = spots.pitch_on(grid)
    if given is None:
        # the lattice around the spots that caught anything is tissue; empty spots (off the tissue) are not
        occupied = spot_totals(sdata, table_key, spots_key, layer) > 0
        mask = (tissue_mask(sdata, image_key, grid=grid, coordinate_system=cs) & _near_spots(op, pitch)) | (
            _between_spots(op, pitch, occupied)
        )
    else:
        mask = given & _near_spots(op, pitch)
        _check_tissue_covers_spots(op, lr, mask, tissue, spots_key)
    return SlideInputs(
        sdata=sdata,
        image_key=image_key,
        table_key=table_key,
        spots_key=spots_key,
        genes=list(genes),
        coordinate_system=cs,
        pixel_size=float(pixel_size),
        grid=grid,
        observation=op,
        lr=lr,
        mask=mask,
        image_levels=ImageLevels(levels, spots.frame.to_image),
        um_per_unit=float(um_per_unit),
        um_per_unit_from=why,
        spots=spots,
        layer=layer,
    )


def estimate_memory(shape: tuple[int, int], n_spots: int, spot_radius_px: float, footprint: str) -> int:
    """Bytes that :func:`prepare_inputs` needs at its peak for an HR grid of ``shape`` and ``n_spots`` spots of
    ``spot_radius_px`` HR pixels (half the side for ``footprint="squares"``)."""
    h, w = shape
    r = float(spot_radius_px) + 1.0  # pixels cut by the spot's edge
    per_spot = np.pi * r * r if footprint == "disks" else (2 * r) ** 2
    nnz = n_spots * min(per_spot, h * w)
    return int(BASE_BYTES + BYTES_PER_HR_PIXEL * h * w + BYTES_PER_FOOTPRINT_PIXEL * nnz)


def _check_table(
    sdata: sd.SpatialData,
    table_key: str,
    spots_key: str,
    genes: list[str],
    integer_counts: bool,
    layer: str | None = None,
) -> tuple[list[str], int]:
    """Check the table's rows and values for ``genes`` (cheap; nothing is built). Returns the genes and the number of
    spots (rows of the spots' region)."""
    table, spots_key, region_key, instance_key = table_region(sdata, table_key, spots_key)
    genes = check_genes(genes, table.var_names, where=f"table {table_key!r}")
    rows = np.flatnonzero((table.obs[region_key] == spots_key).to_numpy())
    if rows.size == 0:
        raise ValueError(f"Table {table_key!r} has no rows for region {spots_key!r}.")
    check_unique_instances(table, table_key, spots_key, instance_key, rows, sdata.shapes[spots_key].index)
    if layer is None and table.X is None:
        raise ValueError(
            f"Table {table_key!r} has no X; put the raw spot counts in X, or pass layer= naming the layer that "
            "holds them."
        )
    x = (table.layers[layer] if layer is not None else table.X)[rows][:, table.var_names.get_indexer(genes)]
    obs_names = table.obs_names[rows]
    check_counts(x, genes, obs_names, what=f"Counts of table {table_key!r}")
    if integer_counts:
        check_integer_counts(
            x,
            genes,
            obs_names,
            what=f"The values of table {table_key!r} ({'X' if layer is None else f'layers[{layer!r}]'})",
            fix=_raw_counts_fix(table, table_key, layer),
        )
    return genes, int(rows.size)


def _raw_counts_fix(table: Any, table_key: str, layer: str | None = None) -> str:
    t = f"sdata.tables[{table_key!r}]"
    others = [name for name in table.layers if name != layer]
    if "counts" in others:
        where = "This table keeps them in layers['counts']: pass layer='counts'."
    elif table.raw is not None:
        where = (
            f"This table has a .raw: {t}.layers['counts'] = {t}.raw[:, {t}.var_names].X, then layer='counts'."
        )
    elif others:
        where = f"Pass layer= naming the layer that holds them (its layers: {others})."
    else:
        where = "Put them in a layer of the table and pass layer= naming it."
    return (
        "stsr models raw counts (each spot's counts are kept exactly) and reads them from the table's X or from "
        f"the layer given by layer=. {where} If the values are counts that are not integers by design (e.g. "
        "corrected for ambient RNA), pass integer_counts=False."
    )


def default_pixel_size(diameter: float, um_per_unit: float) -> float:
    """The default HR pixel side, in units of the coordinate system: a tenth of the spot diameter
    (:data:`PIXELS_PER_SPOT_DIAMETER`), but no finer than :data:`MIN_DEFAULT_PIXEL_UM` µm, and for spots under
    4 x that (e.g. Visium HD's 2 µm bins) a quarter of their diameter."""
    floor = min(MIN_DEFAULT_PIXEL_UM / um_per_unit, diameter / 4)
    return max(diameter / PIXELS_PER_SPOT_DIAMETER, floor)


def _default_text(diameter: float, um_per_unit: float) -> str:
    return (
        f"the default is {default_pixel_size(diameter, um_per_unit):.4g} (a tenth of the spot diameter, no finer "
        f"than {MIN_DEFAULT_PIXEL_UM:g} µm)"
    )


def _check_pixel_size(pixel_size: float, diameter: float, cs: str, um_per_unit: float) -> None:
    if isinstance(pixel_size, bool) or not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive number, got {pixel_size!r}.")
    default = _default_text(diameter, um_per_unit)
    if pixel_size >= diameter:
        raise ValueError(
            f"pixel_size={pixel_size:g} ({cs!r} units) is at least the spot diameter ({diameter:.4g}): an HR pixel "
            "would be as large as a spot, so there is nothing to resolve within the spots. Use a pixel_size of at "
            f"most a quarter of the diameter ({diameter / 4:.4g}); {default}."
        )
    if pixel_size > diameter / 4:
        msg = (
            f"pixel_size={pixel_size:g} ({cs!r} units) is more than a quarter of the spot diameter "
            f"({diameter:.4g}): fewer than 4 HR pixels across a spot, so the map resolves little within a spot and "
            f"the spot footprints are coarse. {default[0].upper()}{default[1:]}."
        )
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)


def _check_grid(
    grid: Grid,
    pixel_size: float,
    diameter: float,
    n_spots: int,
    footprint: str,
    cs: str,
    um_per_unit: float,
) -> None:
    """Refuse an HR grid larger than :data:`MAX_GRID_PIXELS` or than the memory can hold, before it is built."""
    h, w = grid.shape
    n_px = h * w
    radius_px = diameter / 2 / pixel_size
    what = (
        f"pixel_size={pixel_size:g} ({cs!r} units) gives an HR grid of {h} x {w} = {n_px / 1e6:.4g} M pixels, with "
        f"spots {2 * radius_px:.3g} HR pixels across"
    )
    default = _default_text(diameter, um_per_unit)
    if n_px > MAX_GRID_PIXELS:
        suggest = _round_up(pixel_size * np.sqrt(n_px / MAX_GRID_PIXELS))
        raise ValueError(
            f"{what}: more than stsr handles ({MAX_GRID_PIXELS / 1e9:.2g} G pixels). Use pixel_size >= {suggest:.3g} "
            f"({default}), or crop the slide (spatialdata.bounding_box_query)."
        )
    need = estimate_memory(grid.shape, n_spots, radius_px, footprint)
    free = available_memory()
    log.info("%s; preparing it needs about %.2g GiB of memory", what, need / 2**30)
    if free is None or need <= free:
        return
    # the grid's and the footprints' bytes scale as 1 / pixel_size^2: aim at half the available memory
    target = max(0.5 * free - BASE_BYTES, 1.0)
    suggest = _round_up(pixel_size * np.sqrt(max(need - BASE_BYTES, 1.0) / target))
    too_coarse = (
        " That is coarser than a quarter of the spot diameter: crop the slide instead."
        if suggest > diameter / 4
        else ""
    )
    raise ValueError(
        f"{what} ({n_spots} spots): preparing it needs about {need / 2**30:.3g} GiB of memory, but only "
        f"{free / 2**30:.3g} GiB are available. Use a larger pixel_size, e.g. pixel_size={suggest:.3g} (about half "
        f"the available memory; {default}), or crop the slide (spatialdata.bounding_box_query).{too_coarse}"
    )


def _round_up(value: float) -> float:
    """``value`` rounded up to 2 significant digits."""
    e = np.floor(np.log10(value)) - 1
    return float(np.ceil(value / 10**e) * 10**e)


def _check_tissue_covers_spots(
    op: ObservationModel, lr: np.ndarray, mask: np.ndarray, tissue: Any, spots_key: str
) -> None:
    name = repr(tissue) if isinstance(tissue, str) else "the given array"
    covered = op.tissue_area(mask) > 0
    if not covered.any():
        raise ValueError(
            f"The tissue {name} covers none of the {op.n_obs} spots of {spots_key!r} on the HR grid (tissue pixels: "
            f"{int(np.asarray(mask).sum())}). Check that it is the right element or array and that its "
            "transformation places it on the image (same coordinate system and units)."
        )
    lost = ~covered & (lr.sum(0) > 0)
    if lost.any():
        share = lr[:, lost].sum() / max(lr.sum(), 1e-12)
        log.warning(
            "%d of %d spots of %r have no pixel in the tissue %s: their counts (%.1f%% of the total) are left out",
            int(lost.sum()),
            op.n_obs,
            spots_key,
            name,
            100 * share,
        )


def _near_spots(op: ObservationModel, pitch: float | None = None) -> np.ndarray:
    """Grid pixels within 0.75 spot ``pitch`` (grid pixels; default ``op.pitch()``) of a spot centre: the measured
    area (gaps of the lattice included)."""
    from scipy.spatial import cKDTree

    pitch = op.pitch() if pitch is None else pitch
    h, w = op.shape
    rr, cc = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    dist, _ = cKDTree(op.centres).query(
        np.stack([rr.ravel(), cc.ravel()], 1), distance_upper_bound=0.75 * pitch
    )
    return np.isfinite(dist).reshape(h, w)


def _between_spots(
    op: ObservationModel, pitch: float | None = None, occupied: np.ndarray | None = None
) -> np.ndarray:
    """Grid pixels covered by a spot or lying in the gap between neighbouring spots (a morphological closing of the
    spot footprint; ``pitch`` the spot pitch in grid pixels, default ``op.pitch()``; ``occupied``: ``(n_obs,)``
    bool, the spots taken, default all). The gaps of a lattice of in-tissue spots are tissue, whatever the image's
    contrast (e.g. a fluorescence image where sparse, dim nuclei read as background); the outer border is not
    extended."""
    from scipy.ndimage import distance_transform_edt

    if occupied is None:
        covered = op.coverage > 0
    else:
        taken = op.matrix[np.flatnonzero(np.asarray(occupied, bool))]
        covered = np.asarray(taken.sum(0)).reshape(op.shape) > 0
    if op.n_obs < 2 or not covered.any():
        return covered
    radius = np.sqrt(np.median(op.support_area[op.support_area > 0]) / np.pi)
    # the farthest a gap pixel can be from every spot edge: the centre of a square lattice cell
    pitch = op.pitch() if pitch is None else pitch
    r = int(np.ceil(max(0.71 * pitch - radius, 0.0))) + 1
    pad = r + 1  # closing near the grid border must not see the border as empty space
    padded = np.pad(covered, pad)
    # closing by the disk {dy^2 + dx^2 <= r^2}: a dilation (within r of a covered pixel) then an erosion (farther
    # than r from every pixel left out), each a threshold of a Euclidean distance transform. This equals
    # scipy.ndimage.binary_closing with that disk, in time and memory linear in the pixels whatever r (the closing's
    # cost grows as r^2 per pixel and its offset tables as r^4: 6 GB at 200 HR pixels per spot pitch)
    dilated = distance_transform_edt(~padded) <= r
    closed = distance_transform_edt(dilated) > r
    return closed[pad:-pad, pad:-pad] | covered


def _is_spots(shapes: Any, key: str) -> bool:
    try:
        spot_footprint(shapes, key)
    except ValueError:
        return False
    return True


def _align_to_bins(spots: Spots, grid: Grid) -> Grid:
    """Shift the grid so that square bins start on pixel edges: each bin then owns whole pixels (no pixel is
    shared by two abutting bins), which keeps the consistency projection exact."""
    centres, half = spots.on_grid(grid)
    edge_y, edge_x = grid.to_reference(centres[0, 0] - half, centres[0, 1] - half)
    ps = grid.pixel_size
    oy, ox = float(np.mod(edge_y, ps)), float(np.mod(edge_x, ps))
    oy, ox = (oy - ps if oy > 1e-9 else 0.0), (ox - ps if ox > 1e-9 else 0.0)
    shape = (grid.shape[0] + (oy < 0), grid.shape[1] + (ox < 0))
    return Grid(shape, ps, (oy, ox))

"""One gene of an HR expression raster drawn over the histology image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._elements import check_gene, get_raster
from ._draw import (
    check_crop,
    color_limits,
    default_image,
    draw_image,
    draw_map,
    finish_axes,
    opaque,
    raster_window,
    save_figure,
    shared_cs,
    unit_of,
)

__all__ = ["overlay"]


def overlay(
    sdata: Any,
    key: str,
    gene: str,
    *,
    image_key: str | None = None,
    show_image: bool = True,
    coordinate_system: str | None = None,
    alpha: float = 0.6,
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    percentile: tuple[float, float] = (0.0, 99.5),
    crop: tuple[float, float, float, float] | None = None,
    level: int | None = None,
    colorbar: bool = True,
    title: str | None = None,
    ax: Any = None,
    save: str | Path | None = None,
) -> Any:
    """Draw one gene of an HR expression raster on top of the histology image it was predicted from.

    Both elements are placed in ``coordinate_system`` through their transformations (``imshow`` with an ``extent``
    in coordinate-system units), so the map lands exactly where the tissue is. The transformations must be
    axis-aligned scales plus translations in that coordinate system; otherwise a :class:`ValueError` says so.

    Pixels of the map without a value are fully transparent, so the image shows unchanged there: NaN, and pixels
    that are zero in every channel of ``key`` (the maps stsr writes are zero outside the tissue mask). A zero of
    ``gene`` where another gene is non-zero is a measured zero and is drawn. Everywhere else the map is drawn at
    opacity ``alpha`` over the image.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` with the raster (e.g. from :func:`stsr.tl.super_resolve`).
    key
        Image element ``(c, y, x)``, one channel per gene (counts per HR pixel).
    gene
        Channel to draw.
    image_key
        Image drawn underneath. Default: the raster's provenance ``image_key``, else ``"he"``, else the only image
        with at most 4 channels; no image if there is none.
    show_image
        Draw the image at all.
    coordinate_system
        Default: ``"global"`` if the raster and the image share it, else their first shared one.
    alpha
        Opacity of the gene map over the image. Without an image the map is opaque, so its colours are exactly the
        colour bar's.
    cmap
        Colour map of the gene map.
    vmin, vmax
        Colour limits; each defaults to the given ``percentile`` of the values in view (pixels without a value
        excluded).
    percentile
        ``(low, high)`` percentiles used for missing ``vmin`` / ``vmax``.
    crop
        ``(xmin, ymin, xmax, ymax)`` in ``coordinate_system`` units; ``None`` shows everything.
    level
        Pyramid level of the raster to draw (coarser levels hold local means, i.e. still counts per HR pixel).
        Default: the finest level whose view is at most 2048 pixels wide. The image's level is always chosen so.
    colorbar
        Add a colour bar labelled with the gene and the unit.
    title
        Axes title (default: the gene).
    ax
        Axes to draw in (default: a new figure).
    save
        Path to save the figure to (PNG unless the suffix says otherwise).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`; ``ax.images`` holds the image (first, when drawn) and the gene map (last;
    its array is masked where there is no value).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    element = get_raster(sdata, key)
    gene = check_gene(element, gene, key)
    crop_box = check_crop(crop)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    if show_image:
        image_key = image_key if image_key is not None else default_image(sdata, key)
        if image_key is not None:
            get_raster(sdata, image_key)
    else:
        image_key = None
    cs = shared_cs(sdata, [key, image_key], coordinate_system)
    values, extent, _ = raster_window(sdata, key, gene, cs, crop_box, level)
    lo, hi = color_limits([values], vmin, vmax, percentile)

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    image_extent = None
    if image_key is not None:
        art = draw_image(ax, sdata, image_key, cs, crop_box)
        image_extent = art.get_extent()
    mappable = draw_map(ax, values, extent, cmap, Normalize(lo, hi), alpha if image_key is not None else 1.0)
    mappable.set_label(f"{key}:{gene}")
    finish_axes(ax, cs, image_extent if image_extent is not None else extent, crop_box)
    if colorbar:
        cb = ax.figure.colorbar(opaque(mappable), ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(f"{gene} ({unit_of(sdata, key)})")
    ax.set_title(gene if title is None else title)
    save_figure(ax.figure, save)
    return ax

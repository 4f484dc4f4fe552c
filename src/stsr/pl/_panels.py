"""Side-by-side panels: measured LR spots, HR prediction, its uncertainty and the ground truth, on one scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._constants import INSTANCE_KEY, KEY_SUPER_RESOLVE, REGION_KEY, SHAPES_SPOTS
from .._elements import check_gene, element_affine, get_raster, pixel_area, provenance
from .._validate import check_element, check_genes, element_type
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
    transparent_bad,
    unit_of,
)

__all__ = ["panels", "spot_values"]


def panels(
    sdata: Any,
    gene: str,
    *,
    lr: str | bool | None = None,
    hr: str = KEY_SUPER_RESOLVE,
    std: str | bool | None = None,
    truth: str | None = None,
    table_key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    coordinate_system: str | None = None,
    crop: tuple[float, float, float, float] | None = None,
    cmap: str = "magma",
    std_cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    percentile: tuple[float, float] = (0.0, 99.5),
    alpha: float = 0.6,
    panel_size: float = 4.0,
    save: str | Path | None = None,
) -> Any:
    """Compare one gene at low and high resolution: LR | HR | uncertainty | ground truth, side by side.

    All expression panels show a *density in counts per HR pixel* of the raster ``hr`` so they share one colour
    scale (``vmin``/``vmax``, by default percentiles of the values of all of them in view): an LR spot's counts are
    divided by the spot's area in HR pixels (``spot area / HR pixel area``, both in ``coordinate_system`` units;
    e.g. a 55 µm Visium spot over 2 µm HR pixels covers ~594 HR pixels); an LR raster's values, and a ground-truth
    raster's on another grid, are scaled by ``HR pixel area / their pixel area``. The uncertainty panel has its own
    colour scale.

    Every panel is drawn over the histology as :func:`stsr.pl.overlay` draws it: raster pixels without a value (NaN,
    or zero in every channel, as outside the tissue mask of the maps stsr writes) and spots without counts are fully
    transparent, so the image shows unchanged there; the rest is drawn at opacity ``alpha``.

    Parameters
    ----------
    sdata
        A :class:`~spatialdata.SpatialData` object.
    gene
        Gene to show (a channel of ``hr``).
    lr
        Measured LR data: a shapes element (spots, circles or polygons, coloured by their counts in a table that
        annotates it) or an LR raster image element. Default: the ``spots_key`` recorded by
        :func:`stsr.tl.super_resolve`, else ``"spots"`` when present; ``False`` for no LR panel.
    hr
        The HR raster (counts per HR pixel).
    std
        Per-pixel standard deviation raster; default ``f"{hr}_std"`` when present; ``False`` for none.
    truth
        Ground-truth raster (counts per pixel), e.g. ``"hr_truth"``.
    table_key
        Table holding the LR counts when ``lr`` is a shapes element (default: the one annotating it; the
        provenance's ``table_key`` first).
    image_key, show_image
        Histology drawn under every panel (see :func:`stsr.pl.overlay`).
    coordinate_system
        Common coordinate system (default ``"global"`` when shared by all, else the first shared one).
    crop
        ``(xmin, ymin, xmax, ymax)`` in coordinate-system units.
    cmap, std_cmap
        Colour maps of the expression panels and of the uncertainty panel.
    vmin, vmax, percentile
        Shared colour limits of the expression panels (percentiles of the pooled values in view, pixels without a
        value excluded, when not given).
    alpha
        Opacity of the expression layers over the image. Without an image they are opaque, so their colours are
        exactly the colour bars'.
    panel_size
        Size (inches) of one panel.
    save
        Path to save the figure to (PNG unless the suffix says otherwise).

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`; its first axes are the panels, in the order LR, HR, uncertainty, truth
    (those present). Each panel's expression artist (``AxesImage`` or ``PatchCollection``) carries the colour
    limits (``get_clim()``); a raster's array is masked where there is no value.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    hr_el = get_raster(sdata, hr)
    gene = check_gene(hr_el, gene, hr)
    crop_box = check_crop(crop)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    lr = _default_lr(sdata, hr) if lr is None else (None if lr is False else lr)
    std = (
        (f"{hr}_std" if f"{hr}_std" in sdata.images else None)
        if std is None
        else (None if std is False else std)
    )
    if isinstance(std, str):
        check_gene(get_raster(sdata, std), gene, std)
    if truth is not None:
        _check_raster(sdata, truth)
        check_gene(sdata[truth], gene, truth)
    if isinstance(lr, str):
        kind = element_type(sdata, lr)
        if kind not in ("shapes", "images"):
            check_element(sdata, lr, "shapes")
            raise ValueError(
                f"lr={lr!r} is a {kind[:-1]} element; pass a shapes element (spots) or an LR raster."
            )
        if kind == "images":
            check_gene(sdata[lr], gene, lr)
    if show_image:
        image_key = (
            image_key
            if image_key is not None
            else default_image(sdata, hr, exclude=tuple(k for k in (lr, std, truth) if isinstance(k, str)))
        )
        if image_key is not None:
            get_raster(sdata, image_key)
    else:
        image_key = None
    keys = [k for k in (hr, lr, std, truth, image_key) if isinstance(k, str)]
    cs = shared_cs(sdata, keys, coordinate_system)
    hr_area = pixel_area(element_affine(hr_el, cs, hr))

    # --- values in view
    hr_vals, hr_ext, _ = raster_window(sdata, hr, gene, cs, crop_box, None)
    shared_values = [hr_vals]
    lr_layer: dict[str, Any] | None = None
    if isinstance(lr, str):
        if element_type(sdata, lr) == "shapes":
            if table_key is None:  # the table recorded by super_resolve, when it is still there
                recorded = provenance(sdata, hr).get("table_key")
                table_key = recorded if isinstance(recorded, str) and recorded in sdata.tables else None
            polys, dens = _spot_layer(sdata, lr, gene, cs, hr_area, table_key)
            in_view = _in_view(polys, crop_box)
            lr_layer = {"kind": "shapes", "polys": polys, "values": dens}
            shared_values.append(dens[in_view])
        else:
            vals, ext, mat = raster_window(sdata, lr, gene, cs, crop_box, None)
            vals = vals * (hr_area / pixel_area(mat))
            lr_layer = {"kind": "raster", "values": vals, "extent": ext}
            shared_values.append(vals)
    truth_layer = None
    if truth is not None:
        vals, ext, mat = raster_window(sdata, truth, gene, cs, crop_box, None)
        vals = vals * (hr_area / pixel_area(mat))
        truth_layer = (vals, ext)
        shared_values.append(vals)
    std_layer = raster_window(sdata, std, gene, cs, crop_box, None)[:2] if std is not None else None
    lo, hi = color_limits(shared_values, vmin, vmax, percentile)
    norm = Normalize(lo, hi)
    layer_alpha = alpha if image_key is not None else 1.0

    # --- figure
    names = (
        (["lr"] if lr_layer else [])
        + ["hr"]
        + (["std"] if std_layer else [])
        + (["truth"] if truth_layer else [])
    )
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(panel_size * len(names) + 1.5, panel_size),
        sharex=True,
        sharey=True,
        squeeze=False,
        constrained_layout=True,
    )
    axes = list(axes[0])
    background = None
    unit = unit_of(sdata, hr)
    shared_mappable = None
    for ax, name in zip(axes, names):
        if image_key is not None:
            if background is None:
                art = draw_image(ax, sdata, image_key, cs, crop_box)
                background = (
                    art.get_array(),
                    art.get_extent(),
                    art.get_cmap() if art.get_array().ndim == 2 else None,
                )
            else:
                ax.imshow(background[0], extent=background[1], origin="upper", cmap=background[2])
        view_extent = background[1] if background is not None else hr_ext
        if name == "lr":
            assert lr_layer is not None
            if lr_layer["kind"] == "shapes":
                from matplotlib.collections import PatchCollection
                from matplotlib.patches import Polygon as MplPolygon

                patches, vals = [], []
                for poly_parts, v in zip(lr_layer["polys"], lr_layer["values"]):
                    for part in poly_parts:
                        patches.append(MplPolygon(part, closed=True))
                        vals.append(v)
                coll = PatchCollection(
                    patches, cmap=transparent_bad(cmap), norm=norm, alpha=layer_alpha, edgecolor="none"
                )
                coll.set_array(np.asarray(vals, dtype=float))
                ax.add_collection(coll)
                mappable = coll
            else:
                mappable = draw_map(ax, lr_layer["values"], lr_layer["extent"], cmap, norm, layer_alpha)
            ax.set_title(f"LR {lr} (density)")
            shared_mappable = shared_mappable or mappable
        elif name == "hr":
            mappable = draw_map(ax, hr_vals, hr_ext, cmap, norm, layer_alpha)
            ax.set_title(f"HR {hr}")
            shared_mappable = mappable
        elif name == "std":
            assert std_layer is not None
            s_lo, s_hi = color_limits([std_layer[0]], None, None, percentile)
            mappable = draw_map(ax, std_layer[0], std_layer[1], std_cmap, Normalize(s_lo, s_hi), layer_alpha)
            ax.set_title(f"uncertainty {std}")
            cb = fig.colorbar(opaque(mappable), ax=ax, shrink=0.8)
            cb.set_label(f"{gene} std ({unit})")
        else:
            assert truth_layer is not None
            mappable = draw_map(ax, truth_layer[0], truth_layer[1], cmap, norm, layer_alpha)
            ax.set_title(f"truth {truth}")
        finish_axes(ax, cs, view_extent, crop_box)
    shared_axes = [ax for ax, n in zip(axes, names) if n != "std"]
    cb = fig.colorbar(opaque(shared_mappable), ax=shared_axes, shrink=0.8)
    cb.set_label(f"{gene} ({unit})")
    fig.suptitle(gene)
    save_figure(fig, save)
    return fig


# ---------------------------------------------------------------------------------------------------- helpers
def _check_raster(sdata: Any, key: str) -> None:
    get_raster(sdata, key)


def _default_lr(sdata: Any, hr: str) -> str | None:
    rec = provenance(sdata, hr).get("spots_key")
    if isinstance(rec, str) and rec in sdata:
        return rec
    return SHAPES_SPOTS if SHAPES_SPOTS in sdata.shapes else None


def spot_values(sdata: Any, shapes_key: str, gene: str, table_key: str | None = None) -> pd.Series:
    """Counts of ``gene`` per shape of ``shapes_key`` from the table annotating it, indexed like the shapes (NaN
    for shapes without a row).

    Raises
    ------
    KeyError
        If no table annotates ``shapes_key`` or the gene is not in it (with close matches).
    """
    shapes = check_element(sdata, shapes_key, "shapes")
    candidates = []
    for name, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        region = [region] if isinstance(region, str) else list(region or [])
        if shapes_key in region:
            candidates.append(name)
    if table_key is not None and table_key in candidates:
        name = table_key
    elif table_key is not None:
        check_element(sdata, table_key, "tables")
        raise KeyError(
            f"Table {table_key!r} does not annotate shapes {shapes_key!r}; tables that do: {candidates or 'none'}."
        )
    elif not candidates:
        raise KeyError(
            f"No table annotates shapes {shapes_key!r}; the LR panel needs its counts. Pass lr=False, or add a table "
            f"with region={shapes_key!r} (spatialdata.models.TableModel.parse)."
        )
    else:
        with_gene = [c for c in candidates if gene in sdata.tables[c].var_names]
        name = (with_gene or candidates)[0]
    table = sdata.tables[name]
    check_genes([gene], table.var_names, where=f"table {name!r}")
    attrs = table.uns.get("spatialdata_attrs", {})
    region_key = attrs.get("region_key", REGION_KEY)
    instance_key = attrs.get("instance_key", INSTANCE_KEY)
    rows = np.asarray(table.obs[region_key] == shapes_key)
    col = table[rows, gene].X
    col = np.asarray(col.toarray() if hasattr(col, "toarray") else col, dtype=np.float64).ravel()
    values = pd.Series(col, index=pd.Index(table.obs[instance_key].to_numpy()[rows]))
    values = values[~values.index.duplicated()]
    return values.reindex(shapes.index)


def _spot_layer(
    sdata: Any, key: str, gene: str, cs: str, hr_area: float, table_key: str | None
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Spot outlines in ``cs`` (list of parts, each ``(n, 2)`` x, y) and their density in counts per HR pixel."""
    from shapely import affinity

    shapes = sdata.shapes[key]
    counts = spot_values(sdata, key, gene, table_key).to_numpy()
    mat = element_affine(shapes, cs, key)
    params = [mat[1, 1], mat[1, 0], mat[0, 1], mat[0, 0], mat[1, 2], mat[0, 2]]
    geoms = list(shapes.geometry)
    exact_area = None
    if set(shapes.geometry.geom_type) <= {"Point"}:
        if "radius" not in shapes.columns:
            raise ValueError(
                f"Shapes {key!r} are points without a 'radius' column; LR spots must be circles."
            )
        radius = np.asarray(shapes["radius"], float)
        geoms = [g.buffer(r, quad_segs=16) for g, r in zip(geoms, radius)]
        exact_area = np.pi * radius**2 * pixel_area(mat)  # circle area in the coordinate system
    polys, dens = [], []
    for i, (g, c) in enumerate(zip(geoms, counts)):
        g = affinity.affine_transform(g, params)
        parts = list(g.geoms) if g.geom_type == "MultiPolygon" else [g]
        polys.append([np.asarray(p.exterior.coords) for p in parts if p.geom_type == "Polygon"])
        area_hr_px = (exact_area[i] if exact_area is not None else g.area) / hr_area
        dens.append(c / area_hr_px if area_hr_px > 0 else np.nan)
    return polys, np.asarray(dens, dtype=np.float64)


def _in_view(polys: list[list[np.ndarray]], crop_box: Any) -> np.ndarray:
    if crop_box is None:
        return np.ones(len(polys), bool)
    out = np.zeros(len(polys), bool)
    for i, parts in enumerate(polys):
        if not parts:
            continue
        xy = np.concatenate(parts)
        out[i] = (
            xy[:, 0].max() >= crop_box[0]
            and xy[:, 0].min() <= crop_box[2]
            and xy[:, 1].max() >= crop_box[1]
            and xy[:, 1].min() <= crop_box[3]
        )
    return out

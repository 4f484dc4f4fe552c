"""Micrometres per unit of a coordinate system, read off the spots themselves.

spatialdata records no unit. stsr's loaders use micrometres; readers such as ``spatialdata_io.visium`` use the
pixels of the full-resolution image. The spot lattice tells them apart: a hexagonal lattice of disks is Visium
(centres 100 µm apart), a square lattice of disks is legacy ST (100 µm spots), each only where the disks' diameter
is the share of the pitch the platform has (:data:`DIAMETER_PER_PITCH`). Visium's unit is read off the pitch, which
the centres give exactly, not off the diameter, which readers record by different conventions (Space Ranger's
``spot_diameter_fullres``, which ``spatialdata_io.visium`` makes the circles' diameter, is that of a 65 µm spot, not
the 55 µm of the capture area). Square bins named as
``spatialdata_io.visium_hd`` names them (``..._square_016um``) are Visium HD bins of that side. Elsewhere (other
square bins, cells, irregular spots) the unit is taken to be the micrometre; the caller overrides any of these with
``um_per_unit=`` (:func:`stsr.tl.super_resolve`, :func:`stsr.tl.prior_map`).
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ._spots import Spots

__all__ = ["microns_per_unit", "check_um_per_unit", "PLATFORM_UM"]

log = logging.getLogger("stsr")

#: The size that gives a recognised lattice its unit, in micrometres: Visium's pitch (centre to centre, exact on
#: every slide), legacy ST's spot diameter (arrays and their aligned centres vary in pitch; stsr's loaders and
#: exports give its spots 100 µm).
PLATFORM_UM = {"visium": ("pitch", 100.0), "legacy_st": ("diameter", 100.0)}
#: Range of spot diameter / pitch in which a lattice of disks is taken for its platform: Visium 0.55 (0.65 with Space
#: Ranger's 65 µm ``spot_diameter_fullres``), legacy ST 0.5. Disks that touch (e.g. bins drawn as circles) or lie
#: far apart are some other platform, whose unit the lattice does not tell.
DIAMETER_PER_PITCH = (0.3, 0.8)


def lattice(centres: np.ndarray) -> str | None:
    """``"hexagonal"``, ``"square"`` or ``None`` (too few points, or irregular), from the number of neighbours at
    the typical nearest-neighbour distance within 1.3 pitches (6 on a hexagonal lattice, 4 on a square one, whose
    diagonal neighbours lie at 1.41)."""
    from scipy.spatial import cKDTree

    centres = np.asarray(centres, float)
    if len(centres) < 20:
        return None
    tree = cKDTree(centres)
    d, _ = tree.query(centres, k=2)
    pitch = float(np.median(d[:, 1]))
    if pitch <= 0:
        return None
    counts = np.array([len(n) - 1 for n in tree.query_ball_point(centres, 1.3 * pitch)])
    # interior points (the mode) tell the lattice; border points have fewer neighbours
    values, freq = np.unique(counts, return_counts=True)
    mode = int(values[np.argmax(freq)])
    return {6: "hexagonal", 4: "square"}.get(mode)


def check_um_per_unit(value: float) -> float:
    """``value`` as a float, or a clear error unless it is a positive finite number."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(
            "um_per_unit must be a positive number: micrometres per unit of the coordinate system (e.g. the "
            f"image's µm per pixel when the spots are given in its pixels), got {value!r}."
        )
    return float(value)


#: ``spatialdata_io.visium_hd`` names each bin size's shapes ``f"{dataset_id}_square_{size:03d}um"``.
VISIUM_HD_BINS = re.compile(r"(?:^|_)square_(\d{3})um$")


def microns_per_unit(spots: Spots, given: float | None = None) -> tuple[float, str]:
    """Micrometres per unit of the spots' coordinate system, and how it was found.

    Parameters
    ----------
    spots
        The :class:`~stsr.pp._spots.Spots` (centres and diameter in units of their coordinate system, footprint).
    given
        The caller's value (``um_per_unit=``), used as it is once checked; ``None`` reads it off the spots.

    Returns
    -------
    ``(µm per unit, reason)``.
    """
    if given is not None:
        return check_um_per_unit(given), "given (um_per_unit=)"
    hd = VISIUM_HD_BINS.search(spots.key) if spots.footprint == "squares" else None
    if hd is not None and spots.diameter > 0:
        um = float(hd.group(1))
        return um / spots.diameter, f"square bins named {spots.key!r}: Visium HD ({um:g} µm bins)"
    if spots.footprint == "disks" and spots.diameter > 0:
        kind = lattice(spots.centres)
        platform = {"hexagonal": "visium", "square": "legacy_st"}.get(kind or "")
        if platform is not None:
            ratio = spots.diameter / spots.pitch
            lo, hi = DIAMETER_PER_PITCH
            if lo <= ratio <= hi:
                size, um = PLATFORM_UM[platform]
                if size == "pitch":
                    # to 6 digits: the median distance of float centres is not exact
                    per_unit = float(f"{um / spots.pitch:.6g}")
                    return per_unit, f"{kind} lattice of disks: {platform} (centres {um:g} µm apart)"
                return um / spots.diameter, f"{kind} lattice of disks: {platform} ({um:g} µm spots)"
            return 1.0, (
                f"coordinate system taken to be in micrometres ({kind} lattice of disks {ratio:.2g} pitch across: "
                f"not {platform}, whose disks are {lo:g}-{hi:g} pitch across)"
            )
    return 1.0, "coordinate system taken to be in micrometres"

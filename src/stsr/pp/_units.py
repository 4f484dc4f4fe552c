"""Micrometres per unit of a coordinate system, read off the spots themselves.

spatialdata records no unit. stsr's loaders use micrometres; readers such as ``spatialdata_io.visium`` use the
pixels of the full-resolution image. The spot lattice tells them apart: a hexagonal lattice of disks is Visium
(55 µm spots), a square lattice of disks is legacy ST (100 µm spots). Elsewhere (square bins, cells, irregular
spots) the unit is taken to be the micrometre, which the caller can override.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["microns_per_unit", "SPOT_DIAMETER_UM"]

log = logging.getLogger("stsr")

#: Spot diameters of the platforms recognised by their lattice, in micrometres.
SPOT_DIAMETER_UM = {"visium": 55.0, "legacy_st": 100.0}


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


def microns_per_unit(centres: np.ndarray, diameter: float, footprint: str) -> tuple[float, str]:
    """Micrometres per coordinate unit, and how it was found.

    Parameters
    ----------
    centres
        ``(n, 2)`` spot centres in the coordinate system.
    diameter
        Spot diameter (disks) or side (squares) in the same units.
    footprint
        ``"disks"`` or ``"squares"``.

    Returns
    -------
    ``(µm per unit, reason)``.
    """
    if footprint == "disks" and diameter > 0:
        kind = lattice(centres)
        platform = {"hexagonal": "visium", "square": "legacy_st"}.get(kind or "")
        if platform is not None:
            um = SPOT_DIAMETER_UM[platform]
            return um / diameter, f"{kind} lattice of disks: {platform} ({um:g} µm spots)"
    return 1.0, "coordinate system taken to be in micrometres"

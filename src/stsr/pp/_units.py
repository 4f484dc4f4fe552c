"""Micrometres per unit of a coordinate system, read off the spots themselves.

spatialdata records no unit. stsr's loaders use micrometres; readers such as ``spatialdata_io.visium`` use the
pixels of the full-resolution image. The spot lattice tells them apart: a hexagonal lattice of disks is Visium
(55 µm spots), a square lattice of disks is legacy ST (100 µm spots). Elsewhere (square bins, cells, irregular
spots) the unit is taken to be the micrometre, which the caller can override.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ._spots import Spots

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


def microns_per_unit(spots: Spots) -> tuple[float, str]:
    """Micrometres per unit of the spots' coordinate system, and how it was found.

    Parameters
    ----------
    spots
        The :class:`~stsr.pp._spots.Spots` (centres and diameter in units of their coordinate system, footprint).

    Returns
    -------
    ``(µm per unit, reason)``.
    """
    if spots.footprint == "disks" and spots.diameter > 0:
        kind = lattice(spots.centres)
        platform = {"hexagonal": "visium", "square": "legacy_st"}.get(kind or "")
        if platform is not None:
            um = SPOT_DIAMETER_UM[platform]
            return um / spots.diameter, f"{kind} lattice of disks: {platform} ({um:g} µm spots)"
    return 1.0, "coordinate system taken to be in micrometres"

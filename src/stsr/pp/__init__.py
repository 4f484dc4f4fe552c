"""stsr.pp: preprocessing — HR grids aligned to the image, LR inputs, ground truth, masks and gene selection."""

from __future__ import annotations

from ..observation import Grid, ObservationModel
from ._downsample import downsample
from ._genes import select_genes
from ._grid import grid_transformations, hr_grid, raster_element
from ._mask import tissue_mask
from ._pseudo_spots import pseudo_spots
from ._spots import rasterize_spots, spots_observation_model
from ._transcripts import bin_transcripts

__all__ = [
    "Grid",
    "ObservationModel",
    "bin_transcripts",
    "downsample",
    "grid_transformations",
    "hr_grid",
    "pseudo_spots",
    "raster_element",
    "rasterize_spots",
    "select_genes",
    "spots_observation_model",
    "tissue_mask",
]

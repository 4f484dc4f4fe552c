"""stsr.tl: tools — super-resolution, training, and tables for scanpy/squidpy."""

from __future__ import annotations

from ._adapt import adapt
from ._aggregate import aggregate
from ._evaluate import evaluate
from ._pairs import raster_grid, training_pair
from ._prior_map import prior_map
from ._super_resolve import resolve_device, super_resolve
from ._to_table import to_table
from ._train import train

__all__ = [
    "super_resolve",
    "prior_map",
    "to_table",
    "aggregate",
    "evaluate",
    "train",
    "adapt",
    "training_pair",
    "raster_grid",
    "resolve_device",
]

"""stsr.tl: tools — super-resolution, training, and tables for scanpy/squidpy."""

from __future__ import annotations

from ._pairs import raster_grid, training_pair
from ._super_resolve import resolve_device, super_resolve
from ._train import train

__all__ = ["super_resolve", "train", "training_pair", "raster_grid", "resolve_device"]

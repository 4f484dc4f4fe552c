"""stsr.pl: plotting HR expression rasters over the histology, and LR / HR / uncertainty / truth side by side."""

from __future__ import annotations

from ._overlay import overlay
from ._panels import panels, spot_values

__all__ = ["overlay", "panels", "spot_values"]

"""stsr: super-resolution of spot-based spatial transcriptomics, conditioned on histology."""

from __future__ import annotations

__version__ = "0.1.0"

from . import datasets, metrics, models, pl, pp, tl  # noqa: E402

__all__ = ["datasets", "metrics", "models", "pl", "pp", "tl", "__version__"]

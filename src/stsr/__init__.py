"""stsr: super-resolution of spot-based spatial transcriptomics, conditioned on histology.

Submodules load on first use (``stsr.pp``, ``stsr.tl``, ...), so ``import stsr.models`` needs only torch, numpy and
scipy: the diffusion core trains on machines without the SpatialData stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["datasets", "metrics", "models", "pl", "pp", "tl", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, metrics, models, pl, pp, tl  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'stsr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

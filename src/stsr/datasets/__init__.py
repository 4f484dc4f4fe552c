"""stsr.datasets: real public slides and procedurally generated ones, each as a validated SpatialData.

Real loaders read ``$STSR_DATA_DIR/<dataset>/`` when present, else download from the original public source
(checksummed, cached in ``$STSR_CACHE_DIR`` or the user cache).
"""

from ._build import SPATIAL_META_KEY
from ._dbit import dbit_mouse_embryo
from ._fetch import REGISTRY, DataUnavailableError, cache_dir, data_path
from ._her2st import HER2ST_SECTIONS, her2st
from ._semi_synthetic import semi_synthetic
from ._synthetic import synthetic
from ._vizgen import vizgen_mouse_brain_mini
from ._xenium import xenium_lung_tiny

__all__ = [
    "her2st",
    "HER2ST_SECTIONS",
    "vizgen_mouse_brain_mini",
    "dbit_mouse_embryo",
    "xenium_lung_tiny",
    "synthetic",
    "semi_synthetic",
    "data_path",
    "cache_dir",
    "REGISTRY",
    "DataUnavailableError",
    "SPATIAL_META_KEY",
]

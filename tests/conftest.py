"""Shared fixtures: the real datasets, each loaded once per test session.

Tests read the real data through ``$STSR_DATA_DIR`` (default: ``<repo>/../shared/data``). Tests that need it FAIL
when it is missing (the loaders raise), they do not skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("STSR_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local real-data directory (fails if it does not exist)."""
    path = Path(os.environ["STSR_DATA_DIR"])
    assert path.is_dir(), f"STSR_DATA_DIR={path} does not exist; point it at the shared data directory."
    return path


@pytest.fixture(scope="session")
def her2st_c2(data_dir):
    """HER2ST section C2 (full-resolution H&E, 187 spots)."""
    from stsr.datasets._her2st import her2st

    return her2st("C2")


@pytest.fixture(scope="session")
def her2st_c2_crop(her2st_c2):
    """``her2st_c2_crop(lo, hi)``: a new SpatialData of the C2 H&E, spots and table inside the square
    ``[lo, hi]`` µm (x and y) of the 'global' frame, as a user crops a slide."""
    import spatialdata as sd

    def crop(lo: float, hi: float):
        part = sd.bounding_box_query(
            her2st_c2,
            axes=("x", "y"),
            min_coordinate=[lo, lo],
            max_coordinate=[hi, hi],
            target_coordinate_system="global",
        )
        return sd.SpatialData(
            images={"he": part["he"]}, shapes={"spots": part["spots"]}, tables={"table": part["table"]}
        )

    return crop


@pytest.fixture(scope="session")
def her2st_c2_semi(her2st_c2_crop):
    """``(source, semi)``: a 1.5 mm square of HER2ST C2 and its semi-synthetic slide
    (:func:`stsr.datasets.semi_synthetic`, 12 genes, seed 3)."""
    from stsr.datasets import semi_synthetic

    source = her2st_c2_crop(2400, 3900)
    return source, semi_synthetic(source, "he", n_genes=12, seed=3)


@pytest.fixture(scope="session")
def vizgen(data_dir):
    """Vizgen MERFISH mouse-brain mini crop, plane z = 1."""
    from stsr.datasets._vizgen import vizgen_mouse_brain_mini

    return vizgen_mouse_brain_mini(z=1)


@pytest.fixture(scope="session")
def dbit(data_dir):
    """DBiT-seq FFPE mouse embryo (2,499 pixels of 25 µm)."""
    from stsr.datasets._dbit import dbit_mouse_embryo

    return dbit_mouse_embryo()


@pytest.fixture(scope="session")
def xenium(data_dir):
    """Tiny Xenium lung fixture (200 cells) with H&E."""
    from stsr.datasets._xenium import xenium_lung_tiny

    return xenium_lung_tiny()


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory of small untrained stsr models (``make_tiny_model(image_channels=2)``): for tests of mechanics."""
    import torch

    from stsr.models import ModelConfig, STSRModel

    def make(**changes):
        torch.manual_seed(0)
        cfg = dict(
            width=8,
            hist_width=8,
            channel_mult=(1, 1, 1),
            time_dim=16,
            n_heads=2,
            shared_dim=8,
            distill_dim=8,
            align_dim=4,
            disc_width=8,
            groups=4,
        )
        return STSRModel(ModelConfig(**{**cfg, **changes}))

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model):
    """A small untrained stsr model (fast): for tests of mechanics (alignment, consistency, storage), not accuracy."""
    return make_tiny_model()


@pytest.fixture(autouse=True)
def _fresh_prior_scores():
    """Each test starts without the prior scores an earlier test's call kept for reuse
    (``stsr.tl._semantic_prior.PRIOR_SCORES_CACHE_BYTES``): a test sees the image read unless it repeats a call."""
    from stsr.tl._semantic_prior import clear_scores_cache

    clear_scores_cache()
    yield

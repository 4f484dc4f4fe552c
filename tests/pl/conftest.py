"""Fixtures for the plotting tests (Agg backend; figures closed after each test)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import spatialdata as sd  # noqa: E402
from _pl_data import make_sdata  # noqa: E402


@pytest.fixture
def sdata() -> sd.SpatialData:
    return make_sdata()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")

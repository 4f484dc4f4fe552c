"""Micrometres per unit read off the spots (``stsr.pp._units.microns_per_unit``)."""

from __future__ import annotations

import numpy as np
import pytest

import stsr
from stsr.pp._spots import Spots
from stsr.pp._units import microns_per_unit
from stsr.tl._inputs import default_pixel_size


def _hexagonal(pitch: float, n: int = 12) -> np.ndarray:
    rows, cols = np.mgrid[0:n, 0:n]
    y = rows * pitch * np.sqrt(3) / 2
    x = cols * pitch + (rows % 2) * pitch / 2
    return np.stack([x.ravel(), y.ravel()], 1).astype(float)


def _square(pitch: float, n: int = 12) -> np.ndarray:
    rows, cols = np.mgrid[0:n, 0:n]
    return np.stack([cols.ravel(), rows.ravel()], 1).astype(float) * pitch


def _spots(centres: np.ndarray, diameter: float, footprint: str = "disks", key: str = "spots") -> Spots:
    return Spots(key, "he", footprint, "global", centres, diameter / 2, np.arange(len(centres)), None)


def test_visium_in_image_pixels_from_the_pitch_whatever_the_diameter_convention():
    """``spatialdata_io.visium`` gives the circles Space Ranger's ``spot_diameter_fullres`` (a 65 µm spot) in
    full-resolution pixels; the centres lie 100 µm apart. At 0.7 µm per pixel the unit is 0.7 µm from the pitch, for
    the 65 µm convention as for 55 µm disks (read off the diameter, the 65 µm circles gave 55 / 92.9 = 0.59)."""
    px = 0.7
    for diameter_um in (55.0, 65.0):
        um, why = microns_per_unit(_spots(_hexagonal(100 / px), diameter_um / px))
        assert um == pytest.approx(px)
        assert "visium" in why


def test_legacy_st_from_its_spots():
    um, why = microns_per_unit(_spots(_square(200 / 0.5), 100 / 0.5))
    assert um == pytest.approx(0.5) and "legacy_st (100 µm spots)" in why


@pytest.mark.parametrize("lattice", [_hexagonal, _square])
def test_disks_of_no_known_geometry_are_in_micrometres(lattice):
    """Disks that touch (bins drawn as circles) or lie far apart are no Visium or legacy ST spots: taken to be in
    micrometres, and the reason says why the lattice was not used."""
    for diameter in (16.0, 3.0):
        um, why = microns_per_unit(_spots(lattice(16.0), diameter))
        assert um == 1.0
        assert "taken to be in micrometres" in why and "pitch across" in why


def test_touching_disks_on_a_square_lattice_are_read_at_their_scale():
    """16 µm disks 16 µm apart (a Visium-HD-like slide of circles, in µm) were read as legacy ST (100 µm spots:
    6.25 µm per unit), so the image teacher read 13 image pixels per 1.6 µm HR pixel instead of 2 (42 times the
    pixels through the network). The public call records the unit and the teacher's scale."""
    sdata = stsr.datasets.synthetic(
        size_um=(240.0, 240.0),
        n_genes=3,
        um_per_px=0.5,
        hr_pixel_um=2.0,
        spot_diameter_um=16.0,
        spot_pitch_um=16.0,
        lattice="square",
        seed=0,
    )
    genes = list(sdata.tables["table"].var_names[:2])
    stsr.tl.prior_map(sdata, "he", genes, key_added="p", progress=False)
    record = sdata.attrs["stsr"]["p"]
    assert record["um_per_unit"] == 1.0
    # the default pixel: a tenth of the 16 µm disks is 1.6 µm, finer than the 2 µm floor
    assert record["pixel_size"] == pytest.approx(2.0)
    assert record["image_scale"] == 3  # 0.67 µm per teacher pixel
    assert sdata["p"]["scale0"]["image"].shape[1:] == (120, 120)


@pytest.mark.parametrize(
    ("diameter", "um_per_unit", "expected"),
    [
        (55.0, 1.0, 5.5),  # Visium in µm: a tenth
        (100.0, 1.0, 10.0),  # legacy ST
        (145.0, 0.379, 14.5),  # Visium in full-resolution pixels: a tenth, 5.5 µm
        (16.0, 1.0, 2.0),  # Visium HD 16 µm bins: 2 µm, not 1.6
        (8.0, 1.0, 2.0),  # 8 µm bins: 2 µm (a quarter), not 0.8
        (8.0 / 0.25, 0.25, 8.0),  # 8 µm bins in 0.25 µm image pixels: 2 µm = 8 units
        (2.0, 1.0, 0.5),  # 2 µm bins: a quarter of the bin (still 4 pixels across)
        (4.0, 1.0, 1.0),
    ],
)
def test_default_pixel_size(diameter, um_per_unit, expected):
    assert default_pixel_size(diameter, um_per_unit) == pytest.approx(expected)

"""Inputs that once ran silently or failed late are refused up front, by ``super_resolve`` and ``prior_map`` alike,
with a message that says the fix: normalised counts, images of unknown value scale, duplicated spot ids, HR grids too
large for the memory, HR pixels as large as a spot. Each check runs before the spots' operator is built (the first
heavy step) and leaves the SpatialData untouched."""

from __future__ import annotations

import copy
import logging
import re
import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pytest
import spatialdata as sd
from scipy import sparse
from scipy.ndimage import binary_closing
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import stsr
from stsr._validate import ELEMENT_TYPES, image_value_scale
from stsr.observation import ObservationModel
from stsr.pp._transforms import raster_levels
from stsr.tl import _inputs
from stsr.tl._image_tiles import ImageSource
from stsr.tl._inputs import estimate_memory, prepare_inputs

GENES = ["gene_000", "gene_001", "gene_002"]
FAST = {"steps": 1, "tile_size": 32, "overlap": 12, "progress": False, "semantic_prior": False}


@pytest.fixture(scope="module")
def slide() -> sd.SpatialData:
    return stsr.datasets.synthetic(size_um=(450, 450), n_genes=4, seed=3)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the spots' operator is built: the checks must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the spots' operator was built before the inputs were checked")

    monkeypatch.setattr(_inputs, "spot_counts", boom)


def _state(sdata: sd.SpatialData) -> tuple:
    table = sdata["table"]
    x = table.X.toarray() if sparse.issparse(table.X) else np.asarray(table.X)
    keys = {kind: sorted(getattr(sdata, kind)) for kind in ELEMENT_TYPES}
    return keys, x.copy(), table.obs.copy(), copy.deepcopy(dict(sdata.attrs))


def _assert_unchanged(sdata: sd.SpatialData, before: tuple) -> None:
    keys, x, obs, attrs = _state(sdata)
    assert keys == before[0]
    np.testing.assert_array_equal(x, before[1])
    assert obs.equals(before[2])
    assert attrs == before[3]


def _refused_by_both(sdata, model, match, exc=ValueError, **kw):
    """Both public functions refuse ``sdata`` with ``match``, without touching it."""
    before = _state(sdata)
    with pytest.raises(exc, match=match):
        stsr.tl.super_resolve(sdata, "he", GENES, model=model, **FAST, **kw)
    _assert_unchanged(sdata, before)
    with pytest.raises(exc, match=match):
        stsr.tl.prior_map(sdata, "he", GENES, progress=False, **kw)
    _assert_unchanged(sdata, before)


def _prepare(sdata, **kw):
    return prepare_inputs(
        sdata,
        "he",
        kw.pop("genes", GENES),
        table_key=None,
        pixel_size=kw.pop("pixel_size", None),
        coordinate_system=None,
        image_channels=3,
        **kw,
    )


# ------------------------------------------------------------------------------------------- counts, not log values
def test_log_normalised_counts_are_refused_with_the_fix(slide, tiny_model, no_heavy_work):
    sdata = sd.deepcopy(slide)
    table = sdata["table"]
    counts = table.X.copy()
    table.layers["counts"] = counts
    per_spot = np.asarray(counts.sum(1)).ravel()
    table.X = sparse.csr_matrix(np.log1p(counts.toarray() / np.maximum(per_spot, 1)[:, None] * 1e4))
    _refused_by_both(
        sdata,
        tiny_model,
        r"table 'table' \(X\) are not raw counts.*log1p.*layers\['counts'\]: pass layer='counts'",
    )
    # a table with the counts in .raw is told so
    del table.layers["counts"]
    table.raw = ad.AnnData(X=counts, obs=table.obs[[]], var=table.var)
    with pytest.raises(ValueError, match=r"has a \.raw: .*raw\[:, .*var_names\]\.X"):
        stsr.tl.prior_map(sdata, "he", GENES, progress=False)


def test_fractional_counts_need_the_opt_in_and_negative_counts_are_never_accepted(slide):
    sdata = sd.deepcopy(slide)
    table = sdata["table"]
    exact = _prepare(sdata).lr
    table.X = table.X * 0.5  # e.g. counts corrected for ambient RNA
    with pytest.raises(ValueError, match="integer_counts=False"):
        _prepare(sdata)
    np.testing.assert_allclose(_prepare(sdata, integer_counts=False).lr, 0.5 * exact)
    dense = table.X.toarray()
    dense[4, 1] = -1.0
    table.X = sparse.csr_matrix(dense)
    for integer_counts in (True, False):
        with pytest.raises(ValueError, match="negative"):
            _prepare(sdata, integer_counts=integer_counts)


# ---------------------------------------------------------------------------------------- one rule for image values
def _with_image(slide: sd.SpatialData, convert) -> sd.SpatialData:
    sdata = sd.deepcopy(slide)
    he = slide["he"]
    data = np.asarray(he["scale0"]["image"].values)
    sdata.images["he"] = Image2DModel.parse(
        convert(data),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=get_transformation(he, get_all=True),
        scale_factors=[2],
    )
    return sdata


def test_float_and_uint16_images_are_read_like_the_uint8_image(slide):
    uint8 = _with_image(slide, lambda a: a)  # the same pyramid construction as the converted images
    inputs = _prepare(uint8)
    h, w = inputs.grid.shape
    reference = ImageSource(inputs.image_levels, inputs.grid, 4).region(0, 0, h, w).numpy()
    assert 0.2 < reference.mean() < 0.95  # the H&E, not a white or black image
    # full resolution: the coarser levels of the pyramids differ by the rounding of the integer ones
    mask = stsr.pp.tissue_mask(uint8, "he", grid=inputs.grid, level=0)
    assert 0.2 < mask.mean() < 0.9
    for convert, scale in (
        (lambda a: a.astype(np.float32), 255.0),  # float in [0, 255]: was clamped to a white image
        (lambda a: a.astype(np.float32) / 255, 1.0),
    ):
        sdata = _with_image(slide, convert)
        levels = raster_levels(sdata["he"])
        assert image_value_scale(levels) == pytest.approx(scale)
        image = ImageSource(levels, inputs.grid, 4).region(0, 0, h, w).numpy()
        np.testing.assert_allclose(image, reference, atol=1e-5)
        np.testing.assert_array_equal(stsr.pp.tissue_mask(sdata, "he", grid=inputs.grid, level=0), mask)
    # uint16 (e.g. 12-bit fluorescence): scaled by a robust maximum, so the image reads proportionally, not dark
    sdata = _with_image(slide, lambda a: a.astype(np.uint16) * 16)
    levels = raster_levels(sdata["he"])
    robust = image_value_scale(levels)
    assert 16 * 200 < robust <= 16 * 255
    image = ImageSource(levels, inputs.grid, 4).region(0, 0, h, w).numpy()
    unclipped = image < 0.99  # values above the robust maximum are clipped to 1
    assert unclipped.mean() > 0.9
    np.testing.assert_allclose((image * robust / (16 * 255))[unclipped], reference[unclipped], atol=1e-4)


def test_image_value_scale_of_each_type():
    def scale(a):
        return image_value_scale([np.asarray(a)[None]])

    ramp = np.arange(4096)[None]
    assert scale(ramp.astype(np.uint16)) == pytest.approx(np.percentile(ramp, 99.9))  # a robust maximum
    assert scale(np.array([[0, 0]], np.uint16)) == 1  # never below 1
    assert scale(np.array([[0, 200]], np.uint8)) == 255  # by the type
    assert scale(np.array([[0.0, 0.5]])) == 1 and scale(np.array([[0.0, 254.5]], np.float32)) == 255
    for bad, match in (
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[-3, 2]], np.int16), "negative"),
        (np.array([[1 + 1j]]), "complex"),
    ):
        with pytest.raises(ValueError, match=match):
            scale(bad)


@pytest.mark.parametrize(
    ("convert", "match"),
    [
        (lambda a: a.astype(np.float32) * 4, r"float values up to 10\d\d .*rescale the image to \[0, 1\]"),
        (lambda a: a.astype(np.float32) / 255 - 0.5, r"negative values.*rescale"),
    ],
)
def test_float_image_of_unknown_scale_is_refused(slide, tiny_model, no_heavy_work, convert, match):
    _refused_by_both(_with_image(slide, convert), tiny_model, match)


def test_counts_from_a_layer_give_the_map_of_the_same_counts_in_x(slide, tiny_model):
    """A scanpy user's table: X normalised and log1p'd, the raw counts in ``layers["counts"]``. ``layer="counts"``
    reads them (genes, checks, counts, size factors): the map is the one of the same counts in X, and X is left as
    it was. A layer that does not exist, or one that is not counts, is refused with the fix."""
    plain = sd.deepcopy(slide)
    stsr.tl.prior_map(plain, "he", progress=False)
    user = sd.deepcopy(slide)
    table = user["table"]
    counts = table.X.copy()
    table.layers["counts"] = counts
    per_spot = np.asarray(counts.sum(1)).ravel()
    logged = sparse.csr_matrix(np.log1p(counts.toarray() / np.maximum(per_spot, 1)[:, None] * 1e4))
    table.X = logged.copy()
    stsr.tl.prior_map(user, "he", layer="counts", progress=False)
    record = user.attrs["stsr"]["stsr_prior"]
    assert record["layer"] == "counts" and plain.attrs["stsr"]["stsr_prior"]["layer"] is None
    # the default genes are chosen from the layer
    assert record["genes"] == plain.attrs["stsr"]["stsr_prior"]["genes"]
    np.testing.assert_allclose(
        user["stsr_prior"]["scale0"]["image"].values, plain["stsr_prior"]["scale0"]["image"].values, rtol=1e-6
    )
    assert (table.X != logged).nnz == 0  # X untouched
    stsr.tl.super_resolve(user, "he", GENES, model=tiny_model, layer="counts", **FAST)
    assert user.attrs["stsr"]["stsr"]["layer"] == "counts"
    before = _state(user)
    with pytest.raises(KeyError, match=r"no layer 'raw'; its layers: \['expected', 'counts'\]"):
        stsr.tl.prior_map(user, "he", GENES, layer="raw", key_added="other", progress=False)
    table.layers["logged"] = logged
    with pytest.raises(ValueError, match=r"\(layers\['logged'\]\) are not raw counts.*pass layer='counts'"):
        stsr.tl.prior_map(user, "he", GENES, layer="logged", key_added="other", progress=False)
    del table.layers["logged"]
    _assert_unchanged(user, before)


# ------------------------------------------------------------------------------------------ image features
def test_image_features_without_the_prior_and_unknown_features_are_refused(slide, tiny_model, no_heavy_work):
    """``image_features`` is read by the semantic prior only: asking for it with the prior off is a contradiction,
    refused before any work instead of being ignored."""
    sdata = sd.deepcopy(slide)
    before = _state(sdata)
    with pytest.raises(
        ValueError, match=r"image_features='nuclei' is what the semantic prior reads.*prior is off"
    ):
        stsr.tl.super_resolve(sdata, "he", GENES, model=tiny_model, image_features="nuclei", **FAST)
    _assert_unchanged(sdata, before)


def test_unknown_image_features_name_the_encoders_and_the_elements(slide):
    sdata = sd.deepcopy(slide)
    before = _state(sdata)
    with pytest.raises(KeyError, match=r"'densenet' is neither a built-in encoder \('densenet121', 'nuclei'\).*"
                       r"Available images: 'he'"):  # fmt: skip
        stsr.tl.prior_map(sdata, "he", GENES, image_features="densenet", progress=False)
    _assert_unchanged(sdata, before)


# ------------------------------------------------------------------------------------------ one row per spot
def test_duplicated_spot_ids_are_refused(slide, tiny_model, no_heavy_work):
    sdata = sd.deepcopy(slide)
    table = sdata["table"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: the names are made unique below
        doubled = ad.concat([table, table[[3, 7, 7]]], uns_merge="first")
    doubled.obs_names_make_unique()
    sdata.tables["table"] = doubled
    match = (
        r"several rows for the same spot of 'spots'.*obs\['instance_id'\] repeats 7 \(3 rows\), 3 \(2 rows\)"
        r".*duplicated\(\)"
    )
    # super_resolve failed with "Factor is exactly singular"; prior_map accepted them silently
    _refused_by_both(sdata, tiny_model, match)
    with pytest.raises(ValueError, match=match):  # and the raster of the spots
        stsr.pp.rasterize_spots(sdata, pixel_size=5.5, genes=GENES)


# --------------------------------------------------------------------------------------------- the HR grid
def test_grid_too_large_for_the_memory_is_refused_with_a_pixel_size_that_fits(slide, tiny_model, monkeypatch):
    monkeypatch.setattr(_inputs, "available_memory", lambda: 2**30)
    before = _state(slide)
    with monkeypatch.context() as m:
        m.setattr(_inputs, "spot_counts", lambda *a, **k: pytest.fail("the operator was built"))
        for run in (
            lambda: stsr.tl.prior_map(slide, "he", GENES, pixel_size=0.1, progress=False),
            lambda: stsr.tl.super_resolve(slide, "he", GENES, model=tiny_model, pixel_size=0.1, **FAST),
        ):
            with pytest.raises(ValueError, match=r"4500 x 4500 = 20\.25 M pixels") as err:
                run()
            assert re.search(
                r"needs about [\d.]+ GiB of memory, but only 1 GiB are available", str(err.value)
            )
            _assert_unchanged(slide, before)
    suggested = float(re.search(r"e\.g\. pixel_size=([\d.]+)", str(err.value)).group(1))
    assert 0.1 < suggested < 55 / 4
    inputs = _prepare(slide, pixel_size=suggested)  # the suggestion fits
    assert estimate_memory(inputs.grid.shape, 20, 27.5 / suggested, "disks") <= 2**30


def test_grid_beyond_any_slide_is_refused_whatever_the_memory(slide, no_heavy_work):
    with pytest.raises(ValueError, match=r"more than stsr handles.*pixel_size >= 0\.0"):
        _prepare(slide, pixel_size=1e-3)


def test_memory_estimate_bounds_what_preparing_the_inputs_takes(slide):
    _prepare(slide, pixel_size=5.5)  # warm: imports and the image's lazy graph
    tracemalloc.start()
    try:
        inputs = _prepare(slide, pixel_size=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = estimate_memory(inputs.grid.shape, inputs.observation.n_obs, 55.0, "disks")
    assert peak <= estimate <= 4 * peak


def test_closing_of_the_spot_lattice_is_exact_and_cheap_at_fine_pixels(slide):
    """The gaps of the spot lattice were closed with binary_closing, whose cost grows as the fourth power of the
    spot size in pixels (65 s and 6 GB at 0.5 µm pixels on this slide); the distance transforms give the same
    mask."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        shape = tuple(int(v) for v in rng.integers(40, 100, 2))
        op = ObservationModel.disks(
            shape, rng.uniform(0, shape, (int(rng.integers(2, 10)), 2)), rng.uniform(2, 7)
        )
        covered = op.coverage > 0
        radius = np.sqrt(np.median(op.support_area[op.support_area > 0]) / np.pi)
        r = int(np.ceil(max(0.71 * op.pitch() - radius, 0.0))) + 1
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        closed = binary_closing(np.pad(covered, r + 1), structure=yy**2 + xx**2 <= r**2)[
            r + 1 : -r - 1, r + 1 : -r - 1
        ]
        np.testing.assert_array_equal(_inputs._between_spots(op), closed | covered)
    tracemalloc.start()
    try:
        inputs = _prepare(slide, pixel_size=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inputs.grid.shape == (900, 900) and peak < 400 * 2**20
    # every spot that caught a count lies in the mask; spots that caught nothing (off the tissue) need not
    op = inputs.observation
    occupied = _inputs.spot_totals(slide, inputs.table_key, inputs.spots_key) > 0
    assert 0 < (~occupied).sum() < occupied.sum()
    assert inputs.mask[np.asarray(op.matrix[np.flatnonzero(occupied)].sum(0)).reshape(op.shape) > 0].all()
    assert not inputs.mask[
        np.asarray(op.matrix[np.flatnonzero(~occupied)].sum(0)).reshape(op.shape) > 0
    ].all()


# ----------------------------------------------------------------------------------- HR pixels against spot size
def test_hr_pixel_as_large_as_a_spot_is_refused(slide, tiny_model, no_heavy_work):
    _refused_by_both(
        sd.deepcopy(slide),
        tiny_model,
        r"pixel_size=60 \('global' units\) is at least the spot diameter \(55\).*at most .*13\.75",
        pixel_size=60.0,
    )


def test_hr_pixel_over_a_quarter_spot_warns(slide, caplog):
    with caplog.at_level(logging.WARNING, logger="stsr"):
        with pytest.warns(UserWarning, match=r"more than a quarter of the spot diameter \(55\)"):
            inputs = _prepare(slide, pixel_size=20.0)
    assert inputs.grid.shape == (23, 23)
    assert any("quarter of the spot diameter" in r.getMessage() for r in caplog.records if r.name == "stsr")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stsr"):
        _prepare(slide, pixel_size=13.0)
    assert not [r for r in caplog.records if "quarter" in r.getMessage()]


# ------------------------------------------------------------------------------------------------ the spots, read once
def test_the_spots_are_read_once_and_describe_the_slide(slide, monkeypatch):
    """prepare_inputs reads the spots once (footprint, coordinate system, centres, size, pitch: one Spots value) and
    passes them on: to the grid (pixel size), the operator, the mask (pitch) and the unit (lattice)."""
    from stsr.pp import _spots

    calls = {"read_spots": 0, "spot_footprint": 0}
    for name, module in (("read_spots", _inputs), ("spot_footprint", _spots)):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    inputs = prepare_inputs(
        slide, "he", GENES, table_key="table", pixel_size=None, coordinate_system=None, image_channels=3
    )
    assert calls == {"read_spots": 1, "spot_footprint": 1}
    spots = inputs.spots
    assert (spots.key, spots.footprint, spots.coordinate_system) == ("spots", "disks", "global")
    # the synthetic slide: 55 um spots 100 um apart on a hexagonal lattice, in um
    assert spots.diameter == pytest.approx(55.0) and spots.pitch == pytest.approx(100.0)
    assert inputs.pixel_size == pytest.approx(5.5)
    centres, radius = spots.on_grid(inputs.grid)
    np.testing.assert_allclose(inputs.observation.centres, centres)
    assert inputs.observation.params["radius"] == pytest.approx(radius) == pytest.approx(5.0)
    assert spots.pitch_on(inputs.grid) == pytest.approx(inputs.observation.pitch())
    # Visium's lattice: 55 um spots of 55 units, 1 um per unit
    assert inputs.um_per_unit == pytest.approx(1.0)


def test_um_per_unit_sets_the_scale_the_image_is_read_at(slide):
    """The synthetic slide is in µm on Visium's lattice (read off the spots: 1 µm per unit); ``um_per_unit=``
    overrides it: the same grid of 5.5 units is then 2.75 µm per pixel, so the image teacher reads 4 image pixels per
    HR pixel instead of 7 (0.75 µm each) and the map differs. Recorded in the provenance."""
    kw = {"progress": False}
    stsr.tl.prior_map(slide, "he", GENES, key_added="read_off", **kw)
    stsr.tl.prior_map(slide, "he", GENES, key_added="given", um_per_unit=0.5, **kw)
    read_off, given = (slide.attrs["stsr"][k] for k in ("read_off", "given"))
    assert (read_off["um_per_unit"], read_off["image_scale"]) == (1.0, 7)
    assert "hexagonal lattice of disks: visium" in read_off["um_per_unit_from"]
    assert (given["um_per_unit"], given["um_per_unit_from"], given["image_scale"]) == (
        0.5,
        "given (um_per_unit=)",
        4,
    )
    assert given["pixel_size"] == read_off["pixel_size"]
    a, b = (np.asarray(slide[k]["scale0"]["image"]) for k in ("read_off", "given"))
    assert a.shape == b.shape and not np.allclose(a, b, rtol=1e-3)


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the spots were read before the bad argument was refused")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_um_per_unit_is_refused_before_work(slide, bad, monkeypatch):
    monkeypatch.setattr(_inputs, "read_spots", _fail_if_called)
    for call in (stsr.tl.prior_map, stsr.tl.super_resolve):
        with pytest.raises(ValueError, match="um_per_unit must be a positive number"):
            call(slide, "he", GENES, um_per_unit=bad, progress=False)


@pytest.mark.parametrize("multiscale", [True, False])
def test_an_rgba_image_is_refused_with_code_that_fixes_it(multiscale):
    """An RGBA image (e.g. read from a PNG) is refused before work by both calls; the message's code adds its RGB
    channels as a new element, which the same call then maps exactly as it maps the RGB image."""
    import spatialdata  # noqa: F401  (the message's code names it)

    sdata = stsr.datasets.synthetic(size_um=(300, 300), n_genes=3, seed=3)
    rgb = sdata["he"]["scale0"]["image"]
    rgba = np.concatenate([np.asarray(rgb), np.full_like(np.asarray(rgb)[:1], 255)])
    sdata.images["he4"] = Image2DModel.parse(
        rgba,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b", "a"],
        transformations=get_transformation(rgb, get_all=True),
        scale_factors=[2] if multiscale else None,
    )
    for call in (stsr.tl.prior_map, stsr.tl.super_resolve):
        with pytest.raises(ValueError, match="alpha channel") as err:
            call(sdata, "he4", GENES[:1], progress=False)
    code = str(err.value).split("pass 'he4_rgb': ")[1].rstrip(".")
    exec(code, {"sdata": sdata, "spatialdata": spatialdata})
    added = raster_levels(sdata["he4_rgb"])
    assert len(added) == (2 if multiscale else 1)  # the same pyramid
    np.testing.assert_array_equal(np.asarray(added[0]), np.asarray(rgb))  # the RGB channels, no alpha
    sdata.images["reference"] = Image2DModel.parse(  # the RGB image with the same pyramid
        np.asarray(rgb),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations=get_transformation(rgb, get_all=True),
        scale_factors=[2] if multiscale else None,
    )
    for key in ("reference", "he4_rgb"):
        stsr.tl.prior_map(sdata, key, GENES[:1], key_added=f"map_{key}", progress=False)
    maps = [np.asarray(sdata[f"map_{k}"]["scale0"]["image"]) for k in ("reference", "he4_rgb")]
    assert maps[0].max() > 0
    np.testing.assert_array_equal(*maps)
    # four channels that are not RGBA get no such advice
    sdata.images["four"] = Image2DModel.parse(rgba, dims=("c", "y", "x"), c_coords=["c0", "c1", "c2", "c3"])
    with pytest.raises(ValueError, match="4 channels") as err:
        stsr.tl.prior_map(sdata, "four", GENES[:1], progress=False)
    assert "alpha" not in str(err.value)

"""The accuracy benchmarks score what users run: the public ``stsr.tl`` functions on a SpatialData per case.

``benchmarks/accuracy.py`` and ``benchmarks/native_resolution.py`` build each case as a user's slide (image, the LR
observations as square bins, a table of their counts) and read the maps back from ``sdata[key]``; these tests check
that they do, and that the map they score is the element the public function wrote.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import accuracy as A  # noqa: E402

import stsr  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dotted_names(path: Path) -> set[str]:
    """Every dotted name (``a.b.c``) that the module's code refers to."""

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            head = dotted(node.value)
            return None if head is None else f"{head}.{node.attr}"
        return None

    tree = ast.parse(path.read_text())
    return {d for node in ast.walk(tree) if isinstance(node, ast.Attribute) and (d := dotted(node))}


@pytest.mark.parametrize(
    "script", ["accuracy.py", "native_resolution.py", "default_call.py", "semi_synthetic.py"]
)
def test_benchmarks_run_the_public_functions(script):
    names = _dotted_names(BENCHMARKS / script)
    assert {"stsr.tl.prior_map", "stsr.tl.super_resolve"} <= names, script
    # the stsr rows no longer come from the in-memory shortcuts of the model internals
    assert not names & {"B.stsr_predict", "stsr.models.prior_guide", "stsr.models.STSRModel.sample"}, script
    assert not any(n.endswith("model.sample") for n in names), script


def test_prior_map_of_a_case_slide_is_the_element_it_wrote(tiny_model):
    pytest.importorskip("h5py")  # the image teacher's weights (extra "prior")
    case = A.synthetic_case(200.0, 3, 4, public=True)
    h, w = case.pair.shape
    assert (h % 4, w % 4) == (0, 0)  # cropped to whole blocks: every block is one bin
    user = A.case_sdata(case)
    table = user.sdata["table"]
    assert user.n_bins == table.n_obs and user.image_key in user.sdata.images
    ids = table.obs["instance_id"].to_numpy()
    x = table.X.toarray().T
    assert list(table.var_names) == [*case.pair.genes, A.OTHER_GENES]
    np.testing.assert_array_equal(x[:3], case.lr[:, ids])  # the LR input, nothing of the truth
    # and each bin's count of the slide's other genes (its total is a user's table's): pooled from the case's own
    others = case.pair.observation.pool(case.others[None])[0][ids]
    np.testing.assert_array_equal(x[3], np.rint(others))
    assert x[3].sum() > x[:3].sum()  # 27 more genes of the synthetic slide

    stsr.tl.prior_map(user.sdata, user.image_key, user.genes, pixel_size=user.pixel_size, progress=False)
    element = np.asarray(A._level0(user.sdata["stsr_prior"]).data)
    pred = A.read_map(user.sdata, "stsr_prior", user.grid)
    # the same pixels, found from the provenance of the call instead of the element's transformation
    record = user.sdata.attrs["stsr"]["stsr_prior"]
    assert record["method"] == "prior_map" and np.isclose(
        record["grid_pixel_size_image_px"], user.grid.pixel_size
    )
    r0, c0 = np.rint((np.asarray(user.grid.origin) - record["grid_origin_image_px"]) / user.grid.pixel_size)
    np.testing.assert_array_equal(pred, element[:, int(r0) : int(r0) + h, int(c0) : int(c0) + w])
    # on the truth's grid: pooled over the case's blocks, it gives back every block's expected count (the counts as
    # Poisson draws, the default)
    op = case.pair.observation
    depth = case.lr.sum(0) + op.pool(case.others[None])[0]  # every gene's count of each bin: its size factor
    np.testing.assert_allclose(
        op.pool(pred),
        op.expected_counts(case.lr, empty=depth == 0, depth=depth),
        rtol=1e-4,
        atol=1e-3,
    )

    # the benchmark's row is that map, scored; the element is removed afterwards
    del user.sdata["stsr_prior"]
    rows = A.prior_rows(case, user, None, "stsr")
    assert [r.method for r in rows] == ["bicubic + mass × semantic prior", A.PRIOR_MAP_LABEL]
    # (the second call reuses the first one's image scores: the same map up to float rounding)
    assert rows[1].note == "prior_map()" and rows[1].values.keys() == A.score(case, pred).keys()
    for name, value in A.score(case, pred).items():
        assert rows[1].values[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert "stsr_prior" not in user.sdata

    # super_resolve through the same slide: consistent with the blocks, so aligned with the truth's grid
    sampled = user.super_resolve(model=tiny_model, steps=2)
    assert sampled.shape == (3, h, w) and "stsr" not in user.sdata
    np.testing.assert_allclose(
        op.pool(sampled),
        op.expected_counts(case.lr, empty=depth == 0, depth=depth),
        rtol=1e-3,
        atol=1e-2,
    )


def test_whole_blocks_crops_the_partial_blocks_and_keeps_the_rest():
    from stsr.models import TrainingPair
    from stsr.observation import Grid, ObservationModel

    rng = np.random.default_rng(0)
    hr = rng.poisson(3.0, (2, 10, 11)).astype(np.float32)
    image = rng.integers(0, 256, (3, 40, 44), dtype=np.uint8)
    pair = TrainingPair(
        image=image, hr=hr, observation=ObservationModel.blocks((10, 11), 4), genes=["a", "b"]
    )
    teacher = rng.integers(0, 256, (3, 80, 88), dtype=np.uint8)
    slide = A.Slide(None, "he", Grid((10, 11), 2.5, (1.0, 2.0)))
    case = A.Case("toy", pair, A.B.pair_lr(pair), teacher_image=teacher, slide=slide)
    cropped = A.whole_blocks(case)
    assert cropped.pair.shape == (8, 8) and cropped.pair.observation.params["lr_shape"] == (2, 2)
    np.testing.assert_array_equal(cropped.pair.hr.numpy(), hr[:, :8, :8])
    np.testing.assert_array_equal(cropped.pair.image.numpy(), image[:, :32, :32])
    np.testing.assert_array_equal(cropped.teacher_image, teacher[:, :64, :64])
    np.testing.assert_allclose(cropped.lr, hr[:, :8, :8].reshape(2, 2, 4, 2, 4).sum((2, 4)).reshape(2, 4))
    assert cropped.slide.grid == Grid((8, 8), 2.5, (1.0, 2.0))
    assert A.whole_blocks(cropped) is cropped


def test_native_resolution_reports_what_each_default_call_chose():
    import native_resolution as N

    record = {
        "prior_strength": 0.25,
        "diffusion_residual": 0.0,
        "self_check": {"checked_optimum": 1.0, "self_estimated_r": 0.812, "self_estimated_within_r": 0.301},
    }
    lines = N.choice_lines({"C2": {N.DEFAULT_CALL_LABEL: record}, "C3": {}})
    rows = [line for line in lines if line.startswith("| C")]
    assert rows == [f"| C2 | {N.DEFAULT_CALL_LABEL} | 0.25 (1.0) | 0.0 | 0.812 / 0.301 |"]
    assert lines[-1] == rows[0] and "self-check" in " ".join(lines)
    assert N.choice_lines({"C2": {}, "C3": {}}) == []  # no default call run: no table


def test_native_fine_interpolation_maps_the_scored_genes_and_keeps_each_bins_count():
    """The user's table also holds the bins' count of the other genes; the fine interpolation maps the scored genes
    only, each bin's pooled map is its count, and the map pools onto the measured spots' lattice."""
    import native_resolution as N

    sec = N.Section("C2", 3, 4, 40.0)
    u = sec.user
    assert A.OTHER_GENES in u.sdata[A.SLIDE_TABLE].var_names and A.OTHER_GENES not in u.genes
    g = N.element_grid(u.sdata, u.image_key, A.SLIDE_BINS)  # the image's pixels, 32 to a grid pixel
    grid = N.Grid((g.shape[0] // 32, g.shape[1] // 32), g.pixel_size * 32, g.origin)
    fine = sec.fine_interpolation(grid)
    assert fine.shape == (3, *grid.shape)
    counts = u.sdata[A.SLIDE_TABLE][:, u.genes].X.toarray().T
    np.testing.assert_allclose(sec.bins_operator(grid).pool(fine), counts, rtol=1e-6, atol=1e-6)
    assert sec.on_lattice(fine, grid).shape == sec.case.pair.hr.shape


def _lattice_misfit(sdata) -> float:
    """Mean distance (in pitches) of the spot centres from the lattice fitted along the image's axes."""
    from stsr.tl import _pairs

    frame = _pairs._frame(sdata, "spots", "he")
    centres, index = _pairs._centres_in_frame(sdata, "spots", frame)
    obs = sdata["table"].obs
    yx = centres[index.get_indexer(obs["instance_id"].to_numpy())]
    ar, ac = obs["array_row"].to_numpy(float), obs["array_col"].to_numpy(float)
    a, b = np.polyfit(ar, yx[:, 0], 1)
    c, d = np.polyfit(ac, yx[:, 1], 1)
    err = np.hypot(a * ar + b - yx[:, 0], c * ac + d - yx[:, 1])
    return float(err.mean() / ((a + c) / 2))


def test_a_turned_section_is_resampled_along_its_lattice():
    """HER2ST A2 is registered into A1's frame, turned by 5.6 degrees: its spots lie 0.69 pitches on average off a
    lattice along the image's axes, which the cases (truth grid, bins of the user's slide) assume. ``lattice_aligned``
    resamples it along the lattice (the spots then fit one as well as on the other sections) and leaves an aligned
    section as it is; the A2 case is built from the resampled slide."""
    a2 = stsr.datasets.her2st("A2")
    assert _lattice_misfit(a2) > 0.5
    with pytest.raises(ValueError, match="lattice_aligned"):
        A.lattice_grid(a2, "he", ["ERBB2"])
    aligned = A.lattice_aligned(a2, "he")
    assert _lattice_misfit(aligned) < 0.1
    np.testing.assert_array_equal(aligned["table"].X.toarray(), a2["table"].X.toarray())
    # the image is the same tissue: as much of it, turned
    dark = [float((np.asarray(A._level0(s["he"]).data).max(0) > 30).sum()) for s in (a2, aligned)]
    assert dark[1] == pytest.approx(dark[0], rel=0.02)
    grid = A.lattice_grid(aligned, "he", ["ERBB2"])
    assert grid.shape == (16, 23)  # array rows x columns of the section
    c2 = stsr.datasets.her2st("C2")
    assert A.lattice_aligned(c2, "he") is c2


def test_semi_synthetic_scores_the_public_maps_on_the_truths_grid(her2st_c2_semi):
    """The semi-synthetic benchmark reads the map a public call wrote on the truth's own pixels and scores it
    against the generated field: the field scores 1, the spots' interpolation has no structure within the spots
    that the prior map, reading the H&E, gives."""
    import semi_synthetic as S

    slide = S.Slide("C2 part", her2st_c2_semi[1])
    perfect = slide.score(slide.truth)
    assert perfect["r"] == pytest.approx(1.0) and perfect["within"] == pytest.approx(1.0)
    interp = slide.score(slide.interpolation())
    prior = slide.public(stsr.tl.prior_map)
    assert prior.shape == slide.truth.shape
    scored = slide.score(prior)
    assert 0.3 < interp["r"] < 0.99 and scored["within"] > interp["within"] + 0.1, (interp, scored)
    assert S.MAP_KEY not in slide.sdata  # the benchmark leaves the slide as it found it


def test_visium_geometry_counts_the_truth_in_the_maps_own_pixels():
    """``benchmarks/visium_geometry.py``: transcripts are counted in the pixels of the raster the public call wrote
    (read off its transformation), and the spot baselines are what they say."""
    import visium_geometry as V
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    # 2 genes on 4 x 5 pixels of 10 units, the first pixel's corner at (y, x) = (100, 200)
    to_global = Sequence([Scale([10.0, 10.0], axes=("y", "x")), Translation([100.0, 200.0], axes=("y", "x"))])
    raster = Image2DModel.parse(
        np.zeros((2, 4, 5), np.float32), dims=("c", "y", "x"), transformations={"global": to_global}
    )
    y = np.array([105.0, 105.0, 139.9, 120.0, 99.9, 120.0])
    x = np.array([201.0, 249.9, 210.0, 230.0, 210.0, 250.1])
    gene = np.array([0, 1, 0, -1, 0, 1])  # -1: not a scored gene; the last two lie outside the raster
    truth, gy, gx = V.truth_on_raster(raster, y, x, gene, 2)
    assert truth.shape == (2, 4, 5) and truth.sum() == 3
    assert truth[0, 0, 0] == truth[1, 0, 4] == truth[0, 3, 1] == 1
    assert (gy[0, 0], gx[0, 0], gy[3, 4], gx[3, 4]) == (105.0, 205.0, 135.0, 245.0)
    centres = np.array([[105.0, 205.0], [135.0, 245.0]])
    density = np.array([[1.0, 2.0], [3.0, 4.0]])
    maps = V.spot_baselines(centres, density, gy, gx, pitch=40.0)
    nearest = maps["nearest spot"]
    np.testing.assert_array_equal(nearest[:, 0, 0], [1.0, 2.0])
    np.testing.assert_array_equal(nearest[:, 3, 4], [3.0, 4.0])
    smooth = maps["Gaussian smoothing, sigma 0.5 pitch"]
    assert (
        1.0 < smooth[0, 0, 0] < smooth[0, 1, 1] < smooth[0, 3, 4] < 3.0
    )  # between the spots' values, rising
    flat = V.spot_baselines(centres, np.ones((2, 2)), gy, gx, pitch=40.0)
    for v in flat.values():
        np.testing.assert_allclose(v, 1.0)  # weights sum to one
    field = truth + np.arange(20.0).reshape(4, 5)
    assert V.mean_r(field, field, np.ones((4, 5), bool)) == pytest.approx(1.0)
    np.testing.assert_array_equal(V.box_sum(np.ones((1, 7, 8)), 3), np.full((1, 2, 2), 9.0))

"""End-to-end on real MERFISH data: Vizgen transcripts pooled into pseudo-spots, super-resolved with the DAPI/polyT
image as the guide (a tiny untrained network: this checks mechanics — exact pooling, alignment, consistency — not
accuracy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

import stsr
from stsr.models import STSRModel
from stsr.pp import spots_observation_model
from stsr.pp._transforms import affine_yx

IMAGE = "morphology"
POINTS = "transcripts"
#: a 300 x 300 µm crop of the 500 x 450 µm Vizgen mini slide
BOX_XY = ([6500.0, 4800.0], [6800.0, 5100.0])
#: among the most frequent genes of the slide
GENES = ["Slc17a7", "Gfap", "Gabbr1", "Cx3cl1"]
#: half-scale Visium pseudo-spots for super-resolution: 35 spots in the crop instead of 6
DIAMETER, PITCH = 27.5, 50.0


@pytest.fixture(scope="module")
def crop(vizgen) -> sd.SpatialData:
    with warnings.catch_warnings():  # spatialdata: "querying points MAY suffer from performance issues"
        warnings.filterwarnings("ignore", message=".*points.*", category=UserWarning)
        small = sd.bounding_box_query(
            vizgen,
            axes=("x", "y"),
            min_coordinate=BOX_XY[0],
            max_coordinate=BOX_XY[1],
            target_coordinate_system="global",
        )
    return sd.SpatialData(images={IMAGE: small[IMAGE]}, points={POINTS: small[POINTS]})


@pytest.fixture(scope="module")
def transcripts(crop):
    """All transcripts of the crop: ``(y, x)`` in µm and gene names."""
    df = crop[POINTS][["y", "x", "gene"]].compute()
    return df[["y", "x"]].to_numpy(float), df["gene"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def fluo_model(make_tiny_model) -> STSRModel:
    """The tiny test network of ``tiny_model``, for 2-channel (DAPI, polyT) images."""
    return make_tiny_model(image_channels=2)


def _disk_counts(yx, genes, centre_yx, radius, gene) -> int:
    d = yx - centre_yx
    return int(((d[:, 0] ** 2 + d[:, 1] ** 2 <= radius**2) & (genes == gene)).sum())


def test_pseudo_spots_count_the_transcripts_in_each_disk(crop, transcripts):
    sdata = sd.SpatialData(images={IMAGE: crop[IMAGE]}, points={POINTS: crop[POINTS]})
    table = stsr.pp.pseudo_spots(sdata, POINTS, IMAGE)  # Visium geometry: 55 µm disks, 100 µm pitch
    yx, names = transcripts
    spots = sdata["pseudo_spots"]
    assert sdata.tables["pseudo_spots_table"] is table
    assert np.allclose(spots["radius"], 27.5)
    assert (
        get_transformation(spots, get_all=True).keys()
        == get_transformation(crop[POINTS], get_all=True).keys()
    )
    # linked like the dataset loaders' spots + table
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "pseudo_spots", "region_key": "region", "instance_key": "instance_id"}
    np.testing.assert_array_equal(table.obs["instance_id"].to_numpy(), spots.index.to_numpy())
    assert np.issubdtype(table.X.dtype, np.integer) and hasattr(table.X, "tocsr")
    # every gene of the points element by default (its categories, some without transcripts in the crop)
    assert list(table.var_names) == list(crop[POINTS]["gene"].cat.categories)
    assert set(names) <= set(table.var_names)
    # Visium hexagonal lattice: neighbours 100 µm apart, rows 86.6 µm apart, all in the crop
    centres = np.c_[spots.geometry.y, spots.geometry.x]
    assert len(centres) == 6
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.testing.assert_allclose(np.sort(dist + np.eye(len(dist)) * 1e9, 1)[:, 0], 100.0, rtol=1e-9)
    assert np.allclose(
        np.unique(np.round(np.diff(np.unique(np.round(centres[:, 0], 6))), 6)), 100 * np.sqrt(3) / 2
    )
    assert (centres - 27.5 >= np.array(BOX_XY[0])[::-1] - 1e-6).all()
    assert (centres + 27.5 <= np.array(BOX_XY[1])[::-1] + 1e-6).all()
    # counts equal a brute-force count of the transcripts inside each disk
    x = table.X.toarray()
    for i, centre in enumerate(centres):
        for gene in GENES + ["Mlc1"]:
            j = table.var_names.get_loc(gene)
            assert x[i, j] == _disk_counts(yx, names, centre, 27.5, gene), (i, gene)
    inside_any = (np.linalg.norm(yx[:, None] - centres[None], axis=-1) <= 27.5).any(1)
    assert x.sum() == inside_any.sum() <= len(yx)
    assert x[:, table.var_names.get_loc("Slc17a7")].sum() > 100  # a well-expressed gene is well counted
    assert table.uns["stsr"]["diameter"] == 55.0 and sdata.attrs["stsr"]["pseudo_spots"]["lattice"] == "hex"
    # nothing else changed
    assert sorted(n for _, n, _ in sdata.gen_elements()) == sorted(
        [IMAGE, POINTS, "pseudo_spots", "pseudo_spots_table"]
    )


def test_pseudo_spots_refuse_bad_inputs_and_existing_keys(crop):
    sdata = sd.SpatialData(images={IMAGE: crop[IMAGE]}, points={POINTS: crop[POINTS]})
    with pytest.raises(KeyError, match="transcripts"):
        stsr.pp.pseudo_spots(sdata, "transcript", IMAGE)
    with pytest.raises(KeyError, match="morphology"):
        stsr.pp.pseudo_spots(sdata, POINTS, "morphologie")
    with pytest.raises(KeyError, match="Gfap"):
        stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, genes=["Gfapp"])
    with pytest.raises(ValueError, match="overlap"):
        stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, diameter=55, pitch=50)
    assert sorted(n for _, n, _ in sdata.gen_elements()) == [IMAGE, POINTS]
    stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, genes=GENES)
    with pytest.raises(ValueError, match=r"'pseudo_spots'.*overwrite=True"):
        stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, genes=GENES)
    with pytest.raises(ValueError, match=r"'pseudo_spots_table'.*overwrite=True"):
        stsr.pp.pseudo_spots(
            sdata, POINTS, IMAGE, genes=GENES, key_added="other", table_key_added="pseudo_spots_table"
        )
    assert "other" not in sdata.shapes
    table = stsr.pp.pseudo_spots(
        sdata, POINTS, IMAGE, genes=GENES[:2], diameter=DIAMETER, pitch=PITCH, overwrite=True
    )
    assert list(table.var_names) == GENES[:2] and len(sdata["pseudo_spots"]) == table.n_obs > 6


def test_super_resolve_vizgen_pseudo_spots(crop, fluo_model):
    sdata = sd.SpatialData(images={IMAGE: crop[IMAGE]}, points={POINTS: crop[POINTS]})
    table = stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, diameter=DIAMETER, pitch=PITCH, genes=GENES)
    # 35 spots on the lattice; those without a transcript of GENES are dropped
    assert table.uns["stsr"]["n_spots_lattice"] == 35 and 25 <= table.n_obs < 35
    assert (np.asarray(table.X.sum(1)).ravel() > 0).all()
    stsr.tl.super_resolve(
        sdata, IMAGE, GENES, model=fluo_model, steps=2, tile_size=32, overlap=8, progress=False
    )
    element = sdata["stsr"]
    out = np.asarray(element["scale0"]["image"].values)
    assert list(element["scale0"]["image"].coords["c"].values) == GENES
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() > 0
    # the crop is all tissue but the DAPI image is dim between sparse nuclei: the gaps between spots still get
    # expression (only pixels beyond the outermost spots' reach stay empty)
    # (measured: 73 % of the grid; the spots themselves cover about 27 %)
    assert (out.sum(0) > 0).mean() > 0.65
    pixel_size = DIAMETER / 10  # the default HR pixel: a tenth of the spot diameter, in µm
    assert sdata.attrs["stsr"]["stsr"]["pixel_size"] == pytest.approx(pixel_size)

    # the output overlays the image: HR pixel (i, j) is the grid's (i, j), mapped to global µm via the image
    grid = stsr.pp.hr_grid(sdata, IMAGE, pixel_size)
    assert out.shape[1:] == grid.shape
    t_out = affine_yx(get_transformation(element, "global"))
    t_img = affine_yx(get_transformation(sdata[IMAGE], "global"))
    np.testing.assert_allclose(np.diag(t_out)[:2], pixel_size, rtol=1e-5)
    for r, c in [(0, 0), (grid.shape[0], grid.shape[1]), (10, 37)]:
        np.testing.assert_allclose(
            t_out @ [r, c, 1], t_img @ [*grid.to_reference(r, c), 1], rtol=0, atol=1e-6
        )

    # consistency: pooling the output over each pseudo-spot gives the spot's counts
    op = spots_observation_model(sdata, "pseudo_spots", grid, IMAGE)
    counts = sdata["pseudo_spots_table"][:, GENES].X.toarray().T.astype(float)
    pooled = op.pool(out.astype(np.float64))
    totals = np.asarray(sdata["pseudo_spots_table"].X.sum(1)).ravel()  # size factors; 0: the spot stays empty
    # the counts as Poisson draws (poisson=True, the default)
    want = op.expected_counts(counts, empty=totals == 0, depth=totals)
    has = counts > 0
    np.testing.assert_allclose(pooled[has], want[has], rtol=1e-4)

    # the output correlates with the real transcripts binned on the same grid: the consistency step alone puts each
    # spot's counts on its own pixels. Single transcripts on 2.75 µm pixels are sparse (~0.1-0.2 per pixel), so
    # correlations are modest (measured: 0.15-0.16 per gene inside the spots); the same output shifted by ~one spot
    # diameter (11 px) loses it (|r| < 0.01). Between the spots this untrained network's output is not informative.
    with (
        warnings.catch_warnings()
    ):  # the HR grid ends within a pixel of the crop: a couple of transcripts lie beyond
        warnings.filterwarnings("ignore", message=".*outside the HR grid", category=UserWarning)
        truth_grid = stsr.pp.bin_transcripts(
            sdata, POINTS, pixel_size, GENES, image_key=IMAGE, key_added="truth"
        )
    assert truth_grid == grid
    truth = np.asarray(sdata["truth"]["scale0"]["image"].values)
    assert truth.sum() > 5000
    in_spots = op.coverage > 0
    for g, gene in enumerate(GENES):
        r = np.corrcoef(out[g][in_spots], truth[g][in_spots])[0, 1]
        r_shifted = np.corrcoef(np.roll(out[g], 11, axis=1)[in_spots], truth[g][in_spots])[0, 1]
        assert r > 0.08 and r > r_shifted + 0.08, (gene, r, r_shifted)
    assert np.corrcoef(out.sum(0)[in_spots], truth.sum(0)[in_spots])[0, 1] > 0.1


def test_rgb_model_on_fluorescence_image_is_refused(crop, tiny_model):
    sdata = sd.SpatialData(images={IMAGE: crop[IMAGE]}, points={POINTS: crop[POINTS]})
    stsr.pp.pseudo_spots(sdata, POINTS, IMAGE, diameter=DIAMETER, pitch=PITCH, genes=GENES)
    before = sorted(n for _, n, _ in sdata.gen_elements())
    attrs_before = {k: dict(v) for k, v in sdata.attrs.get("stsr", {}).items()}
    assert tiny_model.config.image_channels == 3
    with pytest.raises(ValueError, match=r"2 channel\(s\) \['DAPI', 'polyT'\].*expects 3.*image_channels=2"):
        stsr.tl.super_resolve(
            sdata, IMAGE, GENES, model=tiny_model, steps=2, tile_size=32, overlap=8, progress=False
        )
    assert sorted(n for _, n, _ in sdata.gen_elements()) == before
    assert "stsr" not in sdata.attrs["stsr"] and dict(sdata.attrs["stsr"]) == attrs_before

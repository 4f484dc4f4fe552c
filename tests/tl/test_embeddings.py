"""Precomputed embeddings read onto the HR grid: values at known places, clear errors."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation

from stsr.pp import hr_grid
from stsr.tl._embeddings import EmbeddingSource, embedding_fingerprint

UM = 0.5  # H&E µm per px
T_HE = (30.0, 50.0)  # (y, x) µm of the H&E's corner
EMB_PX = 20.0  # µm per embedding pixel
T_EMB = (37.0, 43.0)


def _sdata(emb: np.ndarray) -> sd.SpatialData:
    he = Image2DModel.parse(
        np.full((3, 800, 600), 200, np.uint8),
        dims=("c", "y", "x"),
        transformations={
            "global": Sequence(
                [Scale([UM, UM], axes=("y", "x")), Translation(list(T_HE[::-1]), axes=("x", "y"))]
            )
        },
    )
    e = Image2DModel.parse(
        da.from_array(emb, chunks=(emb.shape[0], 8, 8)),
        dims=("c", "y", "x"),
        transformations={
            "global": Sequence(
                [Scale([EMB_PX, EMB_PX], axes=("y", "x")), Translation(list(T_EMB[::-1]), axes=("x", "y"))]
            )
        },
    )
    return sd.SpatialData(images={"he": he, "emb": e})


def _embeddings(ny=20, nx=15, c=3):
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    return np.stack([yy * 100 + xx, -yy.astype(float), np.full_like(yy, 7.5, float)][:c]).astype(np.float32)


def test_embeddings_read_at_known_places():
    emb = _embeddings()
    sdata = _sdata(emb)
    grid = hr_grid(sdata, "he", 5.0)  # 5 µm HR pixels = 10 H&E px
    src = EmbeddingSource.from_sdata(sdata, "emb", grid, "global", image_key="he")
    win = src.window(3, 4, 30, 20)
    assert win.shape == (3, 30, 20) and win.dtype == np.float32
    for r, c in [(3, 4), (10, 11), (32, 23)]:
        # the HR pixel's centre in µm, then the embedding pixel holding it
        y, x = T_HE[0] + (r + 0.5) * 5.0, T_HE[1] + (c + 0.5) * 5.0
        iy, ix = int((y - T_EMB[0]) // EMB_PX), int((x - T_EMB[1]) // EMB_PX)
        assert win[0, r - 3, c - 4] == iy * 100 + ix
        assert win[1, r - 3, c - 4] == -iy
    # the embeddings end at x = 43 + 15 * 20 = 343 µm: HR column 58 (centre 342.5 µm) is their last pixel, column 59
    # (347.5 µm) is outside and gets the fill value
    far = src.window(78, 58, 2, 2)
    np.testing.assert_array_equal(far[:, :, 0], [[1914, 1914], [-19, -19], [7.5, 7.5]])
    np.testing.assert_array_equal(far[:, :, 1], 0)
    bil = EmbeddingSource.from_sdata(sdata, "emb", grid, "global", image_key="he", interpolation="bilinear")
    w2 = bil.window(3, 4, 30, 20)
    assert np.all(np.diff(w2[1], axis=0) <= 1e-6) and np.abs(w2[2] - 7.5).max() < 1e-5
    assert len(src.fingerprint) == 64 and src.fingerprint == embedding_fingerprint(sdata["emb"])


def test_embeddings_clear_errors():
    emb = _embeddings()
    grid = hr_grid(_sdata(emb), "he", 5.0)
    bad = emb.copy()
    bad[0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        EmbeddingSource.from_sdata(_sdata(bad), "emb", grid, "global", image_key="he")
    with pytest.raises(KeyError, match="neither a built-in encoder.*No image element 'embx'"):
        EmbeddingSource.from_sdata(_sdata(emb), "embx", grid, "global", image_key="he")
    with pytest.raises(ValueError, match="has 3 channels, but 1024"):
        EmbeddingSource.from_sdata(_sdata(emb), "emb", grid, "global", image_key="he", n_channels=1024)
    mask = np.ones(grid.shape, bool)
    # a patch grid of the wrong shape (too few patches: 5 x 4) covers a sliver of the tissue
    with pytest.raises(ValueError, match=r"covers \d+% of the tissue"):
        EmbeddingSource.from_sdata(
            _sdata(_embeddings(5, 4)), "emb", grid, "global", image_key="he", mask=mask
        )
    sdata = _sdata(emb)
    from spatialdata.transformations import set_transformation

    set_transformation(sdata["emb"], Translation([5000.0, 5000.0], axes=("x", "y")), "global")
    with pytest.raises(ValueError, match="does not overlap"):
        EmbeddingSource.from_sdata(sdata, "emb", grid, "global", image_key="he")

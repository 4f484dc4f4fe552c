"""The README's quick start runs end to end on the full HER2ST C2 slide and gives regional clusters.

The python block of ``README.md`` is executed as written (in a temporary folder, Agg backend) and its results are
checked: the prior map holds the genes, Leiden finds a handful of spatially coherent regions that each span many
spots (not single spot disks), Moran's I is computed on the pixel grid, the clusters are drawn with spatialdata-plot,
and none of the scanpy/squidpy calls warns that it is deprecated. About 5 minutes on 2 CPU cores, most of it in
``super_resolve``, so it is marked slow; it stays in CI.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Range of the number of regional clusters the quick start must find on C2 (it finds 9).
N_CLUSTERS = (5, 12)
#: Every cluster holds most of the disk of at least this many spots (it finds 11 or more).
MIN_SPOTS_PER_CLUSTER = 5
#: Share of the pairs of adjacent pixels in the table that fall in the same cluster.
MIN_SAME_NEIGHBOUR = 0.95


def readme_python_blocks(text: str | None = None) -> list[str]:
    """The ```` ```python ```` blocks of the README, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.S | re.M)


def test_readme_has_one_quick_start_block_and_clone_installs():
    text = README.read_text(encoding="utf-8")
    blocks = readme_python_blocks(text)
    assert len(blocks) == 1, (
        "the README should have exactly one python block: the quick start that the test runs"
    )
    code = blocks[0]
    compile(code, "README.md", "exec")
    for call in (
        'stsr.datasets.her2st("C2")',
        "stsr.tl.super_resolve(",
        "stsr.tl.to_table(",
        "sc.tl.leiden(",
    ):
        assert call in code, call
    # stsr installs from a clone, not from PyPI
    assert not re.search(r"pip install\s+[\"']?stsr", text), "stsr is not on PyPI: install it from the clone"
    assert 'pip install -e ".[' in text
    assert len(text.split()) < 800, f"the README should stay short ({len(text.split())} words)"
    for word in ("issue", "target", "session"):
        assert not re.search(rf"\b{word}\b", text, flags=re.I), f"internal word {word!r} in the README"


def _spot_of_pixel(sdata, adata) -> np.ndarray:
    """Index of the spot whose disk holds each pixel centre of ``adata``, -1 between spots."""
    from scipy.spatial import cKDTree

    spots = sdata["spots"]
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    dist, nearest = cKDTree(xy).query(adata.obsm["spatial"])
    return np.where(dist <= spots["radius"].to_numpy()[nearest], nearest, -1)


def _same_neighbour_share(rows: np.ndarray, cols: np.ndarray, labels: np.ndarray) -> float:
    """Share of horizontally/vertically adjacent pixel pairs (both in the table) with the same label."""
    image = np.full((rows.max() + 2, cols.max() + 2), -1, dtype=np.int64)
    image[rows, cols] = labels
    same = total = 0
    for a, b in ((image[:, :-1], image[:, 1:]), (image[:-1, :], image[1:, :])):
        both = (a >= 0) & (b >= 0)
        same += int(np.sum(a[both] == b[both]))
        total += int(both.sum())
    return same / total


@pytest.mark.slow
def test_readme_quick_start_gives_regional_clusters_on_her2st_c2(data_dir, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)  # the block saves figures/clusters.png
    (code,) = readme_python_blocks()
    namespace: dict = {"__name__": "readme_quick_start"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, str(README), "exec"), namespace)
    plt.close("all")
    sdata, adata = namespace["sdata"], namespace["adata"]

    # the map: the default 50 genes on the 10 µm grid, non-negative counts, one table row per tissue pixel
    hr = sdata["stsr"]["scale0"]["image"]
    genes = [str(g) for g in hr.coords["c"].values]
    assert len(genes) == 50 and "ERBB2" in genes
    assert list(adata.var_names) == genes
    assert sdata.attrs["stsr"]["stsr"]["pixel_size"] == pytest.approx(10.0)
    values = np.asarray(hr.values)
    assert np.isfinite(values).all() and values.min() >= 0 and values.sum() > 0
    assert 50_000 < adata.n_obs < 100_000  # about 180 lattice cells of 200 x 200 µm at 10 µm pixels

    # a handful of regional clusters, each a coherent region over many spots
    labels = adata.obs["leiden"].cat.codes.to_numpy()
    n_clusters = int(labels.max()) + 1
    assert N_CLUSTERS[0] <= n_clusters <= N_CLUSTERS[1], f"{n_clusters} clusters"
    spot = _spot_of_pixel(sdata, adata)
    in_spot = spot >= 0
    assert in_spot.mean() > 0.1  # the disks of the spots hold a fair share of the pixels
    n_spots = len(sdata["spots"])
    # the cluster holding most of each spot's disk
    votes = np.zeros((n_spots, n_clusters), dtype=np.int64)
    np.add.at(votes, (spot[in_spot], labels[in_spot]), 1)
    covered = votes.sum(axis=1) > 0
    majority = votes.argmax(axis=1)[covered]
    spots_per_cluster = np.bincount(majority, minlength=n_clusters)
    assert spots_per_cluster.min() >= MIN_SPOTS_PER_CLUSTER, f"spots per cluster: {spots_per_cluster}"
    pixels_per_cluster = np.bincount(labels, minlength=n_clusters)
    assert pixels_per_cluster.min() > 10 * 100, f"pixels per cluster: {pixels_per_cluster}"  # > 10 spot disks
    share = _same_neighbour_share(adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy(), labels)
    assert share > MIN_SAME_NEIGHBOUR, f"only {share:.3f} of adjacent pixels share their cluster"

    # Moran's I on the 4-neighbour grid, for every gene; the HR map is smooth at 10 µm
    moran = adata.uns["moranI"]
    assert set(moran.index) == set(genes)
    assert adata.obsp["spatial_connectivities"].sum(axis=1).max() == 4
    assert np.median(moran["I"]) > 0.5 and moran["I"].max() <= 1.0

    # the clusters were drawn over the H&E through the labels element that to_table added
    assert "stsr_labels" in sdata.labels
    assert sdata["stsr_table"].obs["leiden"].equals(adata.obs["leiden"])
    figure = tmp_path / "figures" / "clusters.png"
    assert figure.is_file() and figure.stat().st_size > 20_000

    # current scanpy/squidpy calls: nothing of theirs is deprecated
    deprecated = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if re.search(r"deprecat|in the future", str(w.message), flags=re.I)
        and re.search(r"neighbo|leiden|autocorr|squidpy|scanpy|igraph", str(w.message), flags=re.I)
    ]
    assert not deprecated, deprecated

"""Locate the files of the real datasets: a local data directory first, else a verified download.

Every file a loader reads is listed in :data:`REGISTRY` with the URL of the ORIGINAL public source (GitHub raw
files at pinned commits) and its SHA-256. :func:`data_path` looks for ``$STSR_DATA_DIR/<dataset>/<filename>``;
when it is missing the file is downloaded with :mod:`pooch` into :func:`cache_dir` and its hash verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from stsr._constants import DATA_DIR_ENV

#: Environment variable that overrides the download/cache directory (default: ``pooch.os_cache("stsr")``).
CACHE_DIR_ENV = "STSR_CACHE_DIR"


class RemoteFile(NamedTuple):
    """Where one dataset file comes from."""

    url: str | None
    """URL of the original public file (``None``: derived file, only available in a local data directory)."""
    sha256: str
    """SHA-256 of the file."""


def _github(repo: str, commit: str, files: dict[str, tuple[str | None, str]]) -> dict[str, RemoteFile]:
    base = f"https://raw.githubusercontent.com/{repo}/{commit}/"
    return {
        local: RemoteFile(None if remote is None else base + remote, sha)
        for local, (remote, sha) in files.items()
    }


_HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"

_HER2ST_IMAGES = {
    # local name -> path in almaan/her2st
    "B4_BT10737_D2_HE.jpg": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "C2_5714_HE_BT_C2.jpg": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3_5714_HE_BT_D1.jpg": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4_5714_HE_BT_D2.jpg": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    "C5_5714_HE_BT_E1.jpg": "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg",
    "C6_5714_HE_BT_E2.jpg": "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg",
}

_SHA = {
    "her2st": {
        "cluster_labels/B4-cluster-annotation.tsv.gz": "ea7ce6d9630921a9b0d03178988192b7c71baec19eb183ebdfdb991e47d690e4",
        "cluster_labels/C2-cluster-annotation.tsv.gz": "3211500325b1be1cd2be7480f2b094a48647fc25df4d8fe6afb8c48c15650ece",
        "cluster_labels/C3-cluster-annotation.tsv.gz": "a1522a14855bc2022ccbb9ea9cbae59837cbcd310bc4c02727ae6bfa37e6d369",
        "cluster_labels/C4-cluster-annotation.tsv.gz": "a5cc7a3a40983a21ea8400145c80a7dc5b13e7468b987ec0610f4c2123978c71",
        "cluster_labels/C5-cluster-annotation.tsv.gz": "5929e9183e09717891fce94a71ec94551a86d5267ebb085067ac1d71894bc4ea",
        "cluster_labels/C6-cluster-annotation.tsv.gz": "bc1234a7a05073a65017f7c0c101547ae2d3c9aa37b895a27dafd9c33842f9d2",
        "counts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
        "counts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
        "counts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
        "counts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
        "counts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
        "counts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
        "images/B4_BT10737_D2_HE.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
        "images/C2_5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
        "images/C3_5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
        "images/C4_5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
        "images/C5_5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
        "images/C6_5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
        "spots/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
        "spots/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
        "spots/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
        "spots/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
        "spots/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
        "spots/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    },
    "her2st_patientA_app": {
        "cluster_labels/A1-cluster-annotation.tsv.gz": "c23fcfc84336e7ae625ab74976721c26051451d5345bd2e248b440033fa87542",
        "cluster_labels/A2-cluster-annotation.tsv.gz": "e7928288a7e5bcda18a840e0f14e362c27b221c293d39a9944f4b79c2b9e625f",
        "counts/A1.tsv.gz": "d91035e5d8a9c4ce7865e4c61446deec1a7318602d41b3220e9fcb3ce7e41fe3",
        "counts/A2.tsv.gz": "1c84f44bfc0bce6d5647b78e4598e2456f769e29f72ca52911d5bc4be81e410c",
        "images/A1_HE_image_dark.png": "e3836547df4772907bb537e53f41794fe4e603e9a6c99c1f6e91ef4342b95a6d",
        "images/A2_HE_image_dark.png": "f37416252956df8f2ff088b4213f37e23d0522c05ef0943eeaede2be50675a73",
        "spots/A1_selection.tsv": "e5f79223be2ea2aebb082c4759059ab7079b0132052d0944209048ac57788c5d",
        "spots/A2_selection.tsv": "b21f48c8492ff1d71c0d0d396dbde64735ff8fa5419bcc6f5cffe60f68d7cb09",
        "spots/app_spot_coords.csv": "4c5feb7cb75da8ba5263a651291c54c851a974a5fef4f021ca6704a5a6c17315",
    },
    "vizgen_mouse_brain_mini": {
        "cell_boundaries/z0_polygons.csv.gz": "8e9229a10d2f5ca0fe111a6791f865085fcae86a58fa12e77b1b3bd0853d75c5",
        "cell_boundaries/z1_polygons.csv.gz": "b254ed5fe5616090827a7bbad646732ba426046cdba057aa7902464fc582ad04",
        "images/mini_dataset_dapi_z0.jpg": "4e6019729ac67c4a218e02102493078195e7e42ca281e0c122c3824322c5e8b0",
        "images/mini_dataset_dapi_z1.jpg": "0d21537d5567ae29c21ce7d36e25446550accde0875b4f7250b28250614a5a38",
        "images/mini_dataset_polyT_z0.jpg": "17347ae38b9a03899a6aa2e4459ad2958bfd5f02333882c7186593976af2b53d",
        "images/mini_dataset_polyT_z1.jpg": "f8ace79125068668c13f97f2e2d1b0614de01e321f73af621861be55c394c94d",
        "vizgen_transcripts.csv.gz": "b0440c5617efff80b4f3982fa12a3960d88c104838a20f544966f7d7b2cd04ba",
    },
    "dbit_mouse_embryo_ffpe2": {
        "FFPE-2.jpg": "9892d837c8e540e6aac7f3e06834309c5d90512a80cf68ffbc266640d393b24a",
        "FFPE-2_BW.jpg": "da84a08964e28dcafe95daffc7aea1e3a1b7f9ef404d9e8ba3d16c71071975a6",
        "FFPE-2_exp_matrix.zip": "1644a193684d9a67ae088818c17d216690bcf8d5fa4341710726ea029819a083",
        "position.txt": "4a8bd62d3e8acbcf120a2d6bea41c0882ade72a412fa5a9ff8d65efe563841d3",
    },
    "xenium_lung_he_ncbi858_tiny": {
        "NCBI858.h5ad": "4c1c428d0f14e5c6a47716652a91dadfa26c1c6c349093bbb4b45c1f10f445aa",
        "NCBI858.jpg": "7ad9ac065f89c57ec62d9010e8352e56f99cb4fc47359f46ab3db0ccc2b21123",
        "NCBI858.json": "6b12f3e2cedda9ec1fb6c251ff08206ea428edde0b7397c500bef29dcaf6f1bd",
    },
}


def _her2st_remote(local: str) -> str | None:
    kind, name = local.split("/", 1)
    section = name[:2]
    if kind == "images":
        return _HER2ST_IMAGES.get(name, f"app/www/imgs/{name}")
    if kind == "counts":
        return f"data/ST-cnts/{name}"
    if kind == "spots":
        # app_spot_coords.csv was derived for this project (app PNG positions); it has no public original.
        return None if name == "app_spot_coords.csv" else f"data/ST-spotfiles/{name}"
    if kind == "cluster_labels":
        return f"res/ST-cluster/lbl/{section}-cluster-annotation.tsv.gz"
    raise AssertionError(local)  # pragma: no cover


def _vizgen_remote(local: str) -> str:
    raw = "inst/Mini_datasets/Vizgen/Raw/"
    if local == "vizgen_transcripts.csv.gz":
        return raw + "vizgen_transcripts.gz"
    return raw + local.replace(".csv.gz", ".gz")


_XENIUM_REMOTE = {
    "NCBI858.h5ad": "example_data/data/h5ad/NCBI858.h5ad",
    "NCBI858.jpg": "example_data/data/image/NCBI858.jpg",
    "NCBI858.json": "example_data/data/meta/NCBI858.json",
}

#: ``REGISTRY[dataset][filename]``: original URL and SHA-256 of every file the loaders read.
REGISTRY: dict[str, dict[str, RemoteFile]] = {
    "her2st": _github(
        "almaan/her2st", _HER2ST_COMMIT, {f: (_her2st_remote(f), h) for f, h in _SHA["her2st"].items()}
    ),
    "her2st_patientA_app": _github(
        "almaan/her2st",
        _HER2ST_COMMIT,
        {f: (_her2st_remote(f), h) for f, h in _SHA["her2st_patientA_app"].items()},
    ),
    "vizgen_mouse_brain_mini": _github(
        "drieslab/GiottoData",
        "1dc55ee8195104a81549b9e3fad04bd459b226de",
        {f: (_vizgen_remote(f), h) for f, h in _SHA["vizgen_mouse_brain_mini"].items()},
    ),
    "dbit_mouse_embryo_ffpe2": _github(
        "edicliuyang/DBiT-seq_FFPE",
        "e672765f0a1811833626c89369faecdd4043ce9a",
        {f: (f"Example_Data/{f}", h) for f, h in _SHA["dbit_mouse_embryo_ffpe2"].items()},
    ),
    "xenium_lung_he_ncbi858_tiny": _github(
        "ratschlab/DeepSpot",
        "b1aeaed815a03caf3e7a5e34a0e7a677561bbc3a",
        {f: (_XENIUM_REMOTE[f], h) for f, h in _SHA["xenium_lung_he_ncbi858_tiny"].items()},
    ),
}


class DataUnavailableError(FileNotFoundError):
    """A dataset file is neither in ``$STSR_DATA_DIR`` nor downloadable."""


def cache_dir() -> Path:
    """Directory where downloaded (and derived, e.g. converted) dataset files are kept.

    Returns
    -------
    ``$STSR_CACHE_DIR`` if set, else ``pooch.os_cache("stsr")``.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("stsr"))


def _download(url: str, sha256: str, folder: Path, fname: str) -> Path:
    """Download ``url`` to ``folder/fname`` with pooch, verifying its SHA-256 (replaced in tests)."""
    import pooch

    return Path(
        pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=fname, path=folder, progressbar=False)
    )


def data_path(dataset: str, filename: str) -> Path:
    """Path of one file of a real dataset, downloading it if needed.

    Parameters
    ----------
    dataset
        Dataset folder name, a key of :data:`REGISTRY` (e.g. ``"her2st"``).
    filename
        File path inside the dataset folder, e.g. ``"counts/C2.tsv.gz"``.

    Returns
    -------
    ``$STSR_DATA_DIR/<dataset>/<filename>`` if it exists; otherwise the file downloaded from its original public
    source into :func:`cache_dir` (SHA-256 verified).

    Raises
    ------
    KeyError
        If the dataset or file is not in :data:`REGISTRY`.
    DataUnavailableError
        If the file is not local and cannot be downloaded (offline, or a derived file with no public source).
    """
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = Path(data_dir) / dataset / filename
        if local.is_file():
            return local
    if dataset not in REGISTRY:
        raise KeyError(f"Unknown dataset {dataset!r}; known datasets: {sorted(REGISTRY)}.")
    if filename not in REGISTRY[dataset]:
        raise KeyError(
            f"Unknown file {filename!r} of dataset {dataset!r}; known files: {sorted(REGISTRY[dataset])}."
        )
    entry = REGISTRY[dataset][filename]
    where = f"${DATA_DIR_ENV}/{dataset}/{filename}" + ("" if data_dir else f" (${DATA_DIR_ENV} is not set)")
    if entry.url is None:
        raise DataUnavailableError(
            f"{dataset}/{filename} is a derived file with no public download; it was not found at {where}. "
            f"Set {DATA_DIR_ENV} to a data directory that contains it."
        )
    target = cache_dir() / dataset / filename
    try:  # pooch reuses a cached file whose hash matches, and downloads otherwise
        return _download(entry.url, entry.sha256, target.parent, target.name)
    except OSError as err:  # requests' errors are OSErrors; so are unwritable caches
        raise DataUnavailableError(
            f"{dataset}/{filename} was not found at {where} and could not be downloaded from {entry.url} "
            f"({type(err).__name__}: {err}). Set {DATA_DIR_ENV} to a local copy of the data, or connect to the "
            "internet."
        ) from err
